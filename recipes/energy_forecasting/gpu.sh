#!/usr/bin/env bash
# All GPU checks of energy_forecasting in one go, for a lent H100/H200 (see README "Benchmarks").
# Here, first:  bash ../shared/device/wheelhouse.sh && .venv/bin/pip wheel --no-deps . -w .whl
# There:        bash recipes/energy_forecasting/gpu.sh        (results in $OUT, default ./gpu_results)
source benchmarks/gpu/prepare.sh  # run from the repository root
REPO=$PWD
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee "$OUT/versions.txt"

# 1. Training step: recipe vs plain loop, hidden 512 x 4 layers, 4096 windows of 168 h history, bf16-mixed;
#    throughput in windows/s.
timeout 300 python3 benchmarks/recipe_step.py energy_forecasting --batch-size 4096 --steps 40 --warmup 10 --repeats 2 \
    --out "$OUT/step.json" --markdown "$OUT/step.md" 2>&1 | grep -vE "Warning|warn\(|LeafSpec" | tail -20

# 2. The whole `aift train` path on the GPU: 200 households (400 series), the GPU experiment, a few epochs, then the
#    test-stage backtest; energy from NVML.
cd /tmp && rm -rf gpu_energy && mkdir gpu_energy && cd gpu_energy
python3 -m aifactory_train.commands.cli data synth energy_forecasting --out data --size 200 --variant parquet >/dev/null
timeout 300 python3 -m aifactory_train.commands.cli train experiment=energy_forecasting_gpu data.root=data \
    trainer.max_epochs=3 trainer.enable_progress_bar=false hydra.run.dir=run energy.meter=nvml energy.sample_every_s=5 \
    > "$OUT/smoke_train.log" 2>&1
echo "aift train exit code: $?"
cp run/summary.json "$OUT/smoke_summary.json" 2>/dev/null && python3 -m aifactory_train.commands.show_summary run/summary.json
cp run/reports/backtest_metrics.json "$OUT/backtest_metrics.json" 2>/dev/null

# 3. `aift export` of that run and its ONNX latency is measured by the bench adapter (CPU); here only that it exports.
timeout 120 python3 -m aifactory_train.commands.cli export recipe=energy_forecasting ckpt_path=run/checkpoints/last.ckpt \
    format=onnx hydra.run.dir=export > "$OUT/export.log" 2>&1
echo "aift export exit code: $?"
cd "$REPO"
