"""Cross-lowering of Pallas kernels for TPU and CUDA from a CPU-only host (`lower(lowering_platforms=...)`).

Lowering under an abstract device runs the real Pallas→Mosaic TPU or Pallas→Triton lowering and MLIR verification,
which catches block-shape, layout and dtype rules that interpret mode never checks. It does not compile for the
device (Mosaic's backend passes, Triton→PTX): a real-device run is still needed for that.
"""

import warnings

import jax
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

ABSTRACT_DEVICES = {
    "tpu": AbstractDevice(device_kind="TPU v5 lite", platform="tpu", num_cores=1),
    "cuda": AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132),
}
# What each backend's kernel looks like in the lowered module text.
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def lower_text(fn, *specs: jax.ShapeDtypeStruct, platform: str, mesh: AbstractMesh | None = None) -> str:
    """Lowers `fn` (traced on `specs`) for `platform` ("tpu" or "cuda") and returns the StableHLO text.

    `mesh`: an AbstractMesh over ABSTRACT_DEVICES[platform] for sharded specs (shard_map); default: no mesh axes.

    The Triton lowering's DeprecationWarning ("The Pallas Triton backend is deprecated") is expected for "cuda" and
    silenced here; any other warning still fails the test (pytest runs with warnings as errors).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning
        )
        if mesh is None:
            mesh = AbstractMesh((), (), abstract_device=ABSTRACT_DEVICES[platform])
        with use_abstract_mesh(mesh):
            return jax.jit(fn).trace(*specs).lower(lowering_platforms=(platform,)).as_text()


def count_kernels(text: str, platform: str) -> int:
    """How many Pallas kernel custom calls for `platform` the lowered text holds."""
    return text.count(CUSTOM_CALL[platform])
