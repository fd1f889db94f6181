"""infrastructure_segmentation: the three layouts, the checks before training, the metrics, tiled prediction of
rasters into a GeoTIFF mask and GeoJSON polygons, and the ONNX export. One small run (one epoch) is trained once
and reused by the predict and export tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aifactory_train.errors import DataError
from aifactory_train.recipes.infrastructure_segmentation.data import InfrastructureSegmentationDataModule
from aifactory_train.recipes.infrastructure_segmentation.synth import CLASSES

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def datamodule(root: Path, format: str, **kwargs) -> InfrastructureSegmentationDataModule:
    dm = InfrastructureSegmentationDataModule(str(root), format=format, classes=list(CLASSES), tile_size=64,
                                              num_workers=0, batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


@pytest.fixture
def seg_copy(seg_data, tmp_path) -> Path:
    return Path(shutil.copytree(seg_data, tmp_path / "ortho"))


def write_like(reference: Path, path: Path, array: np.ndarray, **changes) -> None:
    import rasterio

    with rasterio.open(reference) as src:
        profile = {**src.profile, **changes}
    with rasterio.open(path, "w", **profile) as out:
        out.write(array if array.ndim == 3 else array[None])


# -- layouts -----------------------------------------------------------------------------------------------------

def test_three_layouts_give_the_same_windows_and_nodata_is_ignored(seg_data):
    geotiff, vector, folders = (datamodule(seg_data, f) for f in ("geotiff", "vector", "folders"))
    assert geotiff.data_info["crs"] == "EPSG:28992" and folders.data_info["crs"] is None
    a, b, c = (dm.dataset("val", train=False) for dm in (geotiff, vector, folders))
    assert len(a) == len(b) == 4 and len(c) == 4  # 128 px val raster: 2 x 2 windows of 64; 1 PNG tile of 128
    image_a, mask_a = a[0]
    image_b, mask_b = b[0]
    assert image_a.dtype == torch.uint8 and image_a.shape == (3, 64, 64) and mask_a.shape == (64, 64)
    assert torch.equal(image_a, image_b)
    # polygons rasterised onto the window = the label raster made from the same polygons
    assert (mask_a == mask_b).float().mean() > 0.999
    image_c, mask_c = c[0]  # the PNG tile's top-left window is the raster's
    assert torch.equal(image_c, image_a) and torch.equal(mask_c, mask_a)
    assert (mask_a == 255).any() and (image_a[:, mask_a == 255] == 0).all()  # the nodata corner
    assert set(mask_a.unique().tolist()) <= set(range(len(CLASSES))) | {255}


def test_training_windows_augment_image_and_mask_together(seg_data):
    dm = datamodule(seg_data, "geotiff")
    train = dm.dataset("train", train=True)
    assert len(train) == dm.train_tiles
    torch.manual_seed(0)
    for _ in range(8):
        image, mask = train[0]
        roads = mask == CLASSES.index("road")
        if roads.sum() > 20:  # roads are grey in the image wherever the mask says road, whatever the flips
            grey = image[:, roads].float()
            assert (grey.std(dim=0).mean() < 20) and abs(float(grey.mean()) - 122) < 25
            break
    else:
        pytest.fail("no window with a road in 8 draws")


def test_lineage_digests_every_raster_and_label(seg_data):
    dm = datamodule(seg_data, "geotiff")
    lineage = dm.lineage()
    assert set(lineage.splits) == {"train", "val", "test"}
    assert lineage.datacard["license"] == "CC0-1.0"
    again = datamodule(seg_data, "vector").lineage()
    assert again.splits["train"].digest != lineage.splits["train"].digest  # other label files


# -- clear errors before training --------------------------------------------------------------------------------

def test_mask_of_another_size_than_its_image(seg_copy):
    from PIL import Image

    mask = sorted((seg_copy / "train" / "masks").glob("*.png"))[0]
    Image.open(mask).crop((0, 0, 100, 128)).save(mask)
    with pytest.raises(DataError, match=rf"mask '{mask}' is 100x128 px but its image .* is 128x128"):
        datamodule(seg_copy, "folders")


def test_mask_values_outside_the_class_list(seg_copy):
    from PIL import Image

    mask = sorted((seg_copy / "val" / "masks").glob("*.png"))[0]
    values = np.asarray(Image.open(mask)).copy()
    values[5, 5] = 9
    Image.fromarray(values).save(mask)
    with pytest.raises(DataError, match=rf"mask '{mask}' holds value\(s\) \[9\] outside the class list"):
        datamodule(seg_copy, "folders")
    labels = seg_copy / "train" / "labels" / "ortho.tif"
    import rasterio

    with rasterio.open(labels) as src:
        values = src.read(1)
    values[200, 200] = 7
    write_like(labels, labels, values)
    with pytest.raises(DataError, match=rf"mask '{labels}' holds value\(s\) \[7\]"):
        datamodule(seg_copy, "geotiff")


def test_label_raster_in_another_crs_or_off_the_grid(seg_copy):
    import rasterio
    from rasterio.transform import from_origin

    labels = seg_copy / "val" / "labels" / "ortho.tif"
    with rasterio.open(labels) as src:
        values, transform = src.read(1), src.transform
    write_like(labels, labels, values, crs="EPSG:4326")
    with pytest.raises(DataError, match=rf"label raster '{labels}' is in CRS EPSG:4326 but its image .* EPSG:28992"):
        datamodule(seg_copy, "geotiff")
    write_like(labels, labels, values, crs="EPSG:28992", transform=from_origin(transform.c + 1.0, transform.f, 0.25,
                                                                                 0.25))
    with pytest.raises(DataError, match=rf"label raster '{labels}' .* is not aligned to its image"):
        datamodule(seg_copy, "geotiff")


def test_polygons_outside_the_raster_or_in_another_crs(seg_copy):
    import geopandas
    from shapely.affinity import translate

    vector = seg_copy / "test" / "labels" / "ortho.geojson"
    frame = geopandas.read_file(vector)
    frame.to_crs("EPSG:4326").to_file(vector, driver="GeoJSON")
    with pytest.raises(DataError, match=rf"polygons '{vector}' are in CRS EPSG:4326 but the raster"):
        datamodule(seg_copy, "vector")
    frame.loc[2, "geometry"] = translate(frame.geometry[2], xoff=5000)
    frame.to_file(vector, driver="GeoJSON")
    with pytest.raises(DataError, match=rf"polygons '{vector}': 1 of {len(frame)} lie outside the raster .* "
                                        r"e\.g\. feature 2"):
        datamodule(seg_copy, "vector")


def test_corrupt_tile_and_empty_split(seg_copy):
    tile = sorted((seg_copy / "train" / "images").glob("*.png"))[1]
    whole = tile.read_bytes()
    tile.write_bytes(whole[:300])
    with pytest.raises(DataError, match=rf"cannot decode '{tile}'"):
        datamodule(seg_copy, "folders")
    tile.write_bytes(whole)
    raster = seg_copy / "val" / "rasters" / "ortho.tif"
    raster.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(DataError, match=rf"cannot read raster '{raster}'"):
        datamodule(seg_copy, "geotiff")
    for png in (seg_copy / "val" / "images").glob("*.png"):
        png.unlink()
    with pytest.raises(DataError, match=r"split 'val' of data.root .* is empty: no .*png.* files in"):
        datamodule(seg_copy, "folders")


def test_geotiff_without_crs_is_refused_when_georeferenced_output_is_asked(seg_copy):
    import rasterio

    from aifactory_train.recipes.infrastructure_segmentation.predict import open_input

    raster = seg_copy / "val" / "rasters" / "ortho.tif"
    with rasterio.open(raster) as src:
        values = src.read()
    plain = seg_copy / "plain.tif"
    write_like(raster, plain, values, crs=None)
    with pytest.raises(DataError, match=rf"raster '{plain}' has no CRS, and predict.georeferenced=true"):
        open_input(plain, georeferenced=True)
    open_input(plain, georeferenced=False).close()


# -- metrics -----------------------------------------------------------------------------------------------------

def test_miou_matches_a_confusion_matrix_computed_with_numpy():
    from aifactory_train.recipes.infrastructure_segmentation.module import EvalMetrics

    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (3, 32, 32))
    target[:, :4] = 255
    preds = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 4, target.shape)) % 255
    preds[preds > 3] = 0
    metrics = EvalMetrics(5, 255)  # class 4 absent from both: left out of the mean
    metrics.update(torch.from_numpy(preds), torch.from_numpy(target))
    iou, _ = metrics.compute_and_reset()
    valid = target != 255
    confusion = np.zeros((5, 5))
    np.add.at(confusion, (target[valid], preds[valid]), 1)
    expected = np.diag(confusion) / (confusion.sum(0) + confusion.sum(1) - np.diag(confusion))
    np.testing.assert_allclose(iou[:4].numpy(), expected[:4], rtol=1e-5)
    assert torch.isnan(iou[4])
    assert float(iou.nanmean()) == pytest.approx(expected[:4].mean(), rel=1e-5)


def test_boundary_iou_punishes_a_thin_line_off_by_two_pixels_more_than_region_iou():
    from aifactory_train.recipes.infrastructure_segmentation.module import EvalMetrics

    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[0, :, 30:33] = 1   # a 3 px cable trench
    target[0, 40:60, 40:60] = 2  # a roof
    shifted = torch.roll(target, 2, dims=2)
    metrics = EvalMetrics(3, 255)
    metrics.update(target, target)
    iou, boundary = metrics.compute_and_reset()
    assert torch.allclose(iou, torch.ones(3)) and torch.allclose(boundary, torch.ones(3, dtype=torch.float64))
    metrics.update(shifted, target)
    iou, boundary = metrics.compute_and_reset()
    assert float(boundary[1]) < 0.5 and float(iou[2]) > float(boundary[2])


# -- train once, then predict and export -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seg_run(seg_data, tmp_path_factory):
    from conftest import aift

    work = tmp_path_factory.mktemp("seg_run")
    result = aift("train", "recipe=infrastructure_segmentation", f"data.root={seg_data}", "trainer.max_epochs=1",
                  "data.train_tiles=48", "data.batch_size=8", "data.num_workers=0",
                  f"tracking.uri=sqlite:///{work}/mlflow.db", "hydra.run.dir=run", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    return {"work": work, "summary": summary, "data": seg_data}


@pytest.fixture(scope="module")
def seg_module(seg_run):
    from aifactory_train.recipes.infrastructure_segmentation.module import InfrastructureSegmentationModule
    from aifactory_train.run.checkpoints import load_trained_module

    return load_trained_module(InfrastructureSegmentationModule, seg_run["summary"]["last_checkpoint"]).eval()


def test_a_run_logs_miou_per_class_and_boundary_iou(seg_run):
    from mlflow.tracking import MlflowClient

    summary = seg_run["summary"]
    assert summary["recipe"] == "infrastructure_segmentation" and summary["monitor"] == "val/miou"
    run = MlflowClient(tracking_uri=f"sqlite:///{seg_run['work']}/mlflow.db").get_run(summary["mlflow_run_id"])
    for key in ("val/miou", "val/boundary_iou", "val/iou_background", "test/miou", "test/iou_road"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    assert (seg_run["work"] / "run" / "reports" / "test_per_class_iou.csv").is_file()


def test_prediction_does_not_depend_on_the_tile_grid(seg_module, seg_data):
    import rasterio

    from aifactory_train.recipes.infrastructure_segmentation.export import DeployableSegmenter
    from aifactory_train.recipes.infrastructure_segmentation.predict import segment_blocks

    info = seg_module.hparams.data_info
    model = DeployableSegmenter(seg_module.net, info["mean"], info["std"]).eval()

    def predict(tile, overlap, block, probabilities=False):
        out = np.zeros((5, 256, 256) if probabilities else (256, 256), dtype=np.float32 if probabilities else np.uint8)
        with rasterio.open(seg_data / "train" / "rasters" / "ortho.tif") as src, torch.no_grad():
            for window, part in segment_blocks(model, src, tile, overlap, block, 4, torch.device("cpu"),
                                               probabilities):
                out[(slice(None), *window.toslices()) if probabilities else window.toslices()] = part
        return out

    reference = predict(64, 16, 256)
    assert np.array_equal(predict(64, 16, 96), reference)  # blocks only bound the memory: the same result
    assert (reference == 255).sum() > 0 and (reference[reference != 255] > 0).any()
    # another tile size and overlap: another grid, the same probabilities within a tolerance (the barely trained
    # model of the fixture has near ties, so probabilities are compared, not classes)
    first, other = predict(64, 16, 256, True), predict(96, 32, 160, True)
    assert np.abs(first - other).mean() < 0.02, np.abs(first - other).mean()
    assert np.quantile(np.abs(first - other), 0.999) < 0.15, np.quantile(np.abs(first - other), 0.999)


class ClassFromFirstBand(torch.nn.Module):
    """A 'model' whose class at a pixel is the first band's value there (x 255): the predicted mask is known."""

    def forward(self, batch):
        classes = (batch[:, 0] * 255).round().long().clamp(0, len(CLASSES) - 1)
        return torch.nn.functional.one_hot(classes, len(CLASSES)).permute(0, 3, 1, 2).float() * 10, None


@pytest.mark.parametrize("cell", [0, 144])
def test_polygons_streamed_block_by_block_are_those_of_the_whole_mask(cell, tmp_path):
    """predict_raster polygonises one block at a time and merges the parts cut by block edges (also shapes that
    span several rows of blocks, or join only in a later row); the GeoJSON must hold the polygons that polygonising
    the whole mask at once gives, or with ``cell`` > 0 each cell of the mask on its own (areas cut at cell
    borders)."""
    import geopandas
    import rasterio
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import from_origin

    from aifactory_train.recipes.infrastructure_segmentation.predict import predict_raster
    from aifactory_train.recipes.infrastructure_segmentation.synth import make_scene

    transform = from_origin(233000.0, 582000.0, 0.25, 0.25)
    _, labels, _ = make_scene(np.random.default_rng(3), 300, transform)
    labels[labels == 255] = 0  # the scene's nodata corner: here simply ground
    labels[20:280, 40:44] = 1  # a road over every row of blocks
    labels[200:204, 100:260], labels[60:204, 100:104], labels[60:204, 256:260] = 2, 2, 2  # a U joined in a late row
    source = tmp_path / "coded.tif"
    with rasterio.open(source, "w", driver="GTiff", width=300, height=300, count=3, dtype="uint8", crs="EPSG:28992",
                       transform=transform) as out:
        out.write(np.stack([labels] * 3))
    opts = {"tile": 64, "overlap": 16, "block": 72, "simplify": 0.0, "min_area": 0.0, "georeferenced": True,
            "cell": cell}
    row = predict_raster(ClassFromFirstBand(), source, tmp_path / "out" / "coded", opts, list(CLASSES), 4,
                         torch.device("cpu"), draw=False)
    with rasterio.open(row["mask"]) as mask:
        assert np.array_equal(mask.read(1), labels)
    streamed = geopandas.read_file(row["polygons"])
    assert streamed.crs.to_epsg() == 28992
    step = cell or 300
    whole = [(CLASSES[int(value)], shapely.geometry.shape(geometry))
             for r in range(0, 300, step) for c in range(0, 300, step)
             for geometry, value in shapes(labels[r:r + step, c:c + step], mask=labels[r:r + step, c:c + step] > 0,
                                           transform=transform * transform.translation(c, r))]
    assert len(streamed) == len(whole) >= 10
    assert row["polygons_per_class"] == streamed["class"].value_counts().to_dict()
    for name in CLASSES[1:]:
        expected = shapely.union_all([g for c, g in whole if c == name])
        got = shapely.union_all(list(streamed.geometry[streamed["class"] == name]))
        assert shapely.symmetric_difference(expected, got).area < 1e-9, name
        assert sorted(round(g.area, 4) for c, g in whole if c == name) == \
            sorted(streamed["area"][streamed["class"] == name]), name


def test_a_polygon_cell_that_is_not_a_multiple_of_the_block_is_refused(tmp_path):
    from test_config import compose_run

    from aifactory_train.errors import ConfigError
    from aifactory_train.records.config import validate

    cfg = compose_run(["recipe=infrastructure_segmentation", "predict.block_size=1000"], tmp_path)
    with pytest.raises(ConfigError, match=r"'predict.polygon_cell_size'.*8192.*a multiple of predict.block_size "
                                          r"\(1000\)"):
        validate(cfg)


def test_an_error_while_predicting_reaches_the_user_as_raised(tmp_path, monkeypatch):
    """The polygons are written by pyogrio pulling from a generator; an error inside it must come out as itself
    (here: a DataError for an unreadable block), not as the writer's error."""
    import rasterio
    from rasterio.transform import from_origin

    from aifactory_train.recipes.infrastructure_segmentation import predict

    source = tmp_path / "flat.tif"
    with rasterio.open(source, "w", driver="GTiff", width=200, height=200, count=3, dtype="uint8", crs="EPSG:28992",
                       transform=from_origin(233000.0, 582000.0, 0.25, 0.25)) as out:
        out.write(np.ones((3, 200, 200), dtype=np.uint8))
    blocks = predict.segment_blocks

    def fails_in_the_second_row(*args, **kwargs):
        for window, mask in blocks(*args, **kwargs):
            if window.row_off > 0:
                raise DataError(f"cannot read raster '{source}': block at row {window.row_off} is corrupt")
            yield window, mask

    monkeypatch.setattr(predict, "segment_blocks", fails_in_the_second_row)
    opts = {"tile": 64, "overlap": 16, "block": 100, "simplify": 0.0, "min_area": 0.0, "georeferenced": True}
    with pytest.raises(DataError, match="block at row 100 is corrupt"):
        predict.predict_raster(ClassFromFirstBand(), source, tmp_path / "out" / "flat", opts, list(CLASSES), 4,
                               torch.device("cpu"), draw=False)


def test_predict_writes_a_georeferenced_mask_and_polygons_that_open_with_their_crs(seg_run, tmp_path):
    import geopandas
    import rasterio
    from conftest import aift

    source = seg_run["data"] / "val" / "rasters"
    result = aift("predict", "recipe=infrastructure_segmentation", f"ckpt_path={seg_run['summary']['last_checkpoint']}",
                  f"input={source}", "predict.tile_size=64", "predict.overlap=16", "predict.block_size=96", "predict.polygon_cell_size=192",
                  "predict.draw=true", "predict.simplify=0.1", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    row = json.loads((out / "predictions.jsonl").read_text().splitlines()[0])
    assert row["crs"] == "EPSG:28992" and row["mask"] == "ortho_mask.tif"
    with rasterio.open(out / row["mask"]) as mask, rasterio.open(source / "ortho.tif") as image:
        assert mask.crs == image.crs and mask.transform == image.transform and mask.shape == image.shape
        assert mask.nodata == 255 and mask.dtypes[0] == "uint8"
        values = mask.read(1)
        assert (values[image.read_masks(1) == 0] == 255).all()
    polygons = geopandas.read_file(out / row["polygons"])
    assert polygons.crs.to_epsg() == 28992
    assert set(polygons["class"]) <= set(CLASSES[1:]) and (polygons["area"] > 0).all()
    assert polygons.total_bounds[0] >= image.bounds.left - 1e-6 and polygons.total_bounds[2] <= image.bounds.right
    assert (out / "ortho_overlay.png").is_file()
    counts = row["pixels_per_class"]
    assert sum(counts.values()) + row["nodata_pixels"] == 128 * 128


def test_onnx_export_matches_pytorch_on_tiles_of_the_raster_with_any_tile_size(seg_run, seg_module):
    import onnxruntime
    import rasterio
    from conftest import aift
    from rasterio.windows import Window

    result = aift("export", "recipe=infrastructure_segmentation", f"ckpt_path={seg_run['summary']['last_checkpoint']}",
                  "format=onnx", "export.tile_size=64", "export.overlap=16", "hydra.run.dir=export", cwd=seg_run["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = seg_run["work"] / "export"
    parity = json.loads((out / "export.json").read_text())["parity"]  # aift export's own check, on test tiles
    assert parity["passed"] and parity["inputs"]["records"] >= 1 and parity["max_abs_diff"] <= parity["tolerance"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["class_names"] == CLASSES and meta["tiling"]["tile_size"] == 64 and meta["tiling"]["overlap"] == 16
    assert meta["crs"]["training_crs"] == "EPSG:28992"
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    info = seg_module.hparams.data_info
    from aifactory_train.recipes.infrastructure_segmentation.export import DeployableSegmenter

    model = DeployableSegmenter(seg_module.net, info["mean"], info["std"]).eval()
    with rasterio.open(seg_run["data"] / "train" / "rasters" / "ortho.tif") as src:
        for size in (64, 96, 128):  # height and width are dynamic
            tile = src.read(window=Window(32, 64, size, size)).astype(np.float32)[None] / 255
            logits, probabilities = session.run(None, {"image": tile})
            with torch.no_grad():
                reference, _ = model(torch.from_numpy(tile))
            assert logits.shape == (1, len(CLASSES), size, size)
            np.testing.assert_allclose(logits, reference.numpy(), atol=1e-3, rtol=1e-3)
            assert (logits.argmax(1) == reference.numpy().argmax(1)).mean() > 0.999


def test_synth_takes_what_aift_data_synth_passes_and_refuses_a_variant(tmp_path):
    import inspect

    import rasterio

    from aifactory_train.recipes.infrastructure_segmentation.synth import synthesize

    assert {"out", "size", "seed", "variant", "overwrite"} <= set(inspect.signature(synthesize).parameters)
    with pytest.raises(DataError, match=r"--variant 'rgb': infrastructure_segmentation has no variants"):
        synthesize(tmp_path / "x", size=256, variant="rgb")
    with pytest.raises(DataError, match=r"--size 100 is too small"):
        synthesize(tmp_path / "y", size=100)
    out = synthesize(tmp_path / "z", size=256, seed=1)
    with rasterio.open(out / "val" / "rasters" / "ortho.tif") as image:
        assert image.crs.to_epsg() == 28992 and image.nodata == 0 and image.res == (0.25, 0.25)
    assert len(list((out / "train" / "images").glob("*.png"))) == 4  # 256 px cut into 128 px tiles


# -- aift data check ---------------------------------------------------------------------------------------------

def test_data_check_counts_windows_and_pixels_and_finds_a_tile_of_train_in_test(seg_copy, tmp_path):
    """The report's examples are the evaluation windows (data.tile_size) with their classes and pixel counts, the
    same from the label raster as from the polygons; imagery of train copied into test (as another file) is
    leakage, found from the window hashes."""
    import geopandas
    from aifactory_train.commands.cli import main
    from aifactory_train.data.data_check import REPORT_JSON

    def check(out, *overrides):
        code = main(["data", "check", "recipe=infrastructure_segmentation", f"data.root={seg_copy}",
                     "data.tile_size=64", *overrides, "--out", str(out)])
        return code, json.loads((out / REPORT_JSON).read_text())

    code, report = check(tmp_path / "geotiff")
    assert code == 0, report["problems"]
    train = report["splits"]["train"]
    assert train["count"] == (256 // 64) ** 2
    assert all(pair["count"] == 0 for pair in report["leakage"].values()) and "train/test" in report["leakage"]
    counters = train["counters"]
    assert sum(v for k, v in counters.items()) == 256 * 256
    assert counters["pixels road"] > 0 and counters["pixels nodata (ignored)"] > 0
    assert train["classes"]["counts"]["background"] <= train["count"]
    assert (tmp_path / "geotiff" / report["contact_sheet"]["file"]).is_file()

    # the polygons as a GeoPackage (the vector layout's other format) give the same pixels per class (nodata comes
    # from the image's mask in both layouts)
    for split in ("train", "val", "test"):
        labels = seg_copy / split / "labels"
        geopandas.read_file(labels / "ortho.geojson").to_file(labels / "ortho.gpkg", driver="GPKG")
        (labels / "ortho.geojson").unlink()
    code, from_polygons = check(tmp_path / "vector", "data.format=vector")
    assert code == 0, from_polygons["problems"]
    assert from_polygons["splits"]["train"]["counters"] == counters

    shutil.copy(seg_copy / "train" / "rasters" / "ortho.tif", seg_copy / "test" / "rasters" / "copied.tif")
    shutil.copy(seg_copy / "train" / "labels" / "ortho.gpkg", seg_copy / "test" / "labels" / "copied.gpkg")
    code, leaked = check(tmp_path / "leak", "data.format=vector")
    assert code == 1 and leaked["leakage"]["train/test"]["count"] == train["count"], leaked["leakage"]
    assert leaked["leakage"]["val/test"]["count"] == 0


def test_the_memory_benchmark_predicts_a_mosaic_raster_with_content_everywhere(tmp_path):
    """predict_rss.py (the figure behind 'memory stays bounded') still runs: its mosaic VRT repeats the scene, so
    the far corner of the raster has as many polygons as the first."""
    import rasterio

    from aifactory_train.recipes.infrastructure_segmentation.predict_rss import mosaic_vrt, one

    row = one(1024, "tiny", 256, 32, 512, 32, "mosaic", 512, tmp_path)
    assert row["polygons"] > 0 and row["peak_rss_mib"] >= row["rss_before_predict_mib"] > 0
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8") as out:
        out.write(np.arange(64 * 64 * 3, dtype=np.uint32).reshape(3, 64, 64).astype(np.uint8))
    mosaic_vrt(scene, 64, 150, rasterio.Affine(0.25, 0, 233000.0, 0, -0.25, 582000.0), tmp_path / "m.vrt")
    with rasterio.open(tmp_path / "m.vrt") as mosaic, rasterio.open(scene) as tile:
        assert mosaic.shape == (150, 150) and mosaic.crs.to_epsg() == 28992
        whole = mosaic.read()
        assert np.array_equal(whole[:, 64:128, 128:150], tile.read()[:, :, :22])
