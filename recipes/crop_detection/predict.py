"""`aift predict` for crop_detection: the boxes, classes and scores the detector finds in each image.

Each image is decoded as RGB and scaled to [0, 1] as the eval split is; the detector resizes and normalises it
itself (torchvision's transform, which the ONNX export keeps inside too). Boxes below the score threshold (the
recipe's ``score_threshold`` unless ``predict.score_threshold`` says otherwise) are left out; the sprayer's
decision is made on the rest.

Besides predictions.jsonl, the same boxes go to ``predictions.coco.json``: a COCO file (images by their path below
the input folder, annotations with a ``score``, the training data's categories) that CVAT, Label Studio or Roboflow
import as pre-annotations, and that `aift train` reads as a split once people have corrected it. With
``predict.draw=true`` each image is also written as a PNG with those boxes drawn (class and score), at its own size,
under ``pictures/``, by the same path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torchvision.transforms import v2

from aifactory_train.recipe import DataError
from aifactory_train.recipe import read_in_batches


# one colour per class, in the order of the class names (weeds and crops apart at a glance); repeats after 8
CLASS_COLOURS = ("red", "lime", "yellow", "cyan", "magenta", "orange", "white", "blue")


def read_image(path: Path) -> torch.Tensor:
    """The image as uint8 RGB (C, H, W); a file the decoder cannot read is named."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except Exception as err:  # noqa: BLE001 - name the file, whatever the decoder raised
        raise DataError(f"cannot decode '{path}': {err}") from err


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: list[int], scores: list[float],
                    names: list[str], path: Path) -> None:
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes

    if labels:  # (torchvision warns on an empty box list)
        image = draw_bounding_boxes(image, boxes, labels=[f"{names[l - 1]} {s:.2f}" for l, s in zip(labels, scores)],
                                    colors=[CLASS_COLOURS[(l - 1) % len(CLASS_COLOURS)] for l in labels], width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def predict_files(module, files: list[Path], batch_size: int, options: dict[str, Any]) -> Iterator[dict]:
    names, category_ids = module.class_names, list(module.hparams.data_info["category_ids"])
    score_threshold = options.get("score_threshold")
    threshold = module.hparams.score_threshold if score_threshold is None else score_threshold
    output_dir, input_root = Path(options["output_dir"]), Path(options["input_root"])
    coco = {"images": [], "annotations": [],
            "categories": [{"id": i, "name": name} for i, name in zip(category_ids, names)]}
    for chunk, decoded in read_in_batches(files, read_image, batch_size, options["num_workers"]):
        images = [v2.functional.to_dtype(image, torch.float32, scale=True).to(module.device) for image in decoded]
        for path, image, original, pred in zip(chunk, images, decoded, module.net(images)):
            keep = pred["scores"] >= threshold
            name = path.absolute().relative_to(input_root)  # (not resolved: a linked file keeps its name)
            if options.get("draw"):
                draw_detections(original, pred["boxes"][keep].float().cpu(), pred["labels"][keep].tolist(),
                                pred["scores"][keep].tolist(), names, output_dir / "pictures" / name.with_suffix(".png"))
            detections = []
            for (x0, y0, x1, y1), label, score in zip(pred["boxes"][keep].tolist(), pred["labels"][keep].tolist(),
                                                      pred["scores"][keep].tolist()):
                detections.append({"class": names[label - 1], "category_id": category_ids[label - 1], "score": score,
                                   "bbox": [x0, y0, x1 - x0, y1 - y0]})  # COCO: x, y, width, height in pixels
            width, height = int(image.shape[-1]), int(image.shape[-2])
            image_id = len(coco["images"]) + 1
            coco["images"].append({"id": image_id, "file_name": name.as_posix(), "width": width, "height": height})
            for d in detections:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id, "iscrowd": 0,
                                            "category_id": d["category_id"], "bbox": d["bbox"], "score": d["score"],
                                            "area": d["bbox"][2] * d["bbox"][3]})
            yield {"file": str(path), "width": width, "height": height, "score_threshold": threshold,
                   "detections": detections}
    (output_dir / "predictions.coco.json").write_text(json.dumps(coco) + "\n")
