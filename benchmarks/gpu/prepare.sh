# Sourced by the scripts beside it, on the lent GPU machine: results go to $OUT (default ./gpu_results); the
# wheels built here (.whl/, see each script's header) are installed into /tmp/site, which the GPU image's Python
# then uses first; the GPU's name and limits are recorded.
set -uo pipefail
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv | tee "$OUT/gpu.csv"
