"""effarch layers inside Flax Linen models (layers/linen.py over nnx.bridge).

Every public layer wrapped with `to_linen` computes what the NNX layer computes with the same weights, its
decoding methods are reachable through the wrapper, and a Linen LM with an effarch mixer inits, trains a step with
optax and decodes the same logits as its parallel forward pass.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import effarch.layers as L
from effarch.arches.lm import Block, ModelConfig
from effarch.layers.linen import to_linen

D, B, T = 24, 2, 7  # T is not a multiple of the chunk / block sizes (4)

MIXERS = {
    "attention": (L.Attention, (D, L.AttentionConfig(n_heads=3, n_kv_heads=1)), {}),
    "based": (L.BasedLinearAttention, (D, L.BasedConfig(feature_dim=4, n_heads=2, chunk_size=4)), {}),
    "base_conv": (L.BaseConv, (D, L.ConvConfig()), {}),
    "zoology_base_conv": (L.ZoologyBaseConv, (D, L.ConvConfig()), {}),
    "lightning": (L.LightningAttention, (D, L.LightningConfig(n_heads=2, block_size=4)), {"layer_idx": 1,
                                                                                         "n_layers": 2}),
    "sliding_window": (L.SlidingWindowAttention, (D, L.SlidingWindowConfig(n_heads=2, window=3)), {}),
    "diffqkv": (L.DiffQKVAttention, (D, L.DiffQKVConfig(n_q_heads=6, n_k_heads=1, n_v_heads=3, aug_q_hidden=10)),
                {}),
    "landmark": (L.LandmarkAttention, (D, L.LandmarkConfig(n_heads=2, block_len=3, tile=8)), {}),
    "moh": (L.MoHAttention, (D, L.MoHConfig(n_heads=3, n_shared=1, top_k=1)), {}),
    "titans_lmm": (L.NeuralMemory, (D, L.NeuralMemoryConfig(n_heads=2, chunk_size=4, batch_size=4,
                                                              n_persistent=1)), {}),
    "titans_mac": (L.MemoryAsContext, (D, L.NeuralMemoryConfig(n_heads=2, chunk_size=4, batch_size=4, n_persistent=1),
                                       L.TitansAttentionConfig(n_heads=2, segment_len=8)), {}),
    "titans_mag": (L.MemoryAsGate, (D, L.NeuralMemoryConfig(n_heads=2, chunk_size=4, n_persistent=1),
                                    L.TitansAttentionConfig(n_heads=2, window=3)), {}),
    "titans_mal": (L.MemoryAsLayer, (D, L.NeuralMemoryConfig(n_heads=2, chunk_size=4, n_persistent=1),
                                     L.TitansAttentionConfig(n_heads=2, window=3)), {}),
    "block": (Block, (ModelConfig(d_model=D, n_layers=1, mixers=("based",),
                                  based=L.BasedConfig(feature_dim=4, chunk_size=4)), 0), {}),
}
OTHERS = {
    "swiglu": (L.SwiGLU, (D, 40), {}),
    "sglu": (L.SGLU, (D, 40), {}),
    "rms_norm": (L.rms_norm, (D,), {}),
    "srms_norm": (L.SRMSNorm, (), {}),
}


def _nnx_with(cls, args, kwargs, params):
    """The NNX layer holding the Linen wrapper's (unboxed) parameters."""
    module = cls(*args, **kwargs) if cls is L.SRMSNorm else cls(*args, **kwargs, rngs=nnx.Rngs(123))
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, nn.unbox(params))
    nnx.update(module, state)
    return module


# The bridge is mixer-agnostic; the Titans layers (slowest to compile) run only in the slow suite.
_SLOW = {"titans_lmm", "titans_mac", "titans_mag", "titans_mal"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in [*MIXERS, *OTHERS]])
def test_to_linen_matches_the_nnx_layer(name):
    cls, args, kwargs = {**MIXERS, **OTHERS}[name]
    wrapped = to_linen(cls, *args, **kwargs)
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    variables = wrapped.init(jax.random.key(1), x)
    params = variables.get("params", {})
    if name == "srms_norm":
        assert not params
    else:
        assert jax.tree.leaves(params), "the wrapper holds no parameters"
    y_linen = wrapped.apply(variables, x)
    y_nnx = _nnx_with(cls, args, kwargs, params)(x)
    assert y_linen.shape == (B, T, D)
    np.testing.assert_allclose(y_linen, y_nnx, rtol=1e-6, atol=1e-6)


# Each mixer's own decoding is tested against its parallel form in tests/conformance/; here the point is that
# the methods reach the NNX layer through the wrapper, with a dict KV cache (attention) and through a Block.
@pytest.mark.parametrize("name", ["attention", "block"])
def test_to_linen_decodes_like_the_parallel_form(name):
    cls, args, kwargs = MIXERS[name]
    wrapped = to_linen(cls, *args, **kwargs)
    x = jax.random.normal(jax.random.key(0), (B, T, D))
    variables = wrapped.init(jax.random.key(1), x)
    y = wrapped.apply(variables, x)
    # The block's decoding state is its mixer's; a mixer's is its own.
    init_method = (lambda m, b, t: m.mixer.init_state(b, t)) if name == "block" else cls.init_state
    state = wrapped.apply(variables, B, T, nnx_method=init_method)
    state, y_pre = wrapped.apply(variables, state, x[:, :3], nnx_method=cls.prefill)
    steps = [y_pre]
    for t in range(3, T):
        state, y_t = wrapped.apply(variables, state, x[:, t], nnx_method=cls.decode_step)
        steps.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(steps, 1), y, rtol=1e-4, atol=1e-5)


class LinenLM(nn.Module):
    """A Linen LM of someone else's design with an effarch mixer between its own embedding and head."""

    vocab: int = 13
    d_model: int = D

    def setup(self):
        self.embed = nn.Embed(self.vocab, self.d_model)
        self.mixer = to_linen(L.BasedLinearAttention, self.d_model, L.BasedConfig(feature_dim=4, chunk_size=4))
        self.norm = nn.RMSNorm()
        self.head = nn.Dense(self.vocab)

    def __call__(self, tokens):
        h = self.embed(tokens)
        return self.head(self.norm(h + self.mixer(h)))

    def init_state(self, batch_size, max_len):
        return self.mixer.init_state(batch_size, max_len)

    def decode_step(self, state, token):
        h = self.embed(token)
        state, y = self.mixer.decode_step(state, h)
        return state, self.head(self.norm(h + y))


def test_linen_model_with_an_effarch_mixer_trains_and_decodes():
    model = LinenLM()
    tokens = jax.random.randint(jax.random.key(0), (B, T + 1), 0, model.vocab)
    params = model.init(jax.random.key(1), tokens[:, :-1])["params"]
    # The mixer's weights carry effarch's logical axis names as Linen partitioning metadata.
    specs = nn.get_partition_spec(params)["mixer"]
    assert tuple(specs["q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["out_proj"]["kernel"]) == ("heads", "embed")

    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss, grads

    new_params, opt_state, loss0, grads = step(params, opt_state)
    mixer_grad = nn.unbox(grads)["mixer"]["q_proj"]["kernel"]
    assert float(jnp.abs(mixer_grad).max()) > 0, "no gradient reached the effarch mixer"
    assert not np.allclose(nn.unbox(new_params)["mixer"]["q_proj"]["kernel"],
                           nn.unbox(params)["mixer"]["q_proj"]["kernel"])
    assert float(jax.jit(loss_fn)(new_params)) < float(loss0)

    parallel = model.apply({"params": new_params}, tokens)
    state = model.apply({"params": new_params}, B, T + 1, method=LinenLM.init_state)
    decode = jax.jit(lambda p, s, tok: model.apply({"params": p}, s, tok, method=LinenLM.decode_step))
    decoded = []
    for t in range(T + 1):
        state, logits_t = decode(new_params, state, tokens[:, t])
        decoded.append(logits_t)
    np.testing.assert_allclose(jnp.stack(decoded, 1), parallel, rtol=1e-4, atol=1e-5)


def test_to_linen_refuses_rngs():
    with pytest.raises(ValueError, match="without rngs"):
        to_linen(L.SwiGLU, D, 40, rngs=nnx.Rngs(0))


def test_layers_package_exports_resolve():
    for name in L.__all__:
        assert getattr(L, name) is not None, name
