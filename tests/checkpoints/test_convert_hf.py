"""Hugging Face safetensors -> orbax: every array equals the (transposed) HF weight, exactly."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import checkpoints
from checkpoints import CheckpointError
from delta_jax.config import ModelConfig

from .conftest import FAMILIES, leaves_by_path, make_tiny_hf


def expected_tree(sd):
    """The contract, written out independently of checkpoints.layout: HF name -> (path, transpose)."""
    out = {}
    for name, w in sd.items():
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            out[("embed", "embedding")] = w
        elif name == "model.norm.weight":
            out[("final_norm", "scale")] = w
        elif name == "lm_head.weight":
            out[("lm_head", "kernel")] = w.T
        elif parts[:2] == ["model", "layers"]:
            i, rest = parts[2], parts[3:]
            if rest == ["input_layernorm", "weight"]:
                out[("layers", i, "attn_norm", "scale")] = w
            elif rest == ["post_attention_layernorm", "weight"]:
                out[("layers", i, "mlp_norm", "scale")] = w
            elif rest[0] == "self_attn" and rest[1] in ("q_norm", "k_norm"):
                out[("layers", i, "attn", rest[1], "scale")] = w
            elif rest[0] in ("self_attn", "mlp"):
                group = "attn" if rest[0] == "self_attn" else "mlp"
                if rest[2] == "weight":
                    out[("layers", i, group, rest[1], "kernel")] = w.T
                else:
                    out[("layers", i, group, rest[1], "bias")] = w
            else:
                raise AssertionError(name)
        elif not name.endswith("inv_freq"):
            raise AssertionError(name)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_family_exact(tmp_path, family):
    sd = make_tiny_hf(tmp_path / "hf", family, seed=FAMILIES.index(family))
    dst = checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    params = checkpoints.load_params(dst)
    got = leaves_by_path(params)
    want = expected_tree(sd)
    assert set(got) == set(want)
    for path, w in want.items():
        assert got[path].dtype == np.float32, path
        np.testing.assert_array_equal(got[path], w, err_msg=str(path))
    has_bias = ("layers", "0", "attn", "q_proj", "bias") in got
    has_qk_norm = ("layers", "0", "attn", "q_norm", "scale") in got
    assert has_bias == (family == "qwen2")
    assert has_qk_norm == (family == "qwen3")
    mc = ModelConfig.from_hf(checkpoints.load_config(dst))
    assert (mc.model_type, mc.attention_bias, mc.qk_norm, mc.tie_embeddings) == (family, has_bias, has_qk_norm, False)
    assert mc.head_dim == (12 if family == "qwen3" else 8)
    manifest = json.load(open(os.path.join(dst, "delta_jax.json")))
    assert manifest["source_format"] == "safetensors" and manifest["dtype"] == "float32"
    assert not any(n.startswith(".") for n in os.listdir(tmp_path)), "temporary folder left behind"


def test_sharded_bf16_stays_bf16_and_tied(tmp_path):
    import torch
    sd = make_tiny_hf(tmp_path / "hf", "qwen2", seed=7, torch_dtype=torch.bfloat16, max_shard_size="8KB",
                      tie_word_embeddings=True)
    index = json.load(open(tmp_path / "hf" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 3
    dst = checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    got = leaves_by_path(checkpoints.load_params(dst))
    want = expected_tree(sd)
    want.pop(("lm_head", "kernel"), None)
    assert set(got) == set(want)
    for path, w in want.items():
        assert got[path].dtype == ml_dtypes.bfloat16, path
        np.testing.assert_array_equal(got[path].astype(np.float32), w, err_msg=str(path))
    cfg = checkpoints.load_config(dst)
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "bfloat16"
    assert ModelConfig.from_hf(cfg).tie_embeddings


def test_cast_on_convert_and_on_load(tmp_path):
    sd = make_tiny_hf(tmp_path / "hf", "llama", seed=3)
    dst = checkpoints.convert(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", progress=False)
    got = leaves_by_path(checkpoints.load_params(dst))
    w = sd["model.layers.1.mlp.down_proj.weight"].T
    k = got[("layers", "1", "mlp", "down_proj", "kernel")]
    assert k.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(k, w.astype(ml_dtypes.bfloat16))
    up = checkpoints.load_params(dst, dtype="float32")
    assert up["embed"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(up["embed"]["embedding"]),
                                  sd["model.embed_tokens.weight"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_tokenizer_and_generation_config_copied(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    make_tiny_hf(tmp_path / "hf", "llama", seed=1)
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghij")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(str(tmp_path / "hf"))
    dst = checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    copied = [n for n in os.listdir(tmp_path / "hf") if not n.endswith(".safetensors") and n != "config.json"]
    assert "tokenizer.json" in copied and "generation_config.json" in copied
    for name in copied:
        assert open(os.path.join(dst, name), "rb").read() == open(tmp_path / "hf" / name, "rb").read(), name
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(dst)
    assert again("abc").input_ids == fast("abc").input_ids


def test_cli_module_runs(tmp_path):
    sd = make_tiny_hf(tmp_path / "hf", "mistral", seed=5)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = ("import sys; from checkpoints.convert_hf import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported by the conversion'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf"), str(tmp_path / "out"), "--quiet"],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(checkpoints.__file__)))
    assert r.returncode == 0, r.stderr
    got = leaves_by_path(checkpoints.load_params(tmp_path / "out"))
    np.testing.assert_array_equal(got[("layers", "0", "attn", "o_proj", "kernel")],
                                  sd["model.layers.0.self_attn.o_proj.weight"].T)
    r = subprocess.run([sys.executable, "-m", "checkpoints.convert_hf", str(tmp_path / "hf"), str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(checkpoints.__file__)))
    assert r.returncode == 2 and "not empty" in r.stderr


# ---- errors ---------------------------------------------------------------------------------------


def test_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.convert(tmp_path / "nope", tmp_path / "out", progress=False)


def test_missing_config(tmp_path):
    make_tiny_hf(tmp_path / "hf", "llama")
    os.remove(tmp_path / "hf" / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_unknown_model_type(tmp_path):
    make_tiny_hf(tmp_path / "hf", "llama")
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    cfg["model_type"] = "gpt_neox"
    json.dump(cfg, open(tmp_path / "hf" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="gpt_neox"):
        checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)


def _rewrite_safetensors(path, drop=(), add=None):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path))
    for k in drop:
        del tensors[k]
    tensors.update(add or {})
    save_file(tensors, str(path))


def test_missing_tensor_named(tmp_path):
    make_tiny_hf(tmp_path / "hf", "qwen3")
    _rewrite_safetensors(tmp_path / "hf" / "model.safetensors", drop=["model.layers.1.self_attn.k_norm.weight"])
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_norm\.weight"):
        checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_unknown_tensor_named_and_inv_freq_ignored(tmp_path):
    make_tiny_hf(tmp_path / "hf", "llama")
    st = tmp_path / "hf" / "model.safetensors"
    _rewrite_safetensors(st, add={"model.layers.0.self_attn.rotary_emb.inv_freq": np.arange(4, dtype=np.float32)})
    checkpoints.convert(tmp_path / "hf", tmp_path / "ok", progress=False)
    _rewrite_safetensors(st, add={"model.layers.0.mlp.extra.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra\.weight"):
        checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)


def test_wrong_shape_named(tmp_path):
    make_tiny_hf(tmp_path / "hf", "llama")
    _rewrite_safetensors(tmp_path / "hf" / "model.safetensors",
                         add={"model.norm.weight": np.random.default_rng(0).normal(size=(31,)).astype(np.float32)})
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*\(31,\).*\(32,\)"):
        checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)


def test_no_safetensors_and_bad_dtype_and_nonempty_dst(tmp_path):
    make_tiny_hf(tmp_path / "hf", "llama")
    with pytest.raises(CheckpointError, match="float64"):
        checkpoints.convert(tmp_path / "hf", tmp_path / "out", dtype="float64", progress=False)
    checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    with pytest.raises(CheckpointError, match="not empty"):
        checkpoints.convert(tmp_path / "hf", tmp_path / "out", progress=False)
    checkpoints.convert(tmp_path / "hf", tmp_path / "out", dtype="bfloat16", progress=False, overwrite=True)
    assert checkpoints.load_config(tmp_path / "out")["torch_dtype"] == "bfloat16"
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoints.convert(tmp_path / "hf", tmp_path / "out2", progress=False)
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        checkpoints.convert(tmp_path / "weights.bin", tmp_path / "out3", progress=False)


_PEAK = """
import json, sys
import checkpoints

def status(key):  # VmHWM is this process's own peak; ru_maxrss would include the forking parent's
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

checkpoints.convert(sys.argv[1] + "/warm", sys.argv[1] + "/warm_out", progress=False)
before = status("VmRSS")
checkpoints.convert(sys.argv[1] + "/big", sys.argv[1] + "/big_out", progress=False)
peak = status("VmHWM")
print(json.dumps({"before": before, "peak": peak}))
"""


def test_peak_memory_about_one_copy(tmp_path):
    """Streaming: converting N bytes of bf16 weights raises peak RSS by about N (not 2-3 N)."""
    import json as _json

    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    h, inter, layers, vocab = 512, 2048, 8, 8192
    cfg = dict(model_type="llama", vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    nbytes = 0
    for name, n_layers in (("big", layers), ("warm", 1)):
        os.makedirs(tmp_path / name)
        json.dump(dict(cfg, num_hidden_layers=n_layers), open(tmp_path / name / "config.json", "w"))
        t = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
        for i in range(n_layers):
            for k, s in (("input_layernorm", (h,)), ("post_attention_layernorm", (h,)),
                         ("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                         ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                         ("mlp.down_proj", (h, inter))):
                t[f"model.layers.{i}.{k}.weight"] = s
        arrays = {k: rng.standard_normal(s, dtype=np.float32).astype(ml_dtypes.bfloat16) for k, s in t.items()}
        if name == "big":
            nbytes = sum(a.nbytes for a in arrays.values())
        save_file(arrays, str(tmp_path / name / "model.safetensors"))
        del arrays
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(checkpoints.__file__))
    r = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path)], env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _json.loads(r.stdout.strip().splitlines()[-1])
    assert nbytes > 70e6
    assert m["peak"] - m["before"] < 1.4 * nbytes, (m, nbytes)


def test_check_config_follows_the_model_rules():
    from checkpoints.io import CheckpointError
    from checkpoints.layout import check_config
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    # transformers >= 5 writes attention_bias: null for Qwen2, whose q/k/v projections do have biases
    assert check_config({**base, "model_type": "qwen2", "attention_bias": None})["attention_bias"] is True
    assert check_config({**base, "model_type": "llama"})["attention_bias"] is False
    with pytest.raises(CheckpointError, match="lacks 'hidden_size'"):
        check_config({**base, "model_type": "llama", "hidden_size": None})
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'"):
        check_config({**base, "model_type": "gpt2"})
