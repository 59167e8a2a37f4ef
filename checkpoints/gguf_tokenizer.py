"""The tokenizer stored in a GGUF file, rebuilt as Hugging Face tokenizer files with the `tokenizers` package.

llama.cpp keeps the vocabulary as metadata: `tokenizer.ggml.model` (the algorithm), `.pre` (how text is
split before BPE), `.tokens`, `.token_type`, `.merges`, the bos/eos/unk/pad ids, `.add_bos_token`,
`.add_eos_token`, and `tokenizer.chat_template`. Byte-level BPE (`model = "gpt2"`: SmolLM2, Llama 3) is
rebuilt here as transformers' GGUF loader builds it, without importing transformers or torch:
`tokenizer.json` + `tokenizer_config.json` load with `AutoTokenizer.from_pretrained(folder)`.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .io import CheckpointError

SUPPORTED_MODELS = ("gpt2",)

# token_type values of llama.cpp's vocabulary
CONTROL, USER_DEFINED = 3, 4

# `.pre` -> the regex that splits text before byte-level BPE; None is GPT-2's (the ByteLevel pre-tokenizer's own).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {
    "default": None,
    "gpt2": None,
    "smollm": None,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
}

SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
               "pad_token": "padding_token_id"}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the code points 256, 257, ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0x100
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(extra)
            extra += 1
    return table


def _metadata(reader, path: str) -> Optional[dict]:
    """The `tokenizer.*` metadata under short names, or None when the file has no vocabulary."""
    from .gguf_reader import field
    model = field(reader, "tokenizer.ggml.model")
    if model is None:
        return None
    if model not in SUPPORTED_MODELS:
        raise CheckpointError(
            f"GGUF tokenizer model {model!r} in {path!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)}); "
            "convert the Hugging Face checkpoint instead")
    pre = field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise CheckpointError(
            f"GGUF pre-tokenizer {pre!r} in {path!r} is not supported (supported: {', '.join(PRE_SPLITS)}); "
            "convert the Hugging Face checkpoint instead")
    meta = {"model": model, "pre": pre}
    for key in ("tokens", "token_type", "merges", "add_bos_token", "add_eos_token", *SPECIAL_IDS.values()):
        meta[key] = field(reader, f"tokenizer.ggml.{key}")
    meta["chat_template"] = field(reader, "tokenizer.chat_template")
    if not meta["tokens"] or not meta["merges"]:
        raise CheckpointError(f"GGUF file {path!r} has tokenizer model {model!r} without tokens or merges")
    return meta


def build_tokenizer(meta: dict, path: str):
    """A byte-level BPE `tokenizers.Tokenizer` from the GGUF metadata (see `_metadata`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; one that is not (raw UTF-8) is spelled into it.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise CheckpointError(f"GGUF merge {' '.join(bad)!r} in {path!r} is not two tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    split = PRE_SPLITS[meta["pre"]]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    kinds = meta["token_type"] or []
    named = special_tokens(meta)
    # Control tokens stay whole and are special; one outside the byte alphabet is a mislabel and is left out.
    control = [t for t, k in zip(meta["tokens"], kinds) if k == CONTROL and set(t) <= alphabet]
    # The bos/eos/unk/pad tokens are special too, control or not.
    extra = [t for t in dict.fromkeys(named.values()) if t is not None and t not in control]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control + extra])
    user = [t for t, k in zip(meta["tokens"], kinds) if k == USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    bos = named["bos_token"] if meta["add_bos_token"] else None
    eos = named["eos_token"] if meta["add_eos_token"] else None
    single = _template(bos, eos, "$A", 0)
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=single + _template(bos, eos, "$B", 1),
        special_tokens=[(t, tok.token_to_id(t)) for t in (bos, eos) if t is not None])
    return tok


def _template(bos: Optional[str], eos: Optional[str], sequence: str, type_id: int) -> list[str]:
    """One sequence of a TemplateProcessing template, with bos before and eos after when given."""
    return [f"{t}:{type_id}" for t in (bos, sequence, eos) if t is not None]


def special_tokens(meta: dict) -> dict[str, Optional[str]]:
    """bos/eos/unk/pad token strings from their GGUF ids (None when absent)."""
    out = {}
    for name, key in SPECIAL_IDS.items():
        i = meta[key]
        out[name] = meta["tokens"][i] if i is not None and 0 <= i < len(meta["tokens"]) else None
    return out


def export(path: str, dst: str) -> bool:
    """Writes `tokenizer.json` and `tokenizer_config.json` (special tokens, bos/eos flags, chat template)
    for the GGUF file `path` into `dst`. Returns False (writing nothing) when the file has no vocabulary."""
    from .gguf_reader import open_gguf
    meta = _metadata(open_gguf(path), path)
    if meta is None:
        return False
    build_tokenizer(meta, path).save(os.path.join(dst, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              **{k: v for k, v in special_tokens(meta).items() if v is not None},
              "add_bos_token": bool(meta["add_bos_token"]), "add_eos_token": bool(meta["add_eos_token"]),
              "clean_up_tokenization_spaces": False}
    if meta["chat_template"]:
        config["chat_template"] = meta["chat_template"]
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return True
