"""ONNX export of a plastic_sorting classifier for the sorting line: ``model.onnx`` + ``model.json``.

The graph takes a batch of images as the camera gives them after resizing: float32 in [0, 1], shape
(N, C, S, S) with the training's bands in order (``channels``) and size ``S``; the normalisation the model was
trained with is inside it, so the line's software does not have to repeat it. It returns ``logits`` and
``probabilities`` (N, K), K = ``class_names``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class DeployableClassifier(torch.nn.Module):
    """The trained network with its input normalisation in front and a softmax behind."""

    def __init__(self, net: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor):
        logits = self.net((image - self.mean) / self.std)
        return logits, logits.softmax(dim=1)


def training_normalisation(info: dict) -> tuple[list[float], list[float]]:
    """The (mean, std) a checkpoint was trained with, from its ``data_info``."""
    from aifactory_train.recipe import CheckpointError

    if "mean" not in info or "std" not in info:
        raise CheckpointError("ckpt_path: this plastic_sorting checkpoint does not record the normalisation it was "
                              "trained with (data_info.mean/std; written before export existed); train it again to "
                              "export it or predict with it")
    return list(info["mean"]), list(info["std"])


def export_onnx(module, out_dir: Path) -> list[Path]:
    info = module.hparams.data_info
    training_normalisation(info)
    out_dir.mkdir(parents=True, exist_ok=True)
    channels, size = list(info["channels"]), int(info["image_size"])
    model = DeployableClassifier(module.net.eval().cpu().float(), info["mean"], info["std"]).eval()
    onnx_path = out_dir / "model.onnx"
    # the TorchScript-based exporter, as for crop_detection: no extra packages, and torchvision's classifiers
    # export with it as they are
    torch.onnx.export(model, (torch.rand(2, len(channels), size, size),), str(onnx_path), dynamo=False,
                      opset_version=17, input_names=["image"], output_names=["logits", "probabilities"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}})
    meta = {
        "format": "onnx",
        "model": module.hparams.model["name"],
        "class_names": module.class_names,
        "input": {"name": "image", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0], "channels": channels,
                  "size_hw": [size, size],
                  "resize": "to size_hw as validation did: torchvision Resize (bilinear, antialias), no crop"},
        "inside_the_model": {"normalize_mean": list(info["mean"]), "normalize_std": list(info["std"])},
        "outputs": {"logits": "float32 (N, K)", "probabilities": "float32 (N, K), softmax of logits",
                    "classes": "K = len(class_names), in that order"},
    }
    meta_path = out_dir / "model.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return [onnx_path, meta_path]
