"""Micro benchmarks of the hardware under the training stack: GEMM, memory and host-device bandwidth,
all-reduce bus bandwidth, and data loading from real files.

Each function returns rows ``{"metric", "value", "unit", "params"}``; `aift bench` turns them into the report.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from aifactory_train.run.timing import loader_rate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (cuBLAS heuristics, page faults)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def gemm(device: torch.device, sizes: list[int], dtypes: list[torch.dtype]) -> list[dict]:
    """Square matmul TFLOP/s (2 n^3 FLOPs per product)."""
    rows = []
    for dtype in dtypes:
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            seconds = _time(lambda: a @ b, device, repeats=max(3, int(2e9 / n**3)) if device.type == "cpu" else 20)
            rows.append({"metric": "gemm_tflops", "value": 2 * n**3 / seconds / 1e12, "unit": "TFLOP/s",
                         "params": {"dtype": str(dtype).replace("torch.", ""), "size": n}})
    return rows


def memory_bandwidth(device: torch.device, mib: int) -> list[dict]:
    """Device memory copy bandwidth, counting read + write (as the reference figure of 4.25 TB/s on an H200)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, repeats=20)
    return [{"metric": "memory_gbps", "value": 2 * src.numel() * 4 / seconds / 1e9, "unit": "GB/s",
             "params": {"mib": mib, "device": device.type}}]


def host_device_bandwidth(mib: int) -> list[dict]:
    """Pinned host to device and back (GPU only)."""
    host = torch.empty(mib * 2**20, dtype=torch.uint8).pin_memory()
    gpu = torch.empty_like(host, device="cuda")
    device = torch.device("cuda")
    h2d = _time(lambda: gpu.copy_(host, non_blocking=True), device, repeats=20)
    d2h = _time(lambda: host.copy_(gpu, non_blocking=True), device, repeats=20)
    return [{"metric": "h2d_gbps", "value": host.numel() / h2d / 1e9, "unit": "GB/s", "params": {"mib": mib}},
            {"metric": "d2h_gbps", "value": host.numel() / d2h / 1e9, "unit": "GB/s", "params": {"mib": mib}}]


def _allreduce_worker(rank: int, world: int, port: int, backend: str, sizes: list[int], out: str) -> None:
    import json

    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rows = []
    for size in sizes:
        tensor = torch.ones(size // 4, dtype=torch.float32, device=device)
        repeats = 5 if size >= 2**26 else 20
        dist.all_reduce(tensor)  # warm-up
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            dist.all_reduce(tensor)
        _sync(device)
        seconds = (time.perf_counter() - start) / repeats
        algbw = size / seconds / 1e9
        # nccl-tests PERFORMANCE.md: busbw = algbw * 2 (n - 1) / n for all-reduce
        rows.append({"metric": "allreduce_busbw_gbps", "value": algbw * 2 * (world - 1) / world, "unit": "GB/s",
                     "params": {"bytes": size, "world": world, "backend": backend, "algbw_gbps": algbw}})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def allreduce(world: int, backend: str, sizes: list[int]) -> list[dict]:
    """all-reduce bus bandwidth over message sizes, ``world`` local processes (gloo on CPU, nccl on GPUs)."""
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp()) / "allreduce.json"
    mp.spawn(_allreduce_worker, args=(world, port, backend, sizes, str(out)), nprocs=world, join=True)
    return json.loads(out.read_text())


def dataloader(adapter, workers: list[int], image_size: int, batch_size: int, files: int) -> list[dict]:
    """Images/s of a recipe's image pipeline (decode + augment real PNGs) per worker count. ``adapter``: a recipe's
    bench adapter offering ``image_files`` and ``image_datamodule`` (``BenchAdapter`` in aifactory_train/recipe.py)."""
    root = adapter.image_files(files)
    rows = []
    for count in workers:
        loader = adapter.image_datamodule(root, image_size, batch_size, count)
        rate = loader_rate(loader, count)["samples_per_s"]
        rows.append({"metric": "dataloader_images_per_s", "value": rate, "unit": "images/s",
                     "params": {"workers": count, "image_size": image_size, "files": files}})
    return rows
