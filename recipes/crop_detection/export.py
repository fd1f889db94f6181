"""ONNX export of a crop_detection model for the sprayer: ``model.onnx`` + ``model.json``.

The ONNX graph is the whole torchvision detector, its own resize and normalisation included: it takes one
RGB image, float32 in [0, 1], shape (3, H, W) of any size, and returns ``boxes`` (N, 4; x0, y0, x1, y1 in the
input's pixels), ``labels`` (N; 1..K, index into ``class_names`` minus one) and ``scores`` (N).
"""

from __future__ import annotations

import json
from pathlib import Path


def export_onnx(module, out_dir: Path, image_size: list[int]) -> list[Path]:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    net = module.net.eval().cpu().float()
    height, width = image_size
    example = [torch.rand(3, height, width)]
    onnx_path = out_dir / "model.onnx"
    # The TorchScript-based exporter: torchvision's detectors (NMS, RoIAlign, data-dependent sizes) export
    # with it, and it needs no extra packages; the dynamo exporter does not handle them yet.
    torch.onnx.export(
        net, (example,), str(onnx_path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["boxes", "labels", "scores"],
        dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                      "labels": {0: "detections"}, "scores": {0: "detections"}},
    )
    transform = net.transform
    meta = {
        "format": "onnx",
        "model": module.hparams.model["name"],
        "class_names": module.class_names,
        "category_ids": module.hparams.data_info.get("category_ids"),
        "labels": "1..K; class name = class_names[label - 1] (0 is background and never returned)",
        "input": {"name": "image", "layout": "CHW", "dtype": "float32", "range": [0.0, 1.0], "channels": "RGB",
                  "example_size_hw": [height, width]},
        "inside_the_model": {"resize_min_size": list(getattr(transform, "min_size", [])),
                             "resize_max_size": getattr(transform, "max_size", None),
                             "normalize_mean": list(transform.image_mean), "normalize_std": list(transform.image_std)},
        "outputs": {"boxes": "float32 (N, 4) x0,y0,x1,y1 in input pixels", "labels": "int64 (N,)",
                    "scores": "float32 (N,)"},
        "score_threshold_recommended": module.hparams.score_threshold,
    }
    meta_path = out_dir / "model.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return [onnx_path, meta_path]
