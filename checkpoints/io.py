"""Orbax save/restore of the parameter tree, and the converted-folder layout.

A converted folder holds `params/` (an orbax checkpoint of the nested parameter dict),
`config.json` (Hugging Face style), the tokenizer files and `delta_jax.json` (a manifest).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional, Union

import jax
import numpy as np

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "delta_jax.json"
FORMAT_VERSION = 1
CHUNK_BYTES = 64 << 20

DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint or argument that cannot be converted or restored; the message names it."""


def canonical_dtype(dtype) -> Optional[str]:
    """Returns "float32" / "bfloat16" / "float16" for a dtype-like, None for None."""
    if dtype is None:
        return None
    try:
        name = np.dtype(jax.numpy.dtype(dtype)).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)} or None")
    return name


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(jax.numpy.dtype(name))


def is_converted(folder: Union[str, os.PathLike]) -> bool:
    """True when `folder` holds `config.json` and an orbax `params/` checkpoint."""
    folder = os.fspath(folder)
    return (os.path.isfile(os.path.join(folder, CONFIG_FILE))
            and os.path.isdir(os.path.join(folder, PARAMS_DIR)))


def load_config(folder: Union[str, os.PathLike]) -> dict:
    """The HF-style `config.json` dict of a converted folder."""
    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {CONFIG_FILE} in {os.fspath(folder)!r}")
    with open(path) as f:
        return json.load(f)


def load_manifest(folder: Union[str, os.PathLike]) -> Optional[dict]:
    path = os.path.join(os.fspath(folder), MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _checkpointer():
    import orbax.checkpoint as ocp
    return ocp.StandardCheckpointer()


def _saver():
    """A PyTree checkpointer without compression: zstd would hold a second copy of every array while saving."""
    import orbax.checkpoint as ocp
    try:
        handler = ocp.PyTreeCheckpointHandler(use_compression=False)
    except TypeError:  # orbax versions without the option
        handler = ocp.PyTreeCheckpointHandler()
    return ocp.Checkpointer(handler)


def host_array(array: np.ndarray):
    """A jax.Array on the host CPU device holding `array` (numpy when no CPU backend is enabled).

    Orbax writes CPU jax.Arrays without an extra host copy, unlike numpy leaves.
    """
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:
        return array
    return jax.device_put(array, cpu)


def save_params(tree: Mapping[str, Any], folder: Union[str, os.PathLike], *,
                config: Optional[dict] = None, force: bool = False) -> str:
    """Saves a nested dict of arrays (numpy or jax) to `folder/params`; writes `config.json` if given.

    Returns the absolute path of `folder`.
    """
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PARAMS_DIR)
    if os.path.exists(path) and not force:
        raise CheckpointError(f"{path!r} already exists; pass force=True to overwrite")
    import orbax.checkpoint as ocp
    try:  # chunked storage lets a sharded restore read only the chunks of its shards
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), dict(tree))
    except TypeError:
        save_args = None
    ckptr = _saver()
    try:
        ckptr.save(path, args=ocp.args.PyTreeSave(dict(tree), save_args=save_args), force=force)
    finally:
        ckptr.close()
    if config is not None:
        with open(os.path.join(folder, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return folder


def _metadata_tree(ckptr, path: str):
    """The saved tree of ArrayMetadata (shape, dtype), across orbax 0.12.x metadata return types."""
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    return meta


def path_name(path) -> str:
    """'layers/0/attn/q_proj/kernel' for a jax tree path of dict keys."""
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


ShardingSpec = Union[None, jax.sharding.Sharding, Callable[[str], jax.sharding.Sharding], Mapping[str, Any]]


def _resolve_shardings(meta, shardings: ShardingSpec):
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: default, meta)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, meta)
    if callable(shardings):
        def one(path, _):
            s = shardings(path_name(path))
            if not isinstance(s, jax.sharding.Sharding):
                raise CheckpointError(f"sharding callable returned {s!r} for {path_name(path)!r}, not a Sharding")
            return s
        return jax.tree_util.tree_map_with_path(one, meta)
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    if jax.tree_util.tree_structure(meta) != jax.tree_util.tree_structure(shardings, is_leaf=is_sharding):
        want = {path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(meta)}
        got = {path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(shardings, is_leaf=is_sharding)}
        raise CheckpointError(
            f"shardings tree does not match the checkpoint tree (missing {sorted(want - got)[:3]}, "
            f"extra {sorted(got - want)[:3]}); pass a tree with one Sharding per array, one Sharding, "
            "or a callable path -> Sharding")
    return shardings


def load_params(folder: Union[str, os.PathLike], *, dtype=None, shardings: ShardingSpec = None) -> dict:
    """Restores the parameter tree of a converted folder as jax.Arrays.

    `shardings`: None (first device), one Sharding for every array, a tree of Shardings matching the
    parameter tree, or a callable `path -> Sharding` with paths like "layers/0/attn/q_proj/kernel".
    Each array is read directly into its shards. `dtype` ("float32", "bfloat16", ...) casts on restore.
    """
    folder = os.path.abspath(os.fspath(folder))
    path = os.path.join(folder, PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"no converted parameters at {path!r}; run `delta-jax convert SRC {folder}` first")
    dtype = canonical_dtype(dtype)
    ckptr = _checkpointer()
    try:
        meta = _metadata_tree(ckptr, path)
        shard_tree = _resolve_shardings(meta, shardings)
        target = jax.tree.map(
            lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), numpy_dtype(dtype) if dtype else m.dtype, sharding=s),
            meta, shard_tree)
        return ckptr.restore(path, target)
    finally:
        ckptr.close()


def param_shapes(folder: Union[str, os.PathLike]) -> dict:
    """The saved tree as jax.ShapeDtypeStruct leaves, without reading any array."""
    path = os.path.join(os.path.abspath(os.fspath(folder)), PARAMS_DIR)
    ckptr = _checkpointer()
    try:
        meta = _metadata_tree(ckptr, path)
    finally:
        ckptr.close()
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta)
