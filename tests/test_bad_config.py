"""Every bad config input is one clear line naming the key, the bad value and what would be valid: before anything
runs, without a traceback, with nothing tracked and no run folder left behind.

Most cases call the validation in this process (a CLI start costs seconds); a handful run the real CLI to prove the
path end to end: exit code, one line on stderr, no outputs/ folder and no tracking store."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from aifactory_train.records.config import _gpu_driver_present, check_devices, composition_error, validate
from aifactory_train.errors import ConfigError
from aifactory_train.locations import use_recipes
from conftest import aift
from test_config import compose_run

# (overrides, key, bad value as printed, a piece of what is valid)
BAD_VALUES = [
    (["seed=-5"], "seed", "-5", "[0, 4294967295]"),
    (["seed=4294967296"], "seed", "4294967296", "[0, 4294967295]"),
    (["trainer.max_epochs=0"], "trainer.max_epochs", "0", "an integer >= 1, or -1"),
    (["trainer.max_epochs=-2"], "trainer.max_epochs", "-2", "an integer >= 1, or -1"),
    (["trainer.max_steps=0"], "trainer.max_steps", "0", "an integer >= 1, or -1"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs", "-1", "never ends"),
    (["trainer.val_check_interval=5.0"], "trainer.val_check_interval", "5.0", "(0, 1]"),
    (["trainer.val_check_interval=0.0"], "trainer.val_check_interval", "0.0", "(0, 1]"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval", "0", "training batches >= 1"),
    (["trainer.val_check_interval=-3"], "trainer.val_check_interval", "-3", "training batches >= 1"),
    (["trainer.val_check_interval=true"], "trainer.val_check_interval", "True", "(0, 1]"),
    (["trainer.val_check_interval=often"], "trainer.val_check_interval", "'often'", "(0, 1]"),
    (["debug=smoke", "trainer.val_check_interval=5"], "trainer.val_check_interval", "5",
     "at most trainer.limit_train_batches (4)"),
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch", "0", "an integer >= 1"),
    (["trainer.check_val_every_n_epoch=-1"], "trainer.check_val_every_n_epoch", "-1", "an integer >= 1"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val", "-1.0", "a gradient norm >= 0"),
    (["trainer.gradient_clip_val=inf"], "trainer.gradient_clip_val", "inf", "a gradient norm >= 0"),
    (["trainer.deterministic=maybe"], "trainer.deterministic", "'maybe'", "true, false or warn"),
    (["trainer.deterministic=true", "trainer.benchmark=true"], "trainer.benchmark", "True", "null or false"),
    (["trainer.benchmark=maybe"], "trainer.benchmark", "'maybe'", "true or false"),
    (["trainer.enable_progress_bar=sometimes"], "trainer.enable_progress_bar", "'sometimes'", "true or false"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches", "0", "trains on nothing"),
    (["trainer.limit_train_batches=0.0"], "trainer.limit_train_batches", "0.0", "trains on nothing"),
    (["trainer.devices=[]", "strategy=ddp"], "trainer.devices", "[]", "non-empty list"),
    (["trainer.devices=[0,0]", "strategy=ddp"], "trainer.devices", "[0, 0]", "distinct"),
    (["trainer.devices=[-1]"], "trainer.devices", "[-1]", "indices >= 0"),
    (["strategy=single", "trainer.devices=3"], "trainer.devices", "3", "strategy=ddp"),
    (["strategy=single", "trainer.devices=[0,1]"], "trainer.devices", "[0, 1]", "strategy=ddp"),
    (["strategy=single", "trainer.num_nodes=2"], "trainer.num_nodes", "2", "strategy=ddp"),
    (["strategy=deepspeed_zero2", "trainer.precision=64-true"], "trainer.precision", "64-true", "bf16-mixed"),
    (["strategy=fsdp", "trainer.precision=64-true"], "trainer.precision", "64-true", "bf16-mixed"),
    (["optim.lr=nan"], "optim.lr", "nan", "finite"),
    (["optim.weight_decay=-1"], "optim.weight_decay", "-1.0", ">= 0"),
    (["optim.momentum=1.0"], "optim.momentum", "1.0", "[0, 1)"),
    (["optim.momentum=-0.1"], "optim.momentum", "-0.1", "[0, 1)"),
    (["optim.name=sgd", "optim.momentum=0"], "optim.momentum", "0.0", "Nesterov"),
    (["checkpoint.every_n_minutes=inf"], "checkpoint.every_n_minutes", "inf", "> 0"),
    (["early_stopping.patience=3", "trainer.limit_val_batches=0"], "early_stopping.patience", "3",
     "no validation"),
    (["energy.sample_every_s=inf"], "energy.sample_every_s", "inf", "> 0"),
    (["+optim._target_=torch.optim.NoSuchOptimizer"], "optim._target_", "'torch.optim.NoSuchOptimizer'",
     "torch.optim.Optimizer"),
    (["+optim._target_=torch.nn.Linear"], "optim._target_", "'torch.nn.Linear'", "torch.optim.Optimizer"),
    (["+predict.batch_size=0"], "predict.batch_size", "0", "an integer >= 1"),
    (["+export.register=' '"], "export.register", "' '", "registered model name"),
]


@pytest.mark.parametrize("overrides, key, value, valid", BAD_VALUES, ids=lambda v: str(v)[:60])
def test_a_bad_value_names_its_key_value_and_what_is_valid(overrides, key, value, valid, tmp_path):
    cfg = compose_run(overrides, tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert f"'{key}'" in message and value in message and valid in message, message
    assert "\n" not in message


@pytest.mark.parametrize("key, target", [("recipe.module._target_", "no_such_package.module.Module"),
                                         ("data._target_", "aifactory_train.no_such_module.DataModule")])
def test_a_recipe_class_that_cannot_be_imported_is_named_when_the_recipe_loads(key, target, tmp_path):
    """The recipe's classes are checked against the contract when the recipe is loaded (before data or tracking):
    a _target_ that cannot be imported is one line naming the key and the path."""
    from omegaconf import OmegaConf

    from aifactory_train.recipe import load_recipe

    cfg = compose_run([f"{key}={target}"], tmp_path)
    with pytest.raises(ConfigError) as err:
        load_recipe(OmegaConf.to_container(cfg, resolve=True))
    message = str(err.value)
    assert f"config key '{key}': cannot import '{target}'" in message and "\n" not in message, message


# the same keys through this machine's devices: it has no GPU (skipped where one is)
BAD_HERE = [
    (["trainer.accelerator=gpu"], "trainer.accelerator", "'gpu'", "valid here: auto, cpu"),
    (["trainer.accelerator=cuda"], "trainer.accelerator", "'cuda'", "valid here: auto, cpu"),
    (["trainer.precision=16-true"], "trainer.precision", "'16-true'", "valid on CPU: auto, 32-true"),
    (["trainer.precision=16-mixed"], "trainer.precision", "'16-mixed'", "bf16-mixed"),
    (["trainer.accelerator=cpu", "trainer.precision=16-mixed"], "trainer.precision", "'16-mixed'", "bf16-mixed"),
    (["precision=16-mixed"], "trainer.precision", "'16-mixed'", "valid on CPU"),
]


@pytest.mark.skipif(_gpu_driver_present(), reason="the cases are about a machine without a GPU")
@pytest.mark.parametrize("overrides, key, value, valid", BAD_HERE, ids=lambda v: str(v)[:60])
def test_devices_and_precision_this_machine_cannot_run_are_refused(overrides, key, value, valid, tmp_path):
    typed = validate(compose_run(overrides, tmp_path))  # valid for a GPU node: aift launch submits it
    with pytest.raises(ConfigError) as err:
        check_devices(typed)
    message = str(err.value)
    assert f"'{key}'" in message and value in message and valid in message, message


@pytest.mark.parametrize("override, message", [
    ("trainer.max_epoch=3", "unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"),
    ("trainer.epochs=3", "unknown key 'trainer.epochs'; did you mean 'trainer.max_epochs'?"),
    ("optim.learning_rate=0.1", "unknown key 'optim.learning_rate'; valid keys in 'optim': optim.lr,"),
    ("data.batchsize=8", "unknown key 'data.batchsize'; did you mean 'data.batch_size'?"),
    ("early_stoping.patience=3", "unknown key 'early_stoping.patience'; did you mean 'early_stopping.patience'?"),
    ("hydra.run.dirr=x", "unknown key 'hydra.run.dirr'; did you mean 'hydra.run.dir'?"),
    ("foo.bar=1", "unknown key 'foo.bar': there is no section 'foo'"),
    ("model=resnet9000", "config group 'model': 'resnet9000' is not an option; valid: model=convnext_tiny,"),
])
def test_a_misspelt_key_or_option_gets_the_closest_valid_one(override, message, tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose_run(["recipe=plastic_sorting", override], tmp_path)
    translated = composition_error(err.value, "train", [*use_recipes(), "recipe=plastic_sorting", override])
    assert isinstance(translated, ConfigError)
    assert message in str(translated) and "\n" not in str(translated), str(translated)


def test_a_key_unknown_to_the_schema_gets_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'data\.batch_sise' \(not in PlasticSortingConfig\); did "
                                          r"you mean 'data\.batch_size'\?"):
        validate(compose_run(["+data.batch_sise=8"], tmp_path))


def assert_clean_failure(result, code: int, *pieces: str, cwd: Path) -> None:
    """Exit code, one line on stderr (two for an unexpected error: and where its details are), no traceback, the
    pieces named, and nothing written: no run folder, no tracking store."""
    assert result.returncode == code, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == (1 if code == 2 else 2), result.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr + result.stdout
    for piece in pieces:
        assert piece in lines[0], lines[0]
    assert not (cwd / "outputs").exists() and not (cwd / "mlflow.db").exists(), sorted(cwd.iterdir())


# through the real CLI: (command line, pieces of the one line)
CLI_CASES = [
    (["train", "recipe=plastic_sorting", "trainer.max_epoch=3"],
     ["unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"]),
    (["train", "recipe=plastic_sorting", "seed=-5"], ["'seed'", "-5", "[0, 4294967295]"]),
    (["train", "recipe=plastic_sorting", "strategy=single", "trainer.devices=3"],
     ["'trainer.devices'", "3", "strategy=ddp"]),
    (["eval", "recipe=plastic_sorting", "data.root=DATA", "ckpt_path=nope.ckpt"],
     ["'ckpt_path'", "'nope.ckpt'", "does not exist"]),
    (["predict", "recipe=plastic_sorting", "ckpt_path=nope.ckpt", "input=."], ["'ckpt_path'", "'nope.ckpt'"]),
    (["export", "recipe=plastic_sorting", "ckpt_path=nope.ckpt"], ["'ckpt_path'", "'nope.ckpt'"]),
]


@pytest.mark.parametrize("args, pieces", CLI_CASES, ids=lambda a: " ".join(a)[:70])
def test_the_cli_fails_with_one_line_quickly_and_leaves_nothing(args, pieces, plastic_data, tmp_path):
    started = time.monotonic()
    result = aift(*[a.replace("DATA", str(plastic_data)) for a in args], cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert_clean_failure(result, 2, *pieces, cwd=tmp_path)
    assert elapsed < 30, elapsed  # ~2 s on an idle machine (eval imported Lightning first: ~15 s); CI is shared


def test_a_relative_data_root_names_the_folder_and_the_synth_hint_writes_there(tmp_path):
    result = aift("train", "recipe=plastic_sorting", "data.root=mine/plastic", cwd=tmp_path)
    absolute = tmp_path / "mine" / "plastic"
    assert_clean_failure(result, 2, "data.root 'mine/plastic' does not exist",
                         f"resolved against the working folder {tmp_path}",
                         f"aift data synth plastic_sorting --out {absolute}", cwd=tmp_path)


def test_a_failed_run_keeps_a_folder_the_user_gave_that_had_content(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = aift("train", "recipe=plastic_sorting", "seed=-5", "hydra.run.dir=mine", cwd=tmp_path)
    assert result.returncode == 2 and "'seed'" in result.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "-5" in (mine / "train.log").read_text()  # the error is in the run's log too


def test_an_unexpected_error_prints_one_line_and_where_its_traceback_is(plastic_data, tmp_path):
    result = aift("train", "recipe=plastic_sorting", f"data.root={plastic_data}", "tracking=none", "debug=smoke",
                  # a keyword the recipe's module does not take: it fails when Hydra builds the module (a _target_ that
                  # cannot be imported is refused earlier, as bad input, when the recipe is loaded)
                  "+recipe.module.no_such_module=1", cwd=tmp_path)
    assert_clean_failure(result, 1, "InstantiationException", "no_such_module", cwd=tmp_path)
    details = result.stderr.strip().splitlines()[1]
    assert details.startswith("details: ") and "--verbose" in details
    log = Path(details.split()[1])
    assert log.is_file() and "Traceback" in log.read_text() and "no_such_module" in log.read_text()


def test_verbose_also_prints_the_traceback(tmp_path, monkeypatch, capsys):
    from aifactory_train.commands import cli

    monkeypatch.setattr(cli, "_main", lambda argv, verbose: 1 / 0)
    assert cli.main(["--verbose", "recipes", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ZeroDivisionError: division by zero") and "Traceback" in err
    assert cli.main(["recipes", "list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2 and "last-error.log" in err


def test_a_job_failure_goes_to_the_run_log_and_an_empty_run_folder_is_removed(tmp_path, monkeypatch, capsys):
    from aifactory_train.errors import DataError
    from aifactory_train.commands.failures import fresh_run_dir, report_job_failure

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    for name, err, code in (("bad", DataError("data.root 'x' does not exist"), 2),
                            ("bug", RuntimeError("boom"), 1)):
        run_dir = tmp_path / "outputs" / "recipe" / name
        (run_dir / ".hydra").mkdir(parents=True)
        handler = logging.FileHandler(run_dir / "train.log")
        root.addHandler(handler)
        try:
            assert fresh_run_dir(run_dir, {})
            try:
                raise err
            except Exception as raised:  # noqa: BLE001 - as the CLI's task catches it
                assert report_job_failure(raised, run_dir, True, verbose=False) == code
        finally:
            root.removeHandler(handler)
            handler.close()
        assert not run_dir.exists()
    assert not (tmp_path / "outputs").exists()  # the parents it made empty went too
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: data.root 'x' does not exist" in err and "RuntimeError: boom" in err


def test_a_local_run_does_not_print_lightnings_srun_warning(plastic_data, tmp_path):
    """srun is installed on this machine (Slurm tests); Lightning then warned twice per local run."""
    result = aift("train", "recipe=plastic_sorting", f"data.root={plastic_data}", "tracking=none", "debug=smoke",
                  "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "srun" not in result.stdout + result.stderr
