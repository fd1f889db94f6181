#!/usr/bin/env bash
# The whole GPU suite on one lent H100/H200: install what the GPU image lacks, then
# `aift bench acceptance` against the GPU's profile. Expected to take ~3 minutes (not yet run on a GPU:
# the session that wrote it had spent its device time; the pieces ran there in benchmarks/gpu/*.sh).
# Here, first:  bash ../shared/device/wheelhouse.sh faster-coco-eval && .venv/bin/pip wheel --no-deps . -w .whl
# There:        PROFILE=h200 bash benchmarks/gpu/acceptance.sh       (results and mlflow.db in $OUT)
set -uo pipefail
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv | tee "$OUT/gpu.csv"
timeout 480 python3 -m aifactory_train.cli bench acceptance --profile "${PROFILE:-h200}" --out "$OUT" \
    --tracking-uri "sqlite:///$OUT/mlflow.db" 2>&1 | grep -vE "Warning|warn\(|LeafSpec|Tip:" | tee "$OUT/acceptance.log" | tail -40
