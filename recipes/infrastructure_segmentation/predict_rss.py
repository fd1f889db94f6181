"""Peak memory (RSS) of infrastructure_segmentation's tiled prediction on rasters of growing size.

`aift predict` reads a raster window by window, holds one output block of logits at a time and streams the polygons
to their file (predict.py), so its peak RSS should stay flat as the raster grows, far below the raster's decoded
size. Each size runs in its own process (a clean peak). The raster (``--source``) is

* ``mosaic`` (default): a GDAL VRT repeating a 2048 px synthetic scene (roads, trenches, manholes, roofs) over the
  whole extent: content, and so polygons, everywhere, at no disk cost;
* ``sparse``: a tiled GeoTIFF with the scene in one corner (SPARSE_OK: unwritten blocks read as 0, no disk cost).

It then runs the recipe's ``predict_raster`` (the function `aift predict` calls per file), writing the GeoTIFF mask
and the GeoJSON polygons. With ``--memory-limit-mib``, each process runs in a cgroup with that memory limit (root and
a cgroup memory controller needed): a machine of that size, which is also shown to be unable to decode the largest
raster whole (``--control``: ``dataset.read()`` of it in the same cgroup is killed).

    python -m aifactory_train.recipes.infrastructure_segmentation.predict_rss --sides 2048 8192 16384 32768 \
        --memory-limit-mib 1536 --control --out benchmarks/results/<name>.md

(It lives in the recipe's folder, not benchmarks/, because the framework's files name no recipe.)

``--net recipe`` uses the recipe's default network (random init: memory does not depend on the weights);
``--net tiny`` an 8 px average, a 1x1 convolution and upsampling, so that the pipeline's own memory (reads,
blending, writing, polygons) is measured on rasters too large to run the real network over in minutes on 2 CPU
cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_memory_gib() -> float:
    return int(open("/proc/meminfo").read().split()[1]) / 2**20


def mosaic_vrt(tile_path: Path, tile_side: int, side: int, transform, path: Path) -> None:
    """A GDAL VRT of ``side`` px a side that repeats the GeoTIFF ``tile_path`` over its whole extent: a raster with
    real content everywhere, as large as asked, that costs no disk (GDAL reads each window from the tile). Written
    as XML because rasterio has no VRT builder and this machine has no gdalbuildvrt; the format is GDAL's
    (https://gdal.org/drivers/raster/vrt.html)."""
    steps = range(0, side, tile_side)
    geo = ", ".join(str(v) for v in (transform.c, transform.a, transform.b, transform.f, transform.d, transform.e))
    bands = []
    for band in (1, 2, 3):
        sources = "".join(
            f"<SimpleSource><SourceFilename relativeToVRT=\"0\">{tile_path}</SourceFilename><SourceBand>{band}"
            f"</SourceBand><SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{min(tile_side, side - c)}\" "
            f"ySize=\"{min(tile_side, side - r)}\"/><DstRect xOff=\"{c}\" yOff=\"{r}\" "
            f"xSize=\"{min(tile_side, side - c)}\" ySize=\"{min(tile_side, side - r)}\"/></SimpleSource>"
            for r in steps for c in steps)
        bands.append(f"<VRTRasterBand dataType=\"Byte\" band=\"{band}\">{sources}</VRTRasterBand>")
    path.write_text(f"<VRTDataset rasterXSize=\"{side}\" rasterYSize=\"{side}\"><SRS>EPSG:28992</SRS>"
                    f"<GeoTransform>{geo}</GeoTransform>{''.join(bands)}</VRTDataset>\n")


def one(side: int, net_kind: str, tile: int, overlap: int, block: int, cache_mb: int, source_kind: str,
        cell: int, out_dir: Path | None = None) -> dict:
    import numpy as np
    import rasterio
    import torch
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from .export import DeployableSegmenter
    from .model import build_net
    from .predict import predict_raster
    from .synth import CLASSES, make_scene

    torch.set_num_threads(2)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=out_dir) as folder:
        transform = from_origin(233000.0, 582000.0, 0.25, 0.25)
        scene_side = min(side, 2048)
        image, _, _ = make_scene(np.random.default_rng(0), scene_side, transform)
        scene = Path(folder) / "scene.tif"
        with rasterio.open(scene, "w", driver="GTiff", width=scene_side, height=scene_side, count=3, dtype="uint8",
                           crs="EPSG:28992", transform=transform, tiled=True, blockxsize=512, blockysize=512) as out:
            out.write(image)
        if source_kind == "mosaic":
            path = Path(folder) / "big.vrt"
            mosaic_vrt(scene, scene_side, side, transform, path)
        else:
            path = Path(folder) / "big.tif"
            with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8",
                               crs="EPSG:28992", transform=transform, tiled=True, blockxsize=512, blockysize=512,
                               compress="deflate", BIGTIFF="YES", SPARSE_OK=True) as out:
                out.write(image[:, :1024, :1024], window=Window(0, 0, 1024, 1024))  # content in one corner
        if net_kind == "tiny":
            # smoothed first, so that its mask has areas as a trained net's has, not one polygon per noisy pixel
            net = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Conv2d(3, len(CLASSES), 1),
                                      torch.nn.Upsample(scale_factor=8, mode="bilinear"))
            torch.nn.init.normal_(net[1].weight, std=3.0)
        else:
            net = build_net({"name": "unet", "encoder": "tu-mobilenetv3_small_100", "encoder_depth": 3,
                             "decoder_channels": [64, 32, 16]}, len(CLASSES))
        model = DeployableSegmenter(net, [0.5] * 3, [0.25] * 3).eval()
        import geopandas  # noqa: F401 - imported before the baseline is taken: its libraries are not the raster's
        import pyogrio  # noqa: F401
        import shapely  # noqa: F401

        before = rss_mib()
        started = time.perf_counter()
        opts = {"tile": tile, "overlap": overlap, "block": block, "simplify": 0.5, "min_area": 0.0,
                "georeferenced": True, "gdal_cache_mb": cache_mb, "cell": cell}
        with torch.inference_mode():
            row = predict_raster(model, path, Path(folder) / "out" / "big", opts, CLASSES, 8, torch.device("cpu"),
                                 draw=False)
        seconds = time.perf_counter() - started
        mask_mib = Path(row["mask"]).stat().st_size / 2**20
        polygons_mib = Path(row["polygons"]).stat().st_size / 2**20
    return {"side_px": side, "source": source_kind, "net": net_kind, "tile": tile, "overlap": overlap, "block": block,
            "gdal_cache_mb": cache_mb, "polygon_cell": cell, "decoded_rgb_gib": round(3 * side * side / 2**30, 2),
            "machine_memory_gib": round(machine_memory_gib(), 1), "rss_before_predict_mib": round(before),
            "peak_rss_mib": round(rss_mib()), "seconds": round(seconds, 1), "mask_file_mib": round(mask_mib, 1),
            "polygons": sum(row["polygons_per_class"].values()), "polygons_file_mib": round(polygons_mib, 1),
            "pixels_per_s": round(side * side / seconds)}


class MemoryCgroup:
    """A cgroup with a memory limit that child processes join (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``)."""

    def __init__(self, limit_mib: int):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.is_file() and "memory" in v2.read_text().split():
            self.path, limit_file = Path(f"/sys/fs/cgroup/aift-predict-rss-{os.getpid()}"), "memory.max"
        elif Path("/sys/fs/cgroup/memory").is_dir():
            self.path = Path(f"/sys/fs/cgroup/memory/aift-predict-rss-{os.getpid()}")
            limit_file = "memory.limit_in_bytes"
        else:
            raise SystemExit("--memory-limit-mib: this machine has no cgroup memory controller")
        try:
            self.path.mkdir()
            (self.path / limit_file).write_text(str(limit_mib * 2**20))
        except OSError as err:
            raise SystemExit(f"--memory-limit-mib: cannot make a cgroup at {self.path} ({err}); it needs root")

    def join(self) -> None:  # preexec_fn of the child
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def remove(self) -> None:
        self.path.rmdir()


def decode_whole(side: int, out_dir: Path | None) -> None:
    """The control: builds the same mosaic and reads it whole into memory, as a tool without windows would."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    with tempfile.TemporaryDirectory(dir=out_dir) as folder:
        transform = from_origin(233000.0, 582000.0, 0.25, 0.25)
        scene = Path(folder) / "scene.tif"
        with rasterio.open(scene, "w", driver="GTiff", width=2048, height=2048, count=3, dtype="uint8",
                           crs="EPSG:28992", transform=transform) as out:
            out.write(np.full((3, 2048, 2048), 100, dtype="uint8"))
        mosaic_vrt(scene, 2048, side, transform, Path(folder) / "big.vrt")
        with rasterio.open(Path(folder) / "big.vrt") as dataset:
            print(json.dumps({"decoded_bytes": int(dataset.read().nbytes)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--net", choices=("tiny", "recipe"), default="tiny")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--cache-mb", type=int, default=256, help="predict.gdal_cache_mb")
    parser.add_argument("--cell", type=int, default=8192, help="predict.polygon_cell_size")
    parser.add_argument("--source", choices=("mosaic", "sparse"), default="mosaic",
                        help="mosaic: a VRT repeating a 2048 px synthetic scene (content everywhere); sparse: a "
                             "sparse GeoTIFF with content in one corner only")
    parser.add_argument("--tmp", type=Path, help="folder for the rasters and outputs (default: the system's)")
    parser.add_argument("--memory-limit-mib", type=int,
                        help="run each size in a cgroup with this memory limit (needs root)")
    parser.add_argument("--control", action="store_true",
                        help="also read the largest raster whole in the same limit (expected: killed)")
    parser.add_argument("--decode-whole", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.net, args.tile, args.overlap, args.block, args.cache_mb, args.source,
                             args.cell, args.tmp)))
        return
    if args.decode_whole:
        decode_whole(args.decode_whole, args.tmp)
        return
    cgroup = MemoryCgroup(args.memory_limit_mib) if args.memory_limit_mib else None
    rows, control = [], None
    try:
        for side in args.sides:
            done = subprocess.run([sys.executable, "-m", __spec__.name, "--one", str(side), "--net", args.net,
                                   "--tile", str(args.tile), "--overlap", str(args.overlap), "--block", str(args.block),
                                   "--cache-mb", str(args.cache_mb), "--source", args.source, "--cell", str(args.cell)]
                                  + (["--tmp", str(args.tmp)] if args.tmp else []),
                                  capture_output=True, text=True, preexec_fn=cgroup.join if cgroup else None)
            if done.returncode:
                raise SystemExit(f"side {side}: exit {done.returncode}: {done.stderr[-2000:]}")
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]),
                         "memory_limit_mib": args.memory_limit_mib})
            print(rows[-1], flush=True)
            if args.out:  # after each size, so that a long series that is stopped keeps what it measured
                write_results(args.out, rows, control)
        if args.control:
            side = max(args.sides)
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", __spec__.name, "--decode-whole", str(side)]
                                  + (["--tmp", str(args.tmp)] if args.tmp else []),
                                  capture_output=True, text=True, preexec_fn=cgroup.join if cgroup else None)
            control = {"side_px": side, "exit_code": done.returncode, "seconds": round(time.perf_counter() - started, 1),
                       "memory_limit_mib": args.memory_limit_mib,
                       "result": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else
                       (done.stderr.strip().splitlines() or ["(nothing)"])[-1][:300]}
            print(control, flush=True)
            if args.out:
                write_results(args.out, rows, control)
    finally:
        if cgroup:
            cgroup.remove()

def write_results(out: Path, rows: list[dict], control: dict | None) -> None:
    lines = ["# infrastructure_segmentation: peak RSS of tiled prediction vs raster size", "",
             f"`python -m {__spec__.name} {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}", "",
             "| side (px) | source | decoded RGB (GiB) | machine memory (GiB) | net | tile/overlap/block/cell | "
             "memory limit (MiB) | GDAL cache (MiB) | RSS before (MiB) | peak RSS (MiB) | polygons | "
             "mask / GeoJSON (MiB) | time (s) | px/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['side_px']} | {r['source']} | {r['decoded_rgb_gib']} | {r['machine_memory_gib']} | {r['net']} | "
              f"{r['tile']}/{r['overlap']}/{r['block']}/{r['polygon_cell']} | {r['memory_limit_mib'] or '-'} | "
              f"{r['gdal_cache_mb']} | {r['rss_before_predict_mib']} | "
              f"{r['peak_rss_mib']} | {r['polygons']} | {r['mask_file_mib']} / {r['polygons_file_mib']} | "
              f"{r['seconds']} | {r['pixels_per_s']} |" for r in rows]
    if control:
        lines += ["", f"Control: reading the {control['side_px']} px raster whole (`dataset.read()`) in the same "
                      f"memory limit ({control['memory_limit_mib']} MiB): exit code {control['exit_code']} after "
                      f"{control['seconds']} s ({'killed by the limit' if control['exit_code'] in (-9, 137) else control['result']})."]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"runs": rows, "control": control}, indent=2) + "\n")

if __name__ == "__main__":
    main()
