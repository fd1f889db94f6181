"""`aift data check` for infrastructure_segmentation: the tiles the model is evaluated on, per split.

An example is a ``data.tile_size`` window of a raster (or PNG) on the evaluation grid, read through the same reader
as training (``Source.read``: windowed reads, polygons rasterised, nodata as ``data.ignore_index``), so memory
stays bounded on large rasters. Per window: its classes (a class counts the windows that hold it: ``label_unit``
"window"), and a SHA-256 of its image pixels, so that the same imagery in two splits shows as leakage even when the
files differ (a tile cut twice from one orthophoto). Pixel counts per class and nodata go to the counters: thin
classes (manholes, cables) are rare in pixels, which the loss's class weights are for.

With ``cheap`` (the check before a job is queued) no pixel is read: windows are counted from the raster sizes.
"""

from __future__ import annotations

import hashlib

import numpy as np

from aifactory_train.recipe import DataDescription, Sample, SplitDescription

from .data import grid_windows
from .predict import tint


def describe(datamodule, cheap: bool = False) -> DataDescription:
    size, ignore, classes = datamodule.tile_size, datamodule.ignore_index, datamodule.classes
    splits = {}
    for split, sources in datamodule.sources.items():
        windows = grid_windows(sources, size)
        sizes = [(source.width, source.height) for source in sources]
        names = [source.image.relative_to(datamodule.root).as_posix() for source in sources]
        ids = [f"{names[i]} @ row {row} col {col}" for i, row, col in windows]
        if cheap:
            splits[split] = SplitDescription(count=len(windows), record_ids=ids, image_sizes=sizes)
            continue
        labels, hashes = [], []
        pixels = np.zeros(256, dtype=np.int64)
        for i, row, col in windows:
            image, mask = sources[i].read(row, col, size, ignore)
            counts = np.bincount(mask.ravel(), minlength=256)
            pixels += counts
            labels.append([classes[v] for v in np.flatnonzero(counts[:len(classes)])])
            hashes.append(hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest())
        counters = {f"pixels {name}": int(pixels[v]) for v, name in enumerate(classes)}
        counters["pixels nodata (ignored)"] = int(pixels[ignore])
        splits[split] = SplitDescription(count=len(windows), record_ids=ids, record_hashes=hashes, labels=labels,
                                         image_sizes=sizes, counters=counters)

    def sample(split: str, index: int) -> Sample:
        import torch

        i, row, col = grid_windows(datamodule.sources[split], size)[index]
        image, mask = datamodule.sources[split][i].read(row, col, size, ignore)
        present = [classes[v] for v in np.unique(mask) if v < len(classes) and v > 0]
        return Sample(image=torch.from_numpy(tint(image.transpose(1, 2, 0), mask, ignore).transpose(2, 0, 1).copy()),
                      caption=", ".join(present) or "background only")

    return DataDescription(splits=splits, class_names=list(classes), label_unit="window",
                           sample=None if cheap else sample,
                           notes=[f"an example is a {size} px window on the evaluation grid (data.tile_size); a class "
                                  f"counts the windows that hold it; pixel counts are in the counters",
                                  f"data.format={datamodule.format}, CRS {datamodule.crs or 'none (PNG folders)'}"])
