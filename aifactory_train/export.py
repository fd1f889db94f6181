"""`aift export`: turn a checkpoint into a deployable model (format per recipe: ONNX, HF folder, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run_export(cfg) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from aifactory_train.config import validate

    validate(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    from hydra.utils import get_class

    from aifactory_train.checkpoints import load_trained_module, resolve_checkpoint
    from aifactory_train.errors import ConfigError
    from aifactory_train.train import use_hydra_logging

    use_hydra_logging()
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir)
    module_class = get_class(resolved["recipe"]["module"]["_target_"])
    if not hasattr(module_class, "export_model"):
        raise ConfigError(f"recipe '{resolved['recipe']['name']}' has no export; nothing to do for format={cfg.format}")
    module = load_trained_module(module_class, ckpt_path)
    files = module.export_model(cfg.format, run_dir, resolved["export"])
    from aifactory_train.provenance import write_export_provenance

    # which data and run made this model, beside it, in its folder and in an ONNX file's metadata
    files = [*files, write_export_provenance(ckpt_path, cfg.format, files, run_dir)]
    report = {"checkpoint": str(Path(ckpt_path).resolve()), "recipe": resolved["recipe"]["name"], "format": cfg.format,
              "files": [str(Path(f).resolve()) for f in files]}
    (run_dir / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    for file in report["files"]:
        print(f"wrote {file}")
    return report
