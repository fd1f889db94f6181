"""The preamble `aift eval`, `aift predict` and `aift export` share: the config validated, a checkpoint required,
the recipe loaded and checked for what the command needs (``aifactory_train.recipe``), then the checkpoint found,
checked to be this recipe's, and loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CheckpointCommand:
    cfg: Any
    command: str  # "aift eval", ...
    resolved: dict[str, Any]
    run_dir: Path
    recipe: Any  # aifactory_train.recipe.LoadedRecipe
    typed: Any  # what validate returned
    ckpt_path: str | None = None

    def find_checkpoint(self) -> str:
        """The checkpoint (``ckpt_path``: a file, ``last``, a DeepSpeed folder), refused if another task's."""
        from aifactory_train.run.checkpoints import check_checkpoint_task, resolve_checkpoint

        self.ckpt_path = resolve_checkpoint(self.cfg.ckpt_path, self.run_dir)
        check_checkpoint_task(self.ckpt_path, self.resolved["recipe"])
        return self.ckpt_path

    def load_module(self):
        """The trained LightningModule of the checkpoint (``find_checkpoint`` first)."""
        from aifactory_train.commands.train import use_hydra_logging
        from aifactory_train.run.checkpoints import load_trained_module

        use_hydra_logging()
        return load_trained_module(self.recipe.module_class, self.ckpt_path or self.find_checkpoint())


def open_checkpoint_command(cfg, command: str, needs: type | None = None,
                            refusal: str = "") -> CheckpointCommand:
    """Validate ``cfg`` for ``command``, which needs a checkpoint, and a recipe module with the ``needs`` Protocol
    (refused with ``refusal`` and what the module lacks). Nothing is read or written yet."""
    from omegaconf import OmegaConf

    from aifactory_train.errors import ConfigError
    from aifactory_train.recipe import load_recipe, missing_members
    from aifactory_train.records.config import require_checkpoint, validate

    typed = validate(cfg)
    require_checkpoint(cfg, command)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    recipe = load_recipe(resolved)
    if needs is not None and (missing := missing_members(recipe.module_class, needs)):
        raise ConfigError(f"recipe '{recipe.name}' {refusal} (its module {recipe.module_class.__name__} lacks "
                          f"{', '.join(missing)}: {needs.__name__} in aifactory_train/recipe.py)")
    return CheckpointCommand(cfg, command, resolved, Path(cfg.paths.output_dir), recipe, typed)
