"""GGUF -> orbax: dequantization, the q/k rotary un-permutation, config and tokenizer export."""

import os

import numpy as np
import pytest

import checkpoints
from checkpoints import CheckpointError, convert_hf, gguf_reader
from delta_jax.config import ModelConfig

from .conftest import leaves_by_path, llama_cpp_permute, make_tiny_hf, tiny_hf_config, write_tiny_gguf


def _rope_scores(q, k, pos_q, pos_k, theta, interleaved):
    """q.k after rotary embedding; interleaved pairs (2i, 2i+1) (llama.cpp) or half-split (i, i+d/2) (HF)."""
    d = q.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)

    def rot(x, pos):
        ang = pos[:, None] * inv[None, :]
        cos, sin = np.cos(ang), np.sin(ang)
        if interleaved:
            a, b = x[:, 0::2], x[:, 1::2]
            out = np.empty_like(x)
            out[:, 0::2], out[:, 1::2] = a * cos - b * sin, a * sin + b * cos
            return out
        a, b = x[:, : d // 2], x[:, d // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

    return rot(q, pos_q) @ rot(k, pos_k).T


@pytest.mark.parametrize("n_head,head_dim", [(4, 8), (3, 64), (1, 2)])
def test_unpermute_inverts_llama_cpp_and_preserves_rope_scores(n_head, head_dim):
    rng = np.random.default_rng(n_head * 100 + head_dim)
    hidden = 16
    wq = rng.normal(size=(n_head * head_dim, hidden))
    wk = rng.normal(size=(n_head * head_dim, hidden))
    gq, gk = llama_cpp_permute(wq, n_head), llama_cpp_permute(wk, n_head)
    assert not np.array_equal(gq, wq) or head_dim == 2
    np.testing.assert_array_equal(gguf_reader.unpermute_rotary(gq, n_head), wq)
    x = rng.normal(size=(5, hidden))
    pos = np.array([0.0, 3.0, 17.0, 256.0, 1000.0])
    for h in range(n_head):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        ref = _rope_scores(x @ gq[sl].T, x @ gk[sl].T, pos, pos[::-1], 10000.0, interleaved=True)
        uq, uk = gguf_reader.unpermute_rotary(gq, n_head), gguf_reader.unpermute_rotary(gk, n_head)
        ours = _rope_scores(x @ uq[sl].T, x @ uk[sl].T, pos, pos[::-1], 10000.0, interleaved=False)
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(CheckpointError, match="un-permute"):
        gguf_reader.unpermute_rotary(rng.normal(size=(6, 4)), 4)


@pytest.fixture
def no_tokenizer(monkeypatch):
    """The tiny GGUFs carry no vocabulary; tokenizer export is covered by the SmolLM2 tests."""
    monkeypatch.setattr(convert_hf, "export_gguf_tokenizer", lambda src, dst, cfg: None)


@pytest.mark.parametrize("tied,f16", [(False, False), (True, True)])
def test_tiny_gguf_matches_hf_exactly(tmp_path, no_tokenizer, tied, f16):
    sd = make_tiny_hf(tmp_path / "hf", "llama", seed=11 + tied, tie_word_embeddings=tied)
    cfg = tiny_hf_config("llama")
    if tied:
        sd.pop("lm_head.weight", None)
    write_tiny_gguf(tmp_path / "m.gguf", sd, cfg, f16=f16)
    dst = checkpoints.convert(tmp_path / "m.gguf", tmp_path / "out", progress=False)
    got = leaves_by_path(checkpoints.load_params(dst))
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    k = sd["model.layers.1.self_attn.k_proj.weight"]
    cast = (lambda a: a.astype(np.float16).astype(np.float32)) if f16 else (lambda a: a)
    np.testing.assert_array_equal(got[("layers", "1", "attn", "q_proj", "kernel")], cast(q).T)
    np.testing.assert_array_equal(got[("layers", "1", "attn", "k_proj", "kernel")], cast(k).T)
    np.testing.assert_array_equal(got[("layers", "0", "mlp", "down_proj", "kernel")],
                                  cast(sd["model.layers.0.mlp.down_proj.weight"]).T)
    np.testing.assert_array_equal(got[("embed", "embedding")], cast(sd["model.embed_tokens.weight"]))
    np.testing.assert_array_equal(got[("layers", "0", "attn_norm", "scale")], sd["model.layers.0.input_layernorm.weight"])
    assert (("lm_head", "kernel") in got) == (not tied)
    assert all(v.dtype == np.float32 for v in got.values())
    c = checkpoints.load_config(dst)
    mc = ModelConfig.from_hf(c)
    assert (mc.model_type, mc.tie_embeddings, mc.num_heads, mc.num_kv_heads, mc.head_dim) == ("llama", tied, 4, 2, 8)
    assert (c["rope_theta"], c["rms_norm_eps"], c["bos_token_id"], c["eos_token_id"]) == (50000.0, 1e-5, 1, 2)
    assert checkpoints.load_params(dst, dtype="bfloat16")["embed"]["embedding"].dtype.name == "bfloat16"


def test_gguf_errors(tmp_path, no_tokenizer):
    import gguf
    sd = make_tiny_hf(tmp_path / "hf", "llama", seed=2)
    cfg = tiny_hf_config("llama")
    write_tiny_gguf(tmp_path / "qwen.gguf", sd, cfg, arch="gpt2")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
        checkpoints.convert(tmp_path / "qwen.gguf", tmp_path / "o1", progress=False)
    write_tiny_gguf(tmp_path / "extra.gguf", sd, cfg, extra={"blk.0.attn_q.bias": np.ones(32, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*blk\.0\.attn_q\.bias"):
        checkpoints.convert(tmp_path / "extra.gguf", tmp_path / "o2", progress=False)
    write_tiny_gguf(tmp_path / "miss.gguf", sd, cfg, skip=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        checkpoints.convert(tmp_path / "miss.gguf", tmp_path / "o3", progress=False)
    write_tiny_gguf(tmp_path / "yarn.gguf", sd, cfg, rope_scaling=gguf.RopeScalingType.YARN)
    with pytest.raises(CheckpointError, match="rope scaling"):
        checkpoints.convert(tmp_path / "yarn.gguf", tmp_path / "o4", progress=False)
    (tmp_path / "junk.gguf").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="cannot read GGUF"):
        checkpoints.convert(tmp_path / "junk.gguf", tmp_path / "o5", progress=False)
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())


# ---- the real SmolLM2-135M GGUF (Q4_1 / Q8_0), converted once per session ----------------------


def _transformers_reference(reader, name, cfg):
    """transformers' own GGUF path: its torch dequantizer, then its llama q/k reverse permutation."""
    import torch
    from transformers.integrations.gguf.dequant import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    t = next(t for t in reader.tensors if t.name == name)
    shape = tuple(int(x) for x in reversed(t.shape))
    if t.tensor_type.name == "F32":
        w = np.array(t.data, np.float32).reshape(shape)
    else:
        raw = torch.from_numpy(np.array(t.data, copy=True).reshape(-1))
        w = dequantize(raw, int(t.tensor_type), torch.float32).numpy().reshape(shape)
    proc = LlamaTensorProcessor(config={"num_attention_heads": cfg["num_attention_heads"],
                                        "num_key_value_heads": cfg["num_key_value_heads"]})
    return np.asarray(proc.process(w, name).weights)


def test_smollm2_layers_match_transformers(smollm2_cache, smollm2_gguf):
    _, folder = smollm2_cache
    cfg = checkpoints.load_config(folder)
    params = checkpoints.load_params(folder)
    reader = gguf_reader.open_gguf(smollm2_gguf)
    pairs = [("token_embd.weight", params["embed"]["embedding"], False),
             ("output_norm.weight", params["final_norm"]["scale"], False)]
    for i in (0, 17, 29):
        lp = params["layers"][str(i)]
        pairs += [(f"blk.{i}.attn_q.weight", lp["attn"]["q_proj"]["kernel"], True),
                  (f"blk.{i}.attn_k.weight", lp["attn"]["k_proj"]["kernel"], True),
                  (f"blk.{i}.attn_v.weight", lp["attn"]["v_proj"]["kernel"], True),
                  (f"blk.{i}.attn_output.weight", lp["attn"]["o_proj"]["kernel"], True),
                  (f"blk.{i}.ffn_down.weight", lp["mlp"]["down_proj"]["kernel"], True),
                  (f"blk.{i}.ffn_gate.weight", lp["mlp"]["gate_proj"]["kernel"], True),
                  (f"blk.{i}.attn_norm.weight", lp["attn_norm"]["scale"], False),
                  (f"blk.{i}.ffn_norm.weight", lp["mlp_norm"]["scale"], False)]
    for name, ours, transposed in pairs:
        ref = _transformers_reference(reader, name, cfg)
        ours = np.asarray(ours)
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours.T if transposed else ours, ref, rtol=1e-6, atol=1e-7, err_msg=name)
    raw_q = np.asarray(gguf_reader.GGUFTensors(reader, cfg, smollm2_gguf).by_hf["model.layers.0.self_attn.q_proj.weight"].data)
    assert raw_q.dtype == np.uint8  # really quantized: the comparison above went through dequantization


def test_smollm2_config_and_tokenizer(smollm2_cache, smollm2_gguf):
    from transformers import AutoTokenizer
    _, folder = smollm2_cache
    mc = ModelConfig.from_hf(checkpoints.load_config(folder))
    assert (mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_layers) == (49152, 576, 1536, 30)
    assert (mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.tie_embeddings) == (9, 3, 64, True)
    assert (mc.rope_theta, mc.rms_norm_eps, mc.max_position_embeddings) == (100000.0, 1e-5, 8192)
    assert mc.bos_token_id == 1 and mc.eos_token_ids == (2,)
    ours = AutoTokenizer.from_pretrained(folder)
    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))
    for text in ("What is the capital of France?", " leading space\tand tabs\n\nnewlines", "naïve café 東京 123456"):
        ids = ours(text).input_ids
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids) == text
    assert ours("What is the capital of France?").input_ids == [1780, 314, 260, 3575, 282, 4649, 47]
    assert (ours.eos_token_id, ours.bos_token_id) == (2, 1)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in text


@pytest.mark.slow
def test_smollm2_all_tensors_match_transformers_loader(smollm2_cache, smollm2_gguf):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    _, folder = smollm2_cache
    meta = load_gguf_checkpoint(smollm2_gguf, return_tensors=False)["config"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in meta.items() if k != "model_type"}))
    ref = load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=model)["tensors"]
    got = leaves_by_path(checkpoints.load_params(folder))
    assert len(got) == len(ref) == 272
    for name, w in ref.items():
        w = np.asarray(w, np.float32)
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            ours = got[("embed", "embedding")]
        elif name == "model.norm.weight":
            ours = got[("final_norm", "scale")]
        else:
            sub = {"input_layernorm": ("attn_norm",), "post_attention_layernorm": ("mlp_norm",)}
            if parts[3] in sub:
                ours = got[("layers", parts[2]) + sub[parts[3]] + ("scale",)]
            else:
                group = "attn" if parts[3] == "self_attn" else "mlp"
                ours = got[("layers", parts[2], group, parts[4], "kernel")].T
        np.testing.assert_allclose(ours, w, rtol=1e-6, atol=1e-7, err_msg=name)
