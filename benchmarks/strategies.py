"""Per-strategy step time and peak memory per process.

CPU (default): one model, 2 processes on this machine (gloo, with the CPU smoke path for FSDP and DeepSpeed). This
says what each strategy costs in memory and time for the same work, not how it scales (2 processes on 2 cores
share one memory bus).

    python benchmarks/strategies.py RECIPE --out benchmarks/results/strategies_cpu-2proc_<date>.json --markdown ....md

GPU (--gpu): one process on one GPU, `experiment=RECIPE_gpu` (Llama 374M, 8 x 2048 tokens, bf16-mixed,
eager) under single, ddp, deepspeed_zero2 and deepspeed_zero3: tokens/s is the last windowed value of the
run's own throughput metric (steady state, MLflow), memory is the run's peak_device_memory_gib. On one GPU
the sharded strategies have nothing to shard over, so this shows their fixed cost; see README for where they pay.

    python benchmarks/strategies.py RECIPE --gpu --steps 60 --out $OUT/strategies_gpu.json --markdown $OUT/strategies_gpu.md

Each strategy runs `aift launch --local 2` of RECIPE (a causal-LM recipe) with a 25M-parameter Llama (hidden 512, 8 layers),
full fine-tuning, batch 4 x 256 tokens per process, fp32, for --steps steps. Peak memory is the largest resident
set of any one process (getrusage of the finished children); step time comes from the run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = {
    "ddp": [],
    "fsdp": ["strategy.cpu_smoke=true"],
    "deepspeed_zero1": ["strategy.cpu_smoke=true"],
    "deepspeed_zero2": ["strategy.cpu_smoke=true"],
    "deepspeed_zero3": ["strategy.cpu_smoke=true", "strategy.stage3_param_persistence_threshold=0"],
}
MODEL = ["model.hidden_size=512", "model.num_layers=8", "model.num_heads=8", "model.intermediate_size=1376"]
GPU_STRATEGIES = {"single": [], "ddp": [], "deepspeed_zero2": [], "deepspeed_zero3": []}
GPU_RUN = ["model.compile=false", "trainer.devices=1", "trainer.log_every_n_steps=10",
           "trainer.limit_val_batches=0", "run_test=false", "trainer.enable_progress_bar=false"]


# --gpu --on-cpu: the same plan with a tiny model on this CPU, to check the script before spending GPU time
ON_CPU = ["trainer.accelerator=cpu", "model=llama_tiny", "trainer.precision=32-true", "data.max_length=256",
          "data.max_target_length=64", "data.num_workers=0"]


def run_gpu(recipe: str, strategy: str, data: Path, work: Path, steps: int, extra: list[str]) -> dict:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work}/mlflow.db"
    args = [sys.executable, "-m", "aifactory_train.commands.cli", "train", f"data.root={data}", f"strategy={strategy}",
            *GPU_STRATEGIES[strategy], f"experiment={recipe}_gpu", *GPU_RUN, f"trainer.max_steps={steps}", f"tracking.uri={uri}", *extra,
            f"hydra.run.dir={work / strategy}"]
    started = time.time()
    result = subprocess.run(args, capture_output=True, text=True, cwd=work)
    if result.returncode != 0:
        return {"strategy": strategy, "error": result.stderr[-1500:]}
    summary = json.loads((work / strategy / "summary.json").read_text())
    history = MlflowClient(tracking_uri=uri).get_metric_history(summary["mlflow_run_id"], "throughput/device/tokens_per_sec")
    steady = max(history, key=lambda m: m.step).value if history else None
    return {"strategy": strategy, "tokens_per_s_steady": steady, "tokens_per_s_whole_run": summary["train_tokens_per_s"],
            "peak_device_memory_gib": summary["peak_device_memory_gib"], "wall_s": time.time() - started,
            "global_step": summary["global_step"]}


def run(recipe: str, strategy: str, data: Path, work: Path, steps: int) -> dict:
    args = [sys.executable, "-m", "aifactory_train.commands.cli", "launch", "--local", "2", f"recipe={recipe}",
            f"data.root={data}", f"strategy={strategy}", *STRATEGIES[strategy], *MODEL, "trainer.accelerator=cpu",
            f"trainer.max_steps={steps}", "trainer.limit_val_batches=0", "run_test=false", "tracking=none",
            "data.batch_size=4", "data.max_length=256", "data.packing=true", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={work / strategy}"]
    # a fresh wrapper process per strategy: its RUSAGE_CHILDREN peak covers exactly this run's processes
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    started = time.time()
    result = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, cwd=work)
    if result.returncode != 0:
        raise SystemExit(f"{strategy} failed:\n{result.stderr[-3000:]}")
    peak_kib = int(next(line for line in result.stdout.splitlines() if line.startswith("MAXRSS_KIB")).split()[1])
    summary = json.loads((work / strategy / "summary.json").read_text())
    step_s = (4 * 2) / summary["train_samples_per_s"]
    return {"strategy": strategy, "step_time_s": step_s, "tokens_per_s": summary["train_tokens_per_s"],
            "peak_rss_gib_max_process": peak_kib / 2**20,
            "wall_s": time.time() - started, "global_step": summary["global_step"]}


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_gpu_scripts.py parses the GPU scripts' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a causal-LM recipe (its model overrides, `<recipe>_gpu` experiment and a "
                        "synth variant --variant of already de-identified notes)")
    parser.add_argument("--variant", default="tagged", help="the recipe's synth variant to train on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpu", action="store_true", help="one GPU: single, ddp, ZeRO-2, ZeRO-3 on the 374M model")
    parser.add_argument("--notes", type=int, default=None, help="synthetic notes to train on")
    parser.add_argument("--on-cpu", action="store_true", help="with --gpu: the same plan, tiny model, on CPU (a check)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--keep-runs", action="store_true", help="keep the temporary run folders (checkpoints, logs)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="aift-strategies-"))
    try:
        report, title, about, table = measure(args, work)
    finally:  # each strategy's run folder holds full checkpoints (GBs at 374M)
        if args.keep_runs:
            print(f"run folders kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(table), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text("\n".join([f"# {title} — {report['date']}", "", f"Command: `{report['command']}`", "",
                                                  about, "", *table]) + "\n")


def measure(args, work: Path):
    """(report, title, about, table rows) of the strategies run in ``work``."""
    from aifactory_train.locations import load_object, recipe_info, use_recipes

    use_recipes()
    synthesize = load_object(recipe_info(args.recipe).synth)
    data = synthesize(work / "notes", size=args.notes or (4000 if args.gpu else 200), seed=0, variant=args.variant)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    date = time.strftime("%Y-%m-%d")
    if args.gpu:
        plan = {s: ON_CPU + (["strategy.cpu_smoke=true"] if s.startswith("deepspeed") else []) if args.on_cpu else []
                for s in GPU_STRATEGIES}
        rows = [run_gpu(args.recipe, strategy, data, work, args.steps, extra) for strategy, extra in plan.items()]
        report = {"benchmark": "strategies_gpu", "model": "llama_374m", "processes": 1,
                  "batch": "8 x 2048 tokens, bf16-mixed, eager"}
        title = "Strategies on one GPU" if not args.on_cpu else "Strategies: the one-GPU plan checked on CPU"
        about = (f"{args.recipe}, Llama 374M, 8 x 2048 tokens, bf16-mixed, eager, {args.steps} steps, one process."
                 if not args.on_cpu else f"A check of the plan on CPU: llama_tiny, 8 x 256 tokens, fp32, {args.steps} steps.")
        table = ["| strategy | tokens/s (steady) | tokens/s (whole run) | peak GPU memory (GiB) |", "|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                table.append(f"| {r['strategy']} | failed | | |")
                continue
            steady, peak = r["tokens_per_s_steady"], r["peak_device_memory_gib"]
            table.append(f"| {r['strategy']} | {f'{steady:.0f}' if steady else '—'} | "
                         f"{r['tokens_per_s_whole_run']:.0f} | {f'{peak:.2f}' if peak else '— (CPU)'} |")
    else:
        rows = [run(args.recipe, strategy, data, work, args.steps) for strategy in STRATEGIES]
        report = {"benchmark": "strategies_cpu", "model": "llama 25M (hidden 512, 8 layers)", "processes": 2,
                  "batch_per_process": "4 x 256 tokens"}
        title = "Strategies on 2 CPU processes"
        about = (f"{args.recipe}, Llama 25M (hidden 512, 8 layers), full fine-tuning, 4 x 256 tokens per process, fp32, "
                 f"{args.steps} steps; FSDP and DeepSpeed through the CPU smoke path (gloo).")
        table = ["| strategy | step time (s) | tokens/s (both processes) | peak RSS of the largest process (GiB) |",
                 "|---|---|---|---|"]
        table += [f"| {r['strategy']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['peak_rss_gib_max_process']:.2f} |" for r in rows]
        table += ["", "Peak RSS: getrusage(RUSAGE_CHILDREN).ru_maxrss in a fresh wrapper process per strategy, i.e. the",
                  "largest resident set of any process of that run, including each process's Python/torch baseline."]
    report.update(command=command, date=date, rows=rows)
    return report, title, about, table

if __name__ == "__main__":
    main()
