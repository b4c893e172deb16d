#!/usr/bin/env bash
# One prepared GPU check (run it through the device tool, or on any CUDA machine): the @pytest.mark.gpu tests,
# a GPU smoke of the whole suite's op tests, and the kernel benchmarks at GPU sizes. Results go under $OUT.
#
# The GPU image has jax (0.11.2 + CUDA), flax, optax and orbax but installs nothing from the network: pure-Python
# packages it lacks (jaxtyping, beartype, tensorboardX, ...) travel as wheels in .whl/ (see the device README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
site=/tmp/effarch-site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" . || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)"
} 2>&1 | tee "$OUT/env.txt"

status=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
python3 -m pytest -q -p no:cacheprovider tests/pallas_kernels tests/layers 2>&1 | tee "$OUT/pytest_ops.log" || status=1
for b in benchmarks/lightning_scaling.py benchmarks/scaling.py benchmarks/diffqkv.py; do
  [ -f "$b" ] || continue
  name=$(basename "$b" .py)
  timeout 240 python3 "$b" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || status=1
done
# Lightning and BASED Pallas kernels vs their XLA paths and cuDNN flash attention (bf16, T 2k/8k/32k, JSON).
timeout 420 python3 benchmarks/kernels.py --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1 || status=1
timeout 120 python3 benchmarks/mqar_loop.py --out "$OUT/mqar_loop.json" > "$OUT/mqar_loop.log" 2>&1 || status=1
exit $status
