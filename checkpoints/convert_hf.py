"""Convert a Hugging Face safetensors folder or a GGUF file into a delta-jax folder (orbax params,
config.json, tokenizer, manifest).

    python -m checkpoints.convert_hf SRC DST [--dtype bfloat16|float32|float16] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Optional, Union

import numpy as np

from . import layout
from .io import (CONFIG_FILE, FORMAT_VERSION, MANIFEST_FILE, CheckpointError, canonical_dtype,
                 save_params)
from .safetensors_reader import SafetensorsFile, model_files

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _convert_safetensors(src: str, tmp: str, dtype: Optional[str], progress: bool) -> dict:
    cfg_path = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"no {CONFIG_FILE} in {src!r}; expected a Hugging Face model folder or a .gguf file")
    with open(cfg_path) as f:
        raw = json.load(f)
    files = [SafetensorsFile(p) for p in model_files(src)]
    owner, order = {}, []
    for st in files:
        for name in st.names():
            order.append(name)
            owner[name] = st
    if "tie_word_embeddings" not in raw:
        raw = dict(raw, tie_word_embeddings="lm_head.weight" not in owner)
    cfg = layout.check_config(raw)
    expected = layout.expected_shapes(cfg)
    names = layout.check_names(order, expected, repr(src))
    tree = layout.build_tree(names, expected, lambda n: owner[n].read(n), dtype, os.path.basename(src), progress)
    source_dtype = np.dtype(tree["embed"]["embedding"].dtype).name
    cfg["torch_dtype"] = dtype or source_dtype
    cfg.pop("dtype", None)
    _log(progress, f"saving {len(names)} tensors to {tmp}")
    save_params(tree, tmp, config=cfg)
    del tree
    for name in TOKENIZER_FILES:
        p = os.path.join(src, name)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(tmp, name))
    return {"source_format": "safetensors", "dtype": dtype or source_dtype, "tensors": len(names)}


def _convert_gguf(src: str, tmp: str, dtype: Optional[str], progress: bool) -> dict:
    from . import gguf_reader
    reader = gguf_reader.open_gguf(src)
    cfg = gguf_reader.hf_config(reader, src)
    tensors = gguf_reader.GGUFTensors(reader, cfg, src)
    cfg = layout.check_config(cfg)
    expected = layout.expected_shapes(cfg)
    names = layout.check_names(tensors.names(), expected, repr(src))
    out_dtype = dtype or "float32"
    tree = layout.build_tree(names, expected, tensors.read, out_dtype, os.path.basename(src), progress)
    cfg["torch_dtype"] = out_dtype
    _log(progress, f"saving {len(names)} tensors to {tmp}")
    save_params(tree, tmp, config=cfg)
    del tree, tensors, reader
    _log(progress, "building the tokenizer from the GGUF metadata")
    export_gguf_tokenizer(src, tmp, cfg)
    return {"source_format": "gguf", "dtype": out_dtype, "tensors": len(names)}


def export_gguf_tokenizer(src: str, dst: str, cfg: dict) -> None:
    """Writes the GGUF file's tokenizer (see `gguf_tokenizer`) and generation_config.json (bos/eos/pad ids)."""
    from . import gguf_tokenizer
    gguf_tokenizer.export(src, dst)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    with open(os.path.join(dst, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


def convert(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], *, dtype=None, progress: bool = True,
            overwrite: bool = False) -> str:
    """Converts `src` (a HF folder with config.json and safetensors, or a `.gguf` file) into `dst`.

    dtype: None keeps the source dtype (GGUF dequantizes to float32); "bfloat16"/"float32"/"float16" cast.
    The result is written to a temporary folder beside `dst` and renamed into place, so a partial
    conversion is never visible. Returns the absolute path of `dst`.
    """
    src = os.path.abspath(os.path.expanduser(os.fspath(src)))
    dst = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    dtype = canonical_dtype(dtype)
    if not os.path.exists(src):
        raise CheckpointError(f"source {src!r} does not exist")
    is_gguf = os.path.isfile(src)
    if is_gguf and not src.endswith(".gguf"):
        raise CheckpointError(f"source {src!r} is a file but not a .gguf; expected a HF model folder or a .gguf file")
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            raise CheckpointError(f"destination {dst!r} exists and is not a folder")
        if os.listdir(dst) and not overwrite:
            raise CheckpointError(f"destination {dst!r} is not empty; remove it or pass overwrite=True")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        if is_gguf:
            info = _convert_gguf(src, tmp, dtype, progress)
        else:
            info = _convert_safetensors(src, tmp, dtype, progress)
        manifest = {"format_version": FORMAT_VERSION, "source": src, **info}
        with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=2)
        if os.path.exists(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rename(dst, os.path.join(old, "x"))
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(progress, f"converted {src} -> {dst} ({info['tensors']} tensors, {info['dtype']})")
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints.convert_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="Hugging Face model folder (config.json + safetensors) or a .gguf file")
    p.add_argument("dst", help="output folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast parameters (default: keep the source dtype; GGUF gives float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    try:
        convert(args.src, args.dst, dtype=args.dtype, progress=not args.quiet, overwrite=args.overwrite)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
