#!/usr/bin/env bash
# GPU checks of infrastructure_segmentation, for a lent H100/H200 (not yet run on one: no GPU was lent when it was written).
# Here, first:  bash ../shared/device/wheelhouse.sh rasterio shapely geopandas pyogrio pyproj segmentation-models-pytorch timm \
#                   && .venv/bin/pip wheel --no-deps . -w .whl
# There:        bash recipes/infrastructure_segmentation/gpu.sh        (results in $OUT, default ./gpu_results)
source benchmarks/gpu/prepare.sh  # run from the repository root
REPO=$PWD

# 1. Training step: recipe vs plain loop on the same U-Net and batch of tiles (512 px, batch 32, bf16-mixed,
#    channels_last), eager and compiled; the input pipeline (windowed GeoTIFF reads + augmentation) at 4/8 workers.
timeout 300 python3 benchmarks/recipe_step.py infrastructure_segmentation --image-size 512 --batch-size 32 \
    --steps 30 --warmup 5 --repeats 2 --compile both --channels-last true --workers 4 8 \
    --out "$OUT/seg_step.json" --markdown "$OUT/seg_step.md" 2>&1 | grep -E "compile=|Error|error" | tail -5

# 2. The whole `aift train` path of the GPU experiment (ResNet-34 U-Net, 512 px tiles, bf16-mixed, channels_last)
#    on a synthetic orthophoto, a few hundred steps.
cd /tmp && rm -rf seg_smoke && mkdir seg_smoke && cd seg_smoke
python3 -m aifactory_train.commands.cli data synth infrastructure_segmentation --out data --size 4096 >/dev/null
timeout 240 python3 -m aifactory_train.commands.cli train experiment=infrastructure_segmentation_gpu data.root=data \
    data.train_tiles=2048 trainer.max_epochs=3 trainer.enable_progress_bar=false hydra.run.dir=run \
    > "$OUT/seg_train.log" 2>&1
echo "aift train exit code: $?"
cp run/summary.json "$OUT/seg_summary.json" 2>/dev/null

# 3. `aift predict` on the GPU: the 4096 px training orthophoto, 1024 px tiles, bf16 autocast; predict.json keeps
#    the wall time, the GeoTIFF mask and polygons their CRS.
timeout 180 python3 -m aifactory_train.commands.cli predict recipe=infrastructure_segmentation \
    ckpt_path=run/checkpoints/last.ckpt input=data/train/rasters predict.tile_size=1024 predict.overlap=128 \
    predict.block_size=4096 predict.batch_size=8 hydra.run.dir=predict > "$OUT/seg_predict.log" 2>&1
echo "aift predict exit code: $?"
cp predict/predict.json predict/predictions.jsonl "$OUT/" 2>/dev/null
cd "$REPO"
