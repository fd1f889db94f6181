"""Loading infrastructure_segmentation data: three layouts, windowed reads, checks before training.

Per split folder (``train``, ``val``, optional ``test``) under ``data.root``:

* ``folders`` — ``images/<name>.png|jpg|tif`` with ``masks/<name>.png``: class-index PNGs (a palette PNG's indices
  are the classes), ``data.ignore_index`` (255) where nothing is known.
* ``geotiff`` — ``rasters/<name>.tif`` (RGB orthophoto) with ``labels/<name>.tif``: a one-band label raster on the
  same grid (same CRS, transform and size).
* ``vector`` — ``rasters/<name>.tif`` with ``labels/<name>.geojson`` or ``.gpkg``: polygons whose ``data.class_field``
  names a class, in the raster's CRS, rasterised onto each window as it is read (later classes in
  ``data.classes`` over earlier ones).

Samples are windows of ``data.tile_size`` px: random windows for training (``data.train_tiles`` per epoch), a
regular grid (padded with ``ignore_index`` past the edge) for validation and test. Rasters are read window by
window with rasterio (``Dataset.read(window=...)``), so a 20,000 x 20,000 px orthophoto is never loaded whole; a
raster's nodata mask becomes ``ignore_index`` in the labels, left out of the loss and the metrics.

Checked before training, each as one DataError naming the file: an empty split, an image without its mask, a mask
of another size than its image, mask values outside ``data.classes``, a label raster in another CRS or off the
image grid, polygons outside the raster or in another CRS, and a file that does not decode (a corrupt tile).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from aifactory_train.recipe import (DataError, DataLoader, DatasetLineage, SplitLineage, digest_files, file_digests,
                                     read_datacard, shuffled)
from .config import OPTIONAL_SPLITS, REQUIRED_SPLITS, check_data_files

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
RASTER_EXTENSIONS = (".tif", ".tiff")
VECTOR_EXTENSIONS = (".geojson", ".gpkg", ".json")


# -- checks ------------------------------------------------------------------------------------------------------

def _open_raster(path: Path):
    import rasterio

    try:
        return rasterio.open(path)
    except Exception as err:  # noqa: BLE001 - any GDAL failure means: not a readable raster
        raise DataError(f"cannot read raster '{path}': {str(err).splitlines()[0]} (a corrupt or truncated file?)") \
            from None


def check_label_values(values: np.ndarray, path: Path, classes: list[str], ignore_index: int) -> None:
    bad = sorted(set(np.unique(values).tolist()) - set(range(len(classes))) - {ignore_index})
    if bad:
        raise DataError(f"mask '{path}' holds value(s) {bad[:10]} outside the class list: valid are 0..{len(classes) - 1} "
                        f"({', '.join(classes)}) and {ignore_index} (data.ignore_index, nothing known)")


def check_png_pair(image: Path, mask: Path, classes: list[str], ignore_index: int) -> tuple[int, int]:
    """(height, width) of a checked image/mask pair."""
    from PIL import Image

    sizes = []
    for path in (image, mask):
        try:
            with Image.open(path) as picture:
                picture.load()  # decodes every pixel: a truncated tile fails here, not at hour 3
                sizes.append(picture.size)
                if path == mask:
                    if picture.mode not in ("L", "P", "I", "I;16"):
                        raise DataError(f"mask '{mask}' is a {picture.mode} image; expected class indices (a "
                                        f"one-band or palette PNG)")
                    values = np.asarray(picture)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001
            raise DataError(f"cannot decode '{path}': {err} (a corrupt tile?)") from None
    if sizes[0] != sizes[1]:
        raise DataError(f"mask '{mask}' is {sizes[1][0]}x{sizes[1][1]} px but its image '{image}' is "
                        f"{sizes[0][0]}x{sizes[0][1]}; a mask must have its image's size")
    check_label_values(values, mask, classes, ignore_index)
    return sizes[0][1], sizes[0][0]


def check_label_raster(image: Path, labels: Path, classes: list[str], ignore_index: int) -> tuple[int, int]:
    """The label raster lies on the image's grid and holds known classes; read block by block (bounded memory)."""
    with _open_raster(image) as img, _open_raster(labels) as lab:
        if img.crs != lab.crs:
            raise DataError(f"label raster '{labels}' is in CRS {lab.crs} but its image '{image}' is in {img.crs}; "
                            f"reproject the labels onto the image grid (e.g. gdalwarp -t_srs {img.crs} -tr/-te of "
                            f"the image)")
        if (lab.width, lab.height) != (img.width, img.height) or not lab.transform.almost_equals(img.transform):
            raise DataError(f"label raster '{labels}' ({lab.width}x{lab.height} px, origin "
                            f"{lab.transform.c:.3f},{lab.transform.f:.3f}, pixel {lab.transform.a:g}) is not aligned to "
                            f"its image '{image}' ({img.width}x{img.height} px, origin {img.transform.c:.3f},"
                            f"{img.transform.f:.3f}, pixel {img.transform.a:g}); expected the same grid")
        if lab.count != 1:
            raise DataError(f"label raster '{labels}' has {lab.count} bands; expected one band of class indices")
        try:
            for _, window in lab.block_windows(1):
                check_label_values(lab.read(1, window=window), labels, classes, ignore_index)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001
            raise DataError(f"cannot decode label raster '{labels}': {str(err).splitlines()[0]} (a corrupt "
                            f"tile?)") from None
        return img.height, img.width


def read_polygons(image: Path, vector: Path, classes: list[str], class_field: str) -> list[tuple[bytes, int]]:
    """(WKB geometry, class index) of every polygon, checked against the raster: same CRS, inside its bounds."""
    import geopandas
    from shapely.geometry import box

    with _open_raster(image) as img:
        crs, bounds = img.crs, img.bounds
    if crs is None:
        raise DataError(f"raster '{image}' has no CRS, so the polygons in '{vector}' cannot be placed on it; "
                        f"give the raster its CRS (e.g. gdal_edit.py -a_srs EPSG:28992)")
    try:
        frame = geopandas.read_file(vector)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read polygons '{vector}': {str(err).splitlines()[0]}") from None
    if frame.crs is None or not frame.crs.equals(crs):
        raise DataError(f"polygons '{vector}' are in CRS {frame.crs} but the raster '{image}' is in {crs}; "
                        f"reproject them (e.g. ogr2ogr -t_srs {crs})")
    if class_field not in frame.columns:
        raise DataError(f"polygons '{vector}' have no attribute '{class_field}' (data.class_field); their "
                        f"attributes: {[c for c in frame.columns if c != 'geometry']}")
    unknown = sorted(set(map(str, frame[class_field])) - set(classes))
    if unknown:
        raise DataError(f"polygons '{vector}': {class_field} value(s) {unknown[:10]} are not in data.classes "
                        f"({', '.join(classes)})")
    outside = ~frame.geometry.intersects(box(*bounds))
    if outside.any():
        first = int(np.flatnonzero(outside.to_numpy())[0])
        raise DataError(f"polygons '{vector}': {int(outside.sum())} of {len(frame)} lie outside the raster "
                        f"'{image}' (bounds {tuple(round(b, 3) for b in bounds)}), e.g. feature {first}; wrong "
                        f"raster or wrong CRS?")
    index = {name: i for i, name in enumerate(classes)}
    rows = [(geometry.wkb, index[str(name)]) for geometry, name in zip(frame.geometry, frame[class_field])]
    return sorted(rows, key=lambda row: row[1])  # later classes drawn over earlier ones


# -- reading windows ---------------------------------------------------------------------------------------------

class Source:
    """One image of a split with its labels: a PNG pair (read whole: tiles are small) or a raster (windowed)."""

    def __init__(self, image: Path, labels: Path | None, kind: str, height: int, width: int,
                 polygons: list[tuple[bytes, int]] | None = None):
        self.image, self.labels, self.kind = image, labels, kind
        self.height, self.width = height, width
        self.polygons = polygons
        self._handles: tuple | None = None
        self._tree = None

    def __getstate__(self):  # open file handles stay in the process that opened them
        state = dict(self.__dict__)
        state["_handles"], state["_tree"] = None, None
        return state

    def _open(self):
        if self._handles is None or self._handles[0] != os.getpid():
            image = _open_raster(self.image)
            labels = _open_raster(self.labels) if self.kind == "geotiff" else None
            self._handles = (os.getpid(), image, labels)
        return self._handles[1], self._handles[2]

    def read(self, row: int, col: int, size: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 image (3, size, size) and labels (size, size) of the window at (row, col), padded past the edge."""
        if self.kind == "folders":
            from PIL import Image

            with Image.open(self.image) as picture:
                image = np.asarray(picture.convert("RGB")).transpose(2, 0, 1)
            with Image.open(self.labels) as picture:
                labels = np.asarray(picture)
            image = image[:, row:row + size, col:col + size]
            labels = labels[row:row + size, col:col + size]
            pad = ((0, size - labels.shape[0]), (0, size - labels.shape[1]))
            return (np.pad(image, ((0, 0), *pad)), np.pad(labels, pad, constant_values=ignore_index).astype(np.uint8))
        from rasterio.windows import Window

        window = Window(col, row, size, size)
        image_ds, labels_ds = self._open()
        try:
            image = image_ds.read((1, 2, 3), window=window, boundless=True, fill_value=0)
            valid = image_ds.read_masks(1, window=window, boundless=True) > 0
        except Exception as err:  # noqa: BLE001
            raise DataError(f"cannot decode window (row {row}, col {col}, {size} px) of '{self.image}': "
                            f"{str(err).splitlines()[0]} (a corrupt tile?)") from None
        if self.kind == "geotiff":
            labels = labels_ds.read(1, window=window, boundless=True, fill_value=ignore_index)
        else:
            labels = self.rasterize(image_ds.window_transform(window), size)
        labels = np.where(valid, labels, ignore_index).astype(np.uint8)
        return image, labels

    def rasterize(self, transform, size: int) -> np.ndarray:
        import shapely
        from rasterio.features import rasterize
        from rasterio.windows import bounds, Window

        if self._tree is None:
            self._geometries = shapely.from_wkb([wkb for wkb, _ in self.polygons])
            self._classes = np.array([c for _, c in self.polygons])
            self._tree = shapely.STRtree(self._geometries)
        window_box = shapely.box(*bounds(Window(0, 0, size, size), transform))
        hits = np.sort(self._tree.query(window_box, predicate="intersects"))  # in class order, as drawn
        if len(hits) == 0:
            return np.zeros((size, size), dtype=np.uint8)
        return rasterize(zip(self._geometries[hits], self._classes[hits].tolist()), out_shape=(size, size),
                         transform=transform, fill=0, dtype="uint8")


def grid_windows(sources: list[Source], size: int) -> list[tuple[int, int, int]]:
    return [(i, row, col) for i, s in enumerate(sources)
            for row in range(0, s.height, size) for col in range(0, s.width, size)]


class Tiles(Dataset):
    """Windows of the split's sources: random ones (training, ``count`` per epoch) or a fixed grid (evaluation)."""

    def __init__(self, sources: list[Source], size: int, ignore_index: int, train: bool, count: int,
                 augment: dict[str, Any]):
        self.sources, self.size, self.ignore_index, self.train = sources, size, ignore_index, train
        self.windows = None if train else grid_windows(sources, size)
        self.count = count if train else len(self.windows)
        areas = np.array([s.height * s.width for s in sources], dtype=np.float64)
        self.weights = torch.tensor(areas / areas.sum())
        steps: list = []
        if train and augment.get("hflip", True):
            steps.append(v2.RandomHorizontalFlip())
        if train and augment.get("vflip", True):
            steps.append(v2.RandomVerticalFlip())
        if train and augment.get("brightness", 0) > 0:
            steps.append(v2.ColorJitter(brightness=augment["brightness"]))  # the image only, never the mask
        self.transform = v2.Compose(steps) if steps else None
        self.rotate90 = train and augment.get("rotate90", True)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if self.train:
            which = int(torch.multinomial(self.weights, 1))
            source = self.sources[which]
            row = int(torch.randint(0, max(1, source.height - self.size + 1), ()))
            col = int(torch.randint(0, max(1, source.width - self.size + 1), ()))
        else:
            which, row, col = self.windows[index]
            source = self.sources[which]
        image, labels = source.read(row, col, self.size, self.ignore_index)
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)))
        mask = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(labels)).long())
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        if self.rotate90:
            k = int(torch.randint(0, 4, ()))
            image, mask = torch.rot90(image, k, (1, 2)), torch.rot90(mask, k, (0, 1))
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)


# -- the DataModule ----------------------------------------------------------------------------------------------

class InfrastructureSegmentationDataModule(L.LightningDataModule):

    MATCH_ON_RESUME = ("class_names",)

    def __init__(self, root: str, format: str = "geotiff", classes: list[str] = (), class_field: str = "class",
                 ignore_index: int = 255, tile_size: int = 64, train_tiles: int = 256,
                 mean: list[float] = (0.5, 0.5, 0.5), std: list[float] = (0.25, 0.25, 0.25), batch_size: int = 16,
                 num_workers: int = 2, augment: dict[str, Any] | None = None):
        super().__init__()
        self.root, self.format = Path(root), format
        self.classes, self.class_field, self.ignore_index = list(classes), class_field, ignore_index
        self.tile_size, self.train_tiles = tile_size, train_tiles
        self.mean, self.std = list(mean), list(std)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.augment = augment or {}
        self.sources: dict[str, list[Source]] | None = None
        self.files: dict[str, list[tuple[str, str]]] = {}  # split -> [(relative path, role)] for the digest
        self.crs: str | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.sources is not None:
            return
        check_data_files(self.root, self.format)
        self.sources = {}
        for split in REQUIRED_SPLITS + OPTIONAL_SPLITS:
            if (self.root / split).is_dir():
                self.sources[split] = self._scan(split)
        crs = {str(c) for c in (self._crs_of(s) for ss in self.sources.values() for s in ss) if c is not None}
        self.crs = sorted(crs)[0] if len(crs) == 1 else None
        sizes = ", ".join(f"{split}={len(sources)} image(s)" for split, sources in self.sources.items())
        log.info("data %s (%s): classes %s; %s", self.root, self.format, self.classes, sizes)

    def _crs_of(self, source: Source):
        if source.kind == "folders":
            return None
        with _open_raster(source.image) as ds:
            return ds.crs

    def _scan(self, split: str) -> list[Source]:
        folder = self.root / split
        image_dir = folder / ("images" if self.format == "folders" else "rasters")
        extensions = IMAGE_EXTENSIONS if self.format == "folders" else RASTER_EXTENSIONS
        images = sorted(p for p in image_dir.glob("*") if p.is_file() and p.suffix.lower() in extensions) \
            if image_dir.is_dir() else []
        if not images:
            raise DataError(f"split '{split}' of data.root '{self.root}' is empty: no {', '.join(extensions)} files in "
                            f"'{image_dir}' (data.format={self.format})")
        sources, files = [], []
        for image in images:
            if self.format == "folders":
                mask = folder / "masks" / f"{image.stem}.png"
                if not mask.is_file():
                    raise DataError(f"image '{image}' has no mask: expected '{mask}'")
                height, width = check_png_pair(image, mask, self.classes, self.ignore_index)
                sources.append(Source(image, mask, "folders", height, width))
            elif self.format == "geotiff":
                labels = folder / "labels" / f"{image.stem}.tif"
                if not labels.is_file():
                    raise DataError(f"raster '{image}' has no label raster: expected '{labels}'")
                height, width = check_label_raster(image, labels, self.classes, self.ignore_index)
                sources.append(Source(image, labels, "geotiff", height, width))
            else:
                candidates = [folder / "labels" / f"{image.stem}{ext}" for ext in VECTOR_EXTENSIONS]
                vector = next((p for p in candidates if p.is_file()), None)
                if vector is None:
                    raise DataError(f"raster '{image}' has no polygons: expected one of "
                                    f"{', '.join(str(p) for p in candidates)}")
                polygons = read_polygons(image, vector, self.classes, self.class_field)
                with _open_raster(image) as ds:
                    height, width = ds.height, ds.width
                sources.append(Source(image, vector, "vector", height, width, polygons))
            if sources[-1].kind != "folders":
                with _open_raster(image) as ds:
                    if ds.count < 3:
                        raise DataError(f"raster '{image}' has {ds.count} band(s); expected RGB (3 bands)")
            files += [(image.relative_to(self.root).as_posix(), "image"),
                      (sources[-1].labels.relative_to(self.root).as_posix(), "labels")]
        self.files[split] = files
        return sources

    # -- recipe contract -------------------------------------------------------------------------
    @property
    def data_info(self) -> dict[str, Any]:
        return {"class_names": self.classes, "ignore_index": self.ignore_index, "tile_size": self.tile_size,
                "mean": self.mean, "std": self.std, "crs": self.crs, "format": self.format}

    @property
    def splits(self) -> dict[str, list[str]]:
        """The image files per split (what the benchmark adapters count)."""
        return {split: [str(s.image) for s in sources] for split, sources in (self.sources or {}).items()}

    def has_split(self, name: str) -> bool:
        return self.sources is not None and name in self.sources

    def lineage(self) -> DatasetLineage:
        import datasets

        lineage = DatasetLineage(name="infrastructure_segmentation", root=str(self.root),
                                 datacard=read_datacard(self.root))
        for split, files in self.files.items():
            paths = [p for p, _ in files]
            # SHA-256 per file through the stat-keyed digest cache: a large raster is hashed once, not every run
            digest = digest_files(self.root, paths, [r for _, r in files], digests=file_digests(self.root, paths))
            # the split's files as a table (image and label file per row), for MLflow's dataset input
            table = datasets.Dataset.from_dict({"image": paths[0::2], "labels": paths[1::2]}, split=split)
            lineage.splits[split] = SplitLineage(name=split, num_rows=len(self.sources[split]), digest=digest,
                                                 dataset=table)
        return lineage

    # -- loaders ---------------------------------------------------------------------------------
    def dataset(self, split: str, train: bool) -> Tiles:
        return Tiles(self.sources[split], self.tile_size, self.ignore_index, train, self.train_tiles, self.augment)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        images = v2.functional.to_dtype(images, torch.float32, scale=True)
        return v2.functional.normalize(images, self.mean, self.std)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, masks = batch
        return self.normalize(images), masks

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.dataset(split, train)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=shuffled(dataset, self.trainer) if train else None,
                          drop_last=train and len(dataset) > self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_split("test"):
            raise DataError(f"data.root '{self.root}' has no test split")
        return self._loader("test", False)
