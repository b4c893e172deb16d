"""Public entry points of the BASED Taylor linear attention op (arXiv 2402.18668).

- `based_linear_attention`: the parallel (training) form, `implementation=` in {"reference", "xla", "pallas_gpu",
  "pallas_tpu"}; the Pallas kernels (pallas_gpu.py, pallas_tpu.py, wired in pallas_vjp.py) take any shape and raise
  NotImplementedError up front off their platform (unless EFFARCH_PALLAS_INTERPRET=1), so a sequence can fall back
  to "xla". They are opt-in: the default is "xla" on every platform until the kernels have passed
  `scripts/gpu_check.sh` there (`KERNEL_EVIDENCE` below, pallas_kernels/dispatch.py).
- `based_prefill`: the same output plus the state after the prompt, optionally continuing from a state.
- `based_init_state` / `based_decode_step`: the recurrent form, one token at a time.

Prefill and decoding stay on "xla" / the recurrent step. An unknown name raises ValueError (pallas_kernels/dispatch.py).
"""

from collections.abc import Mapping, Sequence

from jaxtyping import Array, Float

from effarch.pallas_kernels.based import reference, xla
from effarch.pallas_kernels.based.pallas_vjp import based_pallas_impl
from effarch.pallas_kernels.based.reference import BasedState
from effarch.pallas_kernels.dispatch import dispatch, kernel_default_order

# Where the default flips: a platform named here gets (its kernel, "xla") as its default order. Add one only with
# the evidence of a passing `scripts/gpu_check.sh` run on that platform (date, device, commit, its summary.json:
# the `kernel_tests` step passed and benchmarks/kernels.py's max_rel_err_vs_xla within the tests' tolerances).
# Evidence so far: none (neither kernel has run on a GPU or a TPU).
KERNEL_EVIDENCE: dict[str, str] = {}
DEFAULT_ORDER: Mapping[str, tuple[str, ...]] = kernel_default_order(KERNEL_EVIDENCE)
PREFILL_ORDER: Mapping[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}


def based_linear_attention(
    q: Float[Array, "B T H F"],
    k: Float[Array, "B T H F"],
    v: Float[Array, "B T H V"],
    *,
    eps: float = 1e-6,
    chunk_size: int = 64,
    implementation: str | Sequence[str] | None = None,
) -> Float[Array, "B T H V"]:
    """Causal BASED attention, o_t = sum_{j<=t} w_tj v_j / (sum_{j<=t} w_tj + eps), w = 1 + s + s^2/2.

    Args:
      q: queries, [B, T, H, F] (F the feature dim, 16 in the paper); s = q . k / sqrt(F).
      k: keys, [B, T, H, F].
      v: values, [B, T, H, V].
      eps: added to the denominator (fla uses 1e-6, based/zoology 1e-12).
      chunk_size: tokens per chunk of the "xla" and Pallas paths; ignored by "reference".
      implementation: "reference" (quadratic, materialises [T, T]), "xla" (chunked scan, O(T) memory),
        "pallas_gpu" / "pallas_tpu" (kernels), a sequence of these tried in order, or None for the platform default.

    Returns:
      [B, T, H, V] in v's dtype (accumulated in float32).
    """
    impls = {
        "reference": lambda q, k, v: reference.based_quadratic(q, k, v, eps=eps),
        "xla": lambda q, k, v: xla.based_chunked(q, k, v, eps=eps, chunk_size=chunk_size)[0],
        "pallas_gpu": lambda q, k, v: based_pallas_impl("pallas_gpu", q, k, v, chunk_size=chunk_size, eps=eps),
        "pallas_tpu": lambda q, k, v: based_pallas_impl("pallas_tpu", q, k, v, chunk_size=chunk_size, eps=eps),
    }
    return dispatch("based_linear_attention", impls, implementation, q, k, v, default_order=DEFAULT_ORDER)


def based_prefill(
    q: Float[Array, "B T H F"],
    k: Float[Array, "B T H F"],
    v: Float[Array, "B T H V"],
    *,
    initial_state: BasedState | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
    implementation: str | Sequence[str] | None = None,
) -> tuple[Float[Array, "B T H V"], BasedState]:
    """`based_linear_attention` continuing from `initial_state`, also returning the state after the last token.

    Args:
      q, k, v, eps, chunk_size: as in `based_linear_attention`.
      initial_state: the state after earlier tokens; None means an empty prefix.
      implementation: "xla" (chunked scan) or "reference" (token-by-token recurrence), or a sequence, or None.
        "pallas_gpu" and "pallas_tpu" are accepted and run the "xla" scan (no prefill kernel).

    Returns:
      (o [B, T, H, V], BasedState after token T - 1).
    """
    impls = {
        "reference": lambda q, k, v: reference.based_recurrent(q, k, v, eps=eps, initial_state=initial_state),
        "xla": lambda q, k, v: xla.based_chunked(
            q, k, v, eps=eps, chunk_size=chunk_size, initial_state=initial_state
        ),
    }
    # Prefill has no kernel (it stays on the chunked XLA scan): the Pallas names select that scan, so that a layer
    # configured with implementation="pallas_gpu" runs its kernel in training and can still prefill.
    impls["pallas_gpu"] = impls["pallas_tpu"] = impls["xla"]
    return dispatch("based_prefill", impls, implementation, q, k, v, default_order=PREFILL_ORDER)


def based_init_state(batch_size: int, n_heads: int, feature_dim: int, value_dim: int) -> BasedState:
    """Empty decoding state: kv [B, H, P, V] and k [B, H, P] zeros, P = 1 + F + F(F+1)/2, float32.

    Its size does not depend on the sequence length.
    """
    return reference.based_init_state(batch_size, n_heads, feature_dim, value_dim)


def based_decode_step(
    state: BasedState,
    q_t: Float[Array, "B H F"],
    k_t: Float[Array, "B H F"],
    v_t: Float[Array, "B H V"],
    *,
    eps: float = 1e-6,
) -> tuple[BasedState, Float[Array, "B H V"]]:
    """Adds token t to the state and returns (new state, o_t [B, H, V]); o_t attends to tokens <= t."""
    return reference.based_step(state, q_t, k_t, v_t, eps=eps)
