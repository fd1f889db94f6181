"""Synthetic field-camera images: real JPEG files and COCO JSON, for demos and tests.

Soil-like backgrounds (brown noise with clods and tractor tracks) with crop plants (broad round rosettes in
rows, a light green) and weeds (thin spiky stars, a darker blue-green, anywhere), so a short CPU run learns
to tell them apart. Category ids are deliberately non-contiguous (3 = crop, 7 = weed), as exports from
CVAT/Label Studio often are, and about one image in eight has no plants at all (a valid negative).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aifactory_train.recipe import DataError
from aifactory_train.recipe import prepare_output_folder, write_datacard

CATEGORIES = [{"id": 3, "name": "crop", "supercategory": "plant"}, {"id": 7, "name": "weed", "supercategory": "plant"}]
SPLIT_FRACTIONS = {"train": 1.0, "val": 0.25, "test": 0.25}
DEFAULT_SIZE = 160
IMAGE_SIZE = 256
VARIANTS = ("coco",)


def _soil(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([110, 80, 55]) + rng.normal(0, 10, 3)
    coarse = rng.normal(0, 1, (size // 16 + 1, size // 16 + 1))
    coarse = np.kron(coarse, np.ones((16, 16)))[:size, :size]
    image = base[None, None, :] + 18 * coarse[..., None] + rng.normal(0, 9, (size, size, 3))
    if rng.random() < 0.5:  # a tractor track
        x = int(rng.integers(0, size))
        image[:, max(0, x - 6): x + 6] *= 0.8
    return image


def _draw_plant(draw, rng: np.random.Generator, kind: str, cx: float, cy: float, radius: float) -> list[float]:
    if kind == "crop":
        colour = tuple(int(c) for c in np.clip(np.array([90, 170, 60]) + rng.normal(0, 12, 3), 0, 255))
        for angle in np.linspace(0, 2 * np.pi, int(rng.integers(5, 8)), endpoint=False) + rng.uniform(0, 1):
            lx, ly = cx + 0.55 * radius * np.cos(angle), cy + 0.55 * radius * np.sin(angle)
            r = 0.45 * radius
            draw.ellipse([lx - r, ly - r, lx + r, ly + r], fill=colour)
        draw.ellipse([cx - 0.3 * radius, cy - 0.3 * radius, cx + 0.3 * radius, cy + 0.3 * radius], fill=colour)
    else:
        colour = tuple(int(c) for c in np.clip(np.array([40, 110, 80]) + rng.normal(0, 10, 3), 0, 255))
        for angle in np.linspace(0, 2 * np.pi, int(rng.integers(6, 11)), endpoint=False) + rng.uniform(0, 1):
            length = radius * rng.uniform(0.7, 1.0)
            draw.line([cx, cy, cx + length * np.cos(angle), cy + length * np.sin(angle)], fill=colour, width=3)
    return [cx - radius, cy - radius, 2 * radius, 2 * radius]


def make_image(rng: np.random.Generator, size: int = IMAGE_SIZE):
    """One image (uint8 HxWx3) and its objects [(category_id, [x, y, w, h]), ...]."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.clip(_soil(rng, size), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects = []
    if rng.random() >= 0.125:
        row_y = rng.uniform(0.3, 0.7) * size
        for x in np.arange(rng.uniform(20, 50), size - 20, rng.uniform(60, 90)):
            radius = rng.uniform(14, 22)
            y = row_y + rng.normal(0, 6)
            objects.append((3, _draw_plant(draw, rng, "crop", x, y, radius)))
        for _ in range(int(rng.integers(1, 5))):
            radius = rng.uniform(11, 18)
            x, y = rng.uniform(radius, size - radius, 2)
            objects.append((7, _draw_plant(draw, rng, "weed", x, y, radius)))
    clipped = []
    for category, (x, y, w, h) in objects:
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(size), x + w), min(float(size), y + h)
        clipped.append((category, [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]))
    return np.asarray(image), clipped


def synthesize(out: str | Path, size: int | None = None, seed: int = 0, variant: str | None = None,
               overwrite: bool = False) -> Path:
    """Write ``images/<split>/*.jpg`` and ``annotations/<split>.json`` (COCO) under ``out``."""
    from PIL import Image

    variant = variant or "coco"
    if variant not in VARIANTS:
        raise DataError(f"--variant '{variant}' is not valid for crop_detection; valid variants: {', '.join(VARIANTS)}")
    size = DEFAULT_SIZE if size is None else size
    if size < 2:
        raise DataError(f"--size {size} is too small: at least 2 training images are needed")
    out = prepare_output_folder(out, overwrite, owned=("images", "annotations"))
    rng = np.random.default_rng(seed)
    annotation_id = 1
    for split, fraction in SPLIT_FRACTIONS.items():
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(max(2, int(round(size * fraction)))):
            pixels, objects = make_image(rng)
            name = f"{split}_{index:05d}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=92)
            images.append({"id": index + 1, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
            for category, box in objects:
                annotations.append({"id": annotation_id, "image_id": index + 1, "category_id": category, "bbox": box,
                                    "area": round(box[2] * box[3], 2), "iscrowd": 0})
                annotation_id += 1
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (out / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    card = {
        "name": "crop_detection synthetic field images",
        "owner": "AI Factory Groningen (generated demo data)",
        "license": "CC0-1.0",
        "consent": "not applicable: synthetic images, no farm or person data",
        "source": f"aift data synth crop_detection --size {size} --seed {seed}",
        "description": "Crops in rows and weeds on soil, 256 px JPEG, COCO boxes; category ids 3=crop, 7=weed",
    }
    write_datacard(out, card)
    return out
