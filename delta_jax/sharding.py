"""The device mesh and the one rule table mapping logical axis names to mesh axes.

Mesh axes: `data` (batch, decode slots and the KV pages they own) and `model` (attention heads, MLP,
vocabulary). A logical axis whose
size the mesh axis does not divide is replicated (for example 3 KV heads on a `model` axis of 2).
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from delta_jax.config import ConfigError, ModelConfig

RULES = {
    "batch": "data",
    "slots": "data",
    "pages": "data",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "vocab": "model",
    "embed": None,
    "seq": None,
    "head_dim": None,
}

POOL_AXES = ("kv_heads", "pages", None, "head_dim")  # [kv_heads, pages, page_size, head_dim]

_PARAM_AXES = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"q_proj/kernel$", ("embed", "heads")),
    (r"q_proj/bias$", ("heads",)),
    (r"[kv]_proj/kernel$", ("embed", "kv_heads")),
    (r"[kv]_proj/bias$", ("kv_heads",)),
    (r"o_proj/kernel$", ("heads", "embed")),
    (r"(gate|up)_proj/kernel$", ("embed", "mlp")),
    (r"down_proj/kernel$", ("mlp", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(norm)/scale$", (None,)),
)

_current: list = []


def make_mesh(spec=None, devices: Optional[Sequence] = None, cfg: Optional[ModelConfig] = None) -> Mesh:
    """A `(data, model)` mesh from `"data=2,model=4"`, a dict, or None (all devices on `model` as far
    as the head counts allow, the rest on `data`)."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if spec is None:
        model = n
        if cfg is not None:
            model = math.gcd(n, cfg.num_kv_heads)
        sizes = {"data": n // model, "model": model}
    else:
        if isinstance(spec, str):
            sizes = {}
            for part in spec.split(","):
                m = re.fullmatch(r"\s*(data|model)\s*=\s*(\d+)\s*", part)
                if not m:
                    raise ConfigError(f"bad mesh {spec!r}: expected e.g. data=2,model=4")
                sizes[m.group(1)] = int(m.group(2))
        else:
            sizes = dict(spec)
        sizes.setdefault("data", 1)
        sizes.setdefault("model", 1)
        if sizes["data"] * sizes["model"] != n:
            raise ConfigError(f"mesh data={sizes['data']} x model={sizes['model']} needs "
                              f"{sizes['data'] * sizes['model']} devices, {n} are available")
    return Mesh(np.asarray(devices).reshape(sizes["data"], sizes["model"]), ("data", "model"))


def spec_for(axes: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for logical `axes`, replicating any axis the mesh axis does not divide."""
    out = []
    for name, size in zip(axes, shape):
        mesh_axis = RULES.get(name) if name else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis] == 0:
            out.append(mesh_axis)
        else:
            out.append(None)
    return P(*out)


def param_axes(path: str) -> tuple:
    """Logical axes of the parameter at `path` (e.g. 'layers/3/attn/q_proj/kernel')."""
    for pattern, axes in _PARAM_AXES:
        if re.search(pattern, path):
            return axes
    raise KeyError(f"no sharding rule for parameter {path}")


def param_sharding(path: str, mesh: Mesh, cfg: ModelConfig) -> NamedSharding:
    """Sharding of the parameter at `path`; heads are split whole or not at all."""
    units = {"heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "mlp": cfg.intermediate_size,
             "vocab": cfg.vocab_size, "embed": cfg.hidden_size}
    spec = []
    for name in param_axes(path):
        mesh_axis = RULES.get(name) if name else None
        ok = mesh_axis is not None and units[name] % mesh.shape[mesh_axis] == 0
        spec.append(mesh_axis if ok else None)
    return NamedSharding(mesh, P(*spec))


def pool_sharding(shape, mesh: Mesh) -> NamedSharding:
    """Sharding of one layer's pages `[kv_heads, pages, page_size, head_dim]` (`delta_jax.cache`)."""
    return NamedSharding(mesh, spec_for(POOL_AXES, shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def slot_sharding(ndim: int, mesh: Mesh) -> NamedSharding:
    """Sharding of a per-slot array `[slots, ...]`: slots over `data` (the pool's pages follow them)."""
    return NamedSharding(mesh, P(RULES["slots"], *([None] * (ndim - 1))))


def heads_divide(kv_heads: int, mesh: Optional[Mesh]) -> bool:
    """Whether attention runs per head shard (`kv_heads` divisible by a `model` axis larger than 1)."""
    return mesh is not None and mesh.shape["model"] > 1 and kv_heads % mesh.shape["model"] == 0


@contextlib.contextmanager
def use_mesh(mesh: Optional[Mesh]):
    """Makes `mesh` the one the attention kernels wrap themselves in `shard_map` for, while tracing."""
    _current.append(mesh)
    try:
        yield
    finally:
        _current.pop()


def current_mesh() -> Optional[Mesh]:
    return _current[-1] if _current else None


def shard_map(fn, mesh: Mesh, in_specs, out_specs):
    """`shard_map` across jax versions (jax.shard_map or jax.experimental.shard_map)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as sm
    return sm(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
