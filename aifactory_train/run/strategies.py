"""From the `strategy` and `trainer` config sections to Lightning's strategy and precision."""

from __future__ import annotations

import os
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


def deepspeed_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON of a ``deepspeed_*`` strategy config.

    Precision (bf16/fp16), gradient clipping, gradient accumulation and the micro batch size are left out on
    purpose: Lightning fills them in from the trainer and the data (and refuses them when both set them).
    """
    zero: dict[str, Any] = {
        "stage": cfg["stage"],
        "overlap_comm": cfg["overlap_comm"],
        "contiguous_gradients": cfg["contiguous_gradients"],
        "allgather_bucket_size": int(cfg["allgather_bucket_size"]),
        "reduce_bucket_size": int(cfg["reduce_bucket_size"]),
    }
    if cfg["stage"] == 3:
        zero.update({
            "stage3_prefetch_bucket_size": int(cfg["stage3_prefetch_bucket_size"]),
            "stage3_param_persistence_threshold": int(cfg["stage3_param_persistence_threshold"]),
            "stage3_max_live_parameters": int(cfg["stage3_max_live_parameters"]),
            # a checkpoint that also holds the 16-bit weights whole, so it can be exported without consolidation
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    for key, ds_key in (("offload_optimizer", "offload_optimizer"), ("offload_parameters", "offload_param")):
        if cfg[key] != "none":
            zero[ds_key] = {"device": cfg[key], "pin_memory": True}
            if cfg[key] == "nvme":
                zero[ds_key]["nvme_path"] = cfg["nvme_path"]
    # the recipes bring their own torch optimizers (AdamW, SGD); DeepSpeed would otherwise refuse them with ZeRO
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True}


def _cpu_smoke_deepspeed():
    """DeepSpeed on CPU processes (gloo). Lightning refuses a CPU accelerator in ``setup_environment`` and needs a
    GPU index in ``setup_distributed`` and ``_setup_model_and_optimizer`` (benchmarks/README.md, reference figures); these three
    overrides (and the same fix for ``_initialize_deepspeed_inference``, used by validate/test) rely on private
    Lightning methods, hence the pinned Lightning range and tests/test_strategies.py."""
    import argparse

    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUSmokeDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's CUDA-only check, keep the rest

        def setup_distributed(self) -> None:
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        def _with_cpu_rank(self, method, *args):
            """Run a Lightning method that calls ``deepspeed.initialize(args=Namespace(device_rank=<GPU index>))``
            with the local rank instead of the CPU device's index (None)."""
            import deepspeed

            original = deepspeed.initialize

            def initialize(*a, **kw):
                if getattr(kw.get("args"), "device_rank", 0) is None:
                    kw["args"] = argparse.Namespace(device_rank=self.local_rank)
                return original(*a, **kw)

            deepspeed.initialize = initialize
            try:
                return method(*args)
            finally:
                deepspeed.initialize = original

        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            return self._with_cpu_rank(super()._setup_model_and_optimizer, model, optimizer, lr_scheduler)

        def _initialize_deepspeed_inference(self, model) -> None:
            return self._with_cpu_rank(super()._initialize_deepspeed_inference, model)

    return CPUSmokeDeepSpeedStrategy


def _cpu_smoke_fsdp():
    """FSDP on CPU processes: Lightning rejects ``strategy="fsdp"`` with a CPU accelerator only when the strategy's
    type is exactly FSDPStrategy (benchmarks/README.md, reference figures), so a subclass passes; torch then needs ``device_id=cpu``
    where Lightning passes the device index (None on CPU), so ``_setup_model`` (private) wraps with that."""
    import torch
    import torch.distributed.fsdp as fsdp
    from lightning.pytorch.strategies import FSDPStrategy

    class CPUFullyShardedDataParallel(fsdp.FullyShardedDataParallel):
        def __init__(self, *args, device_id=None, **kwargs):
            super().__init__(*args, device_id=torch.device("cpu"), **kwargs)

    class CPUSmokeFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model):
            original = fsdp.FullyShardedDataParallel
            fsdp.FullyShardedDataParallel = CPUFullyShardedDataParallel
            try:
                return super()._setup_model(model)
            finally:
                fsdp.FullyShardedDataParallel = original

    return CPUSmokeFSDPStrategy


def _classes(paths: list[str]) -> set:
    from hydra.utils import get_class

    from aifactory_train.errors import ConfigError

    classes = set()
    for path in paths:
        try:
            classes.add(get_class(path))
        except Exception as err:  # noqa: BLE001 - hydra raises ImportError or ValueError
            raise ConfigError(f"config key 'strategy': cannot import layer class '{path}' ({err}); give its full "
                              f"dotted path, e.g. transformers.models.llama.modeling_llama.LlamaDecoderLayer") from None
    return classes


def build_strategy(strategy_cfg: dict[str, Any], accelerator: str):
    from aifactory_train.records.config import GPU_STRATEGIES
    from aifactory_train.errors import ConfigError

    name = strategy_cfg["name"]
    gpu = gpu_available(accelerator)
    backend = strategy_cfg.get("process_group_backend") or ("nccl" if gpu else "gloo")
    if name in GPU_STRATEGIES and not gpu and not strategy_cfg.get("cpu_smoke"):
        raise ConfigError(f"config key 'strategy': {name} shards over GPUs, and there is none here (trainer.accelerator="
                          f"{accelerator}); use strategy=ddp on CPUs, or strategy.cpu_smoke=true to check this "
                          f"strategy's config on CPU processes (gloo) before a GPU job")
    if name == "single":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(
            process_group_backend=backend,
            find_unused_parameters=strategy_cfg.get("find_unused_parameters", False),
            gradient_as_bucket_view=strategy_cfg.get("gradient_as_bucket_view", True),
            static_graph=strategy_cfg.get("static_graph", False),
        )
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        kwargs: dict[str, Any] = {
            "sharding_strategy": strategy_cfg["sharding_strategy"],
            "state_dict_type": strategy_cfg["state_dict_type"],
            "cpu_offload": strategy_cfg["cpu_offload"],
            "process_group_backend": backend,
            # the module keeps its own parameters (not FSDP's flat views): torch.compile, parameter groups and
            # a test stage after fit work on them
            "use_orig_params": True,
        }
        if strategy_cfg["auto_wrap_policy"]:
            kwargs["auto_wrap_policy"] = _classes(strategy_cfg["auto_wrap_policy"])
        if strategy_cfg["activation_checkpointing"]:
            kwargs["activation_checkpointing_policy"] = _classes(strategy_cfg["activation_checkpointing"])
        if gpu:
            return FSDPStrategy(**kwargs)
        return _cpu_smoke_fsdp()(**kwargs)
    if name == "deepspeed":
        if not gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
            return _cpu_smoke_deepspeed()(config=deepspeed_config(strategy_cfg), process_group_backend=backend)
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(config=deepspeed_config(strategy_cfg), process_group_backend=backend)
    raise ValueError(f"unknown strategy {name}")  # validate() lists the valid names before this point


def trainer_kwargs(trainer_cfg: dict[str, Any], strategy_cfg: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``lightning.Trainer`` from the trainer + strategy sections."""
    kwargs = dict(trainer_cfg)
    kwargs.pop("global_batch_size", None)  # not Lightning's: train.py derives accumulate_grad_batches from it
    accelerator = kwargs["accelerator"]
    kwargs["precision"] = resolve_precision(kwargs["precision"], accelerator)
    if strategy_cfg["name"] == "single" and kwargs["devices"] == "auto":
        kwargs["devices"] = 1  # Lightning's "auto" would take every visible GPU
    kwargs["strategy"] = build_strategy(strategy_cfg, accelerator)
    return kwargs


def strategy_callbacks(kwargs: dict[str, Any]) -> list:
    """Callbacks a strategy needs, taking over trainer options it cannot honour itself (mutates ``kwargs``).

    FSDP: Lightning's FSDP precision plugin refuses clipping by norm, because each process holds only a shard of
    the gradients. FSDP's own ``clip_grad_norm_`` computes the norm over all shards; this callback calls it with
    the configured value, just before each optimizer step.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(kwargs.get("strategy"), FSDPStrategy) or not kwargs.get("gradient_clip_val"):
        return []
    import lightning as L

    max_norm = float(kwargs.pop("gradient_clip_val"))
    if kwargs.get("gradient_clip_algorithm", "norm") != "norm":
        from aifactory_train.errors import ConfigError

        raise ConfigError("config key 'trainer.gradient_clip_algorithm': FSDP clips by norm only")

    class FSDPGradientClipping(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            trainer.strategy.model.clip_grad_norm_(max_norm)

    return [FSDPGradientClipping()]
