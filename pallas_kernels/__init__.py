"""Pallas kernels of delta-jax: `sparse_prefill` (Delta Attention prefill) and `delta_decode` (DELTA).

Each kernel package has GPU (Triton), TPU (Mosaic) and XLA bodies and a pure-JAX reference.
"""

import jax

BACKENDS = ("gpu", "tpu", "xla")


def pick_backend(backend=None) -> str:
    """`backend` checked, or the one for the default platform: gpu, tpu, else xla (the CPU)."""
    if backend is None:
        platform = jax.default_backend()
        return "gpu" if platform in ("gpu", "cuda", "rocm") else ("tpu" if platform == "tpu" else "xla")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend
