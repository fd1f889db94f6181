"""The benchmark adapter of this recipe (``aift bench recipes``, benchmarks/recipe_step.py): image
classification with a torchvision classifier, AdamW, label smoothing, channels_last on GPU; the same model and
batch in the recipe's Lightning step and in a plain PyTorch loop (``BenchAdapter`` in aifactory_train/recipe.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from aifactory_train.recipe import BENCH_OPTIM, build_torchvision_classifier, import_onnxruntime, loader_rate, median_ms

# summary metrics a profile may set thresholds on, without the "<recipe>_" prefix: -> (what, needs a GPU)
METRICS = {
    "ratio": ("recipe/plain samples/s", False),
    "samples_per_s": ("recipe samples/s", False),
    "mfu": ("recipe model FLOP/s / peak", True),
    "joules_per_sample": ("GPU energy / samples", True),
    "samples_per_s_per_watt": ("performance per watt: samples / GPU energy", True),
    "data_wait_fraction": ("share of step time waiting for data (real files)", False),
}
# benchmarks/recipe_step.py's defaults (CPU: resnet18, 64 px, batch 32)
DEFAULTS = {"model": "resnet18", "batch_size": 32, "image_size": 64, "steps": 20}


def settings(gpu: bool, quick: bool) -> dict:
    """The shape `aift bench recipes` measures; split_steps: the timed steps of the run on real files."""
    if gpu:
        return dict(model="resnet50", batch_size=256, image_size=224, warmup=10, split_steps=40)
    return dict(model="resnet18", batch_size=16 if quick else 32, image_size=64, warmup=2 if quick else 5,
                split_steps=5 if quick else 20)


def image_files(files: int) -> Path:
    """A folder of ``files`` synthetic PNG files (the micro suite's data-loading measurement)."""
    from .synth import synthesize

    return synthesize(Path(tempfile.mkdtemp()) / "images", size=files, seed=0)


def image_datamodule(root: Path, image_size: int, batch_size: int, workers: int):
    """The recipe's DataModule (decode + augment in workers) on ``image_files``."""
    from .data import PlasticSortingDataModule

    return PlasticSortingDataModule(root=str(root), image_size=image_size, batch_size=batch_size,
                                    num_workers=workers, verify_files=False)


def build(args, device):
    return Bench(args, device)


class Bench:
    classes = 7

    def __init__(self, args, device):
        self.args, self.device = args, device
        gen = torch.Generator().manual_seed(0)
        self.batches = [
            (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device),
             torch.randint(0, self.classes, (args.batch_size,), generator=gen).to(device))
            for _ in range(8)
        ]

    def module(self):
        from .module import PlasticSortingModule

        model = {"name": self.args.model, "weights_path": None, "channels_last": "auto", "compile": self.args._compile}
        info = {"class_names": [f"c{i}" for i in range(self.classes)], "channels": ["r", "g", "b"],
                "image_size": self.args.image_size, "mean": [0.5] * 3, "std": [0.25] * 3}
        return PlasticSortingModule(model=model, optim=BENCH_OPTIM, loss={"label_smoothing": 0.1}, data_info=info), None

    def plain(self):
        """(parameters, step function) of the hand-written loop: the same model, loss, autocast as the recipe."""
        net = build_torchvision_classifier(self.args.model, self.classes).to(self.device)
        channels_last = self.device.type == "cuda"
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.args._compile:
            net.compile()
        net.train()

        def step(batch):
            images, labels = batch
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            return F.cross_entropy(net(images), labels, label_smoothing=0.1)

        return net, step, None

    def datamodule(self, workers: int):
        """The recipe's DataModule on freshly synthesised real files (12 batches' worth)."""
        root = image_files(max(self.args.batch_size * 12, 560))
        return image_datamodule(root, self.args.image_size, self.args.batch_size, workers)

    def input_pipeline(self, workers: int) -> dict:
        return loader_rate(self.datamodule(workers), workers)

    def onnx_latency(self) -> dict:
        """CPU latency at batch 1 of the exported model (onnxruntime) and of the same model in eager PyTorch."""
        from .export import DeployableClassifier, export_onnx

        onnxruntime = import_onnxruntime()
        module, _ = self.module()
        out = Path(tempfile.mkdtemp())
        export_onnx(module, out)
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        image = torch.rand(1, 3, self.args.image_size, self.args.image_size)
        eager = DeployableClassifier(module.net.eval().cpu(), [0.5] * 3, [0.25] * 3).eval()
        return {"input_hw": list(image.shape[2:]), "threads": torch.get_num_threads(),
                "onnxruntime_ms": median_ms(lambda: session.run(None, {"image": image.numpy()})),
                "pytorch_eager_ms": median_ms(lambda: eager(image))}
