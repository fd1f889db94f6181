"""The benchmark adapter of this recipe (``aift bench recipes``, benchmarks/recipe_step.py): semantic segmentation
with the recipe's smp U-Net, cross-entropy + Dice with class weights, AdamW, channels_last on GPU; the same model
and batch of tiles in the recipe's Lightning step and in a plain PyTorch loop (``BenchAdapter`` in
aifactory_train/recipe.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from aifactory_train.recipe import BENCH_OPTIM, import_onnxruntime, loader_rate, median_ms

METRICS = {
    "ratio": ("recipe/plain samples/s", False),
    "samples_per_s": ("recipe tiles/s", False),
    "mfu": ("recipe model FLOP/s / peak", True),
    "data_wait_fraction": ("share of step time waiting for data (windowed GeoTIFF reads)", False),
}
# the CPU default of the recipe: U-Net, MobileNetV3-small encoder cut at depth 3, 64 px tiles, batch 16
DEFAULTS = {"model": "tu-mobilenetv3_small_100", "batch_size": 16, "image_size": 64, "steps": 20}
CLASSES = ["background", "road", "cable_trench", "manhole", "building"]
WEIGHTS = [0.5, 1.0, 3.0, 10.0, 1.0]
IGNORE = 255


def settings(gpu: bool, quick: bool) -> dict:
    if gpu:  # experiment infrastructure_segmentation_gpu: ResNet-34 U-Net, 512 px tiles, batch 32
        return dict(model="resnet34", batch_size=32, image_size=512, warmup=10, split_steps=40)
    return dict(model="tu-mobilenetv3_small_100", batch_size=8 if quick else 16, image_size=64,
                warmup=2 if quick else 5, split_steps=5 if quick else 20)


def model_config(args) -> dict:
    deep = args.model.startswith("resnet")
    return {"name": "unet", "encoder": args.model, "encoder_depth": 5 if deep else 3,
            "decoder_channels": [256, 128, 64, 32, 16] if deep else [64, 32, 16], "weights_path": None,
            "channels_last": "auto", "compile": args._compile}


def build(args, device):
    return Bench(args, device)


class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        gen = torch.Generator().manual_seed(0)
        size = args.image_size
        self.batches = []
        for _ in range(8):
            masks = torch.randint(0, len(CLASSES), (args.batch_size, size, size), generator=gen)
            masks[:, :2] = IGNORE  # a nodata edge, as orthophotos have
            self.batches.append((torch.randn(args.batch_size, 3, size, size, generator=gen).to(device),
                                 masks.to(device)))

    def module(self):
        from .module import InfrastructureSegmentationModule

        info = {"class_names": CLASSES, "ignore_index": IGNORE, "tile_size": self.args.image_size,
                "mean": [0.5] * 3, "std": [0.25] * 3, "crs": None, "format": "geotiff"}
        module = InfrastructureSegmentationModule(model=model_config(self.args), optim=BENCH_OPTIM,
                                                  loss={"class_weights": WEIGHTS, "dice_weight": 1.0}, data_info=info)
        return module, None

    def plain(self):
        import segmentation_models_pytorch as smp

        from .model import build_net

        net = build_net(model_config(self.args), len(CLASSES)).to(self.device)
        channels_last = self.device.type == "cuda"
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.args._compile:
            net.compile()
        net.train()
        weights = torch.tensor(WEIGHTS, device=self.device)
        dice = smp.losses.DiceLoss("multiclass", ignore_index=IGNORE)

        def step(batch):
            images, masks = batch
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = net(images).float()
            return F.cross_entropy(logits, masks, weight=weights, ignore_index=IGNORE) + dice(logits, masks)

        return net, step, None

    def datamodule(self, workers: int):
        """The recipe's DataModule on a freshly synthesised orthophoto (windowed GeoTIFF reads)."""
        from .data import InfrastructureSegmentationDataModule
        from .synth import synthesize

        root = synthesize(Path(tempfile.mkdtemp()) / "ortho", size=512, seed=0)
        return InfrastructureSegmentationDataModule(str(root), format="geotiff", classes=CLASSES,
                                                    tile_size=self.args.image_size, train_tiles=self.args.batch_size * 12,
                                                    batch_size=self.args.batch_size, num_workers=workers)

    def input_pipeline(self, workers: int) -> dict:
        return loader_rate(self.datamodule(workers), workers)

    def onnx_latency(self) -> dict:
        """CPU latency of one tile through the exported model (onnxruntime) and eager PyTorch."""
        from .export import DeployableSegmenter, export_onnx

        onnxruntime = import_onnxruntime()
        module, _ = self.module()
        out = Path(tempfile.mkdtemp())
        export_onnx(module, out, {"tile_size": self.args.image_size, "overlap": 0})
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        image = torch.rand(1, 3, self.args.image_size, self.args.image_size)
        eager = DeployableSegmenter(module.net.eval().cpu(), [0.5] * 3, [0.25] * 3).eval()
        return {"input_hw": list(image.shape[2:]), "threads": torch.get_num_threads(),
                "onnxruntime_ms": median_ms(lambda: session.run(None, {"image": image.numpy()})),
                "pytorch_eager_ms": median_ms(lambda: eager(image))}
