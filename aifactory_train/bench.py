"""`aift bench`: measure the hardware and the recipes, and say pass or fail against a profile of thresholds.

Suites: ``micro`` (GEMM, memory and host-device bandwidth, all-reduce bus bandwidth, data loading),
``recipes`` (each recipe's training step vs a hand-written PyTorch loop in the same run, with energy per
sample and MFU on GPUs) and ``acceptance`` (both, checked against ``benchmarks/profiles/<name>.yaml``; the
exit status is 1 when a check fails). Every run writes ``<suite>_<hardware>_<date>.json`` (stable keys,
``schema_version``), a Markdown report and plots into ``--out``, and logs all of it to MLflow as one run.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aifactory_train.errors import ConfigError

SUITES = ("micro", "recipes", "acceptance")
SCHEMA_VERSION = 1
# summary metrics a profile may set thresholds on: name -> (how it is made from the rows, needs a GPU)
METRICS = {
    "gemm_fp32_tflops": ("max gemm_tflops dtype=float32", False),
    "gemm_bf16_tflops": ("max gemm_tflops dtype=bfloat16", True),
    "memory_gbps": ("memory_gbps", False),
    "h2d_gbps": ("h2d_gbps", True),
    "d2h_gbps": ("d2h_gbps", True),
    "allreduce_busbw_gbps": ("max allreduce_busbw_gbps", False),
    "dataloader_images_per_s": ("max dataloader_images_per_s", False),
    "plastic_sorting_ratio": ("recipe/plain samples/s", False),
    "plastic_sorting_samples_per_s": ("recipe samples/s", False),
    "plastic_sorting_mfu": ("recipe model FLOP/s / peak", True),
    "plastic_sorting_joules_per_sample": ("GPU energy / samples", True),
    "crop_detection_ratio": ("recipe/plain samples/s", False),
    "crop_detection_samples_per_s": ("recipe samples/s", False),
    "crop_detection_mfu": ("recipe model FLOP/s / peak", True),
    "crop_detection_joules_per_sample": ("GPU energy / samples", True),
    "clinical_notes_ratio": ("recipe/plain tokens/s", False),
    "clinical_notes_samples_per_s": ("recipe rows/s", False),
    "clinical_notes_tokens_per_s": ("recipe tokens/s", False),
    "clinical_notes_mfu": ("recipe model FLOP/s / peak", True),
    "clinical_notes_joules_per_sample": ("GPU energy / rows", True),
    "clinical_notes_joules_per_1k_tokens": ("GPU energy / 1k tokens", True),
    "clinical_notes_data_wait_fraction": ("share of step time waiting for data (real files)", False),
    "plastic_sorting_data_wait_fraction": ("share of step time waiting for data (real files)", False),
    "crop_detection_data_wait_fraction": ("share of step time waiting for data (real files)", False),
}


def profiles_dir() -> Path:
    import aifactory_train.benchmarks as benchmarks

    return Path(benchmarks.__file__).parent / "profiles"


def load_profile(name_or_path: str) -> dict[str, Any]:
    """A profile by name (benchmarks/profiles/NAME.yaml) or path, after checking every threshold."""
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = profiles_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in profiles_dir().glob("*.yaml"))
        raise ConfigError(f"--profile '{name_or_path}': no such profile; valid profiles: {', '.join(valid)} (or a path)")
    profile = yaml.safe_load(path.read_text()) or {}
    thresholds = profile.get("thresholds")
    if not isinstance(thresholds, dict) or not thresholds:
        raise ConfigError(f"profile '{path}': 'thresholds' is missing or empty; it maps metrics to {{min: X}} or {{max: X}}")
    for metric, rule in thresholds.items():
        if metric not in METRICS:
            raise ConfigError(f"profile '{path}': thresholds.{metric} is not a known metric; valid: {', '.join(METRICS)}")
        if not isinstance(rule, dict) or not ({"min", "max"} & set(rule)) or not all(
                isinstance(rule.get(k, 0), (int, float)) for k in ("min", "max")):
            raise ConfigError(f"profile '{path}': thresholds.{metric} must be {{min: number}} and/or {{max: number}}, got {rule!r}")
    profile["path"] = str(path)
    profile["name"] = path.stem
    profile.setdefault("required", [])
    unknown = [m for m in profile["required"] if m not in thresholds]
    if unknown:
        raise ConfigError(f"profile '{path}': required lists {unknown} without a threshold; add them to thresholds")
    return profile


def hardware_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(0)
    return f"cpu-{torch.get_num_threads()}thread"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def micro_suite(device, quick: bool, log) -> tuple[list[dict], list[dict]]:
    import torch

    from aifactory_train.benchmarks import micro

    rows, skipped = [], []
    gpu = device.type == "cuda"
    sizes = [1024, 2048, 4096, 8192] if gpu else ([256, 512, 1024] if quick else [512, 1024, 2048])
    dtypes = [torch.float32, torch.bfloat16] if gpu else [torch.float32]
    log("micro: GEMM")
    rows += micro.gemm(device, sizes, dtypes)
    log("micro: memory bandwidth")
    rows += micro.memory_bandwidth(device, 1024 if gpu else (64 if quick else 256))
    if gpu:
        log("micro: host-device bandwidth")
        rows += micro.host_device_bandwidth(256 if quick else 1024)
    else:
        skipped.append({"metric": "h2d_gbps", "reason": "no GPU on this machine"})
        skipped.append({"metric": "d2h_gbps", "reason": "no GPU on this machine"})
    world = torch.cuda.device_count() if gpu else 2
    if world >= 2:
        log(f"micro: all-reduce on {world} processes")
        top = 2**24 if quick else 2**30
        message_sizes = [2**10 * 4**i for i in range(11) if 2**10 * 4**i <= top]
        rows += micro.allreduce(world, "nccl" if gpu else "gloo", message_sizes)
    else:
        skipped.append({"metric": "allreduce_busbw_gbps", "reason": "one GPU: all-reduce needs at least two"})
    log("micro: data loading from real PNG files")
    cpus = len(__import__("os").sched_getaffinity(0))
    workers = [w for w in ([0, 1, 2] if quick else [0, 1, 2, 4, 8, 12]) if w <= cpus]
    rows += micro.dataloader(workers, image_size=224 if gpu else 64, batch_size=64, files=140 if quick else 560)
    return rows, skipped


def recipes_suite(device, quick: bool, log) -> tuple[list[dict], list[dict]]:
    import torch

    from aifactory_train.benchmarks.energy import EnergyMeter
    from aifactory_train.benchmarks.recipe_step import RECIPES, data_wait_split, plain_loop, recipe_loop

    gpu = device.type == "cuda"
    precision = "bf16-mixed" if gpu else "32-true"
    settings = {
        "plastic_sorting": (dict(model="resnet50", batch_size=256, image_size=224, steps=40, warmup=10) if gpu else
                            dict(model="resnet18", batch_size=16 if quick else 32, image_size=64,
                                 steps=5 if quick else 20, warmup=2 if quick else 5)),
        "crop_detection": (dict(model="fasterrcnn_resnet50_fpn_v2", batch_size=16, image_size=640, steps=20, warmup=3)
                           if gpu else dict(model="fasterrcnn_mobilenet_v3_large_320_fpn", batch_size=2 if quick else 4,
                                            image_size=256, steps=2 if quick else 8, warmup=1 if quick else 2)),
        "clinical_notes": (dict(model="llama_374m", batch_size=8, seq_len=2048, image_size=None, steps=20, warmup=5)
                           if gpu else dict(model="llama_tiny", batch_size=8 if quick else 16, seq_len=256 if quick else 512,
                                            image_size=None, steps=10, warmup=3)),
    }
    # 3 pairs on GPUs too: a detector's step varies with its sampled proposals, and the one H200 pair of
    # crop_detection (benchmarks/results/crop_detection_step_h200_2026-11-28.md, ratio 0.898) could not tell
    # noise from cost. Each run is seconds long against a minute of model building.
    repeats = 3
    rows, skipped = [], []
    for name, spec_class in RECIPES.items():
        args = SimpleNamespace(**settings[name], repeats=1, _compile=False)
        shape = f"{args.seq_len} tokens" if getattr(args, "seq_len", None) else f"{args.image_size} px"
        log(f"recipes: {name} ({args.model}, batch {args.batch_size}, {shape}, {precision})")
        spec = spec_class(args, device)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        # Alternate plain and recipe runs and keep each side's fastest (timeit's rule: the slower runs measure
        # what else the machine was doing). A single pair of 5-step runs on a shared 2-core machine once gave
        # ratio 0.73 for a recipe whose long-run ratio is 1.0.
        plain_runs, recipe_runs = [], []
        for _ in range(repeats):
            plain_meter, recipe_meter = EnergyMeter(), EnergyMeter()
            plain_runs.append((plain_loop(spec, args, device, precision, meter=plain_meter), plain_meter))
            recipe_runs.append((recipe_loop(spec, args, device, precision, meter=recipe_meter), recipe_meter))
        plain, plain_meter = max(plain_runs, key=lambda run: run[0])
        recipe, recipe_meter = max(recipe_runs, key=lambda run: run[0])
        params = {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
                  "precision": precision, "steps": args.steps}
        runs = {"plain_runs": [round(r, 3) for r, _ in plain_runs], "recipe_runs": [round(r, 3) for r, _ in recipe_runs]}
        tokens = getattr(spec, "tokens_per_sample", None)
        if tokens:
            params["seq_len"] = tokens
        rows.append({"metric": f"{name}_samples_per_s", "value": recipe, "unit": "samples/s", "params": params})
        rows.append({"metric": f"{name}_plain_samples_per_s", "value": plain, "unit": "samples/s", "params": params})
        rows.append({"metric": f"{name}_ratio", "value": recipe / plain, "unit": "ratio", "params": {**params, **runs}})
        if tokens:
            rows.append({"metric": f"{name}_tokens_per_s", "value": recipe * tokens, "unit": "tokens/s", "params": params})
        if gpu:
            rows.append({"metric": f"{name}_peak_memory_gib", "value": torch.cuda.max_memory_allocated() / 2**30,
                         "unit": "GiB", "params": params})
        if recipe_meter.available:
            samples = args.steps * args.batch_size
            rows.append({"metric": f"{name}_joules_per_sample", "value": recipe_meter.joules / samples, "unit": "J/sample",
                         "params": {**params, "average_watts": recipe_meter.watts}})
            if tokens:
                rows.append({"metric": f"{name}_joules_per_1k_tokens", "value": 1000 * recipe_meter.joules / (samples * tokens),
                             "unit": "J/1k tokens", "params": {**params, "average_watts": recipe_meter.watts}})
        else:
            skipped.append({"metric": f"{name}_joules_per_sample", "reason": recipe_meter.reason})
        flops = recipe_meter.flops_per_sample
        if gpu and flops:
            from lightning.fabric.utilities.throughput import get_available_flops

            peak = get_available_flops(device, torch.bfloat16)
            if peak:
                mfu = flops * recipe / peak
                rows.append({"metric": f"{name}_mfu", "value": mfu, "unit": "fraction", "params": {**params, "peak_flops": peak}})
        elif f"{name}_mfu" in METRICS:
            skipped.append({"metric": f"{name}_mfu", "reason": "MFU needs a GPU with a known peak (and measured FLOPs)"})
        workers = min(8, len(__import__("os").sched_getaffinity(0))) if gpu else 2
        log(f"recipes: {name} step time split on real files ({workers} workers)")
        split = data_wait_split(spec, args, device, precision, workers)
        rows.append({"metric": f"{name}_data_wait_fraction", "value": split["data_wait_fraction"], "unit": "fraction",
                     "params": {**params, "workers": workers, "data_wait_s": round(split["data_wait_s"], 4),
                                "compute_s": round(split["compute_s"], 4)}})
    return rows, skipped


def summarize(rows: list[dict]) -> dict[str, float]:
    summary: dict[str, float] = {}
    for row in rows:
        metric = row["metric"]
        if metric == "gemm_tflops":
            metric = f"gemm_{'fp32' if row['params']['dtype'] == 'float32' else row['params']['dtype'].replace('bfloat16', 'bf16')}_tflops"
        summary[metric] = max(summary.get(metric, float("-inf")), row["value"])
    return summary


def check(profile: dict, summary: dict[str, float], skipped: list[dict]) -> list[dict]:
    """pass / fail / skipped per threshold. A metric not measured here (a GPU metric on a CPU machine, a recipe
    metric in the micro suite) is skipped with the reason, and fails only if the profile lists it as required."""
    results = []
    reasons = {s["metric"]: s["reason"] for s in skipped}
    for metric, rule in profile["thresholds"].items():
        value = summary.get(metric)
        entry = {"metric": metric, "min": rule.get("min"), "max": rule.get("max"), "value": value}
        if value is None:
            entry["reason"] = reasons.get(metric, "not measured by this suite")
            entry["status"] = "fail" if metric in profile["required"] else "skipped"
        elif ("min" in rule and value < rule["min"]) or ("max" in rule and value > rule["max"]):
            entry.update(status="fail", reason=f"{value:.4g} is outside {rule}")
        else:
            entry["status"] = "pass"
        results.append(entry)
    return results


def write_plots(rows: list[dict], out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    gemm = [r for r in rows if r["metric"] == "gemm_tflops"]
    if gemm:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for dtype in sorted({r["params"]["dtype"] for r in gemm}):
            points = sorted((r["params"]["size"], r["value"]) for r in gemm if r["params"]["dtype"] == dtype)
            ax.plot(*zip(*points), marker="o", label=dtype)
        ax.set(xscale="log", xlabel="matrix size n (n x n)", ylabel="TFLOP/s", title="GEMM")
        ax.legend()
        files.append(_save(fig, out / f"{stem}_gemm.png"))
    reduce_rows = [r for r in rows if r["metric"] == "allreduce_busbw_gbps"]
    if reduce_rows:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        points = sorted((r["params"]["bytes"], r["value"]) for r in reduce_rows)
        ax.plot(*zip(*points), marker="o")
        ax.set(xscale="log", xlabel="message size (bytes)", ylabel="bus bandwidth (GB/s)",
               title=f"all-reduce, {reduce_rows[0]['params']['world']} x {reduce_rows[0]['params']['backend']}")
        files.append(_save(fig, out / f"{stem}_allreduce.png"))
    recipes = sorted({r["metric"][: -len("_plain_samples_per_s")] for r in rows if r["metric"].endswith("_plain_samples_per_s")})
    if recipes:
        values = {r["metric"]: r["value"] for r in rows}
        fig, ax = plt.subplots(figsize=(5, 3.5))
        x = range(len(recipes))
        ax.bar([i - 0.2 for i in x], [values[f"{n}_plain_samples_per_s"] for n in recipes], 0.4, label="plain PyTorch loop")
        ax.bar([i + 0.2 for i in x], [values[f"{n}_samples_per_s"] for n in recipes], 0.4, label="recipe (Lightning)")
        ax.set_xticks(list(x), recipes)
        ax.set(ylabel="samples/s", yscale="log", title="training throughput")
        ax.legend()
        files.append(_save(fig, out / f"{stem}_recipes.png"))
    return files


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(report: dict) -> str:
    lines = [f"# aift bench {report['suite']} — {report['hardware']}, {report['date']}", "",
             f"Command: `{report['command']}`", "", f"torch {report['packages'].get('torch')}; quick: {report['quick']}", "",
             "| metric | value | unit | parameters |", "|---|---|---|---|"]
    for row in report["rows"]:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        lines.append(f"| {row['metric']} | {row['value']:.4g} | {row['unit']} | {params} |")
    if report["skipped"]:
        lines += ["", "Not measured:", ""] + [f"- {s['metric']}: {s['reason']}" for s in report["skipped"]]
    if report["checks"] is not None:
        lines += ["", f"## Profile {report['profile']}: {'PASS' if report['passed'] else 'FAIL'}", "",
                  "| metric | value | min | max | status |", "|---|---|---|---|---|"]
        for c in report["checks"]:
            value = "—" if c["value"] is None else f"{c['value']:.4g}"
            lines.append(f"| {c['metric']} | {value} | {c['min'] if c['min'] is not None else ''} | "
                         f"{c['max'] if c['max'] is not None else ''} | {c['status']}{': ' + c['reason'] if c.get('reason') else ''} |")
    return "\n".join(lines) + "\n"


def run_bench(suite: str, profile_name: str | None, quick: bool, out: str | None, tracking_uri: str | None,
              command: str) -> int:
    """Run a suite; write JSON, Markdown and plots; log to MLflow; return the exit status (1: a check failed)."""
    if suite not in SUITES:
        raise ConfigError(f"suite '{suite}' is not valid; valid suites: {', '.join(SUITES)}")
    if suite == "acceptance" and not profile_name:
        raise ConfigError("aift bench acceptance needs --profile NAME; valid profiles: "
                          + ", ".join(sorted(p.stem for p in profiles_dir().glob("*.yaml"))))
    profile = load_profile(profile_name) if profile_name else None  # before any measurement
    if tracking_uri:
        from aifactory_train.tracking import check_tracking_uri

        check_tracking_uri(tracking_uri)
    import torch

    from aifactory_train.tracking import hardware, package_versions

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {message}", flush=True)

    rows, skipped = [], []
    if suite in ("micro", "acceptance"):
        r, s = micro_suite(device, quick, log)
        rows, skipped = rows + r, skipped + s
    if suite in ("recipes", "acceptance"):
        r, s = recipes_suite(device, quick, log)
        rows, skipped = rows + r, skipped + s
    summary = summarize(rows)
    checks = check(profile, summary, skipped) if profile else None
    passed = None if checks is None else all(c["status"] != "fail" for c in checks)
    date = time.strftime("%Y-%m-%d")
    hw = hardware_name(device)
    stem = f"{suite}_{_slug(hw)}_{date}"
    out_dir = Path(out or f"outputs/bench/{stem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "schema_version": SCHEMA_VERSION, "suite": suite, "profile": profile["name"] if profile else None,
        "quick": quick, "date": date, "command": command, "hardware": hw, "machine": hardware(),
        "packages": package_versions(), "wall_time_s": round(time.time() - started, 1),
        "rows": rows, "summary": summary, "skipped": skipped, "checks": checks, "passed": passed,
    }
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(report))
    plots = write_plots(rows, out_dir, stem)
    if tracking_uri:
        _log_to_mlflow(tracking_uri, report, [json_path, md_path, *plots])
    print(md_path.read_text())
    print(f"report: {md_path}")
    if passed is False:
        failed = [c["metric"] for c in checks if c["status"] == "fail"]
        print(f"FAIL against profile {profile['name']}: {', '.join(failed)}")
        return 1
    return 0


def _log_to_mlflow(uri: str, report: dict, files: list[Path]) -> None:
    from mlflow.tracking import MlflowClient

    from aifactory_train.records import has_credentials

    if has_credentials(uri):  # MLflow prints the run's link, built from the URI with its password
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("aift-bench")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("aift-bench")
    run = client.create_run(experiment_id, run_name=f"{report['suite']}-{report['hardware']}",
                            tags={"aift.bench.suite": report["suite"], "aift.bench.profile": str(report["profile"]),
                                  "aift.bench.passed": str(report["passed"]), "aift.hardware": report["hardware"]})
    run_id = run.info.run_id
    for key in ("suite", "profile", "quick", "hardware"):
        client.log_param(run_id, key, str(report[key]))
    for metric, value in report["summary"].items():
        client.log_metric(run_id, metric, float(value))
    for file in files:
        client.log_artifact(run_id, str(file))
    client.set_terminated(run_id, "FINISHED" if report["passed"] is not False else "FAILED")
