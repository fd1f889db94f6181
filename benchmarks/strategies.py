"""Per-strategy step time and peak memory per process: one model, 2 processes on this machine (CPU: gloo, with the
CPU smoke path for FSDP and DeepSpeed). On CPU this says what each strategy costs in memory and time for the same
work, not how it scales (2 processes on 2 cores share one memory bus).

    python benchmarks/strategies.py --out benchmarks/results/strategies_cpu-2proc_<date>.json --markdown ....md

Each strategy runs `aift launch --local 2` of clinical_notes with a 25M-parameter Llama (hidden 512, 8 layers),
full fine-tuning, batch 4 x 256 tokens per process, fp32, for --steps steps. Peak memory is the largest resident
set of any one process (getrusage of the finished children); step time comes from the run's summary.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
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


def run(strategy: str, data: Path, work: Path, steps: int) -> dict:
    args = [sys.executable, "-m", "aifactory_train.cli", "launch", "--local", "2", "recipe=clinical_notes",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    from aifactory_train.recipes.clinical_notes.synth import synthesize

    work = Path(tempfile.mkdtemp(prefix="aift-strategies-"))
    data = synthesize(work / "notes", size=200, seed=0, variant="tagged")
    rows = []
    for strategy in STRATEGIES:
        row = run(strategy, data, work, args.steps)
        rows.append(row)
        print(f"{strategy}: {row['step_time_s']:.3f} s/step, {row['tokens_per_s']:.0f} tokens/s, peak RSS "
              f"{row['peak_rss_gib_max_process']:.2f} GiB (largest process)", flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    report = {"benchmark": "strategies_cpu", "command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "model": "llama 25M (hidden 512, 8 layers)", "processes": 2, "batch_per_process": "4 x 256 tokens"}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        lines = [f"# Strategies on 2 CPU processes — {report['date']}", "", f"Command: `{command}`", "",
                 "clinical_notes, Llama 25M (hidden 512, 8 layers), full fine-tuning, 4 x 256 tokens per process, fp32, "
                 f"{args.steps} steps; FSDP and DeepSpeed through the CPU smoke path (gloo).", "",
                 "| strategy | step time (s) | tokens/s (both processes) | peak RSS of the largest process (GiB) |",
                 "|---|---|---|---|"]
        lines += [f"| {r['strategy']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | "
                  f"{r['peak_rss_gib_max_process']:.2f} |" for r in rows]
        lines += ["", "Peak RSS: getrusage(RUSAGE_CHILDREN).ru_maxrss in a fresh wrapper process per strategy, i.e. the",
                  "largest resident set of any process of that run, including each process's Python/torch baseline."]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
