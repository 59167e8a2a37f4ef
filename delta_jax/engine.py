"""Engine: load a model, then generate and score with jit-compiled prefill and decode steps."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delta_jax.config import ConfigError, DecodeConfig, ModelConfig, PrefillConfig
from delta_jax.model import Decoder

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_PREFILL_FIELDS = {f.name for f in dataclasses.fields(PrefillConfig)} - {"method"}
_DECODE_FIELDS = {f.name for f in dataclasses.fields(DecodeConfig)} - {"method", "variant"}


@dataclasses.dataclass
class GenerateOutput:
    """One prompt's generation."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    finish_reason: str  # "eos" or "length"


@dataclasses.dataclass
class ScoreOutput:
    """One prompt's scores: `logprobs[t-1] = log p(token t | tokens < t)`; `last_logprobs [last, vocab]`."""

    tokens: list[int]
    logprobs: np.ndarray
    last_logprobs: Optional[np.ndarray]


def bucket(n: int, minimum: int = 128) -> int:
    """Smallest of {2^k, 3 * 2^(k-1)} >= n (at least `minimum`): few distinct compiled shapes."""
    b = minimum
    while True:
        if b >= n:
            return b
        if b * 3 // 2 >= n:
            return b * 3 // 2
        b *= 2


def methods_from(prefill, decode, params: dict) -> tuple[PrefillConfig, DecodeConfig]:
    """Builds the method configs from names or configs plus keyword parameters of the same names."""
    unknown = set(params) - _PREFILL_FIELDS - _DECODE_FIELDS - {"decode_variant"}
    if unknown:
        raise ConfigError(f"unknown method parameters: {sorted(unknown)}")
    pre_kw = {k: v for k, v in params.items() if k in _PREFILL_FIELDS and v is not None}
    dec_kw = {k: v for k, v in params.items() if k in _DECODE_FIELDS and v is not None}
    if params.get("decode_variant") is not None:
        dec_kw["variant"] = params["decode_variant"]
    if isinstance(prefill, str):
        prefill = PrefillConfig(method=prefill, **pre_kw)
    elif pre_kw:
        prefill = dataclasses.replace(prefill, **pre_kw)
    if isinstance(decode, str):
        decode = DecodeConfig(method=decode, **dec_kw)
    elif dec_kw:
        decode = dataclasses.replace(decode, **dec_kw)
    return prefill, decode


def resolve_dtype(dtype: str) -> str:
    """`auto` is bfloat16 on accelerators and float32 on the CPU (where bf16 matmuls are emulated)."""
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, bfloat16 or float32")
    return dtype


def _log(msg: str, progress: bool):
    if progress:
        print(f"[delta-jax] {msg}", file=sys.stderr, flush=True)


class Engine:
    """A loaded model with its tokenizer and compiled steps.

    `Engine.from_pretrained(name_or_path)` loads a built-in model name (`smollm2-135m`) or a converted
    checkpoint folder; `Engine.from_config(config)` builds random weights (tests, timing).
    """

    def __init__(self, model: Decoder, tokenizer, *, max_seq_len: Optional[int] = None,
                 mesh=None, progress: bool = True):
        self.config: ModelConfig = model.cfg
        self.tokenizer = tokenizer
        self.dtype = model.dtype
        self.max_seq_len = int(max_seq_len or self.config.max_position_embeddings)
        self.mesh = mesh
        self.progress = progress
        self.graphdef, self.state = nnx.split(model)
        if mesh is not None:
            self.state = self._place_state(self.state)
        self._compiled: dict = {}

    def _place_state(self, state):
        from delta_jax import sharding
        placed = []
        for path, var in nnx.to_flat_state(state):
            name = "/".join(map(str, path))
            sh = sharding.param_sharding(name, self.mesh, self.config)
            placed.append((path, var.replace(jax.device_put(var[...], sh))))
        return nnx.from_flat_state(placed)

    def _put(self, x):
        """Places a host batch array on the mesh (batch over `data` where it divides)."""
        if self.mesh is None:
            return x
        from jax.sharding import NamedSharding, PartitionSpec as P
        data = self.mesh.shape["data"]
        spec = P("data") if x.shape[0] % data == 0 else P()
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def _cache_shardings(self, batch: int, cache_len: int):
        if self.mesh is None:
            return None
        from delta_jax import sharding
        shape = (batch, self.config.num_kv_heads, cache_len, self.config.head_dim)
        sh = sharding.cache_sharding(shape, self.mesh)
        return tuple((sh, sh) for _ in range(self.config.num_layers))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2-135m", *, dtype: str = "auto",
                        max_seq_len: Optional[int] = None, mesh=None, progress: bool = True) -> "Engine":
        from checkpoints import builtin, load_config, load_params
        from transformers import AutoTokenizer

        dtype = resolve_dtype(dtype)
        folder = builtin.resolve(name_or_path, progress=progress)
        cfg = ModelConfig.from_hf(load_config(folder))
        _log(f"loading {name_or_path} ({cfg.model_type}, {cfg.num_layers} layers) as {dtype}", progress)
        shardings = None
        if mesh is not None:
            from delta_jax import sharding
            if not isinstance(mesh, jax.sharding.Mesh):
                mesh = sharding.make_mesh(None if mesh == "auto" else mesh, cfg=cfg)
            shardings = functools.partial(sharding.param_sharding, mesh=mesh, cfg=cfg)
        params = load_params(folder, dtype=DTYPES[dtype], shardings=shardings)
        model = build_model(cfg, DTYPES[dtype], params)
        tokenizer = None
        if any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer.model")):
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            _log(f"no tokenizer in {folder}: prompts must be token ids", progress)
        return cls(model, tokenizer, max_seq_len=max_seq_len, mesh=mesh, progress=progress)

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, dtype: str = "auto", seed: int = 0, tokenizer=None,
                    max_seq_len: Optional[int] = None, mesh=None, progress: bool = False) -> "Engine":
        """Random weights (initialised on the device)."""
        dt = DTYPES[resolve_dtype(dtype)]

        @jax.jit
        def init():
            return nnx.state(Decoder(cfg, dtype=dt, rngs=nnx.Rngs(seed)))

        abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dt, rngs=nnx.Rngs(0)))
        graphdef, _ = nnx.split(abstract)
        model = nnx.merge(graphdef, init())
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            from delta_jax import sharding
            mesh = sharding.make_mesh(None if mesh == "auto" else mesh, cfg=cfg)
        return cls(model, tokenizer, max_seq_len=max_seq_len, mesh=mesh, progress=progress)

    # ------------------------------------------------------------------ tokenisation
    def encode(self, prompt: Union[str, Sequence[int]], chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            ids = [int(t) for t in prompt]
        else:
            if self.tokenizer is None:
                raise ConfigError("this engine has no tokenizer: pass token ids instead of text")
            if chat:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ConfigError("empty prompt: nothing to condition on")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ConfigError(f"token ids {bad[:5]} are outside the vocabulary (size {self.config.vocab_size})")
        return ids

    def _batch(self, seqs: list[list[int]], extra: int = 0):
        longest = max(len(s) for s in seqs)
        if longest + extra > self.max_seq_len:
            raise ConfigError(
                f"prompt of {longest} tokens plus {extra} new tokens exceeds the cache length "
                f"max_seq_len={self.max_seq_len}")
        t = min(bucket(longest), _round_up(self.max_seq_len, 128))
        tokens = np.zeros((len(seqs), t), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = s
        return (self._put(jnp.asarray(tokens)),
                self._put(jnp.asarray([len(s) for s in seqs], jnp.int32)))

    # ------------------------------------------------------------------ compiled steps
    def _compile(self, key, fn, *args, donate=(), out_shardings=None):
        if key not in self._compiled:
            from delta_jax import sharding
            _log(f"compiling {key[0]} for shape {key[1]}", self.progress)
            t0 = time.perf_counter()
            kw = {} if out_shardings is None else {"out_shardings": out_shardings}
            with sharding.use_mesh(self.mesh):
                self._compiled[key] = jax.jit(fn, donate_argnums=donate, **kw).lower(*args).compile()
            _log(f"compiled {key[0]} in {time.perf_counter() - t0:.1f}s", self.progress)
        return self._compiled[key]

    def _prefill_fn(self, method: PrefillConfig, cache_len: int):
        graphdef = self.graphdef

        def fn(state, tokens, lengths):
            model = nnx.merge(graphdef, state)
            h, cache, _ = model.prefill(tokens, lengths, method, cache_len)
            last = h[jnp.arange(h.shape[0]), lengths - 1]
            return model.logits(last), cache
        return fn

    def _decode_fn(self, method: DecodeConfig):
        graphdef = self.graphdef

        def fn(state, cache, tokens, lengths, key, temperature, top_p):
            model = nnx.merge(graphdef, state)
            logits, cache = model.decode(tokens, lengths, cache, method)
            return sample(logits, key, temperature, top_p), cache
        return fn

    def _rep(self):
        from jax.sharding import NamedSharding, PartitionSpec as P
        return NamedSharding(self.mesh, P())

    # ------------------------------------------------------------------ generate
    def generate(self, prompts, *, max_new_tokens: int = 32, chat: bool = False,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 prefill: Union[str, PrefillConfig] = "dense", decode: Union[str, DecodeConfig] = "dense",
                 on_token: Optional[Callable[[int, int], None]] = None, **params) -> list[GenerateOutput]:
        """Generates up to `max_new_tokens` per prompt (stopping at EOS). Prompts are text or token ids.

        `on_token(index, token)` is called for every new token as it is produced (streaming).
        """
        prefill, decode = methods_from(prefill, decode, params)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ConfigError("no prompts given")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        seqs = [self.encode(p, chat) for p in prompts]
        tokens, lengths = self._batch(seqs, max_new_tokens)
        page = decode.page_size if decode.method == "delta" else 1
        cache_len = _round_up(min(bucket(int(lengths.max()) + max_new_tokens),
                                  _round_up(self.max_seq_len, 128)), max(page, 128))
        if decode.method == "delta":
            decode.schedule(self.config.num_layers)  # validate before compiling

        cache_sh = self._cache_shardings(tokens.shape[0], cache_len)
        pre = self._compile(("prefill", tokens.shape, prefill, cache_len),
                            self._prefill_fn(prefill, cache_len), self.state, tokens, lengths,
                            out_shardings=None if cache_sh is None else (self._rep(), cache_sh))
        t0 = time.perf_counter()
        logits, cache = pre(self.state, tokens, lengths)
        key = jax.random.PRNGKey(seed)
        key, sub = jax.random.split(key)
        temp, tp = jnp.float32(temperature), jnp.float32(top_p)
        nxt = sample(logits, sub, temp, tp)
        nxt.block_until_ready()
        prefill_s = time.perf_counter() - t0

        dec = self._compile(("decode", tokens.shape[0], cache_len, decode), self._decode_fn(decode),
                            self.state, cache, nxt, lengths, key, temp, tp, donate=(1,),
                            out_shardings=None if cache_sh is None else (self._rep(), cache_sh))
        eos = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        b = len(seqs)
        out = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        pos = lengths
        t1 = time.perf_counter()
        steps = 0
        while True:
            host = np.asarray(nxt)
            for i in range(b):
                if not done[i]:
                    out[i].append(int(host[i]))
                    if on_token is not None:
                        on_token(i, int(host[i]))
                    if host[i] in eos or len(out[i]) >= max_new_tokens:
                        done[i] = True
            if done.all():
                break
            key, sub = jax.random.split(key)
            nxt, cache = dec(self.state, cache, nxt, pos, sub, temp, tp)
            pos = pos + 1
            steps += 1
        decode_s = time.perf_counter() - t1
        results = []
        for i in range(b):
            toks = out[i]
            reason = "eos" if toks and toks[-1] in eos else "length"
            text_toks = toks[:-1] if reason == "eos" else toks
            text = self.tokenizer.decode(text_toks, skip_special_tokens=True) if self.tokenizer else ""
            results.append(GenerateOutput(
                text=text, tokens=toks, prompt_tokens=len(seqs[i]), prefill_seconds=prefill_s,
                decode_seconds=decode_s, decode_tokens_per_second=(steps / decode_s if decode_s > 0 else 0.0),
                finish_reason=reason))
        return results

    # ------------------------------------------------------------------ score
    def score(self, prompts, *, prefill: Union[str, PrefillConfig] = "dense", last: int = 0,
              chat: bool = False, **params) -> list[ScoreOutput]:
        """Log-probability of every prompt token given those before it, and the full log-softmax at
        the last `last` positions, with the given prefill method."""
        prefill, _ = methods_from(prefill, "dense", params)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        seqs = [self.encode(p, chat) for p in prompts]
        if last < 0 or any(last > len(s) for s in seqs):
            raise ConfigError(f"last={last} must be between 0 and the shortest prompt length")
        tokens, lengths = self._batch(seqs)
        graphdef = self.graphdef

        def fn(state, tokens, lengths):
            model = nnx.merge(graphdef, state)
            h, _, _ = model.prefill(tokens, lengths, prefill, None)
            lp = _token_logprobs(model, h, tokens)
            lastlp = None
            if last:
                idx = jnp.clip(lengths[:, None] - last + jnp.arange(last)[None, :], 0, None)
                hl = jnp.take_along_axis(h, idx[..., None], axis=1)
                lastlp = jax.nn.log_softmax(model.logits(hl), axis=-1)
            return lp, lastlp

        run = self._compile(("score", tokens.shape, prefill, last), fn, self.state, tokens, lengths)
        lp, lastlp = run(self.state, tokens, lengths)
        lp = np.asarray(lp)
        lastlp = np.asarray(lastlp) if last else None
        return [ScoreOutput(tokens=s, logprobs=lp[i, :len(s) - 1],
                            last_logprobs=None if lastlp is None else lastlp[i])
                for i, s in enumerate(seqs)]

    def _one_prompt(self, kind: str, prompt, prefill, params: dict, body) -> np.ndarray:
        """Runs `body(model, tokens, lengths, prefill)` jit-compiled on one prompt; trims to its length
        along axis `1` of the result when it is per-layer, else axis 0."""
        prefill, _ = methods_from(prefill, "dense", params)
        seqs = [self.encode(prompt)]
        toks, lengths = self._batch(seqs)
        graphdef = self.graphdef

        def fn(state, tokens, lengths):
            return body(nnx.merge(graphdef, state), tokens, lengths, prefill)

        run = self._compile((kind, toks.shape, prefill), fn, self.state, toks, lengths)
        out = np.asarray(run(self.state, toks, lengths))
        return out[:len(seqs[0])] if kind == "logits" else out[:, :len(seqs[0])]

    def logits(self, prompt, *, prefill: Union[str, PrefillConfig] = "dense", **params) -> np.ndarray:
        """Float32 logits `[T, vocab]` at every position of one prompt."""
        return self._one_prompt("logits", prompt, prefill, params, lambda model, tokens, lengths, pre:
                                model.logits(model.prefill(tokens, lengths, pre, None)[0][0]))

    def coverage(self, prompts, *, decode: Union[str, DecodeConfig] = "delta", steps: int = 8,
                 chat: bool = False, **params) -> dict:
        """How well DELTA's shared page selection covers each layer's own attention, over `steps`
        greedy decode steps after a dense prefill, decoding with `decode`.

        Returns per layer (arrays `[layers]`): `covered` (mean share of the layer's softmax mass, head
        averaged, on the pages it attended to; 1 for dense layers), `oracle` (mass on the layer's own
        best `budget` pages: what a per-layer selection could reach), the roles, and `matrix`
        `[layers, layers]`: entry (i, j) is the share of layer j's mass on the pages DELTA would select
        from layer i's scores (the input of `delta_jax.calibrate`).
        """
        from pallas_kernels.delta_decode import select_pages
        _, decode = methods_from("dense", decode, params)
        seqs = [self.encode(p, chat) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        tokens, lengths = self._batch(seqs, steps)
        cache_len = _round_up(max(int(lengths.max()) + steps, tokens.shape[1]), max(decode.page_size, 128))
        roles = decode.schedule(self.config.num_layers)
        pre = self._compile(("prefill", tokens.shape, PrefillConfig(), cache_len),
                            self._prefill_fn(PrefillConfig(), cache_len), self.state, tokens, lengths)
        logits, cache = pre(self.state, tokens, lengths)
        graphdef = self.graphdef
        ps, budget, recent = decode.page_size, decode.budget, decode.recent

        def fn(state, cache, tok, pos):
            model = nnx.merge(graphdef, state)
            logits, cache, (mass, score, idx, valid) = model.decode(tok, pos, cache, decode, record=True)
            covered = jnp.sum(jnp.take_along_axis(mass, idx, -1) * valid, -1)          # [L, b]
            oracle = jnp.sum(jax.lax.top_k(mass, min(budget, mass.shape[-1]))[0], -1)  # [L, b]
            sel = jax.vmap(lambda sc: select_pages(sc, pos + 1, page_size=ps, budget=budget,
                                                   recent=recent))(score)               # [L, b, budget]
            matrix = jnp.sum(jnp.take_along_axis(mass[None], sel[0][:, None], -1) * sel[1][:, None], -1)
            return (jnp.argmax(logits, -1).astype(jnp.int32), cache, covered, oracle, valid.any(-1),
                    matrix.mean(-1))

        run = self._compile(("coverage", tokens.shape[0], cache_len, decode), fn, self.state, cache,
                            jnp.argmax(logits, -1).astype(jnp.int32), lengths)
        tok, pos, cov, orc, mat = jnp.argmax(logits, -1).astype(jnp.int32), lengths, [], [], []
        for _ in range(steps):
            tok, cache, c, o, sparse, m = run(self.state, cache, tok, pos)
            cov.append(np.where(np.asarray(sparse), np.asarray(c), 1.0))
            orc.append(np.asarray(o))
            mat.append(np.asarray(m))
            pos = pos + 1
        return {"roles": list(roles), "covered": np.mean(cov, axis=(0, 2)), "oracle": np.mean(orc, axis=(0, 2)),
                "matrix": np.mean(mat, axis=0)}

    def shift_cosines(self, tokens, *, prefill: Union[str, PrefillConfig], **params) -> np.ndarray:
        """Cosine similarity `[layers, T, heads]` of each layer's attention output under `prefill` to
        dense attention, each method running its own forward pass (the shift accumulates)."""

        def body(model, toks, lengths, pre):
            ref = model.prefill(toks, lengths, PrefillConfig(), None, trace=True)[2][:, 0].astype(jnp.float32)
            out = model.prefill(toks, lengths, pre, None, trace=True)[2][:, 0].astype(jnp.float32)
            norms = jnp.linalg.norm(ref, axis=-1) * jnp.linalg.norm(out, axis=-1)
            return jnp.sum(ref * out, -1) / jnp.maximum(norms, 1e-30)

        return self._one_prompt("shift", tokens, prefill, params, body)

    def attention_outputs(self, tokens, *, prefill: Union[str, PrefillConfig] = "dense",
                          **params) -> np.ndarray:
        """Per-layer attention outputs (before o_proj) `[layers, T, heads, head_dim]` for one prompt."""
        return self._one_prompt("trace", tokens, prefill, params, lambda model, toks, lengths, pre:
                                model.prefill(toks, lengths, pre, None, trace=True)[2][:, 0].astype(jnp.float32))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _token_logprobs(model: Decoder, h: jax.Array, tokens: jax.Array, chunk: int = 256) -> jax.Array:
    """`[b, T-1]` log p(tokens[:, t] | < t), computed in chunks so [b, T, vocab] never materialises."""
    b, t, hd = h.shape
    n = -(-(t - 1) // chunk)
    pad = n * chunk - (t - 1)
    hs = jnp.pad(h[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, hd)
    tg = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(b, n, chunk)

    def one(args):
        hc, tc = args
        lg = model.logits(hc)
        return jnp.take_along_axis(lg, tc[..., None], -1)[..., 0] - jax.nn.logsumexp(lg, axis=-1)

    out = jax.lax.map(one, (jnp.swapaxes(hs, 0, 1), jnp.swapaxes(tg, 0, 1)))
    return jnp.swapaxes(out, 0, 1).reshape(b, n * chunk)[:, :t - 1]


@jax.jit
def sample(logits: jax.Array, key, temperature, top_p) -> jax.Array:
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. logits `[b, V]`."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, -1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    pick = jax.random.categorical(key, masked, axis=-1)
    sampled = jnp.take_along_axis(order, pick[:, None], -1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def build_model(cfg: ModelConfig, dtype, params: dict) -> Decoder:
    """A Decoder whose weights are the nested `params` dict (the checkpoint layout of `checkpoints`)."""
    abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    filled = []
    for path, var in nnx.to_flat_state(state):
        name = "/".join(map(str, path))
        node = params
        for p in path:
            if not isinstance(node, dict) or str(p) not in node:
                raise ConfigError(f"checkpoint has no tensor {name}")
            node = node[str(p)]
        if tuple(node.shape) != tuple(var.shape):
            raise ConfigError(f"tensor {name} has shape {tuple(node.shape)}, the config implies {tuple(var.shape)}")
        filled.append((path, var.replace(jnp.asarray(node, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))
