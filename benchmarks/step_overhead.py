"""What a recipe's Lightning step does that the plain PyTorch loop does not: host-device sync points and tensor
ops per training step, counted, not timed (so it means the same on a shared 2-core machine and on a GPU).

    python benchmarks/step_overhead.py NAME --markdown benchmarks/results/NAME_step_overhead_cpu_<date>.md
    python benchmarks/step_overhead.py NAME --model fasterrcnn_resnet50_fpn_v2 --image-size 640 --batch-size 16

NAME: any recipe with a bench adapter (``<recipe>/bench.py``).

Both loops are those of benchmarks/recipe_step.py (same model, batch, precision and in-memory data). Each is run
twice, with 1 and with 1 + N steps after the warm-up, and the difference is divided by N, so one-time work
(Trainer set-up, moving the model) drops out and what is left is the per-step cost.
- Sync points: every ``Tensor.item()`` and ``bool(tensor)`` call (on a GPU each waits for the GPU to catch up),
  grouped by call site.
- Tensor ops: torch.profiler's count of aten ops (on a GPU each is a kernel launch or host work).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

def _caller(stack: list[traceback.FrameSummary]) -> str:
    """The call site: the innermost frame (torchvision's, Lightning's or ours) that called item() or bool()."""
    inner = next(f for f in reversed(stack) if "step_overhead.py" not in f.filename)
    return f"{_short(inner.filename)}:{inner.lineno} {inner.name}"


def _short(filename: str) -> str:
    """site-packages/x/y.py -> x/y.py; a file of this repository (or the installed package) -> its path in it."""
    if "site-packages/" in filename and "aifactory_train" not in filename:
        return filename.split("site-packages/")[-1]
    parts = Path(filename).parts
    for top in ("recipes", "benchmarks", "aifactory_train"):
        if top in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(top) - 1:])
    return Path(filename).name


class SyncCounter:
    """Counts Tensor.item() and bool(tensor) calls by call site while active."""

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()
        self._item, self._bool = torch.Tensor.item, torch.Tensor.__bool__

    def __enter__(self) -> "SyncCounter":
        counter, item, as_bool = self, self._item, self._bool

        def counted_item(tensor):
            counter.sites["item() at " + _caller(traceback.extract_stack()[:-1])] += 1
            return item(tensor)

        def counted_bool(tensor):
            counter.sites["bool() at " + _caller(traceback.extract_stack()[:-1])] += 1
            return as_bool(tensor)

        torch.Tensor.item, torch.Tensor.__bool__ = counted_item, counted_bool
        return self

    def __exit__(self, *exc) -> None:
        torch.Tensor.item, torch.Tensor.__bool__ = self._item, self._bool


def measure(loop, adapter, args, device, precision: str, steps: int) -> tuple[collections.Counter, collections.Counter]:
    run_args = SimpleNamespace(**{**vars(args), "steps": steps})
    spec = adapter.build(run_args, device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, SyncCounter() as syncs:
        loop(spec, run_args, device, precision)
    ops = collections.Counter({event.key: event.count for event in profile.key_averages() if event.key.startswith("aten::")})
    return ops, syncs.sites


def per_step(short: collections.Counter, long: collections.Counter, steps: int) -> dict[str, float]:
    return {key: (long[key] - short.get(key, 0)) / steps for key in long if long[key] != short.get(key, 0)}


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_gpu_scripts.py parses the GPU scripts' commands with it)."""
    from aifactory_train.benchmarks.recipe_step import add_recipe_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument("--steps", type=int, default=4, help="N: the extra steps whose cost is counted")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="auto: bf16-mixed on GPU, 32-true on CPU")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--markdown", default=None, help="Markdown file to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    from aifactory_train.bench.adapters import bench_adapter
    from aifactory_train.bench.paired import plain_loop, recipe_loop

    args = build_parser().parse_args(argv)
    adapter = bench_adapter(args.recipe)
    for key, value in adapter.DEFAULTS.items():
        if key != "steps" and getattr(args, key, None) is None:
            setattr(args, key, value)
    args.repeats, args._compile = 1, False
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if device.type == "cuda" else "32-true")

    result = {"benchmark": f"{args.recipe}_step_overhead", "command": "python " + shlex.join(sys.argv),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "hardware": torch.cuda.get_device_name(0) if device.type == "cuda" else
              f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
              "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size, "precision": precision,
              "loops": {}}
    for name, loop in (("plain", plain_loop), ("recipe", recipe_loop)):
        ops_1, syncs_1 = measure(loop, adapter, args, device, precision, 1)
        ops_n, syncs_n = measure(loop, adapter, args, device, precision, 1 + args.steps)
        ops, syncs = per_step(ops_1, ops_n, args.steps), per_step(syncs_1, syncs_n, args.steps)
        result["loops"][name] = {"aten_ops_per_step": sum(ops.values()), "syncs_per_step": sum(syncs.values()),
                                 "ops": ops, "sync_sites": syncs}
        print(f"{name}: {sum(ops.values()):.0f} aten ops and {sum(syncs.values()):.1f} sync points per step", flush=True)
    plain, recipe = result["loops"]["plain"], result["loops"]["recipe"]
    result["extra_ops"] = {k: recipe["ops"].get(k, 0) - plain["ops"].get(k, 0)
                           for k in set(plain["ops"]) | set(recipe["ops"]) if recipe["ops"].get(k, 0) != plain["ops"].get(k, 0)}
    result["extra_sync_sites"] = {k: recipe["sync_sites"].get(k, 0) - plain["sync_sites"].get(k, 0)
                                  for k in set(plain["sync_sites"]) | set(recipe["sync_sites"])
                                  if recipe["sync_sites"].get(k, 0) != plain["sync_sites"].get(k, 0)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, args.steps)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


def markdown(result: dict, steps: int) -> str:
    plain, recipe = result["loops"]["plain"], result["loops"]["recipe"]
    lines = [f"# {result['benchmark']}: per-step work of the recipe's Lightning step vs the plain loop", "",
             f"{result['hardware']}, torch {result['torch']}, {result['date']}. Command:", "", f"    {result['command']}", "",
             f"{result['model']}, batch {result['batch_size']}, {result['image_size'] or ''} px, {result['precision']}; "
             f"counts per step from runs of 1 and 1 + {steps} steps (one-time set-up drops out).", "",
             "| | plain loop | recipe | recipe - plain |", "|---|---|---|---|",
             f"| aten ops per step | {plain['aten_ops_per_step']:.0f} | {recipe['aten_ops_per_step']:.0f} | "
             f"{recipe['aten_ops_per_step'] - plain['aten_ops_per_step']:+.0f} |",
             f"| sync points per step (item(), bool(tensor)) | {plain['syncs_per_step']:.1f} | {recipe['syncs_per_step']:.1f} | "
             f"{recipe['syncs_per_step'] - plain['syncs_per_step']:+.1f} |", ""]
    if result["extra_sync_sites"]:
        lines += ["Sync points that differ (per step):", ""]
        lines += [f"- {count:+.1f} {site}" for site, count in sorted(result["extra_sync_sites"].items(), key=lambda kv: -abs(kv[1]))]
        lines.append("")
    else:
        lines += ["The sync points per step are the same call sites, the same number of times.", ""]
    top = sorted(result["extra_ops"].items(), key=lambda kv: -abs(kv[1]))[:12]
    if top:
        lines += ["Tensor ops that differ most (per step): " + ", ".join(f"{k} {v:+.1f}" for k, v in top), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
