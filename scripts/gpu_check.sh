#!/usr/bin/env bash
# One prepared GPU check, at most $GPU_CHECK_BUDGET_S (default 420: 7 minutes) of wall time in all (run it through
# the device tool, or on any CUDA machine). Results go under $OUT, one step at a time: each step writes its log and
# $OUT/<step>.json (rc, seconds, timed out / skipped; pytest's counts and failed ids) as it finishes, and
# $OUT/summary.json covers every step so far, so a timeout loses only the steps that had not run.
#
# Order: what decides whether the Lightning and BASED kernels may become a platform's default first (their compiled
# correctness tests, then benchmarks/kernels.py one length at a time: speed and max_rel_err_vs_xla), then the same for
# the block-sparse kernel (its compiled tests, then benchmarks/block_sparse_gpu.py: correct against the oracle at 4k
# and fwd+bwd speed against dense cuDNN at 32k, 10% density), then the decode kernel (benchmarks/sparse_decode_gpu.py:
# correct against the oracle, decode-step speed against the XLA gather at 8k and 32k), the rest after (the other
# @pytest.mark.gpu tests, the op and layer tests, the other benchmarks). A step runs under `timeout` with
# at most its own limit and never past the budget; a step with under 15 s left is recorded as skipped. The kernels
# flip to default only when summary.json's kernels_passed is true and kernels_T*.json agree with XLA: record the
# run in KERNEL_EVIDENCE (pallas_kernels/lightning/api.py, pallas_kernels/based/api.py).
#
# The GPU image has jax (0.11.2 + CUDA), flax, optax and orbax but installs nothing from the network: pure-Python
# packages it lacks (jaxtyping, beartype, tensorboardX, ...) travel as wheels in .whl/ (see the device README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$SECONDS
status=0

# step NAME MAX_S CMD...: CMD under timeout (its own MAX_S, never past the budget less 10 s for the records), output
# in $OUT/NAME.log, then $OUT/NAME.json and summary.json.
step() {
  local name=$1 max=$2
  shift 2
  local left=$((BUDGET - (SECONDS - start) - 10))
  local limit=$((max < left ? max : left)) t0=$SECONDS rc skipped=""
  if ((left < 15)); then
    rc=1 skipped="no time left in the ${BUDGET} s budget"
    limit=0
  else
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
  fi
  python3 scripts/gpu_check_record.py "$OUT" "$name" "$rc" "$((SECONDS - t0))" "$limit" "$skipped" "$*"
  echo "gpu_check: $name rc=$rc $((SECONDS - t0)) s${skipped:+ (skipped: $skipped)}"
  ((rc == 0)) || status=1
}

site=/tmp/effarch-site
install() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || return 1
  fi
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$site" .
}
step install 120 bash -c "$(declare -f install); site=$site; install" || true
[ -f "$OUT/install.json" ] && grep -q '"passed": true' "$OUT/install.json" || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

step env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  python3 -c \"import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)\""

pytest=(python3 -m pytest -q -p no:cacheprovider)
# 1. The kernels' compiled correctness (what a default flip needs).
step kernel_tests 150 "${pytest[@]}" -m gpu --junitxml="$OUT/kernel_tests.xml" \
  tests/pallas_kernels/lightning tests/pallas_kernels/based
# 2. Their speed and agreement with XLA, one length per step (bf16, B 16, H 16).
for T in 2048 8192 32768; do
  step "kernels_T$T" 90 python3 benchmarks/kernels.py --lengths "$T" --out "$OUT/kernels_T$T.json"
done
# 3. The block-sparse kernel: compiled correctness, then correct (4k) and fast (32k, 10% density) vs dense cuDNN.
step block_sparse_tests 60 "${pytest[@]}" -m gpu --junitxml="$OUT/block_sparse_tests.xml" \
  tests/pallas_kernels/block_sparse
step block_sparse_T32768 90 python3 benchmarks/block_sparse_gpu.py --length 32768 --density 0.1 \
  --out "$OUT/block_sparse_T32768.json"
# The decode kernel (its compiled tests ran in block_sparse_tests): correct against the oracle (4k, bf16), and its
# decode step's time against the XLA gather at 8k and 32k context, 1024 tokens read per list (tokens and blocks).
step sparse_decode_gpu 90 python3 benchmarks/sparse_decode_gpu.py --lengths 8192 32768 \
  --out "$OUT/sparse_decode_gpu.json"
# 4. The rest: the other GPU tests, the op and layer tests compiled for GPU, the other benchmarks.
step gpu_tests 90 "${pytest[@]}" -m gpu --junitxml="$OUT/gpu_tests.xml" tests \
  --ignore=tests/pallas_kernels/lightning --ignore=tests/pallas_kernels/based --ignore=tests/pallas_kernels/block_sparse
step op_tests 240 "${pytest[@]}" --junitxml="$OUT/op_tests.xml" tests/pallas_kernels tests/layers
for b in lightning_scaling scaling diffqkv mqar_loop; do
  step "$b" 120 python3 "benchmarks/$b.py" --out "$OUT/$b.json"
done
exit $status
