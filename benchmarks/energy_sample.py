"""What the energy meter of a training run costs: one sample (read the counter, rewrite the run's energy file
atomically), timed. A run takes one sample every ``energy.sample_every_s`` seconds (30) on a background thread and
adds nothing to the training step.

    python benchmarks/energy_sample.py --markdown benchmarks/results/energy-sample_cpu-2core_<date>.md

On a machine without a readable counter the powercap files are written by this script (as the tests do) and the
sample reads those; with ``--powercap-dir /sys/class/powercap`` (readable) or on a GPU (``--meter nvml``) it reads
the real counter.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path


def fake_powercap(root: Path, packages: int) -> Path:
    for i in range(packages):
        zone = root / f"intel-rapl:{i}"
        zone.mkdir(parents=True)
        (zone / "name").write_text(f"package-{i}\n")
        (zone / "max_energy_range_uj").write_text("262143328850\n")
        (zone / "energy_uj").write_text("123456789\n")
    return root


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_gpu_scripts.py parses the GPU scripts' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meter", choices=["rapl", "nvml"], default="rapl")
    parser.add_argument("--powercap-dir", default=None, help="a real powercap folder (default: files written here)")
    parser.add_argument("--packages", type=int, default=2, help="CPU packages of the written powercap files")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--out", default=None, help="JSON results")
    parser.add_argument("--markdown", default=None, help="Markdown results")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    from aifactory_train.records.energy import EnergyLedger, NvmlCounter, RaplCounter, cuda_uuid

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if args.meter == "nvml":
            counter, source = NvmlCounter(cuda_uuid(0)), "NVML (GPU 0)"
        elif args.powercap_dir:
            counter, source = RaplCounter(args.powercap_dir), f"powercap {args.powercap_dir}"
        else:
            counter = RaplCounter(fake_powercap(work / "powercap", args.packages))
            source = f"powercap files written by this script ({args.packages} packages)"
        ledger = EnergyLedger(counter, work / "run" / "energy", rank=0, sample_every_s=3600)
        ledger.folder.mkdir(parents=True)
        ledger._start_joules, ledger._start_time = counter.read(), time.monotonic()
        times = []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            ledger.sample()
            times.append(time.perf_counter() - t0)
        read_times = []
        for _ in range(args.samples):
            t0 = time.perf_counter()
            counter.read()
            read_times.append(time.perf_counter() - t0)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "host": platform.node(), "python": platform.python_version(), "source": source,
        "samples": args.samples,
        "sample_median_us": round(statistics.median(times) * 1e6, 1),
        "sample_p99_us": round(sorted(times)[int(0.99 * len(times))] * 1e6, 1),
        "counter_read_median_us": round(statistics.median(read_times) * 1e6, 1),
        "share_of_time_at_30s": statistics.median(times) / 30,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(
            f"# Energy meter: the cost of one sample\n\n`{result['command']}`\n\n"
            f"Counter: {source}. {args.samples} samples (counter read + atomic rewrite of the run's energy file).\n\n"
            f"| what | median | p99 |\n|---|---|---|\n"
            f"| one sample | {result['sample_median_us']} µs | {result['sample_p99_us']} µs |\n"
            f"| counter read alone | {result['counter_read_median_us']} µs | |\n\n"
            f"At one sample per 30 s on a background thread: {result['share_of_time_at_30s']:.1e} of the run's time, "
            f"and nothing in the training step.\n")


if __name__ == "__main__":
    main()
