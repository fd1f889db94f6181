"""ONNX export: ``model.onnx`` (normalisation inside, dynamic batch, height and width) + ``model.json``.

The graph takes RGB tiles as the orthophoto holds them, scaled to [0, 1]: float32 (N, 3, H, W), H and W multiples
of 32 (the encoder halves them five times at most). It returns ``logits`` and ``probabilities`` (N, K, H, W).
``model.json`` says how the caller tiles a large raster as ``aift predict`` does (tile size, overlap, blending)
and which CRS the training data were in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class DeployableSegmenter(torch.nn.Module):
    """The trained network with its input normalisation in front and a softmax behind (predict and ONNX)."""

    def __init__(self, net: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor):
        logits = self.net((image - self.mean) / self.std)
        return logits, logits.softmax(dim=1)


def export_onnx(module, out_dir: Path, options: dict[str, Any]) -> list[Path]:
    from aifactory_train.recipe import ConfigError

    info = module.hparams.data_info
    tile = int(options.get("tile_size") or info["tile_size"])
    overlap = int(options.get("overlap", 0) or 0)
    if tile % 32 or tile < 32:
        raise ConfigError(f"config key 'export.tile_size': {tile} is not valid; valid: a multiple of 32, >= 32")
    if not 0 <= overlap < tile:
        raise ConfigError(f"config key 'export.overlap': {overlap} is not valid; valid: 0 <= overlap < tile_size "
                          f"({tile})")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = DeployableSegmenter(module.net.eval().cpu().float(), info["mean"], info["std"]).eval()
    onnx_path = out_dir / "model.onnx"
    # the TorchScript-based exporter, as the other recipes: smp's U-Net traces as it is
    torch.onnx.export(model, (torch.rand(1, 3, tile, tile),), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits", "probabilities"],
                      dynamic_axes={name: {0: "batch", 2: "height", 3: "width"}
                                    for name in ("image", "logits", "probabilities")})
    meta = {
        "format": "onnx",
        "model": f"{module.hparams.model['name']}-{module.hparams.model.get('encoder')}",
        "class_names": module.class_names,
        "nodata_value": info["ignore_index"],
        "input": {"name": "image", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0],
                  "channels": ["red", "green", "blue"], "height_width": "dynamic, multiples of 32"},
        "inside_the_model": {"normalize_mean": list(info["mean"]), "normalize_std": list(info["std"])},
        "outputs": {"logits": "float32 (N, K, H, W)", "probabilities": "float32 (N, K, H, W), softmax over K",
                    "classes": "K = len(class_names), in that order"},
        "tiling": {"tile_size": tile, "overlap": overlap, "training_tile_size": info["tile_size"],
                   "blend": "logits of overlapping tiles averaged with weights ramping linearly over the overlap "
                            "(as aift predict does), then argmax"},
        "crs": {"training_crs": info.get("crs"),
                "expects": "rasters in the training CRS at the training pixel size; the output mask takes the "
                           "input's CRS and transform"},
    }
    meta_path = out_dir / "model.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return [onnx_path, meta_path]
