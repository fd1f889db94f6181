"""A recipe's Lightning training step vs a hand-written PyTorch loop, and the input pipeline on real files.

Both loops run in this one process on the same model, batch, precision and in-memory data, alternating
(plain, recipe, plain, recipe, ...) so that machine noise hits both; the medians are compared. The recipe
side is the real LightningModule of the recipe in a `lightning.Trainer` (with the recipe's throughput callback
and gradient clipping; no logger or checkpointing, which the plain loop does not have either). What each recipe
trains and how is its bench adapter, ``<recipe>/bench.py`` (``BenchAdapter`` in aifactory_train/recipe.py); the
loops are aifactory_train/bench/paired.py. Any recipe with an adapter, shipped, copied or on $AIFT_RECIPES_PATH:

    python benchmarks/recipe_step.py NAME                                  # the adapter's CPU defaults
    python benchmarks/recipe_step.py NAME --model resnet50 --image-size 224 --batch-size 256 \
        --steps 40 --compile both                                          # one GPU, an image recipe
    python benchmarks/recipe_step.py NAME --model llama_374m --seq-len 2048 --batch-size 8 \
        --steps 20 --compile both                                          # one GPU, a text recipe
Writes a JSON (and a Markdown table with --markdown) with the exact command. Adapters with ``onnx_latency`` also
measure the exported ONNX model's CPU latency at batch 1 (onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from aifactory_train.bench.adapters import bench_adapter, bench_adapters
from aifactory_train.bench.paired import plain_loop, recipe_loop


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe and its shape (None: the recipe's CPU default), shared with step_overhead.py."""
    parser.add_argument("recipe", choices=sorted(bench_adapters()), help="a recipe with a bench adapter")
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None, help="text recipes: tokens per row")


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_gpu_scripts.py parses the GPU scripts' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="auto: bf16-mixed on GPU, 32-true on CPU")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                        help="torch.compile the model (as the recipe compiles it, e.g. a detector's backbone + FPN), in both loops")
    parser.add_argument("--channels-last", choices=["auto", "true", "false"], default=None,
                        help="adapters that read it (detection): NHWC convolutions in both loops (default false, as "
                             "the model configs); others decide for themselves")
    parser.add_argument("--workers", type=int, nargs="*", default=None, help="input-pipeline worker counts")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--markdown", default=None, help="Markdown file to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    adapter = bench_adapter(args.recipe)
    for key, value in adapter.DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if device.type == "cuda" else "32-true")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args._compile = False
    spec = adapter.build(args, device)
    rows = []
    for compiled in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
        args._compile = compiled
        plain, recipe = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(spec, args, device, precision))
            recipe.append(recipe_loop(spec, args, device, precision))
        row = {"compile": compiled, "plain_samples_per_s": statistics.median(plain),
               "recipe_samples_per_s": statistics.median(recipe), "plain_runs": plain, "recipe_runs": recipe}
        row["ratio"] = row["recipe_samples_per_s"] / row["plain_samples_per_s"]
        tokens = getattr(spec, "tokens_per_sample", None)
        if tokens:
            row["plain_tokens_per_s"] = row["plain_samples_per_s"] * tokens
            row["recipe_tokens_per_s"] = row["recipe_samples_per_s"] * tokens
            module, _ = spec.module()
            row["flops_per_token"] = module.measure_flops_per_token()
            if device.type == "cuda":
                from lightning.fabric.utilities.throughput import get_available_flops

                peak = get_available_flops(device, torch.bfloat16)
                row["recipe_mfu"] = row["flops_per_token"] * row["recipe_tokens_per_s"] / peak if peak else None
                row["plain_mfu"] = row["flops_per_token"] * row["plain_tokens_per_s"] / peak if peak else None
        elif getattr(spec, "flops_per_sample", None):
            row["flops_per_sample"] = spec.flops_per_sample
            if device.type == "cuda":
                from lightning.fabric.utilities.throughput import get_available_flops

                peak = get_available_flops(device, torch.bfloat16)
                row["recipe_mfu"] = row["flops_per_sample"] * row["recipe_samples_per_s"] / peak if peak else None
                row["plain_mfu"] = row["flops_per_sample"] * row["plain_samples_per_s"] / peak if peak else None
        rows.append(row)
        extra = (f" ({row['plain_tokens_per_s']:.0f} vs {row['recipe_tokens_per_s']:.0f} tokens/s)" if tokens else "")
        print(f"compile={compiled}: plain {row['plain_samples_per_s']:.1f} samples/s, recipe "
              f"{row['recipe_samples_per_s']:.1f} samples/s, ratio {row['ratio']:.3f}{extra}", flush=True)
    workers = args.workers if args.workers is not None else ([2] if device.type == "cpu" else [4, 8, 12])
    pipeline = [spec.input_pipeline(w) for w in workers]
    for p in pipeline:
        print(f"input pipeline, {p['workers']} workers: {p['samples_per_s']:.1f} samples/s "
              f"(training step: {rows[0]['recipe_samples_per_s']:.1f})", flush=True)
        if p.get("deidentify_notes_per_s"):
            print(f"de-identification (deduce, 1 process): {p['deidentify_notes_per_s']:.0f} notes/s", flush=True)
    latency = spec.onnx_latency() if hasattr(spec, "onnx_latency") else None
    if latency:
        print(f"exported ONNX, batch 1, CPU: {latency['onnxruntime_ms']:.1f} ms (eager PyTorch "
              f"{latency['pytorch_eager_ms']:.1f} ms), input {latency['input_hw']}", flush=True)
    hardware = (torch.cuda.get_device_name(0) if device.type == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    result = {
        "benchmark": f"{args.recipe}_step", "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d"), "hardware": hardware, "torch": torch.__version__,
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
        "seq_len": getattr(args, "seq_len", None) if getattr(spec, "tokens_per_sample", None) else None, "precision": precision,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "channels_last": getattr(spec, "channels_last", None),
        "step": rows, "input_pipeline": pipeline, "onnx_latency": latency,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        lines = [f"# {args.recipe} training step vs plain PyTorch — {hardware}, {result['date']}", "",
                 f"Command: `{result['command']}`", "",
                 f"torch {result['torch']}; {args.model}, batch {args.batch_size}, "
                 f"{f'{args.seq_len} tokens' if result['seq_len'] else f'{args.image_size} px'}, {precision}"
                 f"{', channels_last' if result['channels_last'] else ''}; "
                 f"median of {args.repeats} alternating runs of {args.steps} steps after {args.warmup} warm-up steps.", "",
                 "| compile | plain loop (samples/s) | recipe (samples/s) | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['compile']} | {r['plain_samples_per_s']:.2f} | {r['recipe_samples_per_s']:.2f} | {r['ratio']:.3f} |"
                  for r in rows]
        if result["seq_len"]:
            lines += ["", "| compile | plain loop (tokens/s) | recipe (tokens/s) | recipe MFU | training FLOPs/token |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['compile']} | {r['plain_tokens_per_s']:.0f} | {r['recipe_tokens_per_s']:.0f} | "
                      f"{r.get('recipe_mfu') if r.get('recipe_mfu') is not None else 'n/a (CPU)'} | {r['flops_per_token']:,} |"
                      for r in rows]
        if rows[0].get("flops_per_sample"):
            lines += ["", "| compile | training FLOPs/sample (the recipe's count) | plain MFU | recipe MFU |", "|---|---|---|---|"]
            lines += [f"| {r['compile']} | {r['flops_per_sample']:,} | "
                      + " | ".join(f"{r[k]:.3f}" if r.get(k) is not None else "n/a (CPU)" for k in ("plain_mfu", "recipe_mfu"))
                      + " |" for r in rows]
        lines += ["", "Input pipeline alone (real files through the recipe's DataModule, in DataLoader workers):", "",
                  "| workers | samples/s | training step samples/s |", "|---|---|---|"]
        lines += [f"| {p['workers']} | {p['samples_per_s']:.1f} | {rows[0]['recipe_samples_per_s']:.2f} |" for p in pipeline]
        deid = [p for p in pipeline if p.get("deidentify_notes_per_s")]
        if deid:
            lines += ["", f"De-identification (deduce, one process, synthetic notes of ~420 characters): "
                          f"{deid[0]['deidentify_notes_per_s']:.0f} notes/s."]
        if latency:
            lines += ["", f"Exported ONNX model, batch 1, CPU ({latency['threads']} threads), input {latency['input_hw']}: "
                          f"onnxruntime {latency['onnxruntime_ms']:.1f} ms median; eager PyTorch {latency['pytorch_eager_ms']:.1f} ms."]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
