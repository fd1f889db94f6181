"""From the `strategy` and `trainer` config sections to Lightning's strategy and precision."""

from __future__ import annotations

from typing import Any


def gpu_available(accelerator: str) -> bool:
    import torch

    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on a GPU that supports it, fp32 on CPU (bf16 autocast on CPU is slower there)."""
    import torch

    if precision != "auto":
        return precision
    if gpu_available(accelerator) and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def build_strategy(strategy_cfg: dict[str, Any], accelerator: str):
    name = strategy_cfg["name"]
    if name == "single":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = strategy_cfg.get("process_group_backend") or ("nccl" if gpu_available(accelerator) else "gloo")
        return DDPStrategy(
            process_group_backend=backend,
            find_unused_parameters=strategy_cfg.get("find_unused_parameters", False),
            gradient_as_bucket_view=strategy_cfg.get("gradient_as_bucket_view", True),
            static_graph=strategy_cfg.get("static_graph", False),
        )
    raise ValueError(f"unknown strategy {name}")  # validate() lists the valid names before this point


def trainer_kwargs(trainer_cfg: dict[str, Any], strategy_cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``lightning.Trainer`` from the trainer + strategy sections."""
    kwargs = dict(trainer_cfg)
    accelerator = kwargs["accelerator"]
    kwargs["precision"] = resolve_precision(kwargs["precision"], accelerator)
    if strategy_cfg["name"] == "single" and kwargs["devices"] == "auto":
        kwargs["devices"] = 1  # Lightning's "auto" would take every visible GPU
    kwargs["strategy"] = build_strategy(strategy_cfg, accelerator)
    return kwargs
