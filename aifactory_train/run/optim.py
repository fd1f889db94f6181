"""The optimizer of a run, built from the ``optim`` section: ``optim.name`` (adamw | sgd) for the two the recipes
tune their defaults for, or ``optim._target_`` for any ``torch.optim`` optimizer (or another class with its
interface), with ``optim.args`` passed on as keyword arguments: ``optim._target_=torch.optim.RAdam
optim.args.decoupled_weight_decay=true``. The learning rate and schedule stay ``optim.lr`` / ``warmup_steps`` /
``min_lr_ratio`` (``schedules.warmup_cosine``)."""

from __future__ import annotations

from typing import Any, Iterable

SHORT_NAMES = {"adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}


def optimizer_class(cfg: dict[str, Any]):
    from hydra.utils import get_class

    return get_class(cfg.get("_target_") or SHORT_NAMES[cfg.get("name", "adamw")])


def build_optimizer(params: Iterable, cfg: dict[str, Any], recipe_args: dict[str, dict[str, Any]] | None = None):
    """``cfg``: the ``optim`` section (as the module's hyperparameters keep it). ``recipe_args``: per short name,
    arguments the recipe adds (e.g. ``{"sgd": {"nesterov": True}, "adamw": {"fused": True}}``); a ``_target_`` of the
    user's gets ``optim.args`` only."""
    target = cfg.get("_target_")
    kwargs: dict[str, Any] = {"lr": cfg["lr"]}
    if not target:
        name = cfg.get("name", "adamw")
        kwargs["weight_decay"] = cfg["weight_decay"]
        if name == "sgd":
            kwargs["momentum"] = cfg["momentum"]
        kwargs.update((recipe_args or {}).get(name, {}))
    kwargs.update(cfg.get("args") or {})
    return optimizer_class(cfg)(params, **kwargs)
