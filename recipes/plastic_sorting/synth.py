"""Synthetic plastic-sorting images: real PNG (RGB) or .npy (RGB + NIR) files in the imagefolder layout.

Each class has a learnable signature (a colour, a shape, and for multispectral a near-infrared
reflectance level, as real plastics differ in NIR) on a noisy conveyor-belt background, with random
position, size, rotation, colour jitter and noise, so a short CPU run learns it but not trivially.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aifactory_train.recipe import DataError
from aifactory_train.recipe import prepare_output_folder, write_datacard

# class name -> (RGB colour, shape, NIR reflectance)
CLASSES = {
    "PET": ((90, 160, 220), "bottle", 0.85),
    "HDPE": ((235, 235, 225), "jug", 0.65),
    "PVC": ((70, 70, 80), "pipe", 0.20),
    "LDPE": ((120, 200, 120), "film", 0.75),
    "PP": ((210, 60, 50), "cap", 0.55),
    "PS": ((235, 200, 60), "tray", 0.40),
    "other": ((150, 100, 170), "triangle", 0.30),
}
SPLIT_FRACTIONS = {"train": 1.0, "val": 0.25, "test": 0.25}
VARIANTS = ("rgb", "multispectral")
DEFAULT_SIZE = 560
IMAGE_SIZE = 64


def _draw_item(rng: np.random.Generator, shape: str, size: int):
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c = size / 2
    s = size * rng.uniform(0.25, 0.38)
    if shape == "bottle":
        draw.ellipse([c - s * 0.45, c - s, c + s * 0.45, c + s], fill=255)
        draw.rectangle([c - s * 0.15, c - s * 1.25, c + s * 0.15, c - s * 0.8], fill=255)
    elif shape == "jug":
        draw.rounded_rectangle([c - s * 0.8, c - s * 0.8, c + s * 0.8, c + s * 0.8], radius=s * 0.3, fill=255)
    elif shape == "pipe":
        draw.rectangle([c - s * 1.2, c - s * 0.25, c + s * 1.2, c + s * 0.25], fill=255)
    elif shape == "film":
        points = [(c + s * r * np.cos(a), c + s * r * np.sin(a))
                  for a, r in zip(np.linspace(0, 2 * np.pi, 9)[:-1], rng.uniform(0.6, 1.2, 8))]
        draw.polygon(points, fill=255)
    elif shape == "cap":
        draw.ellipse([c - s * 0.6, c - s * 0.6, c + s * 0.6, c + s * 0.6], fill=255)
    elif shape == "tray":
        draw.rectangle([c - s, c - s * 0.7, c + s, c + s * 0.7], fill=255)
        draw.rectangle([c - s * 0.6, c - s * 0.35, c + s * 0.6, c + s * 0.35], fill=128)
    else:
        draw.polygon([(c, c - s), (c + s, c + s * 0.8), (c - s, c + s * 0.8)], fill=255)
    mask = mask.rotate(rng.uniform(0, 360), translate=tuple(rng.integers(-size // 6, size // 6, 2)))
    return np.asarray(mask, dtype=np.float32) / 255.0


def make_sample(rng: np.random.Generator, class_name: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """One item on a belt: uint8 array (4, H, W) with R, G, B and NIR bands."""
    colour, shape, nir = CLASSES[class_name]
    belt = rng.uniform(60, 110)
    background = np.full((4, size, size), belt, dtype=np.float32)
    background[3] = 255 * 0.3
    background += rng.normal(0, 12, background.shape)
    alpha = _draw_item(rng, shape, size)[None]
    item = np.empty((4, 1, 1), dtype=np.float32)
    item[:3, 0, 0] = np.clip(np.array(colour) + rng.normal(0, 18, 3), 0, 255)
    item[3] = 255 * np.clip(nir + rng.normal(0, 0.05), 0, 1)
    image = background * (1 - alpha) + item * alpha
    image += rng.normal(0, 10, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def synthesize(out: str | Path, size: int | None = None, seed: int = 0, variant: str | None = None,
               overwrite: bool = False) -> Path:
    """Write train/val/test splits under ``out`` (``size`` training images, val/test a quarter each)."""
    from PIL import Image

    variant = variant or "rgb"
    if variant not in VARIANTS:
        raise DataError(f"--variant '{variant}' is not valid for plastic_sorting; valid variants: {', '.join(VARIANTS)}")
    size = DEFAULT_SIZE if size is None else size
    if size < len(CLASSES):
        raise DataError(f"--size {size} is too small: at least one image per class ({len(CLASSES)}) is needed")
    out = prepare_output_folder(out, overwrite, owned=tuple(SPLIT_FRACTIONS))
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    for split, fraction in SPLIT_FRACTIONS.items():
        count = max(len(names), int(round(size * fraction)))
        for index in range(count):
            class_name = names[index % len(names)]
            folder = out / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            sample = make_sample(rng, class_name)
            if variant == "rgb":
                Image.fromarray(sample[:3].transpose(1, 2, 0)).save(folder / f"{split}_{index:05d}.png")
            else:
                np.save(folder / f"{split}_{index:05d}.npy", sample)
    card = {
        "name": f"plastic_sorting synthetic ({variant})",
        "owner": "AI Factory Groningen (generated demo data)",
        "license": "CC0-1.0",
        "consent": "not applicable: synthetic images, no people or company data",
        "source": f"aift data synth plastic_sorting --size {size} --seed {seed} --variant {variant}",
        "description": "Plastic items on a conveyor belt; bands: " + ("R,G,B" if variant == "rgb" else "R,G,B,NIR"),
    }
    write_datacard(out, card)
    return out
