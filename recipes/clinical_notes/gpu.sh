#!/usr/bin/env bash
# GPU check of clinical_notes for a lent GPU: the Llama-style 374M (hidden 1024, 24 layers, vocab 32k) at
# 8 x 2048 tokens, bf16-mixed, SDPA, fused AdamW: recipe vs plain loop, eager and compiled, tokens/s and MFU.
# Reference figures (H200, benchmarks/README.md): plain eager 90.4k tok/s, plain compiled 132.3k tok/s (38 % MFU).
# Here, first:  bash ../shared/device/wheelhouse.sh && .venv/bin/pip wheel --no-deps --no-build-isolation . -w .whl
#               (the GPU image has transformers and peft; the wheelhouse adds hydra, mlflow, datasets, deepspeed)
# There:        bash recipes/clinical_notes/gpu.sh        (results in $OUT, default ./gpu_results)
source benchmarks/gpu/prepare.sh  # run from the repository root
# compile both: the first compiled step takes ~1 minute (benchmarks/README.md, reference figures)
timeout 420 python3 benchmarks/recipe_step.py clinical_notes --model llama_374m --seq-len 2048 --batch-size 8 \
    --steps 20 --warmup 5 --repeats 1 --compile both --workers 4 \
    --out "$OUT/clinical_step.json" --markdown "$OUT/clinical_step.md" 2>&1 | grep -E "compile=|pipeline|Error|error" | tail -8
