"""A synthetic georeferenced orthophoto of a Groningen street grid, in the three layouts data.py reads.

Per split one RGB GeoTIFF (EPSG:28992, RD New, 0.25 m pixels) of roads, cable trenches beside them, manholes on
them and roofs, on ground that varies (grass, soil, paving) with noise, plus a nodata corner (as an orthophoto's
edge); its label raster (class index, 255 on nodata) on the same grid; the same labels as polygons (GeoJSON with a
``class`` attribute, in EPSG:28992); and the raster cut into image/mask PNG tiles::

    <out>/<split>/rasters/ortho.tif          RGB GeoTIFF, nodata=0                  (data.format=geotiff|vector)
    <out>/<split>/labels/ortho.tif           label raster, same grid                (data.format=geotiff)
    <out>/<split>/labels/ortho.geojson       polygons with `class`                  (data.format=vector)
    <out>/<split>/images/*.png, masks/*.png  tiles; masks hold class indices, 255 nodata (data.format=folders)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aifactory_train.recipe import DataError, prepare_output_folder, write_datacard

CLASSES = ["background", "road", "cable_trench", "manhole", "building"]
COLOURS = {1: (120, 120, 125), 2: (95, 70, 45), 3: (30, 30, 35), 4: (170, 70, 55)}  # class -> RGB
CRS = "EPSG:28992"
ORIGIN = (233000.0, 582000.0)  # RD New metres, near Groningen
PIXEL = 0.25
SPLIT_SCALE = {"train": 1.0, "val": 0.5, "test": 0.5}
DEFAULT_SIZE = 1024
PNG_TILE = 128
OWNED = tuple(SPLIT_SCALE)


def _geometries(rng: np.random.Generator, size: int):
    """(class index, shapely geometry in pixel coordinates (col, row)) of one scene, drawn in class order."""
    from shapely import union_all
    from shapely.affinity import rotate
    from shapely.geometry import LineString, box

    shapes = []
    roads = []
    for _ in range(max(2, size // 160)):
        horizontal = rng.random() < 0.5
        at = rng.uniform(0.08, 0.92) * size
        tilt = rng.uniform(-0.15, 0.15) * size
        line = LineString([(0, at), (size, at + tilt)]) if horizontal else LineString([(at, 0), (at + tilt, size)])
        width = rng.uniform(9, 15)
        roads.append((line, width))
        shapes.append((1, line.buffer(width / 2, cap_style="flat")))
    for line, width in roads:
        side = rng.choice([-1, 1]) * (width / 2 + 4)
        trench = line.parallel_offset(float(side), "left")
        shapes.append((2, trench.buffer(1.5, cap_style="flat")))
        for t in rng.uniform(0.05, 0.95, max(1, size // 200)):
            shapes.append((3, line.interpolate(t, normalized=True).buffer(rng.uniform(3.0, 4.5))))
    road_area = union_all([g for c, g in shapes if c in (1, 2)])
    for _ in range(size // 40):
        w, h = rng.uniform(14, 34, 2)
        cx, cy = rng.uniform(20, size - 20, 2)
        roof = rotate(box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), rng.uniform(0, 90))
        if not roof.buffer(3).intersects(road_area):
            shapes.append((4, roof))
    return sorted(shapes, key=lambda item: item[0])


def _ground(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grass, soil and paving in smooth patches, (3, H, W) float."""
    coarse = rng.integers(0, 3, (size // 64 + 2, size // 64 + 2))
    kinds = np.kron(coarse, np.ones((64, 64), dtype=int))[:size, :size]
    palette = np.array([(80, 125, 60), (140, 110, 80), (165, 160, 150)], dtype=np.float32)
    ground = palette[kinds].transpose(2, 0, 1)
    return ground + rng.normal(0, 10, (3, 1, 1))


def make_scene(rng: np.random.Generator, size: int, transform):
    """(RGB uint8 (3, H, W), labels uint8 (H, W), [(class name, geometry in CRS coordinates)])."""
    import shapely
    from rasterio.features import rasterize

    pixel_shapes = _geometries(rng, size)
    world = [(c, shapely.affinity.affine_transform(g, [transform.a, transform.b, transform.d, transform.e,
                                                      transform.c, transform.f])) for c, g in pixel_shapes]
    labels = rasterize([(g, c) for c, g in world], out_shape=(size, size), transform=transform, fill=0,
                       dtype="uint8")
    image = _ground(rng, size)
    for index, colour in COLOURS.items():
        tint = np.array(colour, dtype=np.float32)[:, None] + rng.normal(0, 8, (3, 1))
        image[:, labels == index] = tint
    image += rng.normal(0, 12, image.shape)
    image = np.clip(image, 1, 255).astype(np.uint8)  # 0 is nodata
    # the orthophoto's edge: a nodata corner, labelled 255 (left out of loss and metrics)
    rows, cols = np.mgrid[:size, :size]
    corner = rows + cols < size // 6
    image[:, corner] = 0
    labels[corner] = 255
    return image, labels, [(CLASSES[c], g) for c, g in world]


def write_raster(path: Path, array: np.ndarray, transform, crs: str | None, nodata: int | None) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    bands = array if array.ndim == 3 else array[None]
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype=bands.dtype, crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate") as out:
        out.write(bands)


def write_polygons(path: Path, shapes: list, crs: str) -> None:
    import geopandas

    frame = geopandas.GeoDataFrame({"class": [c for c, _ in shapes]}, geometry=[g for _, g in shapes], crs=crs)
    frame.to_file(path, driver="GeoJSON")


def write_png_tiles(folder: Path, image: np.ndarray, labels: np.ndarray, tile: int = PNG_TILE) -> None:
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    # a full 256-entry palette: with fewer than 17 colours PIL writes 4-bit indices, and 255 (nodata) would read back
    # as 15; nodata is drawn white
    colours = [(0, 0, 0), *COLOURS.values()]
    palette = [v for rgb in colours + [(0, 0, 0)] * (255 - len(colours)) + [(255, 255, 255)] for v in rgb]
    for row in range(0, labels.shape[0] - tile + 1, tile):
        for col in range(0, labels.shape[1] - tile + 1, tile):
            name = f"tile_{row:05d}_{col:05d}.png"
            Image.fromarray(image[:, row:row + tile, col:col + tile].transpose(1, 2, 0)).save(folder / "images" / name)
            mask = Image.fromarray(labels[row:row + tile, col:col + tile]).convert("P")
            mask.putpalette(palette)
            mask.save(folder / "masks" / name)


def synthesize(out: str | Path, size: int | None = None, seed: int = 0, variant: str | None = None,
               overwrite: bool = False) -> Path:
    """Write train/val/test under ``out``: a ``size`` x ``size`` px training orthophoto, val and test half a side."""
    from rasterio.transform import from_origin

    if variant is not None:
        raise DataError(f"--variant '{variant}': infrastructure_segmentation has no variants (one dataset holds "
                        f"all three layouts)")
    size = DEFAULT_SIZE if size is None else size
    if size < 2 * PNG_TILE:
        raise DataError(f"--size {size} is too small: at least {2 * PNG_TILE} px (val and test get half a side, "
                        f"cut into {PNG_TILE} px PNG tiles)")
    out = prepare_output_folder(out, overwrite, owned=OWNED)
    rng = np.random.default_rng(seed)
    for index, (split, scale) in enumerate(SPLIT_SCALE.items()):
        side = int(size * scale) // PNG_TILE * PNG_TILE
        # the splits lie side by side on the map, 100 m apart, as regions of one survey would
        transform = from_origin(ORIGIN[0] + index * (size * PIXEL + 100), ORIGIN[1], PIXEL, PIXEL)
        image, labels, shapes = make_scene(rng, side, transform)
        folder = out / split
        write_raster(folder / "rasters" / "ortho.tif", image, transform, CRS, nodata=0)
        write_raster(folder / "labels" / "ortho.tif", labels, transform, CRS, nodata=255)
        write_polygons(folder / "labels" / "ortho.geojson", shapes, CRS)
        write_png_tiles(folder, image, labels)
    write_datacard(out, {
        "name": "infrastructure_segmentation synthetic orthophoto",
        "owner": "AI Factory Groningen (generated demo data)",
        "license": "CC0-1.0",
        "consent": "not applicable: synthetic imagery, no people or company data",
        "source": f"aift data synth infrastructure_segmentation --size {size} --seed {seed}",
        "description": f"RGB orthophoto ({CRS}, {PIXEL} m pixels) with roads, cable trenches, manholes, roofs; "
                       f"classes: {', '.join(CLASSES)}; 255 = nodata",
    })
    return out
