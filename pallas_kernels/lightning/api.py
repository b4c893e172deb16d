"""Public entry points of the Lightning attention op: `implementation=` dispatch and the custom_vjp wiring.

Paper: Lightning Attention-2, arXiv 2401.04658. Reference: OpenNLPLab/lightning-attention@d15c385.

Implementations:
- "reference": the quadratic masked form (reference.py), differentiated by autodiff; O(T²) memory.
- "xla": block tiling with a running KV state (xla.py) under a `jax.custom_vjp` whose backward is the paper's
  two-pass Alg. 6; only the inputs are saved, so memory is O(T).
- "pallas_gpu": Triton `pallas_call` kernels (pallas_gpu.py), forward and two-pass backward, under a `jax.custom_vjp`
  that saves only the inputs. Runs block_size, K and V rounded up to powers of 2 >= 16 (zero padding, exact).
- "pallas_tpu": Mosaic TPU kernels (pallas_tpu.py), the same custom_vjp. Runs block_size rounded up to a multiple
  of 16. Both Pallas paths take any shape; they raise NotImplementedError before any work off their platform (that
  of the mesh's devices, pallas_kernels/dispatch.py), unless EFFARCH_PALLAS_INTERPRET=1 asks for interpret mode
  (pallas_kernels/interpret.py). Under a multi-device mesh they run per device block of batch and heads inside
  `jax.shard_map` (pallas_kernels/shard.py).

Default order: "xla" on every platform until the kernels have passed `scripts/gpu_check.sh` there (`KERNEL_EVIDENCE`
below, pallas_kernels/dispatch.py); then (kernel, "xla"). The kernels are opt-in until then: `implementation=
"pallas_gpu"` / `"pallas_tpu"`.

The decay rates are fixed (TransNormerLLM reports NaNs with learnable λ), so every implementation returns a zero
cotangent for `decay` (the Pallas backward kernels compute none; the custom_vjp returns zeros); the reference path
stops its gradient so that all paths agree.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from effarch.pallas_kernels.dispatch import dispatch, kernel_default_order
from effarch.pallas_kernels.interpret import Interpret, resolve_interpret
from effarch.pallas_kernels.lightning import pallas_gpu, pallas_tpu, reference, xla
from effarch.pallas_kernels.shard import BATCH, HEADS, shard_kernel

_OP = "lightning_attention"
# Where the default flips: a platform named here gets (its kernel, "xla") as its default order. Add one only with
# the evidence of a passing `scripts/gpu_check.sh` run on that platform (date, device, commit, its summary.json:
# the `kernel_tests` step passed and benchmarks/kernels.py's max_rel_err_vs_xla within the tests' tolerances).
# Evidence so far: none (neither kernel has run on a GPU or a TPU).
KERNEL_EVIDENCE: dict[str, str] = {}
DEFAULT_ORDER = kernel_default_order(KERNEL_EVIDENCE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lightning_xla(q, k, v, decay, initial_state, block_size):
    return xla.lightning_fwd(q, k, v, decay, initial_state, block_size)


def _lightning_xla_fwd(q, k, v, decay, initial_state, block_size):
    out = xla.lightning_fwd(q, k, v, decay, initial_state, block_size)
    # Residuals are the inputs only: the backward recomputes the block states.
    return out, (q, k, v, decay, initial_state)


def _lightning_xla_bwd(block_size, residuals, cotangents):
    q, k, v, decay, initial_state = residuals
    d_out, d_final_state = cotangents
    dq, dk, dv, d_initial = xla.lightning_bwd(q, k, v, decay, initial_state, d_out, d_final_state, block_size)
    # The decay is a fixed schedule, not a parameter: no gradient.
    return dq, dk, dv, jnp.zeros_like(decay), d_initial


_lightning_xla.defvjp(_lightning_xla_fwd, _lightning_xla_bwd)


def _reference(q, k, v, decay, initial_state, block_size):
    del block_size
    return reference.lightning_quadratic(q, k, v, jax.lax.stop_gradient(decay), initial_state)


_KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _lightning_pallas(q, k, v, decay, initial_state, name: str, block_size: int, interpret: Interpret):
    return _KERNELS[name].lightning_fwd(q, k, v, decay, initial_state, block_size=block_size, interpret=interpret)


def _lightning_pallas_fwd(q, k, v, decay, initial_state, name, block_size, interpret):
    out = _lightning_pallas(q, k, v, decay, initial_state, name, block_size, interpret)
    # Residuals are the inputs only: both backward kernels recompute the chunk states.
    return out, (q, k, v, decay, initial_state)


def _lightning_pallas_bwd(name, block_size, interpret, residuals, cotangents):
    q, k, v, decay, initial_state = residuals
    d_out, d_final_state = cotangents
    dq, dk, dv, d_initial = _KERNELS[name].lightning_bwd(
        q, k, v, decay, initial_state, d_out, d_final_state, block_size=block_size, interpret=interpret
    )
    # The decay is a fixed schedule, not a parameter: no gradient (the kernels do not compute one).
    return dq, dk, dv, jnp.zeros_like(decay), d_initial.astype(initial_state.dtype)


_lightning_pallas.defvjp(_lightning_pallas_fwd, _lightning_pallas_bwd)


_X = (BATCH, None, HEADS, None)  # q, k, v, o: [B, T, H, K]
_STATE = (BATCH, HEADS, None, None)  # [B, H, K, V]


def _pallas(name: str, platform: str):
    def impl(q, k, v, decay, initial_state, block_size, *, interpret: Interpret | None = None):
        # Raises NotImplementedError before any work off the kernel's platform, so dispatch can fall back.
        interpret = resolve_interpret(_OP, name, platform, interpret)

        def kernel(q, k, v, decay, initial_state):
            return _lightning_pallas(q, k, v, decay, initial_state, name, block_size, interpret)

        # Per device block of batch and heads under a multi-device mesh (pallas_kernels/shard.py).
        return shard_kernel(kernel, (_X, _X, _X, (HEADS,), _STATE), (_X, _STATE))(q, k, v, decay, initial_state)

    return impl


_IMPLS = {
    "reference": _reference,
    "xla": _lightning_xla,
    "pallas_gpu": _pallas("pallas_gpu", "gpu"),
    "pallas_tpu": _pallas("pallas_tpu", "tpu"),
}


def lightning_attention_with_state(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    decay: Float[Array, " H"],
    initial_state: Float[Array, "B H K V"] | None = None,
    *,
    block_size: int = 64,
    implementation: str | Sequence[str] | None = None,
) -> tuple[Float[Array, "B T H V"], Float[Array, "B H K V"]]:
    """`lightning_attention` that starts from a carried state and also returns the state after the last token.

    This is the prefill path: a prompt, or the next chunk of a long sequence, runs through the block algorithm
    instead of token by token. Differentiable in q, k, v and `initial_state`.

    Args:
      q, k, v, decay, block_size, implementation: as `lightning_attention`.
      initial_state: kv before the first token, [B, H, K, V] float32; zeros if None.

    Returns:
      (o [B, T, H, V], final state kv_{T−1} [B, H, K, V] in float32), the state `lightning_attention_step` carries.
    """
    if block_size < 1:
        raise ValueError(f"{_OP}: block_size must be positive, got {block_size}")
    if initial_state is None:
        batch, _, heads, k_dim = q.shape
        initial_state = jnp.zeros((batch, heads, k_dim, v.shape[-1]), jnp.float32)
    return dispatch(
        _OP, _IMPLS, implementation, q, k, v, decay, initial_state, block_size, default_order=DEFAULT_ORDER
    )


def lightning_attention(
    q: Float[Array, "B T H K"],
    k: Float[Array, "B T H K"],
    v: Float[Array, "B T H V"],
    decay: Float[Array, " H"],
    *,
    block_size: int = 64,
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "B T H V"]:
    """Causal decayed linear attention, O = [(Q Kᵀ) ⊙ M] V with M_tj = exp(−s_h (t − j)) for t ≥ j.

    o_t = Σ_{j≤t} exp(−s_h (t − j)) (q_t · k_j) v_j, per head h.

    Args:
      q: queries, [B, T, H, K]. No 1/√K scale is applied (Lightning convention).
      k: keys, [B, T, H, K].
      v: values, [B, T, H, V].
      decay: per-head rate s_h ≥ 0, [H]; λ_h = exp(−s_h). Not differentiated (zero cotangent).
      block_size: tokens per block of the tiled paths; T need not be a multiple of it.
      implementation: "reference", "xla", "pallas_gpu", "pallas_tpu", a sequence of them tried in order, or None
        for the platform default (see the module docstring). A single name that cannot run raises.

    Returns:
      [B, T, H, V] in v's dtype. SRMSNorm is the caller's job.
    """
    o, _ = lightning_attention_with_state(q, k, v, decay, block_size=block_size, implementation=implementation)
    return o


def lightning_attention_step(
    state: Float[Array, "B H K V"],
    q_t: Float[Array, "B H K"],
    k_t: Float[Array, "B H K"],
    v_t: Float[Array, "B H V"],
    decay: Float[Array, " H"],
) -> tuple[Float[Array, "B H K V"], Float[Array, "B H V"]]:
    """One decode step on the constant-size state: kv ← λ kv + k_tᵀ v_t, o_t = q_t kv.

    Args:
      state: kv after the previous token, [B, H, K, V] float32 (zeros before the first token).
      q_t, k_t: [B, H, K]. v_t: [B, H, V]. decay: [H].

    Returns:
      (new state [B, H, K, V], o_t [B, H, V]).
    """
    return reference.lightning_step(state, q_t, k_t, v_t, decay)
