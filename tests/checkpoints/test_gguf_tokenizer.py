"""The GGUF tokenizer rebuilt without transformers = transformers' GGUF loader (ids, decoding, chat template)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from checkpoints import CheckpointError, gguf_tokenizer

from .conftest import make_tiny_hf, tiny_hf_config, write_tiny_gguf

FRAGMENTS = [
    "The", " capital", " of", " France", " is", " Paris", ".", "?", "!", ",", " naïve", " café", " 東京", "都",
    " 🦊", "👩‍💻", " مرحبا", " Ωμέγα", "e\u0301", " 123", "4567890", " 3.14159", "2024-01-01", " it's", " we'll",
    " I'M", " def f(x):", "\n    return x ** 2", "  # comment", " {\"key\": [1, 2]}", " a+=b;", " <div>", "</div>",
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\u3000", "\u00a0", "<|im_start|>", "<|im_end|>",
    "<|endoftext|>", "<file_sep>", "<|im_start", "|>",
]


def random_texts(n, seed):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(FRAGMENTS, size=rng.integers(1, 24))) for _ in range(n)]


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf, tmp_path_factory):
    """(ours, transformers' GGUF loader) for the built-in model's GGUF."""
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    assert gguf_tokenizer.export(smollm2_gguf, str(out))
    ref = AutoTokenizer.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))
    return AutoTokenizer.from_pretrained(str(out)), ref


def test_smollm2_backend_equals_transformers(smollm2_pair):
    ours, ref = smollm2_pair
    assert json.loads(ours.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.all_special_ids == ref.all_special_ids and len(ours) == len(ref) == 49152


def test_smollm2_ids_and_decoding_equal_transformers(smollm2_pair):
    ours, ref = smollm2_pair
    fixed = ["", " ", "What is the capital of France?", "  leading spaces\tand tabs\n\n\nnewlines   ",
             "naïve café 東京 123456 🦊", "def f(x):\n    return {'a': [1, 2]}\r\n", "<|im_start|>user\nhi<|im_end|>"]
    for text in fixed + random_texts(300, seed=13):
        ids = ours(text).input_ids
        assert ids == ref(text).input_ids, repr(text)
        assert ours.decode(ids) == ref.decode(ids) == text, repr(text)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), repr(text)
    rng = np.random.default_rng(7)
    for _ in range(50):  # arbitrary id sequences, specials and partial UTF-8 byte tokens included
        ids = rng.integers(0, len(ours), size=int(rng.integers(1, 40))).tolist()
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_smollm2_chat_template_equals_transformers(smollm2_pair):
    ours, ref = smollm2_pair
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "naïve  café\n\n東京"},
              {"role": "assistant", "content": "Tokyo."}, {"role": "user", "content": "def f(): pass"}]]
    for chat in chats:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids
            assert ours.decode(ours(text).input_ids) == text
    text = ours.apply_chat_template(chats[0], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in text


def test_export_imports_neither_transformers_nor_torch(smollm2_gguf, tmp_path):
    code = ("import sys; from checkpoints import gguf_tokenizer; "
            f"assert gguf_tokenizer.export({smollm2_gguf!r}, {str(tmp_path)!r}); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "[]"
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "tokenizer_config.json"]


def write_vocab_gguf(path, *, model="gpt2", pre="llama-bpe", add_bos=True):
    """A GGUF holding only a vocabulary: a byte-level BPE trained here on a little text, plus a raw
    UTF-8 token, a user-defined token and a control token outside the byte alphabet (a mislabel)."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False)
    corpus = ["The quick brown fox jumps over the lazy dog. ", "def f(x):\n    return x ** 2  # 12345\r\n",
              "naïve café — ünïcödé ", "it's we'll they're I'M 2024-01-01 "]
    bpe.train_from_iterator(corpus * 10, trainer)
    model_json = json.loads(bpe.to_str())["model"]
    tokens = sorted(model_json["vocab"], key=model_json["vocab"].get)
    kinds = [3 if t.startswith("<|") else 1 for t in tokens]
    tokens += ["東京", "<think>", "<｜fim▁hole｜>"]
    kinds += [1, 4, 3]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(kinds)
    w.add_token_merges([" ".join(m) for m in model_json["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|begin_of_text|>{{ m['content'] }}<|end_of_text|>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("smollm", False)])
def test_synthetic_vocab_equals_transformers(tmp_path, pre, add_bos):
    tokens = write_vocab_gguf(tmp_path / "v.gguf", pre=pre, add_bos=add_bos)
    out = tmp_path / "out"
    out.mkdir()
    assert gguf_tokenizer.export(str(tmp_path / "v.gguf"), str(out))
    ours = AutoTokenizer.from_pretrained(str(out))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="v.gguf")
    mine, theirs = json.loads(ours.backend_tokenizer.to_str()), json.loads(ref.backend_tokenizer.to_str())
    for key in ("model", "pre_tokenizer", "decoder", "normalizer"):
        assert mine[key] == theirs[key], key
    assert mine["model"]["vocab"]["æĿ±äº¬"] == tokens.index("東京")  # the raw UTF-8 token, spelled in bytes
    assert "<｜fim▁hole｜>" not in ours.all_special_tokens
    texts = ["The quick brown fox <think> 12345 <|end_of_text|>", "naïve café 東京\r\n\n  x", "it's  WE'LL\t\t2024",
             "def f(x):\n    return x ** 2"] + [t for t in random_texts(200, seed=5) if "<|endoftext|>" not in t]
    for text in texts:
        ids = ours(text).input_ids
        assert ids == ref(text).input_ids, repr(text)
        assert (ids[0] == 0) == add_bos
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), repr(text)
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == "<|begin_of_text|>hi<|end_of_text|>"


def test_unsupported_tokenizers_are_named(tmp_path):
    write_vocab_gguf(tmp_path / "spm.gguf", model="llama")
    with pytest.raises(CheckpointError, match=r"GGUF tokenizer model 'llama' .* not supported \(supported: gpt2\)"):
        gguf_tokenizer.export(str(tmp_path / "spm.gguf"), str(tmp_path))
    write_vocab_gguf(tmp_path / "qwen.gguf", pre="qwen2")
    with pytest.raises(CheckpointError, match=r"GGUF pre-tokenizer 'qwen2' .* not supported"):
        gguf_tokenizer.export(str(tmp_path / "qwen.gguf"), str(tmp_path))
    assert not any(name.startswith("tokenizer") for name in os.listdir(tmp_path))


def test_byte_alphabet_is_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers
    table = gguf_tokenizer.byte_alphabet()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("A")]) == ("Ġ", "Ċ", "A")


def test_gguf_without_vocabulary_writes_no_tokenizer(tmp_path):
    sd = make_tiny_hf(tmp_path / "hf", "llama")
    write_tiny_gguf(tmp_path / "tiny.gguf", sd, tiny_hf_config("llama"))
    out = tmp_path / "out"
    out.mkdir()
    assert gguf_tokenizer.export(str(tmp_path / "tiny.gguf"), str(out)) is False
    assert os.listdir(out) == []
