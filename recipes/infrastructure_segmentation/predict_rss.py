"""Peak memory (RSS) of infrastructure_segmentation's tiled prediction on rasters of growing size.

`aift predict` reads a raster window by window and holds one output block of logits at a time
(predict.py), so its peak RSS should stay flat as the raster grows, far below
the raster's decoded size. Each size runs in its own process (a clean peak): it writes a tiled GeoTIFF of that size
(EPSG:28992; SPARSE_OK, so a raster larger than this machine's memory costs no disk: unwritten blocks read as 0,
as GDAL documents for sparse files) with real content in its first blocks, then runs the recipe's
``predict_raster`` (the function `aift predict` calls per file), writing the GeoTIFF mask and the polygons.

    python -m aifactory_train.recipes.infrastructure_segmentation.predict_rss --sides 2048 8192 16384 --net tiny \
        --out benchmarks/results/infrastructure_segmentation_predict_rss_cpu-2core_2026-11-30.md

(It lives in the recipe's folder, not benchmarks/, because the framework's files name no recipe.)

``--net recipe`` uses the recipe's default network (random init: memory does not depend on the weights);
``--net tiny`` an 8 px average, a 1x1 convolution and upsampling, so that the pipeline's own memory (reads, blending, writing, polygons) is measured
on rasters too large to run the real network over in minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(side: int, net_kind: str, tile: int, overlap: int, block: int, cache_mb: int = 256) -> dict:
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
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.tif"
        transform = from_origin(233000.0, 582000.0, 0.25, 0.25)
        with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8",
                           crs="EPSG:28992", transform=transform, tiled=True, blockxsize=512, blockysize=512,
                           compress="deflate", BIGTIFF="YES", SPARSE_OK=True) as out:
            image, _, _ = make_scene(np.random.default_rng(0), 1024, transform)
            out.write(image, window=Window(0, 0, 1024, 1024))  # real content in one corner, the rest sparse
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
        import shapely  # noqa: F401

        before = rss_mib()
        started = time.perf_counter()
        opts = {"tile": tile, "overlap": overlap, "block": block, "simplify": 0.5, "min_area": 0.0,
                "georeferenced": True, "gdal_cache_mb": cache_mb}
        with torch.inference_mode():
            row = predict_raster(model, path, Path(folder) / "out" / "big", opts, CLASSES, 8, torch.device("cpu"),
                                 draw=False)
        seconds = time.perf_counter() - started
        mask_mib = Path(row["mask"]).stat().st_size / 2**20
    return {"side_px": side, "net": net_kind, "tile": tile, "overlap": overlap, "block": block, "gdal_cache_mb": cache_mb,
            "decoded_rgb_gib": round(3 * side * side / 2**30, 2), "rss_before_predict_mib": round(before),
            "peak_rss_mib": round(rss_mib()), "seconds": round(seconds, 1), "mask_file_mib": round(mask_mib, 1),
            "pixels_per_s": round(side * side / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--net", choices=("tiny", "recipe"), default="tiny")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--cache-mb", type=int, default=256, help="predict.gdal_cache_mb")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.net, args.tile, args.overlap, args.block, args.cache_mb)))
        return
    rows = []
    for side in args.sides:
        done = subprocess.run([sys.executable, "-m", __spec__.name, "--one", str(side), "--net", args.net, "--tile",
                               str(args.tile), "--overlap", str(args.overlap), "--block", str(args.block),
                               "--cache-mb", str(args.cache_mb)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    if args.out:
        lines = ["# infrastructure_segmentation: peak RSS of tiled prediction vs raster size", "",
                 f"`python -m {__spec__.name} {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}", "",
                 "| side (px) | decoded RGB (GiB) | net | tile/overlap/block | GDAL cache (MiB) | RSS before (MiB) | "
                 "peak RSS (MiB) | time (s) | px/s |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['side_px']} | {r['decoded_rgb_gib']} | {r['net']} | {r['tile']}/{r['overlap']}/{r['block']} | "
                  f"{r['gdal_cache_mb']} | {r['rss_before_predict_mib']} | {r['peak_rss_mib']} | {r['seconds']} | {r['pixels_per_s']} |"
                  for r in rows]
        args.out.write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
