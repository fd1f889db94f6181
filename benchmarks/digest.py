"""How long the data digest of a split takes: every file read (a new data root), and again with the digest cache
(the same root, unchanged, or with a few files changed).

    python benchmarks/digest.py --files 2000 --file-kib 512 --markdown benchmarks/results/digest_cpu-2core_<date>.md

Writes ``--files`` random files of ``--file-kib`` KiB under ``--dir`` (a temporary folder by default), then times
``aifactory_train.records.lineage.digest_files`` on them:
- ``sequential, no cache``: one thread reading every byte, as every run did before the cache;
- ``threads, no cache``: what a first run on a data root does now (``AIFT_DIGEST_CACHE=0`` does the same);
- ``cache, unchanged``: the next run on the same data (only ``stat`` per file);
- ``cache, 1 % changed``: after 1 % of the files were rewritten.
The files were just written, so they are read from the page cache: the cold figures are hashing speed, a lower
bound on a first run over a network filesystem, where reads are slower still and the cache saves more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path


def _write_files(root: Path, count: int, size: int) -> list[str]:
    rel = []
    for i in range(count):
        path = root / "train" / f"class_{i % 7}" / f"img_{i:06d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        rel.append(path.relative_to(root).as_posix())
    return rel


def _timed(fn) -> tuple[float, str]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--file-kib", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp folder)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the Markdown report (and .json) here")
    args = parser.parse_args(argv)

    import aifactory_train.records.lineage as lineage

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root, cache = Path(tmp) / "data", Path(tmp) / "cache"
        paths = _write_files(root, args.files, args.file_kib * 1024)
        labels = [p.split("/")[1] for p in paths]
        total_mb = args.files * args.file_kib * 1024 / 1e6
        os.environ["AIFT_CACHE_DIR"] = str(cache)
        lineage.DigestCache.RACY_NS = 0  # the files were written a moment ago; a real data root is older
        rows = []
        default_threads = lineage.DigestCache.MAX_THREADS

        def run(name: str, cached: bool, threads: int | None = None) -> str:
            os.environ["AIFT_DIGEST_CACHE"] = "1" if cached else "0"
            lineage.DigestCache.MAX_THREADS = threads or default_threads
            seconds, digest = _timed(lambda: lineage.digest_files(root, paths, labels))
            rows.append({"case": name, "seconds": round(seconds, 3), "files_per_s": round(args.files / seconds),
                         "mb_per_s": round(total_mb / seconds, 1)})
            print(f"{name:24s} {seconds:8.2f} s  {total_mb / seconds:9.1f} MB/s", flush=True)
            return digest

        first = run("sequential, no cache", cached=False, threads=1)
        assert run("threads, no cache", cached=False) == first
        run("threads, filling cache", cached=True)
        assert run("cache, unchanged", cached=True) == first
        for rel in paths[:: 100]:
            (root / rel).write_bytes(os.urandom(args.file_kib * 1024))
        changed = run("cache, 1 % changed", cached=True)
        assert changed != first

    report = {"command": "python " + shlex.join(sys.argv), "files": args.files, "file_kib": args.file_kib,
              "total_mb": round(total_mb, 1), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "threads": min(lineage.DigestCache.MAX_THREADS, os.cpu_count() or 1), "rows": rows}
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        lines = [f"# Data digest: {args.files} files x {args.file_kib} KiB ({total_mb:.0f} MB)", "",
                 f"Command: `{report['command']}`", "",
                 f"Machine: {report['cpus']} CPUs ({report['machine']}); pool of {report['threads']} threads. Files "
                 "read from the page cache (just written).", "",
                 "| case | seconds | files/s | MB/s |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['seconds']} | {r['files_per_s']:,} | {r['mb_per_s']:,} |" for r in rows]
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
