"""Timing helpers a recipe's benchmark adapter (``<recipe>/bench.py``) uses, re-exported by aifactory_train.recipe.

They sit here, below the recipe contract, so that the contract can re-export them without importing the bench
layer (aifactory_train.bench) that runs the adapters."""

from __future__ import annotations

import time
from typing import Any, Callable

# The optimizer settings both loops of a benchmark start from (an adapter overrides lr / weight_decay).
BENCH_OPTIM = {"name": "adamw", "lr": 0.002, "weight_decay": 0.05, "momentum": 0.9, "warmup_steps": 20,
               "min_lr_ratio": 0.01}


def device_sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it counts that work."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def median_ms(run: Callable[[], Any], warmup: int = 3, repeats: int = 20) -> float:
    """Median milliseconds of ``run()`` (no gradients), after ``warmup`` untimed calls."""
    import statistics

    import torch

    with torch.no_grad():
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))


def loader_rate(datamodule: Any, workers: int) -> dict:
    """Samples/s of a DataModule's train loader of (inputs, targets) batches, on its second pass (the first
    starts the workers)."""
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    rates = []
    for _ in range(2):
        start, samples = time.perf_counter(), 0
        for inputs, _targets in loader:
            samples += len(inputs)
        rates.append(samples / (time.perf_counter() - start))
    return {"workers": workers, "samples_per_s": rates[-1], "files": len(datamodule.splits["train"])}


def model_config(name: str) -> dict:
    """The shared model config ``configs/model/<name>.yaml`` as a plain dict."""
    from omegaconf import OmegaConf

    from aifactory_train.locations import config_dir

    return OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{name}.yaml"))
