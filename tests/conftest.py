import os

# Single-device by default; tests that need 8 CPU devices start a subprocess with its own XLA_FLAGS.
os.environ.setdefault("XLA_FLAGS", "")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
