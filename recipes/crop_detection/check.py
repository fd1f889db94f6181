"""`aift data check` for crop_detection: images, boxes and their classes as the reader produced them (kept apart
from the reader in data.py). Sizes come from the reader (it reads every image header), so nothing is read again."""

from __future__ import annotations

from pathlib import Path

from aifactory_train.recipe import DataDescription, Sample, SplitDescription


def describe(datamodule, cheap: bool = False) -> DataDescription:
    root = Path(datamodule.root)
    name_of = dict(zip(datamodule.category_ids, datamodule.class_names))
    splits = {}
    for split, ds in datamodule.splits.items():
        labels = [[name_of[c] for c in ids] for ids in ds["category_ids"]]
        boxes = [(name_of[c], x1 - x0, y1 - y0)
                 for per_image, ids in zip(ds["boxes"], ds["category_ids"])
                 for (x0, y0, x1, y1), c in zip(per_image, ids)]
        splits[split] = SplitDescription(count=len(ds), files=list(ds["file"]), labels=labels, boxes=boxes,
                                         image_sizes=list(zip(ds["width"], ds["height"])))

    def sample(split: str, index: int) -> Sample:
        from torchvision.io import ImageReadMode, decode_image

        record = datamodule.splits[split][index]
        names = [name_of[c] for c in record["category_ids"]]
        return Sample(image=decode_image(str(root / record["file"]), mode=ImageReadMode.RGB),
                      caption=f"{len(names)} box(es)", boxes=[list(b) for b in record["boxes"]], box_labels=names)

    # boxes the reader dropped or clipped (no area, outside the image), counted over all splits
    invalid = {f"boxes {reason.replace('_', ' ')}": count for reason, count in datamodule.box_counts.items()}
    return DataDescription(splits=splits, class_names=list(datamodule.class_names), label_unit="box", sample=sample,
                           invalid=invalid)
