"""crop_detection: COCO/HF loading and its bad inputs, box-aware augmentation, metrics, model options, ONNX."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from aifactory_train.errors import ConfigError, DataError
from aifactory_train.recipes.crop_detection.data import CropDetectionDataModule
from aifactory_train.recipes.crop_detection.model import build_detector
from aifactory_train.recipes.crop_detection.module import DetectionRecall

SPLITS = {s: {"annotations": f"annotations/{s}.json", "images": f"images/{s}"} for s in ("train", "val", "test")}


def datamodule(root, **kwargs) -> CropDetectionDataModule:
    return CropDetectionDataModule(root=str(root), splits=SPLITS, batch_size=4, num_workers=0, **kwargs)


def coco(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def save(root: Path, data: dict, split: str = "train") -> None:
    (root / "annotations" / f"{split}.json").write_text(json.dumps(data))


# -- loading -------------------------------------------------------------------------------------
def test_coco_non_contiguous_ids_map_to_labels_in_id_order(crop_data):
    dm = datamodule(crop_data)
    dm.setup("fit")
    assert dm.class_names == ["crop", "weed"] and dm.data_info["category_ids"] == [3, 7]
    dataset = dm.dataset("train", train=False)
    labels = torch.cat([dataset[i][1]["labels"] for i in range(len(dataset))])
    assert set(labels.tolist()) == {1, 2}  # 0 stays background
    raw = coco(crop_data)
    assert Counter(labels.tolist()) == Counter({3: 1, 7: 2}[a["category_id"]] for a in raw["annotations"])


def test_images_without_annotations_are_negatives(crop_data):
    dm = datamodule(crop_data)
    dm.setup("fit")
    raw = coco(crop_data)
    annotated = {a["image_id"] for a in raw["annotations"]}
    negatives = [i for i, img in enumerate(raw["images"]) if img["id"] not in annotated]
    assert negatives, "the synthetic data should contain negatives"
    image, target = dm.dataset("train", train=False)[negatives[0]]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert image.shape == (3, 256, 256)


def test_hf_object_detection_layout_loads_the_same_boxes(crop_data, tmp_path):
    from conftest import write_hf_detection_layout

    root = write_hf_detection_layout(crop_data, tmp_path / "hf")
    hf = CropDetectionDataModule(root=str(root), format="hf", class_names=["crop", "weed"], num_workers=0)
    hf.setup("fit")
    reference = datamodule(crop_data)
    reference.setup("fit")
    assert hf.class_names == reference.class_names
    assert sum(len(b) for b in hf.splits["train"]["boxes"]) == sum(len(b) for b in reference.splits["train"]["boxes"])
    assert not hf.has_split("test")


def test_hf_category_outside_class_names(crop_data, tmp_path):
    import shutil

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        name = coco(crop_data, split)["images"][0]["file_name"]
        shutil.copy(crop_data / "images" / split / name, tmp_path / split / name)
        (tmp_path / split / "metadata.jsonl").write_text(json.dumps(
            {"file_name": name, "objects": {"bbox": [[1, 1, 10, 10]], "category": [5]}}) + "\n")
    with pytest.raises(DataError, match=r"line 1: category 5 is not an index into data.class_names"):
        CropDetectionDataModule(root=str(tmp_path), format="hf", class_names=["crop", "weed"], num_workers=0).setup("fit")


# -- bad input -----------------------------------------------------------------------------------
def test_annotation_refers_to_missing_image_file(crop_copy):
    name = coco(crop_copy)["images"][3]["file_name"]
    (crop_copy / "images" / "train" / name).unlink()
    with pytest.raises(DataError) as err:
        datamodule(crop_copy).setup("fit")
    assert name in str(err.value) and "does not exist" in str(err.value) and "train.json" in str(err.value)


def test_annotation_refers_to_unknown_image_id(crop_copy):
    data = coco(crop_copy)
    data["annotations"][0]["image_id"] = 999
    save(crop_copy, data)
    with pytest.raises(DataError, match=r"refers to image_id 999, which is not in 'images'"):
        datamodule(crop_copy).setup("fit")


def test_category_id_not_in_categories(crop_copy):
    data = coco(crop_copy)
    data["annotations"][2]["category_id"] = 5
    save(crop_copy, data)
    with pytest.raises(DataError) as err:
        datamodule(crop_copy).setup("fit")
    assert "category_id 5" in str(err.value) and "valid ids: [3, 7]" in str(err.value)


def test_boxes_without_area_are_refused_or_their_images_skipped_and_counted(crop_copy, caplog):
    data = coco(crop_copy)
    data["annotations"][0]["bbox"][2] = 0
    data["annotations"][1]["bbox"][3] = -4
    save(crop_copy, data)
    with pytest.raises(DataError, match=r"annotation \d+ \(annotations\[0\]\): 'bbox' .* has width 0"):
        datamodule(crop_copy).setup("fit")
    dm = datamodule(crop_copy, on_invalid="skip")
    dm.setup("fit")
    bad_images = {data["annotations"][0]["image_id"], data["annotations"][1]["image_id"]}
    assert len(dm.splits["train"]) == len(data["images"]) - len(bad_images)  # each image goes with all its boxes
    assert dm.invalid_records["impossible_box"]["count"] == len(bad_images)
    assert "left out" in caplog.text and "impossible box" in caplog.text
    assert dm.lineage().datacard["skipped_impossible_box"] == str(len(bad_images))


def test_boxes_outside_the_image_are_clipped_and_counted(crop_copy):
    data = coco(crop_copy)
    ann = data["annotations"][0]
    ann["bbox"] = [-10.0, 240.0, 50.0, 40.0]  # left of and below the 256 px image
    save(crop_copy, data)
    dm = datamodule(crop_copy)
    dm.setup("fit")
    assert dm.box_counts["clipped_outside_image"] == 1
    index = [i for i, img in enumerate(data["images"]) if img["id"] == ann["image_id"]][0]
    assert [0.0, 240.0, 40.0, 256.0] in [list(map(float, b)) for b in dm.splits["train"][index]["boxes"]]


def test_empty_annotation_list_for_a_split(crop_copy):
    data = coco(crop_copy, "val")
    data["annotations"] = []
    save(crop_copy, data, "val")
    with pytest.raises(DataError, match=r"val.json' \(split 'val'\) has an empty annotation list"):
        datamodule(crop_copy).setup("fit")


def test_image_size_in_json_differs_from_the_file(crop_copy):
    data = coco(crop_copy)
    data["images"][1]["width"] = 640
    save(crop_copy, data)
    with pytest.raises(DataError) as err:
        datamodule(crop_copy).setup("fit")
    assert data["images"][1]["file_name"] in str(err.value) and "256x256" in str(err.value) and "640x256" in str(err.value)


def test_missing_root_gives_the_synth_hint(tmp_path):
    with pytest.raises(DataError, match="aift data synth crop_detection"):
        datamodule(tmp_path / "nope").setup("fit")


def test_split_with_other_categories(crop_copy):
    data = coco(crop_copy, "val")
    data["categories"].append({"id": 9, "name": "stone"})
    save(crop_copy, data, "val")
    with pytest.raises(DataError, match="split 'val' has other categories"):
        datamodule(crop_copy).setup("fit")


# -- augmentation ----------------------------------------------------------------------------------
def test_augmentation_moves_boxes_with_the_image(crop_copy):
    """A white square on black: after flips and scale jitter the box must still frame the white pixels."""
    from PIL import Image

    data = coco(crop_copy)
    first = data["images"][0]
    pixels = np.zeros((256, 256, 3), dtype=np.uint8)
    pixels[40:100, 150:230] = 255
    Image.fromarray(pixels).save(crop_copy / "images" / "train" / first["file_name"], quality=100)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first["id"]]
    data["annotations"].append({"id": 10**6, "image_id": first["id"], "category_id": 7, "bbox": [150, 40, 80, 60]})
    save(crop_copy, data)
    dm = datamodule(crop_copy, augment={"photometric": False, "scale_jitter": [0.8, 1.2], "hflip": True, "vflip": True})
    dm.setup("fit")
    dataset = dm.dataset("train", train=True)
    moved = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = dataset[0]
        (x0, y0, x1, y1), = target["boxes"].round().int().tolist()
        white = image[0] > 128
        inside = white[y0 + 2:y1 - 2, x0 + 2:x1 - 2].float().mean()
        assert inside > 0.95 and white.sum() <= (x1 - x0 + 2) * (y1 - y0 + 2)
        moved.add((x0, y0))
    assert len(moved) > 3  # the transforms really moved the box around


# -- metrics ---------------------------------------------------------------------------------------
def test_torchmetrics_map_matches_pycocotools_cocoeval(crop_data):
    """The backend the recipe uses (faster_coco_eval) against the reference COCOeval on the same predictions."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from aifactory_train.recipes.crop_detection.module import MAP_BACKEND, coco_map_metric

    assert MAP_BACKEND == "faster_coco_eval"  # the cross-check is against another implementation

    gt_path = crop_data / "annotations" / "val.json"
    raw = json.loads(gt_path.read_text())
    rng = np.random.default_rng(0)
    detections, preds, targets = [], [], []
    for img in raw["images"]:
        anns = [a for a in raw["annotations"] if a["image_id"] == img["id"]]
        boxes, scores, cats = [], [], []
        for a in anns:
            if rng.random() < 0.8:  # found, slightly off
                x, y, w, h = a["bbox"]
                boxes.append([x + rng.normal(0, 2), y + rng.normal(0, 2), w * rng.uniform(0.85, 1.15), h * rng.uniform(0.85, 1.15)])
                scores.append(rng.uniform(0.3, 1.0))
                cats.append(a["category_id"] if rng.random() < 0.9 else 10 - a["category_id"])
        for _ in range(2):  # false positives
            boxes.append([*rng.uniform(0, 200, 2), *rng.uniform(10, 40, 2)])
            scores.append(rng.uniform(0, 0.6))
            cats.append(int(rng.choice([3, 7])))
        xyxy = lambda bs: torch.tensor([[x, y, x + w, y + h] for x, y, w, h in bs], dtype=torch.float32).reshape(-1, 4)
        pred = {"boxes": xyxy(boxes), "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(cats)}
        preds.append(pred)
        # the reference gets exactly the float32 values torchmetrics sees (a borderline IoU must not flip)
        detections += [{"image_id": img["id"], "category_id": int(c), "score": float(s),
                        "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
                       for b, s, c in zip(pred["boxes"].double(), pred["scores"], pred["labels"])]
        targets.append({"boxes": xyxy([a["bbox"] for a in anns]), "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.long)})
        for a, b in zip(anns, targets[-1]["boxes"].double()):  # the reference's ground truth: the same float32 values
            a["bbox"] = [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
    metric = coco_map_metric()  # what the recipe uses: faster_coco_eval backend, COCO's thresholds
    metric.update(preds, targets)
    ours = metric.compute()
    for a in raw["annotations"]:
        a["area"] = a["bbox"][2] * a["bbox"][3]
    reference = COCO()
    reference.dataset = raw
    reference.createIndex()
    evaluator = COCOeval(reference, reference.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert float(ours["map"]) == pytest.approx(evaluator.stats[0], abs=1e-6)
    assert float(ours["map_50"]) == pytest.approx(evaluator.stats[1], abs=1e-6)
    assert float(ours["map_75"]) == pytest.approx(evaluator.stats[2], abs=1e-6)
    assert 0.1 < evaluator.stats[1] < 0.95  # a non-trivial case


def test_weed_recall_counts_matches_above_the_score_threshold():
    metric = DetectionRecall(label=2, iou_threshold=0.5, score_threshold=0.5)
    truth = {"boxes": torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 5, 5.]]),
             "labels": torch.tensor([2, 2, 2, 1])}
    pred = {"boxes": torch.tensor([[0, 0, 10, 11], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 5, 5.]]),
            "scores": torch.tensor([0.9, 0.8, 0.3, 0.7, 0.9]),  # a duplicate, one too unsure, one of the wrong class
            "labels": torch.tensor([2, 2, 2, 1, 2])}
    metric.update([pred], [truth])
    assert metric.compute().item() == pytest.approx(1 / 3)


# -- model options ---------------------------------------------------------------------------------
def test_detector_options_fail_with_clear_messages():
    with pytest.raises(ConfigError, match="unknown detector 'yolo'"):
        build_detector("yolo", 3)
    with pytest.raises(ConfigError, match=r"needs 3 lists .* of 5 sizes"):
        build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, anchor_sizes=[[8, 16]] * 3)
    with pytest.raises(ConfigError, match="fixed input size"):
        build_detector("ssdlite320_mobilenet_v3_large", 3, min_size=640)
    with pytest.raises(ConfigError, match=r"model.extra"):
        build_detector("fcos_resnet50_fpn", 3, extra={"no_such_option": 1})


def test_custom_anchor_sizes_are_used():
    model = build_detector("retinanet_resnet50_fpn_v2", 3, anchor_sizes=[[8, 10, 12], [16, 20, 24], [32, 40, 48],
                                                                          [64, 80, 96], [128, 160, 192]])
    assert model.anchor_generator.sizes[0] == (8, 10, 12)


@pytest.mark.parametrize("channels_last, expected", [("auto", False), (True, True), (False, False)])
def test_speed_options_change_the_layout_and_compile_only_the_backbone(channels_last, expected):
    from omegaconf import OmegaConf

    from aifactory_train.recipes.crop_detection.module import CropDetectionModule
    from aifactory_train.locations import config_dir

    model = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "fasterrcnn_mobilenet_v3_large_320_fpn.yaml"))
    module = CropDetectionModule(model={**model, "channels_last": channels_last, "compile_backbone": True},
                                 optim={}, loss={}, data_info={"class_names": ["crop", "weed"]})
    keys = list(module.net.state_dict())
    module.setup("fit")  # no trainer: a CPU run, so channels_last=auto stays NCHW
    first_conv = module.net.backbone.body["0"][0].weight
    assert first_conv.is_contiguous(memory_format=torch.channels_last) == expected
    assert module.net.backbone._compiled_call_impl is not None  # compiled at its first call (GPU script)
    assert module.net.rpn._compiled_call_impl is None and module.net.roi_heads._compiled_call_impl is None
    assert list(module.net.state_dict()) == keys  # checkpoints keep their keys


@pytest.fixture(scope="module")
def mobilenet_imagenet_file(tmp_path_factory) -> Path:
    """A MobileNetV3-Large classifier state dict, as torchvision's ImageNet file holds one (random values here)."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_large.pth"
    torch.manual_seed(11)
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), path)
    return path


def test_backbone_weights_load_and_only_the_last_stages_train(mobilenet_imagenet_file):
    from aifactory_train.recipes.crop_detection.module import CropDetectionModule

    saved = torch.load(mobilenet_imagenet_file, weights_only=True)
    module = CropDetectionModule(model={"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "anchor_sizes": None,
                                        "backbone_weights_path": str(mobilenet_imagenet_file),
                                        "trainable_backbone_layers": 2},
                                 optim={}, loss={}, data_info={"class_names": ["crop", "weed"]})
    body = module.net.backbone.body
    for key, value in body.state_dict().items():
        assert torch.equal(value, saved[f"features.{key}"]), key
    # 6 stages starting at blocks 0, 2, 4, 7, 13, 16 (torchvision's grouping); the last 2 train: blocks 13-16.
    # BatchNorm is frozen everywhere, so look at the convolutions
    frozen_blocks = [name for name, block in body.items()
                     if not any(p.requires_grad for m in block.modules() if isinstance(m, torch.nn.Conv2d)
                                for p in m.parameters())]
    assert frozen_blocks == [str(i) for i in range(13)]
    assert not any(p.requires_grad for m in module.frozen_norm for p in m.parameters())
    assert all(p.requires_grad for p in module.net.backbone.fpn.parameters())

    module.train()
    assert module.net.training and not any(m.training for m in module.frozen_norm)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    images = [torch.rand(3, 256, 256), torch.rand(3, 256, 256)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 120.0]]), "labels": torch.tensor([2])}] * 2
    losses = module.net(images, targets)
    sum(losses.values()).backward()
    torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1).step()
    after = module.net.state_dict()
    assert torch.equal(after["backbone.body.0.0.weight"], before["backbone.body.0.0.weight"])  # frozen stage
    assert torch.equal(after["backbone.body.0.1.running_mean"], before["backbone.body.0.1.running_mean"])  # BN stats
    assert torch.equal(after["backbone.body.16.1.weight"], before["backbone.body.16.1.weight"])  # BN scale, last stage
    assert not torch.equal(after["backbone.body.16.0.weight"], before["backbone.body.16.0.weight"])  # trains

    # frozen stages compute no weight gradients, and the FLOP count knows it
    scratch = CropDetectionModule(model={"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "anchor_sizes": None},
                                  optim={}, loss={}, data_info={"class_names": ["crop", "weed"]})
    assert module.measure_flops((3, 256, 256), targets[0]) < scratch.measure_flops((3, 256, 256), targets[0])


def test_backbone_weights_that_do_not_fit_or_cannot_apply_are_refused(mobilenet_imagenet_file, tmp_path):
    import torchvision

    from aifactory_train.errors import CheckpointError
    from aifactory_train.recipes.crop_detection.config import ModelConfig

    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    with pytest.raises(CheckpointError, match=r"model.backbone_weights_path.*resnet18.pth.*does not fit.*missing tensors"):
        build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, backbone_weights_path=str(resnet))
    with pytest.raises(CheckpointError, match=r"model.backbone_weights_path.*does not exist"):
        build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, backbone_weights_path=str(tmp_path / "none.pth"))
    with pytest.raises(ConfigError, match=r"SSDLiteFeatureExtractorMobileNet.*model.weights_path"):
        build_detector("ssdlite320_mobilenet_v3_large", 3, backbone_weights_path=str(mobilenet_imagenet_file))
    with pytest.raises(ConfigError, match=r"trainable_backbone_layers': 7 .* 6 stages: 0 .* to 6"):
        build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 3, backbone_weights_path=str(mobilenet_imagenet_file),
                       trainable_backbone_layers=7)
    with pytest.raises(ConfigError, match=r"model.backbone_weights_path.*null when model.weights_path is set"):
        ModelConfig(weights_path="a.pt", backbone_weights_path="b.pth").check()
    with pytest.raises(ConfigError, match=r"model.trainable_backbone_layers.*null without model.backbone_weights_path"):
        ModelConfig(trainable_backbone_layers=2).check()


def test_training_flops_are_counted_without_touching_the_runs_random_stream():
    from omegaconf import OmegaConf

    from aifactory_train.recipes.crop_detection.module import CropDetectionModule
    from aifactory_train.locations import config_dir

    model = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / "fasterrcnn_mobilenet_v3_large_320_fpn.yaml"))
    target = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([2])}

    def module(**extra) -> CropDetectionModule:
        return CropDetectionModule(model={**model, "extra": {**model["extra"], **extra}}, optim={}, loss={},
                                   data_info={"class_names": ["crop", "weed"]})

    def flops(image_shape=(3, 256, 256), **extra) -> int:
        return module(**extra).measure_flops(image_shape, target)

    default = module()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    base = default.measure_flops((3, 256, 256), target)
    assert torch.equal(torch.get_rng_state(), state)  # an interrupted run resumes with the same random draws
    assert flops() == base
    # the count follows the work: more sampled RoIs in the box head, a larger resized input (min_size 320 keeps a
    # 256 x 256 image at 320 x 320; a 256 x 512 one becomes 320 x 640)
    assert flops(box_batch_size_per_image=256) > base
    assert flops(image_shape=(3, 256, 512)) > 1.5 * base
    assert 1e9 < base < 1e12  # tens of GFLOPs for MobileNetV3-FPN at 320 px with 128 RoIs


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crop_run(crop_data, tmp_path_factory):
    from conftest import aift

    import torchvision

    work = tmp_path_factory.mktemp("crop_run")
    uri = f"sqlite:///{work}/mlflow.db"
    backbone = work / "pretrained" / "mobilenet_v3_large.pth"
    backbone.parent.mkdir()
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), backbone)
    # a low score threshold, so that the barely trained model still returns boxes to compare in the ONNX test
    # channels_last and a frozen pretrained backbone: the checkpoint must export and evaluate like any other (the
    # tests below), without the backbone file, removed after training
    result = aift("train", "recipe=crop_detection", "debug=smoke", "data.batch_size=4", f"data.root={crop_data}",
                  "+model.extra.box_score_thresh=0.001", "model.channels_last=true", f"tracking.uri={uri}",
                  f"model.backbone_weights_path={backbone}", "hydra.run.dir=run", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    backbone_sha256 = hashlib.sha256(backbone.read_bytes()).hexdigest()
    shutil.rmtree(backbone.parent)
    return {"work": work, "uri": uri, "summary": json.loads((work / "run" / "summary.json").read_text()),
            "backbone": str(backbone), "backbone_sha256": backbone_sha256, "data": crop_data}


def test_smoke_train_logs_map_metrics_and_prediction_pictures(crop_run):
    from mlflow.tracking import MlflowClient

    summary = crop_run["summary"]
    assert summary["recipe"] == "crop_detection" and summary["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert summary["global_step"] == 4 and summary["monitor"] == "val/map_50"
    client = MlflowClient(tracking_uri=crop_run["uri"])
    run = client.get_run(summary["mlflow_run_id"])
    for key in ("val/map", "val/map_50", "val/map_75", "val/weed_recall", "val/ap_crop", "val/recall_weed",
                "test/map_50", "train/loss", "train/loss_classifier", "throughput/device/flops_per_sec"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    pictures = [a.path for a in client.list_artifacts(run.info.run_id, "predictions")]
    assert any(p.startswith("predictions/val_step") and p.endswith(".png") for p in pictures), pictures
    assert "predictions/val_pr_curves.png" in pictures
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"crop_detection-train", "crop_detection-val",
                                                                     "crop_detection-test"}
    assert (crop_run["work"] / "run" / "reports" / "test_pr_curves.png").is_file()


def test_onnx_export_matches_pytorch_on_images(crop_run, crop_data):
    import onnxruntime
    from conftest import aift
    from torchvision.io import read_image

    from aifactory_train.run.checkpoints import load_trained_module
    from aifactory_train.recipes.crop_detection.module import CropDetectionModule

    checkpoint = crop_run["summary"]["last_checkpoint"]
    result = aift("export", "recipe=crop_detection", f"ckpt_path={checkpoint}", "format=onnx", "hydra.run.dir=export",
                  cwd=crop_run["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = crop_run["work"] / "export"
    meta = json.loads((out / "model.json").read_text())
    assert meta["class_names"] == ["crop", "weed"] and meta["category_ids"] == [3, 7]
    assert meta["inside_the_model"]["normalize_mean"] == pytest.approx([0.485, 0.456, 0.406])
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    model = load_trained_module(CropDetectionModule, checkpoint).net.eval()
    compared = 0
    for path in sorted((crop_data / "images" / "val").glob("*.jpg"))[:3]:
        image = read_image(str(path)).float() / 255
        boxes, labels, scores = session.run(None, {"image": image.numpy()})
        with torch.no_grad():
            reference = model([image])[0]
        assert boxes.shape == tuple(reference["boxes"].shape)
        np.testing.assert_allclose(scores, reference["scores"].numpy(), atol=1e-4)
        # detections with equal scores may come in another order: match each one to an unused twin
        unused = list(range(len(boxes)))
        for box, label, score in zip(reference["boxes"].numpy(), reference["labels"].numpy(), reference["scores"].numpy()):
            twin = next(j for j in unused if labels[j] == label and abs(scores[j] - score) < 1e-4
                        and np.abs(boxes[j] - box).max() < 1e-2)
            unused.remove(twin)
        compared += len(boxes)
    assert compared > 0  # the comparison saw real detections


def test_predict_draws_each_image_with_its_boxes_and_nothing_else(crop_run, crop_data, tmp_path):
    """predict.draw=true: one PNG per image, by its path below the input folder, at the image's size; it differs
    from the decoded image only at the boxes predictions.jsonl lists (their outlines and labels), and not at all
    where nothing was found. The COCO file of the same boxes reads back as a split. A run that fails on a bad image
    leaves no pictures and no COCO file."""
    from conftest import aift
    from torchvision.io import ImageReadMode, decode_image

    checkpoint = crop_run["summary"]["last_checkpoint"]
    images = sorted((crop_data / "images" / "test").glob("*.jpg"))[:6]
    field = tmp_path / "field"
    for i, path in enumerate(images):  # two camera folders
        (field / f"cam{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, field / f"cam{i % 2}" / path.name)
    args = ["predict", "recipe=crop_detection", f"ckpt_path={checkpoint}", f"input={field}", "predict.draw=true"]

    def predict_and_compare(threshold: float, out: str) -> int:
        """Run, check every picture against its image and row; return how many pictures have boxes."""
        result = aift(*args, f"predict.score_threshold={threshold}", f"hydra.run.dir={out}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / out / "predictions.jsonl").read_text().splitlines()]
        pictures = tmp_path / out / "pictures"
        assert sorted(p.relative_to(pictures) for p in pictures.rglob("*.png")) == sorted(
            Path(r["file"]).relative_to(field).with_suffix(".png") for r in rows)
        assert json.loads((tmp_path / out / "predict.json").read_text())["outputs"] == [
            str(tmp_path / out / "pictures"), str(tmp_path / out / "predictions.coco.json")]
        drawn = 0
        for row in rows:
            original = decode_image(row["file"], mode=ImageReadMode.RGB)
            picture = decode_image(str(pictures / Path(row["file"]).relative_to(field).with_suffix(".png")))
            assert picture.shape == original.shape == (3, row["height"], row["width"])
            changed = (picture != original).any(0)
            inside = torch.zeros_like(changed)
            for d in row["detections"]:
                x, y, w, h = d["bbox"]
                inside[max(0, int(y) - 2):int(y + h) + 3, max(0, int(x) - 2):int(x + w) + 3] = True  # the outline
                label = f"{d['class']} {d['score']:.2f}"  # written from the box's top-left corner, at most 10 px a letter
                inside[int(y):int(y) + 20, int(x):int(x) + 10 * len(label) + 4] = True
            assert not (changed & ~inside).any()
            assert changed.any() == bool(row["detections"])
            drawn += bool(row["detections"])
        return drawn

    # the smoke-trained model's scores are low (and not the same from run to run): every box at 0, none at 1
    assert predict_and_compare(0, "all") == len(images)
    assert predict_and_compare(1, "none") == 0
    # predictions.coco.json holds the same boxes, and the recipe's own COCO reader takes it as a split (the images
    # by their path below the input folder, the training data's category ids), as it will once people corrected it
    from aifactory_train.recipes.crop_detection.data import read_coco_split

    counts = Counter()
    records, categories = read_coco_split(tmp_path, "test", "all/predictions.coco.json", "field", counts)
    assert categories == {3: "crop", 7: "weed"} and not counts
    rows = {r["file"]: r for r in map(json.loads, (tmp_path / "all" / "predictions.jsonl").read_text().splitlines())}
    assert sorted(r["file"] for r in records) == sorted(Path(f).relative_to(tmp_path).as_posix() for f in rows)
    for record in records:
        found = rows[str(tmp_path / record["file"])]["detections"]
        assert record["category_ids"] == [d["category_id"] for d in found]
        torch.testing.assert_close(torch.tensor(record["boxes"]).reshape(-1, 4),
                                   torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in found)]))
    # the same folder again without pictures: the earlier run's go (they would not match the new predictions)
    result = aift(*args[:-1], "predict.num_workers=0", "hydra.run.dir=all", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "all" / "pictures").exists() and (tmp_path / "all" / "predictions.coco.json").is_file()
    # a bad image after the good ones: the run fails, and keeps no pictures (nor predictions)
    (field / "cam1" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    # (a folder that held a file before: a failed run keeps it, with its log; a new one would be removed whole)
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "notes.txt").write_text("the user's\n")
    result = aift(*args, "hydra.run.dir=failed", cwd=tmp_path)
    assert result.returncode == 2 and "zz_broken.jpg" in result.stderr, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "failed").iterdir() if not p.name.startswith(".")) == [
        "notes.txt", "predict.log"]
    assert not [p for p in (tmp_path / "failed").iterdir() if p.name.startswith(".predict-")]


def test_predictions_are_the_boxes_of_the_eval_data_path(crop_run, crop_data):
    """aift predict on the test images (no annotations read), every box kept (score threshold 0): per image the
    boxes, labels and scores the detector gives on the test split as aift eval loads it (the DataModule's test
    loader, its on-device scaling). Category ids are the COCO file's own (3 crop, 7 weed), boxes COCO's
    [x, y, w, h]. And the same threshold logic as the recipe's weed recall: scored with it, they give eval's figure."""
    from conftest import aift

    from aifactory_train.run.checkpoints import load_trained_module
    from aifactory_train.recipes.crop_detection.module import CropDetectionModule

    work, checkpoint = crop_run["work"], crop_run["summary"]["last_checkpoint"]
    result = aift("predict", "recipe=crop_detection", f"ckpt_path={checkpoint}", f"input={crop_data / 'images' / 'test'}",
                  "predict.batch_size=4", "predict.score_threshold=0", "hydra.run.dir=predict", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {Path(r["file"]).name: r for r in map(json.loads, (work / "predict" / "predictions.jsonl").read_text().splitlines())}
    coco = json.loads((crop_data / "annotations" / "test.json").read_text())
    assert set(rows) == {image["file_name"] for image in coco["images"]}
    category_of = {1: 3, 2: 7}  # the recipe's labels (category ids in sorted order, from 1) and the COCO file's ids

    module = load_trained_module(CropDetectionModule, checkpoint).eval()
    data = CropDetectionDataModule(str(crop_data), splits=SPLITS, batch_size=4, num_workers=0)
    data.setup("test")
    names = [image["file_name"] for image in coco["images"]]
    compared = 0
    with torch.inference_mode():
        for batch in data.test_dataloader():
            images, targets = data.on_after_batch_transfer(batch, 0)
            for pred in module.net(images):
                row = rows[names[compared]]
                compared += 1
                found = row["detections"]
                assert [d["category_id"] for d in found] == [category_of[int(l)] for l in pred["labels"]]
                assert [d["class"] for d in found] == [module.class_names[int(l) - 1] for l in pred["labels"]]
                torch.testing.assert_close(torch.tensor([d["score"] for d in found]), pred["scores"].float())
                x0, y0, x1, y1 = pred["boxes"].float().unbind(-1)
                torch.testing.assert_close(torch.tensor([d["bbox"] for d in found]).reshape(-1, 4),
                                           torch.stack([x0, y0, x1 - x0, y1 - y0], -1))
    assert compared == len(names) and sum(len(r["detections"]) for r in rows.values()) > 0
    # and at the recipe's threshold (0.5), the recall the recipe's metric computes from those boxes is eval's
    result = aift("eval", "recipe=crop_detection", f"ckpt_path={checkpoint}", f"data.root={crop_data}",
                  "data.batch_size=4", "data.num_workers=0", "tracking=none", "hydra.run.dir=eval-all", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((work / "eval-all" / "eval.json").read_text())["metrics"]
    recall = DetectionRecall(label=2, iou_threshold=0.5, score_threshold=0.5)
    for image in coco["images"]:
        found = rows[image["file_name"]]["detections"]
        truth = [a for a in coco["annotations"] if a["image_id"] == image["id"]]

        def xyxy(box):
            return [box[0], box[1], box[0] + box[2], box[1] + box[3]]

        recall.update([{"boxes": torch.tensor([xyxy(d["bbox"]) for d in found]).reshape(-1, 4),
                        "scores": torch.tensor([d["score"] for d in found]),
                        "labels": torch.tensor([2 if d["category_id"] == 7 else 1 for d in found])}],
                      [{"boxes": torch.tensor([xyxy(a["bbox"]) for a in truth]).reshape(-1, 4),
                        "labels": torch.tensor([2 if a["category_id"] == 7 else 1 for a in truth])}])
    assert float(recall.compute()) == pytest.approx(metrics["test/weed_recall"], abs=1e-6)


def test_the_exported_model_says_which_data_weights_and_run_made_it(crop_run):
    """provenance.json beside model.onnx, and the same record inside the ONNX file, where onnxruntime on the
    sprayer reads it: the training data's digest and data card, the backbone weights it started from, the run."""
    import onnxruntime
    from conftest import aift

    summary, checkpoint = crop_run["summary"], crop_run["summary"]["last_checkpoint"]
    result = aift("export", "recipe=crop_detection", f"ckpt_path={checkpoint}", "format=onnx",
                  "hydra.run.dir=export_provenance", cwd=crop_run["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = crop_run["work"] / "export_provenance"
    assert f"wrote {out / 'provenance.json'}" in result.stdout
    record = json.loads((out / "provenance.json").read_text())
    assert record["recorded"] and record["recipe"] == "crop_detection"
    assert record["datasets"] == [summary["dataset"]]  # digests of every split, and the data card
    assert record["datasets"][0]["datacard"]["consent"].startswith("not applicable")
    assert record["starting_weights"] == {"backbone_weights_path": {"path": crop_run["backbone"],
                                                                    "sha256": crop_run["backbone_sha256"]}}
    (run,) = record["runs"]
    assert run["mlflow_run_id"] == summary["mlflow_run_id"] and run["tracking_uri"] == crop_run["uri"]
    assert run["output_dir"] == summary["output_dir"]
    assert record["export"]["checkpoint"] == {"path": checkpoint,
                                              "sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()}
    assert record["export"]["files"] == ["model.onnx", "model.json"]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    embedded = session.get_modelmeta().custom_metadata_map
    assert json.loads(embedded["aift.provenance"]) == record
    assert embedded["aift.data.digest"] == summary["dataset"]["digest"]
    assert embedded["aift.mlflow_run_id"] == summary["mlflow_run_id"]
    assert embedded["aift.data.license"] == summary["dataset"]["datacard"]["license"]


def test_export_register_makes_a_versioned_registered_model_tagged_with_its_data(crop_run):
    """export.register: the exported files are logged to the training run and become a new version of an MLflow
    registered model; the version's tags say which data (digest, licence, consent) and checkpoint made it."""
    from conftest import aift
    from mlflow.tracking import MlflowClient

    summary = crop_run["summary"]
    client = MlflowClient(tracking_uri=crop_run["uri"])
    for version in (1, 2):
        result = aift("export", "recipe=crop_detection", f"ckpt_path={summary['last_checkpoint']}", "format=onnx",
                      "export.register=weed-detector", f"hydra.run.dir=export_registered_{version}",
                      cwd=crop_run["work"])
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"registered weed-detector version {version} in {crop_run['uri']}" in result.stdout
    model_version = client.get_model_version("weed-detector", "2")
    assert model_version.run_id == summary["mlflow_run_id"]
    assert model_version.tags["aift.data.digest"] == summary["dataset"]["digest"]
    assert model_version.tags["aift.data.license"] == summary["dataset"]["datacard"]["license"]
    assert model_version.tags["aift.checkpoint.sha256"] == hashlib.sha256(
        Path(summary["last_checkpoint"]).read_bytes()).hexdigest()
    report = json.loads((crop_run["work"] / "export_registered_2" / "export.json").read_text())
    assert report["registered"]["version"] == 2 and model_version.source == report["registered"]["source"]
    folder = report["registered"]["source"].rsplit("/artifacts/", 1)[1]
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], folder)}
    assert logged == {f"{folder}/model.onnx", f"{folder}/model.json", f"{folder}/provenance.json"}
    # the data owner's view: the run trained on their data, where its exports went and which versions they became
    runs = aift("data", "runs", "recipe=crop_detection", f"data.root={crop_run['data']}",
                f"tracking.uri={crop_run['uri']}", cwd=crop_run["work"])
    assert runs.returncode == 0, runs.stderr[-3000:]
    assert "registered: weed-detector version 1" in runs.stdout and "registered: weed-detector version 2" in runs.stdout
    assert f"exported: onnx {crop_run['work'] / 'export_registered_2'}" in runs.stdout


def test_export_register_is_refused_before_anything_is_written_without_a_tracked_run(crop_run, tmp_path):
    from conftest import aift

    state = torch.load(crop_run["summary"]["last_checkpoint"], map_location="cpu", weights_only=True)
    state["callbacks"]["aift_provenance"]["runs"][-1]["mlflow_run_id"] = None  # as a run with tracking=none
    untracked = tmp_path / "untracked.ckpt"
    torch.save(state, untracked)
    result = aift("export", "recipe=crop_detection", f"ckpt_path={untracked}", "format=onnx",
                  "export.register=weed-detector", "hydra.run.dir=export", cwd=tmp_path)
    assert result.returncode == 2
    assert "config key 'export.register'" in result.stderr and "was trained without tracking" in result.stderr
    assert not (tmp_path / "export" / "model.onnx").exists()


def test_a_checkpoint_without_a_provenance_record_exports_and_says_so(crop_run, crop_data, tmp_path):
    from conftest import aift

    state = torch.load(crop_run["summary"]["last_checkpoint"], map_location="cpu", weights_only=True)
    del state["callbacks"]["aift_provenance"]  # as a checkpoint from before records were kept
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    # no record names the data it was trained on: the parity check's records come from data.root
    result = aift("export", "recipe=crop_detection", f"ckpt_path={old}", "format=onnx", f"data.root={crop_data}",
                  "hydra.run.dir=export", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{old} holds no provenance record" in result.stdout  # the log, as Hydra prints it
    record = json.loads((tmp_path / "export" / "provenance.json").read_text())
    assert record["recorded"] is False and "datasets" not in record
    assert record["export"]["checkpoint"]["path"] == str(old)


def test_eval_refuses_a_checkpoint_of_another_class_set(crop_run, crop_copy):
    from conftest import aift

    for split in ("train", "val", "test"):
        data = coco(crop_copy, split)
        data["categories"].append({"id": 9, "name": "stone"})
        save(crop_copy, data, split)
    result = aift("eval", "recipe=crop_detection", f"ckpt_path={crop_run['summary']['best_checkpoint']}",
                  f"data.root={crop_copy}", "hydra.run.dir=eval_other", cwd=crop_run["work"])
    assert result.returncode == 2
    assert "trained on 2 classes ['crop', 'weed']" in result.stderr and "'stone'" in result.stderr


def test_export_of_an_unknown_format(crop_run):
    from conftest import aift

    result = aift("export", "recipe=crop_detection", f"ckpt_path={crop_run['summary']['last_checkpoint']}",
                  "format=tflite", "hydra.run.dir=export_bad", cwd=crop_run["work"])
    assert result.returncode == 2 and "'format'" in result.stderr and "'onnx'" in result.stderr and "tflite" in result.stderr


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_never_replaces_or_deletes_what_it_did_not_write(crop_run, crop_data, tmp_path):
    """The user's folder as the issue found it: photos under field/ and their own pictures/ (4 JPEGs and a README)
    beside it. An output folder that is, contains or lies inside the input is refused; a folder holding entries
    that no earlier `aift predict` listed as its own is refused before anything is moved; the user's files stay
    byte for byte. A folder an earlier run wrote is still reused (its own results replaced)."""
    from conftest import aift

    checkpoint = crop_run["summary"]["last_checkpoint"]
    home = tmp_path / "home"
    field = home / "field"
    field.mkdir(parents=True)
    images = sorted((crop_data / "images" / "test").glob("*.jpg"))[:4]
    for path in images:
        shutil.copy(path, field / path.name)
    (home / "pictures").mkdir()
    for path in images:
        shutil.copy(path, home / "pictures" / path.name)
    (home / "pictures" / "README").write_text("our own pictures\n")
    before = _tree(home)
    args = ["predict", "recipe=crop_detection", f"ckpt_path={checkpoint}", f"input={field}", "predict.draw=true",
            "predict.num_workers=0"]
    for out in (home, field, field / "out"):  # contains / is / lies inside the input
        result = aift(*args, f"hydra.run.dir={out}", cwd=tmp_path)
        assert result.returncode != 0
        assert "hydra.run.dir" in result.stderr and "input" in result.stderr and "Traceback" not in result.stderr
        assert {k: v for k, v in _tree(home).items() if ".hydra" not in k and not k.endswith(".log")} == before

    # a folder apart from the input that holds the user's pictures/ (and a predictions.jsonl of theirs)
    other = tmp_path / "other"
    shutil.copytree(home / "pictures", other / "pictures")
    (other / "predictions.jsonl").write_text('{"mine": 1}\n')
    other_before = _tree(other)
    result = aift(*args, f"hydra.run.dir={other}", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "predictions.jsonl" in result.stderr and "valid:" in result.stderr
    assert {k: v for k, v in _tree(other).items() if ".hydra" not in k and not k.endswith(".log")} == other_before
    (other / "predictions.jsonl").unlink()  # only the pictures folder left: refused after the model ran, still whole
    result = aift(*args, f"hydra.run.dir={other}", cwd=tmp_path)
    assert result.returncode != 0 and "'pictures'" in result.stderr, result.stderr[-2000:]
    assert _tree(other / "pictures") == _tree(home / "pictures")
    assert not [p for p in other.iterdir() if p.name.startswith(".predict-")]  # no staging folder left behind

    # a folder that an earlier `aift predict` wrote: reused, its own results replaced
    for _ in range(2):
        result = aift(*args, "hydra.run.dir=mine", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((tmp_path / "mine" / "pictures").rglob("*.png"))) == len(images)
