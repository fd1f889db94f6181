#!/usr/bin/env bash
# All GPU checks of plastic_sorting in one go, for a lent H100/H200 (see README "Benchmarks").
# Here, first:  bash ../shared/device/wheelhouse.sh && .venv/bin/pip wheel --no-deps . -w .whl
# There:        bash recipes/plastic_sorting/gpu.sh        (results in $OUT, default ./gpu_results)
source benchmarks/gpu/prepare.sh  # run from the repository root
REPO=$PWD
python3 -c "import torch, lightning, torchvision; print('torch', torch.__version__, 'lightning', lightning.__version__, 'torchvision', torchvision.__version__)" | tee "$OUT/versions.txt"

# 1. Training step: recipe vs plain loop, ResNet-50, 224 px, batch 256, bf16-mixed, channels_last; eager and compiled.
#    Input pipeline (real PNGs, decode + augment) at 4/8/12 workers vs that step.
timeout 420 python3 benchmarks/recipe_step.py plastic_sorting --model resnet50 --image-size 224 --batch-size 256 \
    --steps 40 --warmup 10 --repeats 2 --compile both --workers 4 8 12 \
    --out "$OUT/step.json" --markdown "$OUT/step.md" 2>&1 | grep -vE "Warning|warn\(|LeafSpec" | tail -20

# 2. The whole `aift train` path on the GPU (bf16-mixed, channels_last, MLflow sqlite), eager, a few steps.
#    energy.meter=nvml: the run's energy from the GPU's NVML counter (fails loudly if it cannot be read).
cd /tmp && rm -rf gpu_smoke && mkdir gpu_smoke && cd gpu_smoke
python3 -m aifactory_train.commands.cli data synth plastic_sorting --out data --size 1024 >/dev/null
timeout 180 python3 -m aifactory_train.commands.cli train experiment=plastic_sorting_gpu data.root=data model.compile=false \
    trainer.max_epochs=2 data.batch_size=128 trainer.enable_progress_bar=false hydra.run.dir=run \
    energy.meter=nvml energy.sample_every_s=5 \
    > "$OUT/smoke_train.log" 2>&1
echo "aift train exit code: $?"
cp run/summary.json "$OUT/smoke_summary.json" 2>/dev/null && python3 -m aifactory_train.commands.show_summary run/summary.json
cp -r run/energy "$OUT/smoke_energy" 2>/dev/null
python3 "$REPO/benchmarks/energy_sample.py" --meter nvml --samples 500 --out "$OUT/energy_sample.json" | tail -8

# 3. `aift predict` on the GPU with that run's checkpoint: precision auto (bf16-mixed autocast on the GPU), the test
#    images decoded in the main process, then by 4 DataLoader workers forked after CUDA started. A functional check
#    of the GPU path; predict.json keeps the device, the precision and the wall time (start-up included).
for WORKERS in 0 4; do
    timeout 120 python3 -m aifactory_train.commands.cli predict recipe=plastic_sorting ckpt_path=run/checkpoints/last.ckpt \
        input=data/test predict.batch_size=128 predict.num_workers=$WORKERS hydra.run.dir=predict_$WORKERS \
        > "$OUT/predict_$WORKERS.log" 2>&1
    echo "aift predict (num_workers=$WORKERS) exit code: $?"
    cp predict_$WORKERS/predict.json "$OUT/predict_$WORKERS.json" 2>/dev/null
done
cd "$REPO"
