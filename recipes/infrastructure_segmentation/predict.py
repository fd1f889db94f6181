"""`aift predict` for infrastructure_segmentation: large rasters, tile by tile, into a map.

Each input raster (GeoTIFF, or PNG/JPEG) is cut into tiles of ``predict.tile_size`` px that overlap by
``predict.overlap`` px on a grid fixed by the raster (not by the blocks below); the model's logits of overlapping
tiles are blended with weights that ramp linearly over the overlap, so no seams show, and the argmax is the class.
The output is made ``predict.block_size`` px square at a time: only the tiles that touch a block are read (rasterio
windowed reads) and only that block's logits are held, so memory stays bounded on any raster size
(predict_rss.py, beside this file, measures it).

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


def block_origins(height: int, width: int, block: int, cell: int = 0) -> Iterator[tuple[int, int]]:
    """(row, col) of each output block: row by row within a cell of ``cell`` px (a multiple of ``block``), cell by
    cell; ``cell=0``: the whole raster is one cell."""
    cell_rows, cell_cols = cell or height, cell or width
    for cr in range(0, height, cell_rows):
        for cc in range(0, width, cell_cols):
            for r0 in range(cr, min(cr + cell_rows, height), block):
                for c0 in range(cc, min(cc + cell_cols, width), block):
                    yield r0, c0


def segment_blocks(model: torch.nn.Module, dataset, tile: int, overlap: int, block: int, batch_size: int,
                   device: torch.device, probabilities: bool = False, cell: int = 0
                   ) -> Iterator[tuple[Any, np.ndarray]]:
    """(rasterio Window, uint8 class mask of it) per output block of ``dataset`` (in the order of
    ``block_origins``), NODATA where the input has none; with ``probabilities``, the blended class probabilities
    (K, h, w) instead of the mask."""
    from rasterio.windows import Window

    height, width = dataset.height, dataset.width
    stride = tile - overlap
    rows, cols = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    weights = blend_weights(tile, overlap).to(device)
    bands = (1, 2, 3) if dataset.count >= 3 else (1, 1, 1)
    scale = 1.0 / (np.iinfo(dataset.dtypes[0]).max if np.dtype(dataset.dtypes[0]).kind in "ui" else 1.0)
    for r0, c0 in block_origins(height, width, block, cell):
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


def block_polygons(mask: np.ndarray, window, cell_bounds: tuple[int, int, int, int]):
    """(class, polygon in pixel coordinates of the raster, whether it touches a block edge inside its cell) per
    area; ``cell_bounds`` = (row0, col0, row1, col1) of the cell the block is in (edges there are final cuts)."""
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import shape

    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + mask.shape[0], c0 + mask.shape[1]
    cell_r0, cell_c0, cell_r1, cell_c1 = cell_bounds
    for geometry, value in shapes(mask, mask=(mask != 0) & (mask != NODATA), transform=Affine.translation(c0, r0)):
        polygon = shape(geometry)
        minx, miny, maxx, maxy = polygon.bounds
        inner = (minx <= c0 and c0 > cell_c0) or (miny <= r0 and r0 > cell_r0) or (maxx >= c1 and c1 < cell_c1) or \
                (maxy >= r1 and r1 < cell_r1)
        yield int(value), polygon, inner


def read_options(options: dict[str, Any]) -> dict[str, Any]:
    """The ``predict`` section (validated by SegmentationPredictOptions in config.py) in this module's names."""
    return {"tile": options["tile_size"], "overlap": options["overlap"], "block": options["block_size"],
            "simplify": float(options["simplify"]), "min_area": float(options["min_area"]),
            "georeferenced": options["georeferenced"], "gdal_cache_mb": options["gdal_cache_mb"],
            "cell": options["polygon_cell_size"]}


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


def return_freed_buffers_to_the_system() -> None:
    """Fix glibc's mmap threshold at 1 MiB for this process.

    glibc serves a large buffer (a batch of tiles, a block's logits) from mmap, but after the first such buffer is
    freed it raises its threshold (up to 32 MiB) and serves the next ones from its heap, where freed space is kept and
    fragments: peak RSS then creeps up with the number of blocks. Measured on a sparse raster (few polygons, the tiny
    network of predict_rss.py): peak 1123 -> 1172 MiB from 8192 to 16384 px without, 974 -> 975 MiB with; the price
    is fresh pages for every large buffer, 25 % more time there (less where a real network's compute dominates). A
    fixed threshold, what the environment variable MALLOC_MMAP_THRESHOLD_ sets at start-up, gives each buffer back
    when it is freed. Done with ctypes because no library exposes mallopt; nothing happens off glibc."""
    import ctypes

    m_mmap_threshold = -3  # from glibc's malloc.h
    try:
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def predict_raster(model, source: Path, out_base: Path, opts: dict[str, Any], class_names: list[str],
                   batch_size: int, device: torch.device, draw: bool) -> dict[str, Any]:
    """Writes ``<out_base>_mask.tif`` and ``<out_base>_polygons.geojson`` for one raster, one block at a time.

    Polygons are streamed to the GeoJSON file (pyogrio.write_arrow pulls one Arrow batch per row of blocks), so
    neither the mask nor the polygons of the whole raster are ever held: what is held is one block's logits, the
    polygons of one row of blocks, and the parts cut by the lower edge of that row, which wait to be merged with
    their continuation in the next row. Blocks run cell by cell (``opts["cell"]`` px, ``predict.polygon_cell_size``)
    and an area that crosses a cell's border is cut there: a connected area (a road network) can span the whole
    raster, and one polygon of it would grow with the raster. ``cell=0`` merges over the whole raster."""
    import pyarrow
    import pyogrio
    import rasterio
    import shapely

    return_freed_buffers_to_the_system()
    # GDAL's block cache defaults to 5 % of the machine's memory; capped, so the peak does not depend on the machine
    with rasterio.Env(GDAL_CACHEMAX=opts.get("gdal_cache_mb", 256) * 2**20), \
            open_input(source, opts["georeferenced"]) as dataset:
        crs = dataset.crs if opts["georeferenced"] else None
        transform = dataset.transform if opts["georeferenced"] else rasterio.Affine.identity()
        profile = {"driver": "GTiff", "width": dataset.width, "height": dataset.height, "count": 1, "dtype": "uint8",
                   "crs": crs, "transform": transform, "nodata": NODATA, "tiled": True, "blockxsize": 256,
                   "blockysize": 256, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        mask_path = out_base.with_name(out_base.name + "_mask.tif")
        polygons_path = out_base.with_name(out_base.name + "_polygons.geojson")
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        counts = np.zeros(256, dtype=np.int64)
        polygons_per_class: dict[str, int] = {}
        to_map = np.array([[transform.a, transform.b, transform.c], [transform.d, transform.e, transform.f]])
        schema = pyarrow.schema([pyarrow.field("class", pyarrow.string()), pyarrow.field("area", pyarrow.float64()),
                                 pyarrow.field("geometry", pyarrow.binary(),
                                               metadata={"ARROW:extension:name": "geoarrow.wkb"})])
        failure: list[BaseException] = []

        def features(done: list[tuple[int, Any]]) -> pyarrow.RecordBatch:
            """The finished polygons (pixel coordinates) in map coordinates, simplified, small ones left out."""
            geometries = shapely.transform(np.array([polygon for _, polygon in done], dtype=object),
                                           lambda xy: xy @ to_map[:, :2].T + to_map[:, 2])
            if opts["simplify"] and len(geometries):
                geometries = shapely.simplify(geometries, opts["simplify"], preserve_topology=True)
            areas = shapely.area(geometries)
            keep = [i for i, area in enumerate(areas) if area >= opts["min_area"] and area > 0]
            names = [class_names[done[i][0]] for i in keep]
            for name in names:
                polygons_per_class[name] = polygons_per_class.get(name, 0) + 1
            return pyarrow.record_batch([pyarrow.array(names, pyarrow.string()),
                                         pyarrow.array([round(float(areas[i]), 4) for i in keep], pyarrow.float64()),
                                         pyarrow.array(shapely.to_wkb(geometries[keep]) if keep else [],
                                                       pyarrow.binary())], schema=schema)

        def rows_of_polygons(out) -> Iterator[pyarrow.RecordBatch]:
            """Runs the blocks, writing the mask; yields the polygons finished by each row of blocks. An error is
            kept and raised after the writer stops, so that it reaches the user as it was raised (an exception
            inside an Arrow stream comes out as the writer's own error)."""
            pending: dict[int, list] = {}  # polygons cut by a block edge, merged with their other parts later
            done: list[tuple[int, Any]] = []
            cell = opts.get("cell", 0)
            try:
                for window, mask in segment_blocks(model, dataset, opts["tile"], opts["overlap"], opts["block"],
                                                   batch_size, device, cell=cell):
                    out.write(mask, 1, window=window)
                    counts[:] += np.bincount(mask.ravel(), minlength=256)
                    cell_r0, cell_c0 = (int(window.row_off) // cell * cell, int(window.col_off) // cell * cell) \
                        if cell else (0, 0)
                    cell_r1 = min(cell_r0 + cell, dataset.height) if cell else dataset.height
                    cell_c1 = min(cell_c0 + cell, dataset.width) if cell else dataset.width
                    for value, polygon, inner in block_polygons(mask, window, (cell_r0, cell_c0, cell_r1, cell_c1)):
                        if inner:
                            pending.setdefault(value, []).append(polygon)
                        else:
                            done.append((value, polygon))
                    if draw and window.row_off == 0 and window.col_off == 0:
                        draw_overlay(dataset, mask, out_base.with_name(out_base.name + "_overlay.png"))
                    row_end = int(window.row_off + window.height)
                    if window.col_off + window.width < cell_c1:
                        continue
                    # a row of the cell's blocks is complete: merge the parts cut by edges inside it; those that do
                    # not reach its lower edge (or the cell's) are finished
                    for value, parts in list(pending.items()):
                        merged = shapely.union_all(parts)
                        pending[value] = []
                        for part in getattr(merged, "geoms", [merged]):
                            if part.bounds[3] >= row_end and row_end < cell_r1:
                                pending[value].append(part)
                            else:
                                done.append((value, part))
                    yield features(done)
                    done = []
            except Exception as err:  # noqa: BLE001 - re-raised below, once the writer has stopped
                failure.append(err)

        with rasterio.open(mask_path, "w", **profile) as out:
            stream = pyarrow.RecordBatchReader.from_batches(schema, rows_of_polygons(out))
            try:
                pyogrio.write_arrow(stream, polygons_path, driver="GeoJSON", geometry_name="geometry",
                                    geometry_type="Polygon", crs=str(crs) if crs else None)
            except Exception:
                if failure:
                    raise failure[0] from None
                raise
            if failure:
                raise failure[0]
    return {"mask": str(mask_path), "polygons": str(polygons_path), "crs": str(crs) if crs else None,
            "pixels_per_class": {name: int(counts[i]) for i, name in enumerate(class_names) if counts[i]},
            "nodata_pixels": int(counts[NODATA]),
            "polygons_per_class": dict(sorted(polygons_per_class.items(), key=lambda item: -item[1]))}


PALETTE = np.array([(0, 0, 0), (255, 220, 0), (255, 0, 255), (0, 255, 255), (255, 60, 60)] + [(0, 255, 0)] * 251,
                   dtype=np.float32)  # per class index; the later classes all green


def tint(image: np.ndarray, labels: np.ndarray, nodata: int = NODATA) -> np.ndarray:
    """uint8 (H, W, 3): each labelled pixel of ``image`` (H, W, 3) half its class's colour; background (0) and
    ``nodata`` pixels as they are."""
    labelled = ((labels > 0) & (labels != nodata))[..., None]
    tinted = np.where(labelled, 0.5 * image.astype(np.float32) + 0.5 * PALETTE[labels], image)
    return np.clip(tinted, 0, 255).astype(np.uint8)


def draw_overlay(dataset, mask: np.ndarray, path: Path) -> None:
    from PIL import Image
    from rasterio.windows import Window

    size = (min(OVERLAY_PX, mask.shape[0]), min(OVERLAY_PX, mask.shape[1]))
    bands = (1, 2, 3) if dataset.count >= 3 else (1, 1, 1)
    image = dataset.read(bands, window=Window(0, 0, size[1], size[0])).transpose(1, 2, 0)
    Image.fromarray(tint(image, mask[:size[0], :size[1]])).save(path)


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
