"""Print a run's summary.json for people: `python -m aifactory_train.commands.show_summary PATH`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    summary = json.loads(Path(path).read_text())
    metrics = summary["metrics"]
    print(f"\n== {summary['recipe']} / {summary['model']}: {summary['status']} in {summary['wall_time_s']:.0f} s ==")
    for key in sorted(k for k in metrics if k.split("/")[0] in ("train", "val", "test") and "recall_" not in k):
        print(f"  {key:<16} {metrics[key]:.4f}")
    if summary.get("train_samples_per_s"):
        print(f"  training speed   {summary['train_samples_per_s']:.1f} samples/s")
    stop = summary.get("early_stopping") or {}
    if stop.get("stopped"):
        print(f"  stopped early    in epoch {stop['epoch']}: {stop['message']}")
    energy = summary.get("energy") or {}
    if energy.get("measured"):
        print(f"  energy           {energy['kwh']:.6g} kWh ({energy['joules']:.0f} J; {energy['meter']}, "
              f"{energy['devices']} counter(s), {energy['mean_watts']} W each on average)")
        parts = energy.get("by_meter") or {}
        if len(parts) > 1:
            for name, part in parts.items():
                print(f"    {name:<14} {part['kwh']:.6g} kWh ({part['devices']} counter(s))")
        if energy.get("not_counted"):
            print(f"    not counted    {energy['not_counted']}")
    elif energy:
        print(f"  energy           not measured: {energy['reason']}")
    print(f"  best checkpoint  {summary['best_checkpoint']}")
    if summary.get("mlflow_run_id"):
        print(f"  MLflow run       {summary['mlflow_run_id']} in {summary['tracking_uri']}")
    else:
        print("  MLflow run       none (tracking=none)")
    print(f"  summary file     {Path(path).resolve()}")


if __name__ == "__main__":
    main(sys.argv[1])
