#!/usr/bin/env bash
# Issue 5's GPU figure: single-GPU throughput and peak memory of single, ddp, deepspeed_zero2 and deepspeed_zero3
# on clinical_notes' 374M config (8 x 2048 tokens, bf16-mixed, eager), 60 steps each (~1 min per strategy).
# reference figures (benchmarks/README.md): ZeRO-2 through Lightning cost 15 % vs a plain loop on one H200.
# Check the plan on CPU first:  python benchmarks/strategies.py clinical_notes --gpu --on-cpu --steps 21 --notes 200
# Here, first:  bash ../shared/device/wheelhouse.sh && .venv/bin/pip wheel --no-deps --no-build-isolation . -w .whl
# There:        bash recipes/clinical_notes/gpu_strategies.sh        (results in $OUT, default ./gpu_results)
source benchmarks/gpu/prepare.sh  # run from the repository root
timeout 480 python3 benchmarks/strategies.py clinical_notes --gpu --steps 60 \
    --out "$OUT/strategies_gpu.json" --markdown "$OUT/strategies_gpu.md" 2>&1 | tail -8
