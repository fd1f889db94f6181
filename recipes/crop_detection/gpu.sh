#!/usr/bin/env bash
# GPU checks of crop_detection, for a lent GPU (plastic_sorting's input pipeline: recipes/plastic_sorting/gpu.sh).
# Here, first:  bash ../shared/device/wheelhouse.sh faster-coco-eval && .venv/bin/pip wheel --no-deps . -w .whl
# There:        bash recipes/crop_detection/gpu.sh        (results in $OUT, default ./gpu_results)
source benchmarks/gpu/prepare.sh  # run from the repository root
# Faster R-CNN R50-FPN v2, 640 px, batch 16, bf16-mixed: recipe vs plain loop (reference figures (benchmarks/README.md): plain bf16 78 img/s on H200)
timeout 150 python3 benchmarks/recipe_step.py crop_detection --model fasterrcnn_resnet50_fpn_v2 --image-size 640 \
    --batch-size 16 --steps 20 --warmup 3 --repeats 3 --workers \
    --out "$OUT/crop_step.json" --markdown "$OUT/crop_step.md" 2>&1 | grep -E "compile=|Error|error" | tail -5
# the speed options the recipe offers (model.channels_last, model.compile_backbone), in both loops: against the
# first run's plain NCHW eager loop, they show whether the recipe's GPU defaults should switch them on (~3 min)
timeout 300 python3 benchmarks/recipe_step.py crop_detection --model fasterrcnn_resnet50_fpn_v2 --image-size 640 \
    --batch-size 16 --steps 20 --warmup 5 --repeats 1 --channels-last true --compile both --workers \
    --out "$OUT/crop_options.json" --markdown "$OUT/crop_options.md" 2>&1 | grep -E "compile=|Error|error" | tail -5
# the same shape, counted instead of timed: sync points and aten ops per step, recipe vs plain loop (~1 min)
timeout 150 python3 benchmarks/step_overhead.py crop_detection --model fasterrcnn_resnet50_fpn_v2 --image-size 640 \
    --batch-size 16 --steps 4 --out "$OUT/crop_overhead.json" --markdown "$OUT/crop_overhead.md" 2>&1 | tail -3
