"""How close is `aift plan`'s memory estimate to what training really holds?

Part 1, measured here (CPU, one process per case): the recipe's real model (the same builders as training) does
3 training steps (forward, loss, backward, AdamW step) at the case's batch and size, fp32. Measured:

* model states: the bytes of the parameters, their gradients and AdamW's states after a step (exact);
* activations: the bytes of every tensor autograd saved for backward in a step (``saved_tensors_hooks`` on the real
  tensors, each storage counted once, parameters left out): what the plan estimates on the meta device;
* peak RSS: the process's largest resident set (``ru_maxrss``) minus its resident set before the model was built;
  this also holds the allocator's cache, the backward's temporaries and oneDNN's buffers, which the plan counts only
  as its "backward workspace".

Part 2, the per-process peak RSS that benchmarks/results/strategies_cpu-2proc_2026-11-28.json measured for each
strategy (2 processes, a 25M Llama, 4 x 256 tokens, fp32), against the plan of the same job plus the resident set
of a process that has imported the training stack (measured here), since those peaks include it.

H200: no results file records a GPU's peak memory yet (the H200 files hold speed only; `aift bench acceptance`
on a GPU writes ``<recipe>_peak_memory_gib`` rows). Run ``--gpu`` there to add part 3: the same cases on the GPU
with ``torch.cuda.max_memory_allocated``.

    python benchmarks/plan_memory.py --out benchmarks/results/plan_memory_cpu_<date>.json --markdown ....md
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

GIB = 2**30
# the measured cases (name -> overrides): data about the recipes, kept beside the benchmark profiles
CASES = yaml.safe_load((Path(__file__).parent / "profiles" / "plan_memory_cases.yaml").read_text())
COMMON = ["trainer.precision=32-true", "cluster=local", "strategy=single", "trainer.devices=1"]


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure(case: str, device: str) -> dict:
    """One case, in this process: the estimate, then the real steps."""
    import torch

    from aifactory_train.launch.plan import compose_resolved, memory_per_gpu, model_facts

    torch.manual_seed(0)
    resolved = compose_resolved([*CASES[case], *COMMON])
    batch = resolved["data"]["batch_size"]
    facts = model_facts(resolved, batch, "32-true")
    estimate = memory_per_gpu(facts, {"name": "single"}, "32-true", resolved["optim"], 1, 1, batch)
    dev = torch.device(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_gib()
    from aifactory_train.launch.plan import recipe_plan_example

    # the same training step the plan counts on the meta device (the recipe's plan.py), here on real memory
    with torch.device(dev):
        example = recipe_plan_example(resolved["recipe"]["name"])(resolved["model"], resolved["data"], batch,
                                                                   torch.float32)
    net, loss_fn = example.net, example.step
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    param_ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    for step in range(3):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = loss_fn()
        activations = sum(saved.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    states = sum(p.numel() * p.element_size() for p in net.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in net.parameters() if p.grad is not None)
    opt = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
              if torch.is_tensor(v) and v.dim() > 0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    est = estimate["bytes"]
    est_states = est["parameters"] + est["gradients"] + est["optimizer_states"]
    row = {"case": case, "overrides": CASES[case], "params": facts.params,
           "estimate": {"model_states_gib": est_states / GIB, "activations_gib": est["activations"] / GIB,
                        "workspace_gib": est["backward_workspace"] / GIB, "total_gib": estimate["total_bytes"] / GIB},
           "measured": {"model_states_gib": (states + grads + opt) / GIB, "activations_gib": activations / GIB,
                        "peak_rss_increase_gib": peak_rss - base_rss}}
    if device == "cuda":
        row["measured"]["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    row["error"] = {
        "model_states": est_states / (states + grads + opt) - 1,
        "activations": est["activations"] / activations - 1 if activations else None,
        "total_vs_peak_rss": estimate["total_bytes"] / GIB / (peak_rss - base_rss) - 1,
    }
    if device == "cuda":
        row["error"]["total_vs_max_allocated"] = estimate["total_bytes"] / GIB / row["measured"]["max_memory_allocated_gib"] - 1
    return row


def stack_rss() -> float:
    """Resident set (GiB) of a process that imported the training stack, as every rank of a run has."""
    code = ("import aifactory_train.commands.train, lightning, transformers, torch, resource;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def strategies_part(baseline: float) -> list[dict]:
    from aifactory_train.launch.plan import compose_resolved, memory_per_gpu, model_facts

    results = Path(__file__).parent / "results" / "strategies_cpu-2proc_2026-11-28.json"
    measured = json.loads(results.read_text())
    rows = []
    model = CASES["llama 25M 4x256"]
    resolved = compose_resolved([*model, *COMMON])
    facts = model_facts(resolved, 4, "32-true")
    for row in measured["rows"]:
        name = row["strategy"]
        import yaml

        from aifactory_train.locations import config_dir

        strategy = yaml.safe_load((config_dir() / "strategy" / f"{name}.yaml").read_text())
        if name == "deepspeed_zero3":
            strategy["stage3_param_persistence_threshold"] = 0
        est = memory_per_gpu(facts, strategy, "32-true", resolved["optim"], 2, 2, 4)
        total = est["total_bytes"] / GIB + baseline
        rows.append({"strategy": name, "estimate_gib": est["total_bytes"] / GIB, "estimate_plus_stack_gib": total,
                     "measured_peak_rss_gib": row["peak_rss_gib_max_process"],
                     "error": total / row["peak_rss_gib_max_process"] - 1})
    return rows


def markdown(report: dict) -> str:
    lines = [f"# aift plan: memory estimate vs measured, {report['date']}", "", f"Command: `{report['command']}`", "",
             f"Device: {report['device']}. fp32, AdamW, one process; 3 real training steps per case.", "",
             "| case | params | states est / meas (GiB) | activations est / meas (GiB) | error | total est (GiB) | "
             "peak RSS increase (GiB) | error |", "|---|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        e, m, err = r["estimate"], r["measured"], r["error"]
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.1f}M | {e['model_states_gib']:.3f} / {m['model_states_gib']:.3f} | "
                     f"{e['activations_gib']:.3f} / {m['activations_gib']:.3f} | {err['activations']:+.1%} | "
                     f"{e['total_gib']:.3f} | {m['peak_rss_increase_gib']:.3f} | {err['total_vs_peak_rss']:+.1%} |")
    lines += ["", f"Part 2: {report['strategies_source']} (2 processes, Llama 25M, 4 x 256 tokens, fp32): the plan "
              f"per process plus the resident set of a process that imported the training stack "
              f"({report['stack_rss_gib']:.2f} GiB, measured here), against the measured peak RSS.", "",
              "| strategy | plan (GiB) | plan + stack (GiB) | measured peak RSS (GiB) | error |", "|---|---|---|---|---|"]
    for r in report["strategies"]:
        lines.append(f"| {r['strategy']} | {r['estimate_gib']:.3f} | {r['estimate_plus_stack_gib']:.2f} | "
                     f"{r['measured_peak_rss_gib']:.2f} | {r['error']:+.1%} |")
    lines += ["", "## Error bound", "", report["bound"], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--gpu", action="store_true", help="run the cases on the GPU (max_memory_allocated)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    device = "cuda" if args.gpu else "cpu"
    if args.case:
        print(json.dumps(measure(args.case, device)))
        return 0
    cases = []
    for case in CASES:  # a fresh process each: its peak RSS is its own
        out = subprocess.run([sys.executable, __file__, "--case", case, *(["--gpu"] if args.gpu else [])],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{case}: {out.stderr[-2000:]}")
        cases.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{case}: {cases[-1]['error']}", file=sys.stderr)
    baseline = stack_rss()
    strategies = strategies_part(baseline)
    act = [abs(c["error"]["activations"]) for c in cases if c["error"]["activations"] is not None]
    states = [abs(c["error"]["model_states"]) for c in cases]
    total = [c["error"]["total_vs_peak_rss"] for c in cases]
    strat = [r["error"] for r in strategies]
    bound = (f"Model states: within {max(states):.1%} (exact byte counts). Activations (what autograd saves): within "
             f"{max(act):.1%} of the measured bytes. Total against the peak resident-set increase of a step: "
             f"{min(total):+.0%} to {max(total):+.0%}. Per-process peak RSS of the 2-process strategy runs: "
             f"{min(strat):+.0%} to {max(strat):+.0%}. Not yet checked on a GPU (no H200 result records peak memory).")
    report = {"benchmark": "plan_memory", "date": time.strftime("%Y-%m-%d"), "device": device,
              "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "cases": cases, "stack_rss_gib": baseline, "strategies_source": "strategies_cpu-2proc_2026-11-28.json",
              "strategies": strategies, "bound": bound}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    print(bound)
    return 0


if __name__ == "__main__":
    sys.exit(main())
