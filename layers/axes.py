"""Axis key, jaxtyping aliases and the decoding protocol shared by every layer.

Axis key for every jaxtyping string and einsum in effarch:
  B batch          T query length       S key / memory length
  H heads          G query groups per KV head
  K q/k head dim   V value head dim     D model width        F MLP width (or feature dim of a feature map)
  C chunk size     N number of chunks   M memory slots or landmarks
  E routed heads (MoH)

Kernel-facing tensors are head-minor, [B, T, H, K], like fla, tokamax and jax.nn.dot_product_attention.
"""

from typing import Any, Protocol, runtime_checkable

from jaxtyping import Array, Float, Int

Tokens = Int[Array, "B T"]
Hidden = Float[Array, "B T D"]
HiddenStep = Float[Array, "B D"]
Queries = Float[Array, "B T H K"]
Keys = Float[Array, "B S H K"]
Values = Float[Array, "B S H V"]

# Decode state of one mixer: any pytree of arrays (a KV cache, a recurrent state, a conv buffer).
State = Any


@runtime_checkable
class Mixer(Protocol):
    """What every token mixer (attention, convolution, linear attention, ...) implements.

    `__call__` is the parallel (training) form. Decoding goes through `init_state` / `decode_step`;
    `prefill` runs a whole prompt and returns the state after it. Prefill followed by decode steps
    equals the parallel forward pass (tests/conformance/ checks this for every registered mixer).
    """

    def __call__(self, x: Hidden) -> Hidden: ...

    def init_state(self, batch_size: int, max_len: int) -> State: ...

    def decode_step(self, state: State, x_t: HiddenStep) -> tuple[State, HiddenStep]: ...

    def prefill(self, state: State, x: Hidden) -> tuple[State, Hidden]: ...

    def state_size(self, seq_len: int) -> int:
        """Bytes of decode state (recurrent state or KV cache) per sequence after `seq_len` tokens."""
        ...
