"""The benchmark adapter of this recipe (``aift bench recipes``, benchmarks/recipe_step.py): object detection
with a torchvision detector, AdamW, gradient clipping at 10 (the recipe's defaults); the same model and batch in
the recipe's Lightning step and in a plain PyTorch loop (``BenchAdapter`` in aifactory_train/recipe.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from aifactory_train.recipe import BENCH_OPTIM, import_onnxruntime, loader_rate, median_ms, model_config

METRICS = {
    "ratio": ("recipe/plain samples/s", False),
    "samples_per_s": ("recipe samples/s", False),
    "mfu": ("recipe model FLOP/s / peak", True),
    "joules_per_sample": ("GPU energy / samples", True),
    "samples_per_s_per_watt": ("performance per watt: samples / GPU energy", True),
    "data_wait_fraction": ("share of step time waiting for data (real files)", False),
}
# benchmarks/recipe_step.py's defaults (CPU: Faster R-CNN MobileNetV3 320, batch 4)
DEFAULTS = {"model": "fasterrcnn_mobilenet_v3_large_320_fpn", "batch_size": 4, "image_size": 256, "steps": 10}


def settings(gpu: bool, quick: bool) -> dict:
    if gpu:
        return dict(model="fasterrcnn_resnet50_fpn_v2", batch_size=16, image_size=640, warmup=3, split_steps=20)
    return dict(model="fasterrcnn_mobilenet_v3_large_320_fpn", batch_size=2 if quick else 4, image_size=256,
                warmup=1 if quick else 2, split_steps=2 if quick else 8)


def build(args, device):
    return Bench(args, device)


class Bench:
    optim = {**BENCH_OPTIM, "lr": 0.001, "weight_decay": 0.0001}
    clip = 10.0

    def __init__(self, args, device):
        import numpy as np

        from .synth import make_image

        self.args, self.device = args, device
        rng = np.random.default_rng(0)
        self.batches = []
        for _ in range(4):
            images, targets = [], []
            for _ in range(args.batch_size):
                pixels, objects = make_image(rng, args.image_size)
                images.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).to(device))
                boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objects], dtype=torch.float32).reshape(-1, 4)
                labels = torch.tensor([1 if c == 3 else 2 for c, _ in objects], dtype=torch.int64)
                targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
            self.batches.append((images, targets))
        self.model_cfg = model_config(args.model)

    @property
    def channels_last(self) -> bool:
        """--channels-last auto|true|false (default false, as the model configs)."""
        setting = getattr(self.args, "channels_last", None) or "false"
        return self.device.type == "cuda" if setting == "auto" else setting == "true"

    def module(self):
        from .module import CropDetectionModule

        model = {**self.model_cfg, "channels_last": self.channels_last, "compile_backbone": self.args._compile}
        module = CropDetectionModule(model=model, optim=self.optim, loss={},
                                     data_info={"class_names": ["crop", "weed"], "category_ids": [3, 7]})
        return module, self.clip

    def plain(self):
        from .model import build_detector

        cfg = self.model_cfg
        net = build_detector(cfg["name"], 3, min_size=cfg.get("min_size"), max_size=cfg.get("max_size"),
                             anchor_sizes=cfg.get("anchor_sizes"), extra=cfg.get("extra")).to(self.device).train()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.args._compile:
            net.backbone.compile()

        def step(batch):
            images, targets = batch
            return sum(net(images, targets).values())

        return net, step, self.clip

    def datamodule(self, workers: int):
        """The recipe's DataModule on freshly synthesised real files (12 batches' worth)."""
        from .data import CropDetectionDataModule
        from .synth import synthesize

        root = synthesize(Path(tempfile.mkdtemp()) / "crops", size=max(self.args.batch_size * 12, 96), seed=0)
        splits = {s: {"annotations": f"annotations/{s}.json", "images": f"images/{s}"} for s in ("train", "val")}
        return CropDetectionDataModule(root=str(root), splits=splits, batch_size=self.args.batch_size, num_workers=workers)

    def input_pipeline(self, workers: int) -> dict:
        return loader_rate(self.datamodule(workers), workers)

    def onnx_latency(self) -> dict:
        """CPU latency at batch 1 of the exported model (onnxruntime) and of the same model in eager PyTorch."""
        from .export import export_onnx

        onnxruntime = import_onnxruntime()
        module, _ = self.module()
        out = Path(tempfile.mkdtemp())
        export_onnx(module, out, [self.args.image_size, self.args.image_size])
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        image = self.batches[0][0][0].cpu()
        net = module.net.eval().cpu()
        return {"input_hw": list(image.shape[1:]), "threads": torch.get_num_threads(),
                "onnxruntime_ms": median_ms(lambda: session.run(None, {"image": image.numpy()})),
                "pytorch_eager_ms": median_ms(lambda: net([image]))}
