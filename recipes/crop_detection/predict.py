"""`aift predict` for crop_detection: the boxes, classes and scores the detector finds in each image.

Each image is decoded as RGB and scaled to [0, 1] as the eval split is; the detector resizes and normalises it
itself (torchvision's transform, which the ONNX export keeps inside too). Boxes below the score threshold (the
recipe's ``score_threshold`` unless ``predict.score_threshold`` says otherwise) are left out; the sprayer's
decision is made on the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torchvision.transforms import v2

from aifactory_train.errors import DataError


def read_image(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as err:  # noqa: BLE001 - name the file, whatever the decoder raised
        raise DataError(f"cannot decode '{path}': {err}") from err
    return v2.functional.to_dtype(image, torch.float32, scale=True)


def predict_files(module, files: list[Path], batch_size: int, score_threshold: float | None) -> Iterator[dict]:
    names, category_ids = module.class_names, list(module.hparams.data_info["category_ids"])
    threshold = module.hparams.score_threshold if score_threshold is None else score_threshold
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = [read_image(path).to(module.device) for path in chunk]
        for path, image, pred in zip(chunk, images, module.net(images)):
            keep = pred["scores"] >= threshold
            detections = []
            for (x0, y0, x1, y1), label, score in zip(pred["boxes"][keep].tolist(), pred["labels"][keep].tolist(),
                                                      pred["scores"][keep].tolist()):
                detections.append({"class": names[label - 1], "category_id": category_ids[label - 1], "score": score,
                                   "bbox": [x0, y0, x1 - x0, y1 - y0]})  # COCO: x, y, width, height in pixels
            yield {"file": str(path), "width": int(image.shape[-1]), "height": int(image.shape[-2]),
                   "score_threshold": threshold, "detections": detections}
