"""`aift predict` for infrastructure_segmentation: large rasters, tile by tile, into a map.

Each input raster (GeoTIFF, or PNG/JPEG) is cut into tiles of ``predict.tile_size`` px that overlap by
``predict.overlap`` px on a grid fixed by the raster (not by the blocks below); the model's logits of overlapping
tiles are blended with weights that ramp linearly over the overlap, so no seams show, and the argmax is the class.
The output is made ``predict.block_size`` px square at a time: only the tiles that touch a block are read (rasterio
windowed reads) and only that block's logits are held, so memory stays bounded on any raster size
(benchmarks/infrastructure_segmentation_predict_rss.py measures it).

Per raster, under the output folder (its path relative to the input folder):

* ``<name>_mask.tif`` — class indices, uint8, tiled and compressed, with the input's CRS and transform; the input's
  nodata becomes 255 (its nodata value);
* ``<name>_polygons.geojson`` — one polygon per connected area of a class (background left out), simplified by
  ``predict.simplify`` CRS units, with ``class`` and ``area`` (CRS units squared), in the input's CRS;
* with ``predict.draw=true``, ``<name>_overlay.png``: the classes over the image, for the first 512 px window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from aifactory_train.recipe import DataError
from .export import DeployableSegmenter

NODATA = 255
OVERLAY_PX = 512


def blend_weights(tile: int, overlap: int) -> torch.Tensor:
    """(tile, tile) weights: 1 inside, ramping linearly to near 0 over ``overlap`` px at each side (never 0, so a
    raster edge covered by one tile only is still predicted)."""
    ramp = torch.ones(tile)
    if overlap > 0:
        edge = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        ramp[:overlap] = edge
        ramp[tile - overlap:] = edge.flip(0)
    return ramp[:, None] * ramp[None, :]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every ``stride`` px, the last one moved back to end at the raster's edge, so no
    tile reads past the edge (padding there would change the logits near it); a raster smaller than a tile is
    padded."""
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def segment_blocks(model: torch.nn.Module, dataset, tile: int, overlap: int, block: int, batch_size: int,
                   device: torch.device, probabilities: bool = False) -> Iterator[tuple[Any, np.ndarray]]:
    """(rasterio Window, uint8 class mask of it) per output block of ``dataset``, NODATA where the input has none;
    with ``probabilities``, the blended class probabilities (K, h, w) instead of the mask."""
    from rasterio.windows import Window

    height, width = dataset.height, dataset.width
    stride = tile - overlap
    rows, cols = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    weights = blend_weights(tile, overlap).to(device)
    bands = (1, 2, 3) if dataset.count >= 3 else (1, 1, 1)
    scale = 1.0 / (np.iinfo(dataset.dtypes[0]).max if np.dtype(dataset.dtypes[0]).kind in "ui" else 1.0)
    for r0 in range(0, height, block):
        for c0 in range(0, width, block):
            r1, c1 = min(r0 + block, height), min(c0 + block, width)
            logits = None
            total = torch.zeros(r1 - r0, c1 - c0, device=device)
            tiles = [(r, c) for r in rows if r < r1 and r + tile > r0 for c in cols if c < c1 and c + tile > c0]
            for first in range(0, len(tiles), batch_size):
                chunk = tiles[first:first + batch_size]
                # boundless (a VRT per read in GDAL: slow) only where a tile reaches past a raster smaller than it
                images = np.stack([dataset.read(bands, window=Window(c, r, tile, tile), fill_value=0,
                                                boundless=r + tile > height or c + tile > width) for r, c in chunk])
                batch = torch.from_numpy(images.astype(np.float32) * scale).to(device)
                out, _ = model(batch)
                out = out.float()
                if logits is None:
                    logits = torch.zeros(out.shape[1], r1 - r0, c1 - c0, device=device)
                for (r, c), tile_logits in zip(chunk, out):
                    # the part of the tile inside the block, in tile and in block coordinates
                    tr0, tc0 = max(r0 - r, 0), max(c0 - c, 0)
                    tr1, tc1 = min(r1 - r, tile), min(c1 - c, tile)
                    br0, bc0 = r + tr0 - r0, c + tc0 - c0
                    w = weights[tr0:tr1, tc0:tc1]
                    logits[:, br0:br0 + tr1 - tr0, bc0:bc0 + tc1 - tc0] += tile_logits[:, tr0:tr1, tc0:tc1] * w
                    total[br0:br0 + tr1 - tr0, bc0:bc0 + tc1 - tc0] += w
            window = Window(c0, r0, c1 - c0, r1 - r0)
            if probabilities:
                yield window, (logits / total).softmax(dim=0).cpu().numpy()
                continue
            mask = (logits / total).argmax(dim=0).to(torch.uint8).cpu().numpy()
            valid = dataset.read_masks(1, window=window) > 0
            yield window, np.where(valid, mask, NODATA).astype(np.uint8)


def block_polygons(mask: np.ndarray, window, size: tuple[int, int]):
    """(class, polygon in pixel coordinates of the raster, whether it touches an inner block edge) per area."""
    from rasterio.features import shapes
    from shapely.geometry import shape

    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + mask.shape[0], c0 + mask.shape[1]
    from affine import Affine

    for geometry, value in shapes(mask, mask=(mask != 0) & (mask != NODATA), transform=Affine.translation(c0, r0)):
        polygon = shape(geometry)
        minx, miny, maxx, maxy = polygon.bounds
        inner = (minx <= c0 and c0 > 0) or (miny <= r0 and r0 > 0) or (maxx >= c1 and c1 < size[1]) or \
                (maxy >= r1 and r1 < size[0])
        yield int(value), polygon, inner


def read_options(options: dict[str, Any]) -> dict[str, Any]:
    """The ``predict`` section (validated by SegmentationPredictOptions in config.py) in this module's names."""
    return {"tile": options["tile_size"], "overlap": options["overlap"], "block": options["block_size"],
            "simplify": float(options["simplify"]), "min_area": float(options["min_area"]),
            "georeferenced": options["georeferenced"], "gdal_cache_mb": options["gdal_cache_mb"]}


def open_input(path: Path, georeferenced: bool):
    import rasterio

    try:
        dataset = rasterio.open(path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read raster '{path}': {str(err).splitlines()[0]}") from None
    if georeferenced and dataset.crs is None:
        dataset.close()
        raise DataError(f"raster '{path}' has no CRS, and predict.georeferenced=true asks for a georeferenced mask "
                        f"and polygons; give it its CRS (e.g. gdal_edit.py -a_srs EPSG:28992) or set "
                        f"predict.georeferenced=false (pixel coordinates)")
    if dataset.count not in (1, 3, 4):
        dataset.close()
        raise DataError(f"raster '{path}' has {dataset.count} bands; expected RGB (3, or 4 with alpha)")
    return dataset


def predict_raster(model, source: Path, out_base: Path, opts: dict[str, Any], class_names: list[str],
                   batch_size: int, device: torch.device, draw: bool) -> dict[str, Any]:
    import geopandas
    import rasterio
    import shapely

    # GDAL's block cache defaults to 5 % of the machine's memory; capped, so the peak does not depend on the machine
    with rasterio.Env(GDAL_CACHEMAX=opts.get("gdal_cache_mb", 256) * 2**20), \
            open_input(source, opts["georeferenced"]) as dataset:
        crs = dataset.crs if opts["georeferenced"] else None
        transform = dataset.transform if opts["georeferenced"] else rasterio.Affine.identity()
        profile = {"driver": "GTiff", "width": dataset.width, "height": dataset.height, "count": 1, "dtype": "uint8",
                   "crs": crs, "transform": transform, "nodata": NODATA, "tiled": True, "blockxsize": 256,
                   "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        mask_path = out_base.with_name(out_base.name + "_mask.tif")
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        counts = np.zeros(256, dtype=np.int64)
        finished: list[tuple[int, Any]] = []
        pending: dict[int, list] = {}  # polygons cut by a block edge, merged with their other parts at the end
        with rasterio.open(mask_path, "w", **profile) as out:
            for window, mask in segment_blocks(model, dataset, opts["tile"], opts["overlap"], opts["block"],
                                               batch_size, device):
                out.write(mask, 1, window=window)
                counts += np.bincount(mask.ravel(), minlength=256)
                for value, polygon, inner in block_polygons(mask, window, (dataset.height, dataset.width)):
                    if inner:
                        pending.setdefault(value, []).append(polygon)
                    else:
                        finished.append((value, polygon))
                if draw and window.row_off == 0 and window.col_off == 0:
                    draw_overlay(dataset, mask, out_base.with_name(out_base.name + "_overlay.png"))
    for value, parts in pending.items():
        merged = shapely.union_all(parts)
        finished += [(value, part) for part in getattr(merged, "geoms", [merged])]
    affine = [transform.a, transform.b, transform.d, transform.e, transform.c, transform.f]
    geometries = [shapely.affinity.affine_transform(polygon, affine) for _, polygon in finished]
    geometries = [g.simplify(opts["simplify"], preserve_topology=True) if opts["simplify"] else g for g in geometries]
    areas = [g.area for g in geometries]
    keep = [i for i, a in enumerate(areas) if a >= opts["min_area"] and a > 0]
    frame = geopandas.GeoDataFrame({"class": [class_names[finished[i][0]] for i in keep],
                                    "area": [round(areas[i], 4) for i in keep]},
                                   geometry=[geometries[i] for i in keep], crs=crs)
    polygons_path = out_base.with_name(out_base.name + "_polygons.geojson")
    frame.to_file(polygons_path, driver="GeoJSON")
    return {"mask": str(mask_path), "polygons": str(polygons_path), "crs": str(crs) if crs else None,
            "pixels_per_class": {name: int(counts[i]) for i, name in enumerate(class_names) if counts[i]},
            "nodata_pixels": int(counts[NODATA]),
            "polygons_per_class": frame["class"].value_counts().to_dict() if len(frame) else {}}


def draw_overlay(dataset, mask: np.ndarray, path: Path) -> None:
    from PIL import Image
    from rasterio.windows import Window

    size = (min(OVERLAY_PX, mask.shape[0]), min(OVERLAY_PX, mask.shape[1]))
    bands = (1, 2, 3) if dataset.count >= 3 else (1, 1, 1)
    image = dataset.read(bands, window=Window(0, 0, size[1], size[0])).transpose(1, 2, 0).astype(np.float32)
    palette = np.array([(0, 0, 0), (255, 220, 0), (255, 0, 255), (0, 255, 255), (255, 60, 60)] + [(0, 255, 0)] * 251,
                       dtype=np.float32)
    labels = mask[:size[0], :size[1]]
    tinted = np.where(((labels > 0) & (labels != NODATA))[..., None], 0.5 * image + 0.5 * palette[labels], image)
    Image.fromarray(np.clip(tinted, 0, 255).astype(np.uint8)).save(path)


def predict_files(module, files: list[Path], batch_size: int, options: dict[str, Any]) -> Iterator[dict]:
    opts = read_options(options)
    info = module.hparams.data_info
    model = DeployableSegmenter(module.net, info["mean"], info["std"]).to(module.device).eval()
    out_dir, input_root = Path(options["output_dir"]), Path(options["input_root"])
    for path in files:
        try:
            relative = Path(path).absolute().relative_to(input_root)
        except ValueError:
            relative = Path(Path(path).name)
        base = out_dir / relative.parent / relative.stem
        row = predict_raster(model, Path(path), base, opts, module.class_names, batch_size, module.device,
                             bool(options.get("draw")))
        # paths as they will be once `aift predict` moves the results into its output folder
        for key in ("mask", "polygons"):
            row[key] = str(Path(row[key]).relative_to(out_dir))
        yield {"file": str(path), **row}
