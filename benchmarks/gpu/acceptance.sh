#!/usr/bin/env bash
# The whole GPU suite on one lent H100/H200: install what the GPU image lacks, then
# `aift bench acceptance` against the GPU's profile. Expected to take ~3 minutes (not yet run on a GPU:
# the session that wrote it had spent its device time; the pieces ran there in benchmarks/gpu/*.sh).
# Here, first:  bash ../shared/device/wheelhouse.sh faster-coco-eval && .venv/bin/pip wheel --no-deps . -w .whl
# There:        PROFILE=h200 bash benchmarks/gpu/acceptance.sh       (results and mlflow.db in $OUT)
source "$(dirname "$0")/prepare.sh"
timeout 480 python3 -m aifactory_train.commands.cli bench acceptance --profile "${PROFILE:-h200}" --out "$OUT" \
    --tracking-uri "sqlite:///$OUT/mlflow.db" 2>&1 | grep -vE "Warning|warn\(|LeafSpec|Tip:" | tee "$OUT/acceptance.log" | tail -40
