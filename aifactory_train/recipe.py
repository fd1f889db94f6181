"""The recipe contract: everything a recipe provides, and everything it may use from the framework.

A recipe is one folder (``recipes/<name>/``, or one of your own on ``$AIFT_RECIPES_PATH``)::

    <name>/
      __init__.py
      config.py        the config schema (dataclasses; ``recipe.schema`` names the top class)
      data.py          the LightningDataModule              -> RecipeDataModule
      module.py        the LightningModule                  -> RecipeModule (+ the optional extras below)
      synth.py         demo data: ``synthesize(out, overwrite=False, seed=0, **sizes)``
      check.py         optional: ``describe(datamodule)`` for ``aift data check``
      bench.py         optional: the benchmark adapter for ``aift bench`` (see ``BenchAdapter``)
      configs/
        recipe/<name>.yaml       the recipe section, the defaults of the other groups, optim, loss
        data/<name>.yaml         the data section (``_target_`` = the DataModule)
        experiment/<name>_*.yaml GPU and other experiments

A recipe imports from this module and from its own files (relative imports: ``from .data import ...``), nothing
else of ``aifactory_train``: that is what makes a copy (``aift recipes copy``) a plain copy plus renames.

The framework builds the DataModule from ``data._target_`` and the LightningModule from
``recipe.module._target_`` with ``model``, ``optim``, ``loss`` and ``data_info`` keyword arguments, and checks the
classes against the Protocols below when the recipe is loaded (``load_recipe``), before anything is read: a
recipe that lacks a required method is refused then, with the method named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from aifactory_train.records.lineage import DatasetLineage

from aifactory_train.errors import AiftError, CheckpointError, ConfigError, DataError
from aifactory_train.locations import RecipeInfo
from aifactory_train.records.config import (ExportOptions, OptimConfig, PredictOptions, RunConfig, check, check_choice,
                                            missing_data_root)

# The rest is imported when a recipe first asks for it (PEP 562): a recipe's config.py is imported to validate a
# config, which `aift` does in about a second, before torch and Lightning are loaded.
_LAZY = {
    "DataLoader": ("aifactory_train.run.loaders", "ResumableDataLoader"),  # resumes mid-epoch (torchdata)
    "shuffled": ("aifactory_train.run.loaders", "shuffled"),
    "DatasetLineage": ("aifactory_train.records.lineage", "DatasetLineage"),
    "SplitLineage": ("aifactory_train.records.lineage", "SplitLineage"),
    "digest_files": ("aifactory_train.records.lineage", "digest_files"),
    "file_digests": ("aifactory_train.records.lineage", "file_digests"),
    "InvalidRecords": ("aifactory_train.records.lineage", "InvalidRecords"),
    "SameBytes": ("aifactory_train.records.lineage", "SameBytes"),
    "inside_root": ("aifactory_train.records.lineage", "inside_root"),
    "shared_across_splits": ("aifactory_train.records.lineage", "shared_across_splits"),
    "DATACARD_FILE": ("aifactory_train.records.lineage", "DATACARD_FILE"),
    "read_datacard": ("aifactory_train.records.lineage", "read_datacard"),
    "datacards_for": ("aifactory_train.records.usage_terms", "datacards_for"),
    "withdrawn": ("aifactory_train.records.withdrawal", "withdrawn"),  # a data owner's withdrawal list
    "load_datacard": ("aifactory_train.records.usage_terms", "load_datacard"),
    "prepare_output_folder": ("aifactory_train.data.synth", "prepare_output_folder"),
    "write_datacard": ("aifactory_train.data.synth", "write_datacard"),
    "DataDescription": ("aifactory_train.data.data_check", "DataDescription"),
    "SplitDescription": ("aifactory_train.data.data_check", "SplitDescription"),
    "Sample": ("aifactory_train.data.data_check", "Sample"),
    "record_hash": ("aifactory_train.data.data_check", "record_hash"),
    "input_files": ("aifactory_train.data.files", "input_files"),
    "read_in_batches": ("aifactory_train.data.files", "read_in_batches"),
    "datacard_root": ("aifactory_train.data.files", "datacard_root"),
    "build_torchvision_classifier": ("aifactory_train.run.models", "build_torchvision_classifier"),
    "classifier_names": ("aifactory_train.run.models", "classifier_names"),
    "load_local_weights": ("aifactory_train.run.models", "load_local_weights"),
    "read_state_dict": ("aifactory_train.run.models", "read_state_dict"),
    "build_optimizer": ("aifactory_train.run.optim", "build_optimizer"),
    "planned_optimizer_steps": ("aifactory_train.run.schedules", "planned_optimizer_steps"),
    "warmup_cosine": ("aifactory_train.run.schedules", "warmup_cosine"),
    "load_checkpoint_state": ("aifactory_train.run.checkpoints", "load_checkpoint_state"),
    # for <recipe>/bench.py (BenchAdapter)
    "BENCH_OPTIM": ("aifactory_train.run.timing", "BENCH_OPTIM"),
    "device_sync": ("aifactory_train.run.timing", "device_sync"),
    "median_ms": ("aifactory_train.run.timing", "median_ms"),
    "loader_rate": ("aifactory_train.run.timing", "loader_rate"),
    "model_config": ("aifactory_train.run.timing", "model_config"),
    "import_onnxruntime": ("aifactory_train.records.telemetry", "import_onnxruntime"),
    "onnx_session": ("aifactory_train.records.telemetry", "onnx_session"),  # the export's ONNX file, on the CPU
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aifactory_train.recipe' has no attribute '{name}'")


__all__ = [
    # the contract
    "RecipeDataModule", "RecipeModule", "AdoptsCheckpoint", "Exports", "ChecksExport", "ScoresRecords",
    "ShowsMemorisation", "Predicts", "CountsFlops", "BenchAdapter",
    "RecipeInfo", "LoadedRecipe", "load_recipe", "missing_members", "spread_indices",
    # data loading and lineage
    "DataLoader", "shuffled", "DatasetLineage", "SplitLineage", "digest_files", "InvalidRecords", "SameBytes",
    "inside_root", "shared_across_splits", "file_digests",
    # data cards and demo data
    "DATACARD_FILE", "read_datacard", "datacards_for", "load_datacard", "prepare_output_folder", "write_datacard",
    "withdrawn",
    # aift data check
    "DataDescription", "SplitDescription", "Sample", "record_hash",
    # aift predict: file batching
    "input_files", "read_in_batches", "datacard_root",
    # models, optimizers, schedules, checkpoints
    "build_torchvision_classifier", "classifier_names", "load_local_weights", "read_state_dict", "build_optimizer",
    "planned_optimizer_steps", "warmup_cosine", "load_checkpoint_state",
    # benchmark adapters
    "BENCH_OPTIM", "device_sync", "median_ms", "loader_rate", "model_config", "import_onnxruntime", "onnx_session",
    # config base classes and checks, errors
    "PlanExample", "RunConfig", "OptimConfig", "PredictOptions", "ExportOptions", "check", "check_choice",
    "missing_data_root",
    "AiftError", "ConfigError", "DataError", "CheckpointError",
]


# -- what a recipe provides --------------------------------------------------------------------------------------

@runtime_checkable
class RecipeDataModule(Protocol):
    """A ``lightning.LightningDataModule`` built from the ``data`` section.

    ``data_info`` (set by ``setup``) is what the module needs to know about the data (e.g. ``class_names``); the
    module keeps it in its hyperparameters. ``MATCH_ON_RESUME`` names the ``data_info`` keys a checkpoint must
    agree on to be resumed or scored on this data (e.g. ``("class_names",)``)."""

    MATCH_ON_RESUME: ClassVar[tuple[str, ...]]
    data_info: dict[str, Any]

    def setup(self, stage: str) -> None: ...

    def lineage(self) -> DatasetLineage:
        """Which files (digests), whose (the data card), in which split."""
        ...

    def has_split(self, name: str) -> bool: ...


@runtime_checkable
class RecipeModule(Protocol):
    """A ``lightning.LightningModule`` built from ``recipe.module`` with ``model``, ``optim``, ``loss`` and
    ``data_info`` keyword arguments. It keeps ``data_info`` in its hyperparameters (plain data: checkpoints load
    with ``weights_only=True``), its torch model in ``self.net``, and writes its reports (plots, tables) into
    ``<run dir>/reports``."""

    def training_step(self, batch: Any, batch_idx: int) -> Any: ...

    def configure_optimizers(self) -> Any: ...


@runtime_checkable
class AdoptsCheckpoint(Protocol):
    """A DataModule whose preparation depends on the checkpoint (a tokenizer trained with the model): called
    before ``setup`` on resume, and in eval."""

    def adopt_checkpoint(self, path: str) -> None: ...


@runtime_checkable
class Exports(Protocol):
    """A module ``aift export`` can turn into deployable files. ``EXPORT_FORMATS``: the ``format=`` values.
    ``options``: the validated ``export`` section as a dict (:class:`ExportOptions`, or the recipe's subclass of it
    that its schema declares as ``export``)."""

    EXPORT_FORMATS: ClassVar[tuple[str, ...]]

    def export_model(self, format: str, out_dir: Path, options: dict[str, Any]) -> list[Path]: ...


@runtime_checkable
class ChecksExport(Protocol):
    """An exporting module that `aift export` can check: the exported files must give the module's outputs on real
    records (aifactory_train/run/release.py compares them within ``export.parity_tolerance``). ``parity_inputs``:
    ``count`` records of ``split`` of the set-up DataModule, as the exported model takes them; the two others: the
    outputs by name (arrays) of the PyTorch module and of the exported files (ONNX Runtime, transformers loaded from
    the written folder) on those inputs."""

    def parity_inputs(self, datamodule: Any, split: str, count: int) -> Any: ...

    def reference_outputs(self, inputs: Any) -> dict[str, Any]: ...

    def exported_outputs(self, files: list[Path], inputs: Any) -> dict[str, Any]: ...


def spread_indices(count: int, limit: int) -> list[int]:
    """``limit`` record indices of ``count``, spread evenly (deterministic): the records a disclosure test scores,
    so a split sorted by class or patient is not judged by its first class."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(1, limit - 1)) for i in range(limit)})


@runtime_checkable
class ScoresRecords(Protocol):
    """A module that gives the loss of each record (up to ``limit``, spread over the split: ``spread_indices``; no
    augmentation) of a split of the set-up DataModule: the membership-inference test of the disclosure check
    (run/release.py)."""

    def per_record_losses(self, datamodule: Any, split: str, limit: int) -> list[float]: ...


@runtime_checkable
class ShowsMemorisation(Protocol):
    """A language model's memorisation tests (run/release.py). ``verbatim_fractions``: per record, prompted as in
    training, the fraction of its training target that the greedy continuation returns verbatim (from the start).
    ``vocabulary``: the strings that travel with the model (tokenizer entries, decoded). ``record_texts``: one text
    per record of the split (what the vocabulary was trained on)."""

    def verbatim_fractions(self, datamodule: Any, split: str, limit: int) -> list[float]: ...

    def vocabulary(self) -> list[str]: ...

    def record_texts(self, datamodule: Any, split: str) -> list[str]: ...


@runtime_checkable
class Predicts(Protocol):
    """A module ``aift predict`` runs on files: ``PREDICT_EXTENSIONS`` (e.g. ``(".png", ".jpg")``), one JSON-able
    row per file or record. ``PREDICT_DRAWS``: whether ``predict.draw=true`` draws pictures. ``options``: the
    validated ``predict`` section as a dict (:class:`PredictOptions`, or the recipe's subclass of it that its schema
    declares as ``predict``), plus ``output_dir`` (a folder for the recipe's own result files) and ``input_root``."""

    PREDICT_EXTENSIONS: ClassVar[tuple[str, ...]]
    PREDICT_DRAWS: ClassVar[bool]

    def predict_files(self, files: list[Path], batch_size: int, options: dict[str, Any]) -> Iterator[dict]: ...


@dataclass
class PlanExample:
    """One training step of a recipe's model, as `aift plan` measures it on torch's ``meta`` device (shapes only: no
    memory, no data). A recipe's ``plan.py`` has ``plan_example(model, data, batch, dtype) -> PlanExample``: it is
    called inside ``torch.device("meta")`` with the resolved ``model``/``data`` sections, the micro-batch and the
    compute dtype; ``step()`` runs the forward pass and returns the loss (``aift plan`` runs the backward)."""

    net: Any  # the torch.nn.Module, built on the meta device
    step: Any  # () -> loss tensor: one forward pass at the micro-batch
    shape: str  # what one sample is, in words ("224x224 px, 3 bands", "2048 tokens, vocab 32000")
    tokens: int | None = None  # tokens per sample (sequence models), for tokens/s
    notes: list[str] | None = None  # what the count leaves out


@runtime_checkable
class CountsFlops(Protocol):
    """A module that knows its training FLOPs per sample (and per token), for MFU in the summary and bench."""

    flops_per_sample: float | None


class BenchAdapter(Protocol):
    """``<recipe>/bench.py`` (a module): the same model and batch trained by the recipe and by a plain PyTorch loop,
    for ``aift bench recipes`` and benchmarks/recipe_step.py (the loops: aifactory_train/bench/paired.py).

    ``METRICS``: the summary metrics a profile may set thresholds on, without the ``<recipe>_`` prefix the bench
    adds (``{"ratio": ("recipe/plain samples/s", False), ...}``: what it is, whether it needs a GPU).
    ``DEFAULTS``: benchmarks/recipe_step.py's shape (model, batch_size, image_size, steps, seq_len).
    ``settings(gpu, quick)``: the shape ``aift bench`` measures (plus ``warmup`` and ``split_steps``).
    ``build(args, device)``: the adapter instance: ``batches`` (in memory, on ``device``), ``module()`` ->
    (LightningModule, gradient clip), ``plain()`` -> (net, step function returning the loss, gradient clip),
    ``datamodule(workers)``, ``input_pipeline(workers)``; optionally ``optim``, ``fused_adamw``,
    ``tokens_per_sample`` and ``onnx_latency()``. Optional module functions ``image_files(files)`` and
    ``image_datamodule(root, image_size, batch_size, workers)`` offer the recipe's image pipeline to the micro
    suite's data-loading measurement."""

    METRICS: dict[str, tuple[str, bool]]
    DEFAULTS: dict[str, Any]

    def settings(self, gpu: bool, quick: bool) -> dict[str, Any]: ...

    def build(self, args: Any, device: Any) -> Any: ...


# -- checks the commands run when they load a recipe -------------------------------------------------------------

def _protocol_members(protocol: type) -> list[str]:
    names = [name for name, value in vars(protocol).items()
             if not name.startswith("_") and callable(value)]
    return sorted({*names, *getattr(protocol, "__annotations__", {})})


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` (a class or an instance) lacks. On a class, instance attributes
    set in ``__init__``/``setup`` (``data_info``, ``flops_per_sample``) cannot be seen and are not asked for."""
    is_class = isinstance(obj, type)
    missing = []
    for name in _protocol_members(protocol):
        declared = vars(protocol).get(name)
        if is_class and not callable(declared) and not name.isupper():
            continue
        if not hasattr(obj, name):
            missing.append(name)
    return missing


def _require(obj: Any, protocol: type, what: str, where: str) -> None:
    missing = missing_members(obj, protocol)
    if missing:
        raise ConfigError(f"{where}: {what} lacks {', '.join(missing)}, which {protocol.__name__} requires "
                          f"(see aifactory_train/recipe.py)")


@dataclass(frozen=True)
class LoadedRecipe:
    name: str
    module_class: type
    datamodule_class: type | None

    def require(self, protocol: type, command: str) -> None:
        """Refuse ``command`` with one line naming what the recipe's module lacks for it."""
        missing = missing_members(self.module_class, protocol)
        if missing:
            raise ConfigError(f"recipe '{self.name}' has no {command}: its module {self.module_class.__name__} lacks "
                              f"{', '.join(missing)} ({protocol.__name__} in aifactory_train/recipe.py)")


def load_recipe(resolved: dict[str, Any]) -> LoadedRecipe:
    """Import the recipe's classes named by the config and check them against the contract."""
    from hydra.utils import get_class

    recipe = resolved["recipe"]
    target = recipe["module"]["_target_"]
    try:
        module_class = get_class(target)
    except Exception as err:  # noqa: BLE001 - an import error of the recipe's own code, named with its key
        raise ConfigError(f"config key 'recipe.module._target_': cannot import '{target}': "
                          f"{str(err).splitlines()[0]}") from None
    _require(module_class, RecipeModule, f"the module class {module_class.__name__}", "recipe.module._target_")
    datamodule_class = None
    data_target = (resolved.get("data") or {}).get("_target_")
    if data_target:
        try:
            datamodule_class = get_class(data_target)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"config key 'data._target_': cannot import '{data_target}': "
                              f"{str(err).splitlines()[0]}") from None
        _require(datamodule_class, RecipeDataModule, f"the DataModule class {datamodule_class.__name__}",
                 "data._target_")
    return LoadedRecipe(recipe["name"], module_class, datamodule_class)


def adopts_checkpoint(datamodule: Any) -> bool:
    return isinstance(datamodule, AdoptsCheckpoint)


def resume_keys(datamodule: Any) -> tuple[str, ...]:
    return tuple(getattr(datamodule, "MATCH_ON_RESUME", ()))


def counted_flops(module: Any) -> tuple[float | None, float | None]:
    """(FLOPs per sample, per token) where the module counts them (``CountsFlops``), else (None, None)."""
    return getattr(module, "flops_per_sample", None), getattr(module, "flops_per_token", None)

