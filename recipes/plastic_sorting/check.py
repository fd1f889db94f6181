"""`aift data check` for plastic_sorting: what the generic check cannot know (kept apart from the reader in data.py).

Image sizes come from file headers (PIL) or ``.npy`` headers (memory-mapped), at most ``SIZE_SAMPLE`` files per
split, evenly spread, so a check of a million images stays in minutes; the report says how many were measured."""

from __future__ import annotations

from pathlib import Path

from aifactory_train.recipe import DataDescription, Sample, SplitDescription

SIZE_SAMPLE = 2000


def _size(path: Path) -> tuple[int, int]:
    if path.suffix.lower() == ".npy":
        import numpy as np

        shape = np.load(path, mmap_mode="r").shape  # (bands, H, W)
        return int(shape[2]), int(shape[1])
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _rgb(path: Path):
    """uint8 (3, H, W) to look at: an image file as RGB, an array's first three bands stretched to 0..255."""
    import torch

    if path.suffix.lower() == ".npy":
        import numpy as np

        bands = np.load(path).astype(np.float32)[:3]
        bands = np.concatenate([bands] + [bands[:1]] * (3 - len(bands))) if len(bands) < 3 else bands
        low, high = float(bands.min()), float(bands.max())
        return torch.from_numpy(((bands - low) / max(high - low, 1e-6) * 255).astype(np.uint8))
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(str(path), mode=ImageReadMode.RGB)


def describe(datamodule, cheap: bool = False) -> DataDescription:
    root = Path(datamodule.root)
    names = list(datamodule.class_names)
    splits = {}
    for split, ds in datamodule.splits.items():
        paths = list(ds["path"])
        description = SplitDescription(count=len(paths), files=paths, labels=[[names[i]] for i in ds["label"]])
        if not cheap:
            step = max(1, len(paths) // SIZE_SAMPLE)
            description.image_sizes = [_size(root / p) for p in paths[::step]]
        splits[split] = description

    def sample(split: str, index: int) -> Sample:
        ds = datamodule.splits[split]
        return Sample(image=_rgb(root / ds[index]["path"]), caption=names[ds[index]["label"]])

    measured = sum(len(s.image_sizes or []) for s in splits.values())
    return DataDescription(splits=splits, class_names=names, label_unit="image", sample=sample,
                           notes=[] if cheap else [f"image sizes from the headers of {measured} file(s)"])
