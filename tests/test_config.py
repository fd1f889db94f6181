"""Every config in configs/ composes, validates and instantiates; bad configs fail with a clear message."""

from __future__ import annotations

from pathlib import Path

from dataclasses import asdict

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import open_dict

from aifactory_train.records.config import validate
from aifactory_train.errors import ConfigError
from aifactory_train.locations import config_dir, config_dirs, use_recipes

CONFIGS = config_dir()  # the shared groups; each recipe's own groups are in <recipe>/configs/ (config_dirs())


def config_file(group: str, name: str) -> Path:
    return next(d / group / f"{name}.yaml" for d in config_dirs() if (d / group / f"{name}.yaml").is_file())


def options(group: str) -> list[str]:
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def compose_run(overrides: list[str], tmp_path: Path, root: str = "train"):
    GlobalHydra.instance().clear()
    use_recipes()  # each recipe's configs/ on Hydra's search path
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(root, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as in the app: the task function gets the config without the hydra node
        return cfg


def recipe_of(group: str, name: str) -> str:
    """The recipe a group option belongs to: by the model's task, an experiment's own recipe, else the default."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(config_file(group, name)))
    if group == "model":
        tasks = {OmegaConf.load(config_file("recipe", r)).recipe.task: r for r in options("recipe")}
        return tasks[raw["task"]]
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict) and "override /recipe" in entry:
            return entry["override /recipe"]
    return "plastic_sorting"


def every_override() -> list[list[str]]:
    """One composition per file in configs/: each group option with the recipe it belongs to."""
    runs = [[f"recipe={name}"] for name in options("recipe")]
    for group in ("model", "trainer", "precision", "strategy", "cluster", "tracking", "profile", "paths", "debug",
                  "experiment"):
        runs += [[f"{group}={name}", f"recipe={recipe_of(group, name)}"] for name in options(group)]
    return runs


def test_every_config_file_is_covered():
    covered = {f"{o[0].split('=')[0]}/{o[0].split('=')[1]}.yaml" for o in every_override()}
    on_disk = {str(p.relative_to(d)) for d in config_dirs() for p in d.glob("*/*.yaml")}
    assert on_disk <= covered | {p for p in on_disk if p.startswith("data/")}, on_disk - covered
    recipes_with_data = {o[1].split("=")[1] for o in every_override() if len(o) > 1} | set(options("recipe"))
    assert {f"data/{r}.yaml" for r in recipes_with_data} == {p for p in on_disk if p.startswith("data/")}


@pytest.mark.parametrize("overrides", every_override(), ids=lambda o: "+".join(o))
def test_config_composes_validates_and_instantiates(overrides, tmp_path, data_roots, pretrained_lm):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    recipe = [o for o in overrides if o.startswith("recipe=")][-1].split("=")[1]
    group_override = [o for o in overrides if not o.startswith("recipe=")]
    if "model=hf_local" in group_override:  # its pretrained_path is mandatory (???): a user's own folder
        group_override.append(f"model.pretrained_path={pretrained_lm}")
    cfg = compose_run([f"recipe={recipe}", *group_override, f"data.root={data_roots[recipe]}"], tmp_path)
    typed = validate(cfg)
    assert typed.recipe.name == recipe
    datamodule = instantiate(cfg.data, _convert_="all")
    assert datamodule.root == Path(data_roots[recipe])
    if overrides[0].startswith(("model=", "recipe=")):
        datamodule.setup("fit")
        plain = OmegaConf.to_container(cfg, resolve=True)
        module = instantiate(cfg.recipe.module, model=plain["model"], optim=plain["optim"], loss=plain["loss"],
                             data_info=datamodule.data_info, _convert_="all")
        assert module.net is not None


def test_model_of_another_task_lists_the_right_ones(tmp_path):
    cfg = compose_run(["recipe=plastic_sorting", "model=ssdlite320_mobilenet_v3_large"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "object_detection model" in message and "model=resnet18" in message and "model=ssdlite" not in message


def test_eval_predict_and_export_root_configs_compose(tmp_path):
    cfg = compose_run(["ckpt_path=x.ckpt"], tmp_path, root="eval")
    assert validate(cfg).split == "test"
    cfg = compose_run(["recipe=crop_detection", "ckpt_path=x.ckpt"], tmp_path, root="export")
    assert validate(cfg).format == "onnx"
    cfg = compose_run(["recipe=crop_detection", "ckpt_path=x.ckpt", "input=images"], tmp_path, root="predict")
    typed = validate(cfg)
    assert typed.input == "images"
    # each recipe's schema extends the predict and export options with its own (recipe.py: PredictOptions)
    assert asdict(typed.predict) == {"batch_size": 8, "num_workers": 2, "draw": False, "score_threshold": None}
    assert asdict(validate(compose_run(["recipe=plastic_sorting", "ckpt_path=x.ckpt", "input=images"], tmp_path,
                                       root="predict")).predict) == {"batch_size": 8, "num_workers": 2, "draw": False}
    export = validate(compose_run(["recipe=crop_detection", "ckpt_path=x.ckpt", "export.image_size=[320,240]"],
                                  tmp_path, root="export")).export
    assert asdict(export)["image_size"] == [320, 240] and asdict(export)["register"] is None
    # the checks before release are the framework's, the same keys for every recipe (ExportOptions)
    assert export.parity_tolerance == 1e-3 and export.disclosure.max_membership_auc == 0.75
    with pytest.raises(ConfigError, match=r"export\.disclosure\.max_membership_auc.*0\.4.*\[0\.5, 1\.0\]"):
        validate(compose_run(["recipe=crop_detection", "ckpt_path=x.ckpt", "export.disclosure.max_membership_auc=0.4"],
                             tmp_path, root="export"))
    # clinical_notes reads its notes as its data config says (the note's field, de-identification)
    cfg = compose_run(["recipe=clinical_notes", "ckpt_path=x.ckpt", "input=notes.jsonl", "data.text_field=body",
                       "data.deidentify=inline"], tmp_path, root="predict")
    assert asdict(validate(cfg).predict) == {"batch_size": 8, "num_workers": 2, "draw": False, "text_field": "body",
                                             "deidentify": "inline"}
    # another recipe's option is refused, naming the key and what this recipe's schema has
    with pytest.raises(ConfigError, match="predict.score_threshold"):
        validate(compose_run(["recipe=plastic_sorting", "ckpt_path=x.ckpt", "input=images",
                              "+predict.score_threshold=0.3"], tmp_path, root="predict"))
    with pytest.raises(ConfigError, match=r"config key 'predict.score_threshold': 1.5 is not valid; expected null"):
        validate(compose_run(["recipe=crop_detection", "ckpt_path=x.ckpt", "input=images",
                              "predict.score_threshold=1.5"], tmp_path, root="predict"))
    with pytest.raises(ConfigError, match="config key 'input' is required and was not given; add input="):
        validate(compose_run(["ckpt_path=x.ckpt"], tmp_path, root="predict"))


def test_precision_group_sets_the_trainer_precision(tmp_path):
    assert compose_run(["precision=bf16-true"], tmp_path).trainer.precision == "bf16-true"
    assert compose_run([], tmp_path).trainer.precision == "auto"


def test_unknown_group_option_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_run(["model=resnet9000"], tmp_path)
    message = str(err.value)
    assert "resnet9000" in message
    for name in options("model"):
        assert name in message


def test_unknown_recipe_and_strategy_list_valid_ones(tmp_path):
    for group in ("recipe", "strategy"):
        with pytest.raises(ConfigCompositionException) as err:
            compose_run([f"{group}=nope"], tmp_path)
        assert all(name in str(err.value) for name in options(group))


def test_override_of_a_key_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_run(["trainer.max_epoch=3"], tmp_path)
    assert "trainer.max_epoch" in str(err.value)


def test_added_key_unknown_to_the_schema_is_an_error(tmp_path):
    cfg = compose_run(["+data.colour_space=hsv"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.colour_space"):
        validate(cfg)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("trainer.max_epochs=ten", "trainer.max_epochs", "Integer"),
        ("seed=abc", "seed", "Integer"),
        ("data.batch_size=[1,2]", "data.batch_size", ""),
        ("data.verify_files=maybe", "data.verify_files", "not a valid bool"),
        ("trainer.precision=fp8", "trainer.precision", "bf16-mixed"),
        ("data.on_invalid=ignore", "data.on_invalid", "error, skip"),
        ("data.on_corrupt=skip", "data.on_corrupt", "replaced by data.on_invalid (error | skip)"),
        ("data.on_corrupt=fail", "data.on_corrupt", "set data.on_invalid=error"),
        ("data.format=parquet", "data.format", "manifest"),
        ("trainer.limit_train_batches=2.5", "trainer.limit_train_batches", "fraction"),
        ("data.mean=[0.5]", "data.mean", "one value per channel"),
        ("optim.name=lion", "optim.name", "adamw"),
        ("tracking.backend=wandb", "tracking.backend", "mlflow"),
        ("tracking.system_metrics_interval_s=0", "tracking.system_metrics_interval_s", "seconds > 0"),
        ("energy.sample_every_s=0", "energy.sample_every_s", "seconds > 0"),
        ("energy.meter=wattmeter", "energy.meter", "auto, nvml, rapl, nvml+rapl, none"),
        ("early_stopping.patience=0", "early_stopping.patience", "null (off) or a number of validations >= 1"),
    ],
)
def test_bad_value_names_key_value_and_what_is_valid(override, key, expected, tmp_path):
    cfg = compose_run([override], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert key in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    # 4 devices x 32 per device = 128 per round: 200 is no whole number of rounds
    (["trainer.global_batch_size=200", "strategy=ddp", "trainer.devices=4"],
     "config key 'trainer.global_batch_size': 200 is not a multiple of data.batch_size x ranks = 32 x 4 = 128, so no "
     "whole number of batches per rank adds up to it; valid: trainer.global_batch_size=128, "
     "trainer.global_batch_size=256, data.batch_size=10, data.batch_size=25, data.batch_size=50"),
    # fewer samples than one batch on each rank
    (["trainer.global_batch_size=16", "strategy=ddp", "trainer.devices=2", "trainer.num_nodes=2"],
     "16 is not a multiple of data.batch_size x ranks = 32 x 4 = 128, so no whole number of batches per rank adds up "
     "to it; valid: trainer.global_batch_size=128, data.batch_size=1, data.batch_size=2, data.batch_size=4"),
    (["trainer.global_batch_size=0"], "'trainer.global_batch_size': 0 is not valid; expected null or a number of "
                                      "samples per optimizer step >= 1"),
    (["trainer.global_batch_size=64", "trainer.accumulate_grad_batches=2"],
     "config key 'trainer.accumulate_grad_batches': 2 is not valid; expected 1 when trainer.global_batch_size is set "
     "(64): the accumulation is derived from it; set one of the two"),
])
def test_a_global_batch_that_no_whole_accumulation_gives_is_refused_with_what_fits(overrides, message, tmp_path):
    cfg = compose_run(["recipe=plastic_sorting", *overrides], tmp_path)  # data.batch_size 32
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, ranks, accumulate", [
    (["trainer.global_batch_size=256"], 1, 8),  # single: one device
    (["trainer.global_batch_size=256", "strategy=ddp", "trainer.devices=4", "trainer.num_nodes=2"], 8, 1),
    (["trainer.global_batch_size=256", "strategy=ddp", "trainer.devices=[0,1]"], 2, 4),
    (["trainer.accumulate_grad_batches=3", "strategy=ddp", "trainer.devices=2"], 2, 3),  # no global batch: as set
])
def test_the_accumulation_follows_from_the_global_batch_and_the_ranks(overrides, ranks, accumulate, tmp_path):
    from omegaconf import OmegaConf

    from aifactory_train.run.trainer import batch_plan

    cfg = compose_run(["recipe=plastic_sorting", *overrides], tmp_path)
    typed = validate(cfg)
    assert typed.trainer.known_ranks(typed.strategy.name) == ranks
    plan = batch_plan(OmegaConf.to_container(cfg, resolve=True), ranks)
    assert plan["accumulate_grad_batches"] == accumulate
    assert plan["global"] == 32 * accumulate * ranks


def test_a_global_batch_is_checked_against_the_ranks_found_when_devices_is_auto(tmp_path):
    """devices: auto with DDP is resolved on the node: the check then runs with the rank count found there."""
    from omegaconf import OmegaConf

    from aifactory_train.run.trainer import batch_plan

    cfg = compose_run(["recipe=plastic_sorting", "strategy=ddp", "trainer.global_batch_size=256"], tmp_path)
    typed = validate(cfg)  # nothing to check yet
    assert typed.trainer.known_ranks("ddp") is None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert batch_plan(resolved, 4)["accumulate_grad_batches"] == 2
    with pytest.raises(ConfigError, match=r"256 is not a multiple of data.batch_size x ranks = 32 x 3 = 96"):
        batch_plan(resolved, 3)


def test_unknown_model_name_lists_torchvision_classifiers(tmp_path):
    cfg = compose_run(["model.name=resnet9000"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "model.name" in message and "resnet9000" in message
    assert "resnet18" in message and "efficientnet_b0" in message and "convnext_tiny" in message
