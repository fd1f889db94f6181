"""`aift plan`: what a training job needs, before a proposal is accepted or a job is queued.

From the same config `aift launch` composes (recipe, model, data, strategy, precision, cluster profile), it gives:

* **Memory per GPU** for the strategy: parameters, gradients, optimizer states, activations and buffers. The
  parameters are counted on a model built on torch's ``meta`` device (shapes, no weights, no memory); the
  activations are the tensors autograd saves for the backward pass, counted by ``saved_tensors_hooks`` during a
  forward pass on the meta device at the configured micro-batch, sequence/image size and compute dtype. The model
  states follow the strategy's sharding (the byte counts of DeepSpeed's ZeRO paper and its own estimators, which
  are shown beside them for ZeRO-2/3). ``benchmarks/plan_memory.py`` checks the estimate against measured runs.
* **Step time and throughput** from this project's benchmark results for the cluster's GPU (the results files and
  the measured figures of ``benchmarks/profiles/<hardware>.yaml``). Another batch, size or model is scaled by its
  FLOPs per sample (counted on the meta device: same achieved FLOP/s assumed), another GPU by the ratio of the
  profiles' GEMM floors, and the gradient exchange between GPUs by the all-reduce bandwidth; each such step marks
  the figure as extrapolated.
* **GPU-hours, kWh, CO2, wall time** for the planned steps; whether it fits the GPUs' memory (and, when not, the
  first strategy that would), the track's remaining allocation and ``energy.budget_kwh``.

Why not a library: DeepSpeed's estimators cover model states only (no activations, no DDP/FSDP), and
accelerate's ``estimate-memory`` counts weights only; neither knows this project's benchmarks or allocations.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aifactory_train.errors import ConfigError

GIB = 2**30
# of the GPU's memory a plan may fill: benchmarks/results/plan_memory_cpu-1thread_2026-11-30.md found the estimate
# 8-26 % below the measured peak of models >= 10M parameters (the allocator's cache, backward's temporaries), and the
# CUDA context and NCCL need their share too
FIT_HEADROOM = 0.75
# strategies tried, cheapest first, when the chosen one does not fit (configs/strategy/<name>.yaml)
FALLBACKS = ("ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "deepspeed_zero3_offload")
PLANNED_STEP_KEYS = ("max_steps", "max_epochs")


class PlanUnavailable(ConfigError):
    """The plan cannot be made for this recipe (a task it cannot build a model for): `aift plan` fails with it,
    `aift launch` submits without the plan check and says so."""


def used_gpu_hours(track: str, profile: dict[str, Any], now: datetime | None = None) -> float | None:
    """GPU-hours the allocation track ``track`` has used this calendar month (the period of ``aift usage``'s
    default), from Slurm's accounting (``sacct``, as `aift usage` reads it, jobs mapped to tracks by their account);
    None where no accounting answers (no ``sacct``, no slurmdbd): the plan then compares a job with the whole grant."""
    from aifactory_train.errors import AiftError
    from aifactory_train.launch.usage_report import build_report, sacct_jobs

    now = now or datetime.now(timezone.utc)
    since = now.astimezone().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    try:
        jobs = sacct_jobs(since, now)
    except (AiftError, OSError, subprocess.SubprocessError):
        return None
    report = build_report(profile, jobs, {}, since, now, now=now)
    return float((report["tracks"].get(track) or {}).get("gpu_hours") or 0.0)


# ---------------------------------------------------------------------------------------------------------------
# the model, on the meta device


@dataclass
class ModelFacts:
    """What the memory and speed estimates need from the model, counted without weights."""

    params: int
    trainable: int
    largest_layer: int  # parameters of the largest single layer (DeepSpeed ZeRO-3 gathers one at a time)
    wrap_unit: int  # parameters of the largest FSDP unit (the whole model without an auto_wrap_policy)
    activation_bytes: int  # saved for backward, one micro-batch, at the compute dtype
    largest_saved: int  # the largest single saved tensor (its gradient exists at the same time in backward)
    flops_per_sample: float | None  # forward + backward
    tokens_per_sample: int | None
    shape: str
    notes: list[str] = field(default_factory=list)


def compute_precision(resolved: dict[str, Any]) -> str:
    precision = str(resolved["trainer"]["precision"])
    if precision == "auto":
        return "bf16-mixed" if resolved["cluster"]["node"]["gpus"] else "32-true"
    return {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(precision, precision)


def _dtype(precision: str):
    import torch

    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


PLAN_FILE = "plan.py"  # in a recipe's folder: plan_example(model, data, batch, dtype) -> recipe.PlanExample


def recipe_plan_example(name: str):
    """The recipe's ``plan_example`` (its folder's plan.py); a recipe without one cannot be planned (PlanUnavailable:
    `aift launch` then submits without the plan check, and says so)."""
    import importlib

    from aifactory_train.locations import recipe_folders, recipe_package, use_recipes

    use_recipes()
    folder = recipe_folders().get(name)
    if folder is None or not (folder / PLAN_FILE).is_file():
        raise PlanUnavailable(f"recipe '{name}' has no {PLAN_FILE} (plan_example, see PlanExample in "
                              f"aifactory_train/recipe.py), so `aift plan` cannot build its model")
    module = importlib.import_module(f"{recipe_package(name)}.plan")
    if not callable(getattr(module, "plan_example", None)):
        raise PlanUnavailable(f"{folder / PLAN_FILE}: lacks plan_example(model, data, batch, dtype), which `aift "
                              f"plan` calls (see PlanExample in aifactory_train/recipe.py)")
    return module.plan_example


def model_facts(resolved: dict[str, Any], batch: int, precision: str) -> ModelFacts:
    """Build the recipe's model on the meta device, count its parameters, and run one forward and backward pass at
    ``batch`` to count the saved activations and FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    name = resolved["recipe"]["name"]
    plan_example = recipe_plan_example(name)
    with torch.device("meta"):
        example = plan_example(resolved["model"], resolved.get("data") or {}, batch, _dtype(precision))
    net, run, shape, tokens = example.net, example.step, example.shape, example.tokens
    notes: list[str] = list(example.notes or [])
    dtype = _dtype(precision)
    net.train()
    if dtype != torch.float32:
        net.to(dtype)
    params = list(net.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in net.modules()), default=0)
    wrap = total
    policy = (resolved.get("strategy") or {}).get("auto_wrap_policy") or []
    if policy:
        names = {str(cls).rsplit(".", 1)[-1] for cls in policy}
        units = [sum(p.numel() for p in m.parameters()) for m in net.modules() if type(m).__name__ in names]
        wrap = max(units, default=total)
    skip = {id(p) for p in params} | {id(b) for b in net.buffers()}
    seen: dict[int, tuple[Any, int]] = {}

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in skip and id(base) not in seen:
            seen[id(base)] = (base, base.numel() * base.element_size())  # kept alive: ids stay unique
        return tensor

    counter = FlopCounterMode(display=False)
    with counter, _fused_attention():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = run()
        loss.backward()
    saved = [size for _, size in seen.values()]
    return ModelFacts(params=total, trainable=trainable, largest_layer=largest, wrap_unit=wrap,
                      activation_bytes=sum(saved), largest_saved=max(saved, default=0),
                      flops_per_sample=counter.get_total_flops() / batch or None,
                      tokens_per_sample=tokens, shape=shape, notes=notes)


class _FusedAttentionCount:
    """``scaled_dot_product_attention`` as the fused kernels (flash, memory-efficient; also torch's CPU kernel) run
    it: forward keeps q, k, v and the output for backward, never the sequence x sequence score matrix; backward
    recomputes the scores. On the meta device torch would otherwise take the math path, which saves the scores
    (measured: 3x the activations of the 374M Llama at 2048 tokens). The matmuls stand in for the kernels' FLOPs."""

    @staticmethod
    def function():
        import torch

        class Fused(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, kwargs):
                with torch.no_grad():
                    out = _FusedAttentionCount.original(q, k, v, **kwargs)
                ctx.save_for_backward(q, k, v, out)
                ctx.enable_gqa = q.shape[-3] != k.shape[-3]
                return out

            @staticmethod
            def backward(ctx, grad):
                q, k, v, _ = ctx.saved_tensors
                if ctx.enable_gqa:
                    repeat = q.shape[-3] // k.shape[-3]
                    k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
                scores = q @ k.transpose(-1, -2)  # recomputed
                dv = scores.transpose(-1, -2) @ grad
                dscores = grad @ v.transpose(-1, -2)
                dq, dk = dscores @ k, dscores.transpose(-1, -2) @ q
                if ctx.enable_gqa:
                    dk = dk.unflatten(-3, (-1, repeat)).sum(-2)
                    dv = dv.unflatten(-3, (-1, repeat)).sum(-2)
                return dq, dk, dv, None

        return Fused

    original = None


class _fused_attention:
    def __enter__(self):
        import torch

        _FusedAttentionCount.original = torch.nn.functional.scaled_dot_product_attention
        fused = _FusedAttentionCount.function()

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale,
                      "enable_gqa": enable_gqa}
            return fused.apply(query, key, value, kwargs)

        torch.nn.functional.scaled_dot_product_attention = sdpa
        return self

    def __exit__(self, *exc):
        import torch

        torch.nn.functional.scaled_dot_product_attention = _FusedAttentionCount.original


# ---------------------------------------------------------------------------------------------------------------
# memory per GPU


def _optimizer_states(optim: dict[str, Any]) -> int:
    name = (optim or {}).get("name", "adamw")
    if name == "sgd":
        return 1 if (optim or {}).get("momentum", 0) else 0
    return 2  # adamw, adam: first and second moments


def memory_per_gpu(facts: ModelFacts, strategy: dict[str, Any], precision: str, optim: dict[str, Any],
                   ranks: int, devices_per_node: int, micro_batch: int) -> dict[str, Any]:
    """Bytes per GPU (and per node in host memory, for offload) of the strategy, by part."""
    P, T = facts.params, facts.trainable
    half = precision in ("bf16-true", "16-true")
    mixed = precision in ("bf16-mixed", "16-mixed")
    states = _optimizer_states(optim)
    name = strategy["name"]
    parts = {"parameters": 0.0, "gradients": 0.0, "optimizer_states": 0.0, "autocast_weight_copies": 0.0,
             "buffers": 0.0}
    host = 0.0
    if name == "deepspeed":
        compute = 4 if precision == "32-true" else 2
        master = 4 if compute == 2 else 0  # fp32 master weights, and fp32 gradients of the partition
        stage = int(strategy.get("stage", 2))
        per_param_states = master + 4 * states + master  # master weights + moments + fp32 gradient partition
        offload_opt = strategy.get("offload_optimizer", "none") != "none"
        offload_params = strategy.get("offload_parameters", "none") != "none"
        parts["parameters"] = compute * P if stage < 3 else compute * P / ranks + 4 * facts.largest_layer
        parts["gradients"] = compute * T if stage == 1 else compute * T / ranks
        parts["optimizer_states"] = per_param_states * T / ranks
        if offload_opt:
            host += parts["optimizer_states"] * devices_per_node
            parts["optimizer_states"] = 0.0
        if offload_params and stage == 3:
            host += compute * P / ranks * devices_per_node
            parts["parameters"] = 4 * facts.largest_layer
        bucket = min(int(strategy.get("reduce_bucket_size", 200_000_000)), T)
        gather = (strategy.get("stage3_prefetch_bucket_size", 50_000_000) if stage == 3
                  else strategy.get("allgather_bucket_size", 200_000_000))
        parts["buffers"] = compute * (bucket + min(int(gather), P))
    else:
        weight = 2 if half else 4
        opt_bytes = states * (2 if half else 4) * T
        shards = 1
        sharding = strategy.get("sharding_strategy", "FULL_SHARD") if name == "fsdp" else None
        if sharding in ("FULL_SHARD", "SHARD_GRAD_OP"):
            shards = ranks
        elif sharding == "HYBRID_SHARD":
            shards = devices_per_node
        if sharding in ("FULL_SHARD", "HYBRID_SHARD") and shards > 1:
            gathered = facts.wrap_unit * weight * (2 if facts.wrap_unit < P else 1)  # this unit and the next
            parts["parameters"] = weight * P / shards + gathered
            if strategy.get("cpu_offload"):
                host += weight * P / shards * devices_per_node
                parts["parameters"] = gathered
        else:
            parts["parameters"] = weight * P
        parts["gradients"] = weight * T / shards
        parts["optimizer_states"] = opt_bytes / shards
        if mixed:
            parts["autocast_weight_copies"] = 2 * (facts.wrap_unit if shards > 1 else T)
        if name == "ddp" and ranks > 1:
            parts["buffers"] = weight * T  # DDP's gradient buckets, a second copy of the gradients
    parts["activations"] = float(facts.activation_bytes)
    parts["backward_workspace"] = 2.0 * facts.largest_saved  # the largest saved tensor's gradient and a temporary
    total = sum(parts.values())
    return {"bytes": {k: int(v) for k, v in parts.items()}, "total_bytes": int(total), "host_bytes_per_node": int(host),
            "micro_batch": micro_batch}


def deepspeed_estimate(facts: ModelFacts, strategy: dict[str, Any], nodes: int, devices: int) -> dict[str, Any] | None:
    """DeepSpeed's own estimate of the model states per GPU (ZeRO-2 and ZeRO-3), or None where none applies."""
    if strategy["name"] != "deepspeed" or int(strategy.get("stage", 2)) not in (2, 3):
        return None
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    offload_opt = strategy.get("offload_optimizer", "none") != "none"
    if int(strategy["stage"]) == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            facts.params, facts.largest_layer, num_gpus_per_node=devices, num_nodes=nodes, cpu_offload=offload_opt,
            cpu_offload_params=strategy.get("offload_parameters", "none") != "none", zero_init=True)
        function = "estimate_zero3_model_states_mem_needs"
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(facts.params, num_gpus_per_node=devices, num_nodes=nodes,
                                                         cpu_offload=offload_opt)
        function = "estimate_zero2_model_states_mem_needs"
    return {"function": f"deepspeed {function}", "gpu_bytes": int(gpu), "cpu_bytes_per_node": int(cpu)}


def _strategy_file(name: str) -> dict[str, Any]:
    import yaml

    from aifactory_train.locations import config_dir

    return yaml.safe_load((config_dir() / "strategy" / f"{name}.yaml").read_text())


# ---------------------------------------------------------------------------------------------------------------
# speed, from the benchmark results


def _results_dir() -> Path:
    import aifactory_train.benchmarks as benchmarks

    return Path(benchmarks.__file__).parent / "results"


def results_on(match: str):
    """(path, report) of each benchmarks/results/*.json measured on hardware whose name contains ``match``."""
    for path in sorted(_results_dir().glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and match.lower() in str(report.get("hardware", "")).lower():
            yield path, report


def measured_references(match: str) -> list[dict[str, Any]]:
    """Training speeds measured on hardware whose name contains ``match``, from benchmarks/results/*.json: the
    recipe step benchmarks (the recipe's side, without torch.compile) and `aift bench` reports."""
    found = []
    for path, report in results_on(match):
        bench = str(report.get("benchmark", ""))
        if bench.endswith("_step") and report.get("step"):
            eager = [s for s in report["step"] if not s.get("compile")]
            if eager and eager[0].get("recipe_samples_per_s"):
                found.append({"recipe": bench.removesuffix("_step"), "model": report["model"],
                              "batch_size": report["batch_size"], "image_size": report.get("image_size"),
                              "seq_len": report.get("seq_len"), "precision": report["precision"],
                              "samples_per_s": eager[0]["recipe_samples_per_s"], "source": path.name})
        for row in report.get("rows") or []:
            metric = str(row.get("metric", ""))
            if metric.endswith("_samples_per_s") and not metric.endswith("plain_samples_per_s"):
                params = row.get("params") or {}
                watts = next((r["params"].get("average_watts") for r in report["rows"]
                              if r.get("metric") == metric.replace("_samples_per_s", "_joules_per_sample")), None)
                found.append({"recipe": metric.removesuffix("_samples_per_s"), "model": params.get("model"),
                              "batch_size": params.get("batch_size"), "image_size": params.get("image_size"),
                              "seq_len": params.get("seq_len"), "precision": params.get("precision"),
                              "samples_per_s": row["value"], "watts": watts, "source": path.name})
    return found


def allreduce_busbw(match: str) -> tuple[float, str] | None:
    """The largest all-reduce bus bandwidth (GB/s) measured on this hardware with more than one GPU, if any."""
    best = None
    for path, report in results_on(match):
        for row in report.get("rows") or []:
            if row.get("metric") == "allreduce_busbw_gbps" and (best is None or row["value"] > best[0]):
                best = (float(row["value"]), path.name)
    return best


def hardware_profile(name: str) -> dict[str, Any]:
    from aifactory_train.bench.suites import load_profile

    profile = load_profile(name)
    if not isinstance(profile.get("plan"), dict):
        raise ConfigError(f"profile '{profile['path']}': no 'plan' section (match, gpu_memory_gib, gpu_power_watts); "
                          f"`aift plan` needs it for cluster.hardware={name}")
    return profile


def _gemm_floor(profile: dict[str, Any]) -> float | None:
    rule = profile["thresholds"].get("gemm_bf16_tflops") or {}
    return rule.get("min")


def references_for(profile: dict[str, Any]) -> tuple[list[dict[str, Any]], float, str | None]:
    """(speed references, factor to this GPU, why the factor) for a hardware profile."""
    plan = profile["plan"]
    source = profile
    factor, why = 1.0, None
    if plan.get("speed_from"):
        source = hardware_profile(plan["speed_from"])
        mine, theirs = _gemm_floor(profile), _gemm_floor(source)
        if mine and theirs:
            factor = mine / theirs
        why = (f"no {profile['name']} measurement: {source['name']}'s speed x {factor:.2f} (the ratio of the two "
               f"profiles' gemm_bf16_tflops floors)")
    refs = [dict(r, source=r.get("source", "profile")) for r in source["plan"].get("references") or []]
    refs += measured_references(source["plan"]["match"])
    for ref in refs:
        if ref.get("tokens_per_s") and not ref.get("samples_per_s"):
            ref["samples_per_s"] = ref["tokens_per_s"] / ref["seq_len"]
    return refs, factor, why


def _reference_config(resolved: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """The planned config with the reference's model, batch and size (for its FLOPs per sample)."""
    import yaml

    from aifactory_train.locations import config_dir

    other = json.loads(json.dumps(resolved))
    if ref.get("model") and ref["model"] != resolved["model"].get("name"):
        path = config_dir() / "model" / f"{ref['model']}.yaml"
        if path.is_file():
            other["model"] = yaml.safe_load(path.read_text())
        else:
            other["model"] = {**other["model"], "name": ref["model"]}
    data = other.setdefault("data", {})
    if ref.get("seq_len"):
        data["max_length"] = ref["seq_len"]
    if ref.get("image_size"):
        data["image_size"] = ref["image_size"]
        if other["recipe"]["task"] == "object_detection":
            other["model"]["min_size"] = ref["image_size"]
    return other


@functools.lru_cache(maxsize=16)
def _reference_flops(config_json: str, batch: int, precision: str) -> float | None:
    """FLOPs per sample of a reference's config (the same few references recur, e.g. in a sweep's plans)."""
    return model_facts(json.loads(config_json), batch, precision).flops_per_sample


def throughput_per_gpu(resolved: dict[str, Any], facts: ModelFacts, precision: str, micro_batch: int,
                       profile: dict[str, Any]) -> dict[str, Any] | None:
    """Samples/s of one GPU at the micro-batch, from the closest reference on this hardware; None without one."""
    refs, factor, why = references_for(profile)
    recipe, model = resolved["recipe"]["name"], resolved["model"].get("name")
    mine = [r for r in refs if r["recipe"] == recipe and r.get("samples_per_s")]
    if not mine:
        return None
    shape_key = facts.tokens_per_sample or (resolved.get("data") or {}).get("image_size") or resolved["model"].get("min_size")

    def closeness(ref):
        size = ref.get("seq_len") or ref.get("image_size")
        return (ref.get("model") != model, ref.get("precision") != precision, size != shape_key,
                ref.get("batch_size") != micro_batch, "watts" not in ref)

    ref = min(mine, key=closeness)
    notes = [why] if why else []
    per_gpu = ref["samples_per_s"] * factor
    differs = closeness(ref)[:3]
    if not any(differs) and ref.get("batch_size") != micro_batch:
        notes.append(f"measured at batch {ref.get('batch_size')}: the same samples/s per GPU assumed at {micro_batch}")
    elif any(differs):
        ref_flops = _reference_flops(json.dumps(_reference_config(resolved, ref), sort_keys=True),
                                     int(ref.get("batch_size") or micro_batch), ref.get("precision") or precision)
        if ref_flops and facts.flops_per_sample:
            per_gpu *= ref_flops / facts.flops_per_sample
            if ref_flops / facts.flops_per_sample > 10:
                notes.append(f"{ref_flops / facts.flops_per_sample:,.0f}x fewer FLOPs per sample than the reference: "
                             f"far outside what was measured; measure this job (aift bench) before relying on it")
        notes.append(f"scaled by FLOPs per sample from {ref.get('model')} batch {ref.get('batch_size')} "
                     f"({ref.get('seq_len') or ref.get('image_size')}), assuming the same achieved FLOP/s: a smaller "
                     f"model or batch usually reaches less, so this is optimistic")
    return {"samples_per_s": per_gpu, "reference": ref, "extrapolated": bool(notes), "notes": notes}


# ---------------------------------------------------------------------------------------------------------------
# the plan


def planned_steps(resolved: dict[str, Any], global_batch: int, train_samples: int | None) -> tuple[int | None, str]:
    trainer = resolved["trainer"]
    if trainer.get("max_steps") and trainer["max_steps"] > 0:
        return int(trainer["max_steps"]), f"trainer.max_steps={trainer['max_steps']}"
    if train_samples is None:
        return None, ("unknown: give trainer.max_steps=N, or --train-samples N with trainer.max_epochs "
                      f"({trainer.get('max_epochs')})")
    per_epoch = math.ceil(train_samples / global_batch)
    limit = trainer.get("limit_train_batches", 1.0)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 1:
        per_epoch = min(per_epoch, limit)
    elif isinstance(limit, float) and limit < 1:
        per_epoch = max(1, int(per_epoch * limit))
    epochs = int(trainer.get("max_epochs") or 1)
    return per_epoch * epochs, f"{epochs} epoch(s) x {per_epoch} steps ({train_samples} samples / {global_batch})"


def _strategy_label(strategy: dict[str, Any]) -> str:
    if strategy["name"] == "deepspeed":
        label = f"deepspeed ZeRO-{strategy.get('stage')}"
        offload = [k.split("_")[1] for k in ("offload_optimizer", "offload_parameters")
                   if strategy.get(k, "none") != "none"]
        return label + (f" (offload: {', '.join(offload)})" if offload else "")
    if strategy["name"] == "fsdp":
        return f"fsdp {strategy.get('sharding_strategy', 'FULL_SHARD')}"
    return strategy["name"]


def make_plan(resolved: dict[str, Any], train_samples: int | None = None,
              grid_g_per_kwh: float | None = None) -> dict[str, Any]:
    """The plan of one job (a dict, as `aift plan --format json` writes it). ConfigError when no strategy fits."""
    from aifactory_train.launch.slurm import job_shape
    from aifactory_train.run.trainer import batch_plan

    cluster = resolved["cluster"]
    nodes, devices, _ = job_shape(resolved)
    ranks = nodes * devices
    batch = batch_plan(resolved, ranks)
    micro = int(batch["per_device"] or 1)
    precision = compute_precision(resolved)
    strategy = resolved["strategy"]
    facts = model_facts(resolved, micro, precision)
    profile = hardware_profile(cluster["hardware"]) if cluster.get("hardware") else None
    gpu_gib = profile["plan"].get("gpu_memory_gib") if profile else None
    optim = resolved.get("optim") or {}

    def memory(strat):
        return memory_per_gpu(facts, strat, precision, optim, ranks, devices, micro)

    mem = memory(strategy)
    plan: dict[str, Any] = {
        "recipe": resolved["recipe"]["name"], "model": resolved["model"].get("name"), "shape": facts.shape,
        "precision": precision, "strategy": _strategy_label(strategy),
        "job": {"nodes": nodes, "gpus_per_node": devices, "device": "GPU" if cluster["node"]["gpus"] else "process",
                "ranks": ranks, "micro_batch": micro,
                "accumulate_grad_batches": batch["accumulate_grad_batches"], "global_batch": batch["global"]},
        "cluster": cluster["name"], "hardware": cluster.get("hardware"),
        "model_facts": {"parameters": facts.params, "trainable": facts.trainable, "largest_layer": facts.largest_layer,
                        "flops_per_sample": facts.flops_per_sample, "tokens_per_sample": facts.tokens_per_sample},
        "memory": {**mem, "total_gib": mem["total_bytes"] / GIB, "gpu_memory_gib": gpu_gib,
                   "deepspeed_estimator": deepspeed_estimate(facts, strategy, nodes, devices)},
        "notes": list(facts.notes), "refusals": [],
    }
    host_gb = cluster["node"].get("memory_gb")

    def fits(m):
        ok_gpu = gpu_gib is None or m["total_bytes"] <= FIT_HEADROOM * gpu_gib * GIB
        ok_host = not host_gb or m["host_bytes_per_node"] <= 0.8 * host_gb * 1e9
        return ok_gpu and ok_host

    plan["memory"]["fits"] = fits(mem) if gpu_gib is not None else None
    if gpu_gib is not None and not plan["memory"]["fits"]:
        tried = []
        for name in FALLBACKS:
            candidate = _strategy_file(name)
            if candidate["name"] == strategy["name"] and all(candidate.get(k) == strategy.get(k)
                                                             for k in ("stage", "offload_optimizer", "sharding_strategy")):
                continue
            if candidate["name"] == "fsdp" and ranks > 1 and not strategy.get("auto_wrap_policy"):
                candidate["auto_wrap_policy"] = []
            m = memory(candidate)
            tried.append((m["total_bytes"], name))
            if fits(m):
                plan["memory"]["would_fit"] = {"strategy": name, "total_gib": m["total_bytes"] / GIB}
                break
        if "would_fit" not in plan["memory"]:
            smallest, name = min(tried)
            raise ConfigError(
                f"{resolved['model'].get('name')} ({facts.params / 1e6:,.0f}M parameters, {facts.shape}, micro-batch "
                f"{micro}) fits no strategy on {ranks} x {gpu_gib} GiB GPUs of cluster '{cluster['name']}': the "
                f"smallest, strategy={name}, needs {smallest / GIB:,.1f} GiB per GPU (limit "
                f"{FIT_HEADROOM * gpu_gib:.1f}); use more trainer.num_nodes, a smaller data.batch_size or "
                f"model.gradient_checkpointing=true")
        plan["refusals"].append(
            f"memory: {plan['memory']['total_gib']:.1f} GiB per GPU with {plan['strategy']} exceeds "
            f"{FIT_HEADROOM:.0%} of the {gpu_gib} GiB GPU; strategy={plan['memory']['would_fit']['strategy']} "
            f"would fit ({plan['memory']['would_fit']['total_gib']:.1f} GiB)")

    # speed
    speed = throughput_per_gpu(resolved, facts, precision, micro, profile) if profile else None
    steps, steps_from = planned_steps(resolved, batch["global"] or micro * ranks, train_samples)
    plan["steps"] = {"planned": steps, "from": steps_from}
    if speed is None:
        plan["speed"] = None
        plan["notes"].append("speed: no benchmark result for this recipe on this hardware"
                             + ("" if profile else " (the cluster profile names no `hardware`)"))
    else:
        compute_s = micro / speed["samples_per_s"] * batch["accumulate_grad_batches"]
        grad_bytes = (2 if precision != "32-true" else 4) * facts.trainable
        sharded = strategy["name"] == "deepspeed" and int(strategy.get("stage", 2)) == 3 or (
            strategy["name"] == "fsdp" and strategy.get("sharding_strategy", "FULL_SHARD") != "NO_SHARD")
        volume = (3 if sharded else 2) * (ranks - 1) / ranks * grad_bytes if ranks > 1 else 0.0
        busbw, bw_from = None, None
        if ranks > 1:
            measured = allreduce_busbw(profile["plan"]["match"])
            if measured:
                busbw, bw_from = measured[0], f"measured ({measured[1]})"
            elif cluster.get("internode_busbw_gbps"):
                busbw = float(cluster["internode_busbw_gbps"])
                bw_from = "cluster.internode_busbw_gbps (nominal, not measured)" + (
                    "; within one node NVLink is faster: an upper bound on the time" if nodes == 1 else "")
                speed["extrapolated"] = True
        comm_s = volume / (busbw * 1e9) if busbw else 0.0
        if ranks > 1 and not busbw:
            plan["notes"].append("speed: no all-reduce bandwidth for this hardware; communication not counted")
        step_s = compute_s + comm_s
        plan["speed"] = {
            "per_gpu_samples_per_s": speed["samples_per_s"], "step_s": step_s, "compute_s": compute_s,
            "communication_s": comm_s, "allreduce_busbw_gbps": busbw, "allreduce_from": bw_from,
            "samples_per_s": (batch["global"] or micro * ranks) / step_s,
            "tokens_per_s": (batch["global"] or micro * ranks) * facts.tokens_per_sample / step_s
            if facts.tokens_per_sample else None,
            "extrapolated": speed["extrapolated"], "reference": speed["reference"],
            "notes": speed["notes"] + ["communication not overlapped with compute: an upper bound on step time"
                                       if ranks > 1 else "one GPU: no communication"],
        }
    # cost
    cost: dict[str, Any] = {"grid_g_co2_per_kwh": grid_g_per_kwh if grid_g_per_kwh is not None
                            else cluster.get("grid_g_co2_per_kwh")}
    if plan["speed"] and steps:
        wall_h = steps * plan["speed"]["step_s"] / 3600
        ref = plan["speed"]["reference"]
        measured_watts = ref.get("watts") if not (profile["plan"].get("speed_from")) else None
        watts = measured_watts or profile["plan"].get("gpu_power_watts")
        cost.update({"wall_hours": wall_h, "gpu_hours": wall_h * ranks,
                     "watts_per_gpu": watts,
                     "watts_from": (f"measured ({ref['source']})" if measured_watts else
                                    "the GPU's board power limit (an upper bound)") if watts else None})
        cost["kwh"] = cost["gpu_hours"] * watts / 1000 if watts else None
        cost["kg_co2"] = (cost["kwh"] * cost["grid_g_co2_per_kwh"] / 1000
                          if cost["kwh"] is not None and cost["grid_g_co2_per_kwh"] else None)
        cost["covers"] = "training steps on the GPUs; validation, test, start-up and the host's CPUs not counted"
    plan["cost"] = cost
    # allocation and budget
    track = cluster.get("allocation")
    granted = (cluster.get("allocation_gpu_hours") or {}).get(track)
    used = used_gpu_hours(track, cluster) if track else None
    remaining = granted - used if granted is not None and used is not None else None
    plan["allocation"] = {"track": track, "granted_gpu_hours": granted, "used_gpu_hours": used,
                          "remaining_gpu_hours": remaining,
                          "used_from": "Slurm accounting" if used is not None else
                          "unknown: no accounting reachable (aift usage); compared with the whole grant"}
    if cost.get("gpu_hours") is not None and granted is not None:
        limit = remaining if remaining is not None else granted
        plan["allocation"]["fits"] = cost["gpu_hours"] <= limit
        if not plan["allocation"]["fits"]:
            plan["refusals"].append(f"allocation: {cost['gpu_hours']:,.1f} GPU-hours exceed track '{track}''s "
                                    f"{'remaining' if remaining is not None else 'granted'} {limit:,.1f}")
    else:
        plan["allocation"]["fits"] = None
    plan["start"] = planned_start(resolved, cost.get("wall_hours"))
    budget = (resolved.get("energy") or {}).get("budget_kwh")
    plan["energy_budget_kwh"] = budget
    if budget is not None and cost.get("kwh") is not None and cost["kwh"] > budget:
        plan["refusals"].append(f"energy: the plan needs {cost['kwh']:,.2f} kWh, over energy.budget_kwh={budget}")
    return plan


def planned_start(resolved: dict[str, Any], wall_hours: float | None) -> dict[str, Any] | None:
    """When `aift launch` would begin the job (launch.start=offpeak|grid: launch/start_window.choose_start), over
    the planned wall time where the plan has one (else the job's time limit); launch.start=now: now."""
    mode = (resolved.get("launch") or {}).get("start", "now")
    from datetime import timedelta

    from aifactory_train.launch.start_window import choose_start

    duration = timedelta(hours=wall_hours) if wall_hours else None
    choice = choose_start(resolved["cluster"], duration, mode=mode)
    return {"mode": choice.mode, "begin": choice.local_begin().isoformat(timespec="minutes"), "why": choice.why,
            "over": "the planned wall time" if wall_hours else "the job's time limit (cluster.time_limit)",
            "signal_now": choice.signal_now, "signal_begin": choice.signal_begin, "saving": choice.saving}


def _fmt_gib(value: float) -> str:
    return f"{value / GIB:,.2f} GiB"


def render_text(plan: dict[str, Any]) -> str:
    job, mem = plan["job"], plan["memory"]
    lines = [f"plan: {plan['recipe']} / {plan['model']} ({plan['model_facts']['parameters'] / 1e6:,.1f}M parameters, "
             f"{plan['shape']}), {plan['precision']}",
             f"job: {job['nodes']} node(s) x {job['gpus_per_node']} {job['device']}{'s' if job['device'] == 'GPU' else 'es'} = {job['ranks']} rank(s), "
             f"{plan['strategy']}, micro-batch {job['micro_batch']} x {job['accumulate_grad_batches']} accumulated "
             f"= global batch {job['global_batch']}; cluster {plan['cluster']} ({plan['hardware'] or 'no hardware profile'})",
             f"memory per {job['device']}:"]
    for part, value in mem["bytes"].items():
        if value:
            lines.append(f"  {part.replace('_', ' '):<24}{_fmt_gib(value):>14}")
    fits = {True: "fits", False: "DOES NOT FIT", None: "GPU memory unknown"}[mem["fits"]]
    limit = f" of {mem['gpu_memory_gib']} GiB" if mem["gpu_memory_gib"] else ""
    lines.append(f"  {'total':<24}{_fmt_gib(mem['total_bytes']):>14}{limit}: {fits}")
    if mem["host_bytes_per_node"]:
        lines.append(f"  host memory per node (offload): {mem['host_bytes_per_node'] / 1e9:,.1f} GB")
    if mem.get("deepspeed_estimator"):
        ds = mem["deepspeed_estimator"]
        ours = sum(mem["bytes"][k] for k in ("parameters", "gradients", "optimizer_states"))
        lines.append(f"  model states {_fmt_gib(ours)}; {ds['function']}: {_fmt_gib(ds['gpu_bytes'])} per GPU")
    if mem.get("would_fit"):
        lines.append(f"  would fit: strategy={mem['would_fit']['strategy']} ({mem['would_fit']['total_gib']:.1f} GiB)")
    speed = plan["speed"]
    if speed:
        mark = " (EXTRAPOLATED)" if speed["extrapolated"] else " (measured)"
        tokens = f", {speed['tokens_per_s']:,.0f} tokens/s" if speed["tokens_per_s"] else ""
        lines.append(f"speed{mark}: {speed['step_s']:.3f} s/step ({speed['compute_s']:.3f} compute + "
                     f"{speed['communication_s']:.3f} all-reduce), {speed['samples_per_s']:,.1f} samples/s{tokens}")
        ref = speed["reference"]
        lines.append(f"  from: {ref['source']}: {ref['recipe']} {ref.get('model')} batch {ref.get('batch_size')} "
                     f"{ref.get('precision')}: {ref['samples_per_s']:,.1f} samples/s per GPU")
        if speed["allreduce_from"]:
            lines.append(f"  all-reduce: {speed['allreduce_busbw_gbps']} GB/s bus bandwidth, {speed['allreduce_from']}")
        lines += [f"  note: {n}" for n in speed["notes"]]
    lines.append(f"steps: {plan['steps']['planned'] if plan['steps']['planned'] is not None else '?'} "
                 f"({plan['steps']['from']})")
    cost = plan["cost"]
    if cost.get("gpu_hours") is not None:
        lines.append(f"wall time: {cost['wall_hours']:,.2f} h; GPU-hours: {cost['gpu_hours']:,.1f}")
        if cost.get("kwh") is not None:
            co2 = (f"; CO2: {cost['kg_co2']:,.1f} kg at {cost['grid_g_co2_per_kwh']} g/kWh"
                   if cost.get("kg_co2") is not None else "; CO2: give --grid-intensity G (g/kWh)")
            lines.append(f"energy: {cost['kwh']:,.1f} kWh at {cost['watts_per_gpu']} W per GPU "
                         f"({cost['watts_from']}){co2}")
        lines.append(f"  covers: {cost['covers']}")
    else:
        lines.append("GPU-hours, kWh: unknown (" + ("no speed" if not speed else "no planned steps") + ")")
    alloc = plan["allocation"]
    if alloc["track"]:
        granted = (f"granted {alloc['granted_gpu_hours']:,.0f} GPU-hours" if alloc["granted_gpu_hours"] is not None
                   else "no grant in the profile (cluster.allocation_gpu_hours)")
        used = f"{alloc['used_gpu_hours']:,.1f}" if alloc["used_gpu_hours"] is not None else alloc["used_from"]
        verdict = {True: "fits", False: "EXCEEDS", None: "unknown"}[alloc["fits"]]
        lines.append(f"allocation: track {alloc['track']}: {granted}, used {used}: {verdict}")
    if plan.get("start"):
        start = plan["start"]
        saving = (f"; mean grid signal {start['signal_begin']:.4g} vs {start['signal_now']:.4g} now "
                  f"({start['saving']:+.1%} saved)" if start["saving"] is not None else "")
        lines.append(f"start: {start['begin']} (launch.start={start['mode']}: {start['why']}, over {start['over']}"
                     f"{saving})")
    if plan["energy_budget_kwh"] is not None:
        lines.append(f"energy budget: {plan['energy_budget_kwh']} kWh")
    lines += [f"note: {n}" for n in plan["notes"]]
    lines += [f"REFUSED by aift launch: {r}" for r in plan["refusals"]]
    return "\n".join(lines) + "\n"


def compose_resolved(overrides: list[str]) -> dict[str, Any]:
    """The job's config, composed and validated exactly as `aift launch` does."""
    import tempfile

    from omegaconf import OmegaConf

    from aifactory_train.records.config import validate
    from aifactory_train.launch.slurm import compose, sweep_points

    points = sweep_points(overrides)
    if len(points) > 1:
        raise ConfigError(f"`aift plan` plans one job; {' '.join(o for o in overrides if o not in points[0])} is a "
                          f"sweep: give one value")
    cfg = compose(overrides, Path(tempfile.gettempdir()) / "aift-plan")
    typed = validate(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for section in ("cluster", "energy"):  # with the schema's defaults for keys a profile leaves out (cluster=local)
        resolved[section] = dataclasses.asdict(getattr(typed, section))
    return resolved


def run_plan(overrides: list[str], fmt: str, out: str | None, train_samples: int | None,
             grid: float | None) -> int:
    if train_samples is not None and train_samples < 1:
        raise ConfigError(f"--train-samples {train_samples}: give the number of training samples, >= 1")
    if grid is not None and grid <= 0:
        raise ConfigError(f"--grid-intensity {grid}: give the grid's carbon intensity in g CO2/kWh, > 0")
    plan = make_plan(compose_resolved(overrides), train_samples, grid)
    text = json.dumps(plan, indent=2, default=str) + "\n" if fmt == "json" else render_text(plan)
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    return 0


def check_launch(resolved: dict[str, Any], script: str, ignore_plan: bool) -> tuple[str, dict[str, Any] | None]:
    """`aift launch`'s plan check, for a cluster profile that names its `hardware` (else nothing to check against):
    a job that cannot fit in GPU memory, or exceeds the track's remaining allocation or energy.budget_kwh, is
    refused (ConfigError). With ``ignore_plan`` it is submitted, and the override is recorded: on stderr, in a
    comment of the job script, and in the plan (``ignored_by``) that launch writes to <run>/plan.json."""
    import sys

    if not resolved["cluster"].get("hardware"):
        return script, None
    try:
        plan = make_plan(resolved)
    except PlanUnavailable as err:  # e.g. a copied recipe of a new task: submitted unchecked, and said so
        print(f"warning: no plan check for this job: {err}", file=sys.stderr)
        return script, None
    if not plan["refusals"]:
        return script, plan
    if not ignore_plan:
        raise ConfigError(f"aift plan refuses this job: {'; '.join(plan['refusals'])} (`aift plan` with the same "
                          f"overrides shows the whole plan; --ignore-plan submits it anyway, and records that)")
    from aifactory_train.records.usage_terms import os_user

    plan["ignored_by"] = {"user": os_user(), "flag": "--ignore-plan", "refusals": list(plan["refusals"])}
    for refusal in plan["refusals"]:
        print(f"warning: --ignore-plan: submitted although the plan refuses it: {refusal}", file=sys.stderr)
    lines = script.splitlines(keepends=True)
    # after the #SBATCH header (sbatch stops reading directives at the first command), as comments
    note = "".join(f"# aift launch --ignore-plan ({os_user()}): {refusal}\n" for refusal in plan["refusals"])
    last_directive = max((i for i, line in enumerate(lines) if line.startswith("#SBATCH")), default=0)
    lines.insert(last_directive + 1, note)
    return "".join(lines), plan
