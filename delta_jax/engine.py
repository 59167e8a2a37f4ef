"""Engine: load a model, then generate (through the continuous-batching scheduler) and score."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from delta_jax import cache, memory
from delta_jax.config import ConfigError, DecodeConfig, ModelConfig, PrefillConfig
from delta_jax.model import Decoder
from delta_jax.scheduler import Request, Scheduler, check_prompt, prefill_length, prefill_lengths
from delta_jax.steps import Steps

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_PREFILL_FIELDS = {f.name for f in dataclasses.fields(PrefillConfig)} - {"method"}
_DECODE_FIELDS = {f.name for f in dataclasses.fields(DecodeConfig)} - {"method", "variant"}


@dataclasses.dataclass
class GenerateOutput:
    """One prompt's generation."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float  # the prefill call that held this prompt
    ttft_seconds: float     # from the call to this prompt's first token (other prompts' prefills included)
    decode_seconds: float
    decode_tokens_per_second: float
    finish_reason: str  # "eos", "stop" (a stop string) or "length"


@dataclasses.dataclass
class ScoreOutput:
    """One prompt's scores: `logprobs[t-1] = log p(token t | tokens < t)`; `last_logprobs [last, vocab]`."""

    tokens: list[int]
    logprobs: np.ndarray
    last_logprobs: Optional[np.ndarray]


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
        eos = set(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.steps = Steps(self.graphdef, mesh, self.eos_ids, progress)

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
        check_prompt(ids, self.config.vocab_size)
        return ids

    def _batch(self, seqs: list[list[int]]):
        """Right-padded tokens `[b, T]` (T: the prefill ladder) and lengths `[b]` on the mesh."""
        longest = max(len(s) for s in seqs)
        if longest > self.max_seq_len:
            raise ConfigError(f"prompt of {longest} tokens exceeds the cache length max_seq_len={self.max_seq_len}")
        tokens = np.zeros((len(seqs), prefill_length(longest)), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = s
        return (self._put(jnp.asarray(tokens)),
                self._put(jnp.asarray([len(s) for s in seqs], jnp.int32)))

    def _dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name

    def _model_shards(self) -> int:
        from delta_jax import sharding
        return self.mesh.shape["model"] if sharding.heads_divide(self.config.num_kv_heads, self.mesh) else 1

    def scheduler(self, prefill: Union[str, PrefillConfig] = "dense", decode: Union[str, DecodeConfig] = "dense", *,
                  slots: int, max_seq_len: Optional[int] = None, num_pages: Optional[int] = None,
                  chunk: int = 16, prefill_batch: Optional[int] = None, **params) -> Scheduler:
        """A continuous-batching scheduler over a new paged cache (what `delta-jax serve` runs).

        `slots` decode rows of up to `max_seq_len` tokens (default the engine's) each; `num_pages` pages of
        `page_size` in the pool (default: enough for every slot at full length, capped by the device's free
        memory); `chunk` decode steps per dispatch; one prefill call takes at most the tokens of `prefill_batch`
        prompts of `max_seq_len` (default 1; never over `scheduler.PREFILL_BATCH_TOKENS`). Refuses with one line when
        the pool and one prefill of `max_seq_len` tokens cannot fit the device's memory.
        """
        prefill, decode = methods_from(prefill, decode, params)
        ps = decode.page_size
        max_seq_len = int(max_seq_len or self.max_seq_len)
        if max_seq_len > self.max_seq_len:
            raise ConfigError(f"max_seq_len={max_seq_len} exceeds the model's {self.max_seq_len}")
        width = cache.ladder(cache.pages_for(max_seq_len, ps))
        shards = self._data_shards()
        slots = -(-slots // shards) * shards  # the rows each data shard holds, every one at full length
        longest = prefill_length(max_seq_len)
        act = memory.prefill_bytes(self.config, 1, longest, self.dtype, self._model_shards())
        auto = num_pages is None
        if auto:  # what the free memory holds beside the estimated prefill; checked against XLA's figure below
            free, _ = memory.free_bytes()
            per_device = int((memory.HEADROOM * free / self._sharing() - act) // self._pool_bytes(shards, ps))
            num_pages = max(shards * 2, min(slots * width + shards, per_device * shards))
        hint = "lower --max-seq-len, --slots or --kv-pages, or shard over more devices with --mesh model=N"
        memory.check({"KV cache": self._pool_bytes(num_pages, ps), "prefill activations": act},
                     devices_sharing=self._sharing(), hint=hint)
        if auto:
            num_pages = self._fit_pool(prefill, decode, slots, width, num_pages, longest, hint)
        return Scheduler(self, prefill, decode, slots=slots, pages_per_seq=width, num_pages=num_pages, chunk=chunk,
                         max_prefill_tokens=None if prefill_batch is None else prefill_batch * longest)

    def _fit_pool(self, prefill: PrefillConfig, decode: DecodeConfig, slots: int, width: int, num_pages: int,
                  longest: int, hint: str) -> int:
        """Pages of a pool beside which XLA's figure for every prefill of the longest octave fits the free memory
        (with `memory.SIZING_MARGIN` to spare) and its temporaries the largest free block (the figure is not
        monotone in the length and depends on the pool's size). The prefills are compiled against the pool's
        shapes before it exists, so the pool is allocated once, without leaving holes; the executables are kept
        for the calls."""
        shards = self._data_shards()
        page = self._pool_bytes(shards, decode.page_size) / shards  # bytes per device of one page
        lengths = prefill_lengths(longest // 2 + 1, longest)
        for _ in range(4):
            spec = Scheduler.cache_spec(self, decode, slots=slots, pages_per_seq=width, num_pages=num_pages)
            pool = cache.abstract_pool(spec, Scheduler.pool_sharding(self, spec))
            reserve = self._pool_bytes(spec.num_pages, decode.page_size)
            fit, worst = max(((memory.shortfall(self.steps.compile_prefill(prefill, self.state, pool, 1, t, width),
                                                self.mesh, reserve, memory.SIZING_MARGIN), t) for t in lengths),
                             key=lambda r: r[0].short)
            if fit.need is not None:
                _log(f"KV pool of {spec.num_pages} pages: the worst prefill ({worst} tokens) needs "
                     f"{fit.need / memory.GiB:.1f} GiB (XLA's figure), {fit.free / memory.GiB:.1f} GiB is "
                     f"{fit.where} beside it", self.progress)
            if fit.short <= 0:
                return spec.num_pages
            fewer = (int(fit.short / (memory.HEADROOM * page)) // shards + 1) * shards
            if spec.num_pages - fewer < 2 * shards:
                raise ConfigError(f"a prefill of {worst} tokens needs {fit.need / memory.GiB:.1f} GiB of device "
                                  f"memory (XLA's figure) and {fit.where} is {(fit.free + reserve) / memory.GiB:.1f} "
                                  f"GiB before the KV cache; {hint}")
            num_pages = spec.num_pages - fewer
        raise ConfigError(f"no KV cache size found in 4 tries beside which every prefill of up to {longest} tokens "
                          f"fits (XLA's figure for {worst} tokens: {fit.need / memory.GiB:.1f} GiB); {hint}")

    def _data_shards(self) -> int:
        return self.mesh.shape["data"] if self.mesh is not None else 1

    def _pool_bytes(self, num_pages: int, page_size: int) -> int:
        """Bytes per device of a pool of `num_pages` pages (split over `data`, heads over `model`)."""
        per_token = memory.kv_bytes_per_token(self.config, self.dtype) // self._model_shards()
        return num_pages * page_size * per_token // self._data_shards()

    def _sharing(self) -> int:
        return memory.devices_sharing(self.mesh)

    # ------------------------------------------------------------------ generate
    def generate(self, prompts, *, max_new_tokens: int = 32, chat: bool = False,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 prefill: Union[str, PrefillConfig] = "dense", decode: Union[str, DecodeConfig] = "dense",
                 stop: Sequence[str] = (), on_token: Optional[Callable[[int, int], None]] = None,
                 chunk: int = 16, **params) -> list[GenerateOutput]:
        """Generates up to `max_new_tokens` per prompt (stopping at EOS or a `stop` string). Prompts are text
        or token ids. Every prompt is one request of a scheduler sized to this call (`Engine.scheduler_for`).
        The times in the outputs exclude compilation.

        `on_token(index, token)` is called for every new token as it is produced (streaming, in order per
        prompt); `chunk` decode steps run per device dispatch.
        """
        prefill, decode = methods_from(prefill, decode, params)
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ConfigError("no prompts given")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        seqs = [self.encode(p, chat) for p in prompts]  # sampling parameters: checked by Scheduler.check
        longest = max(len(s) for s in seqs)
        if longest + max_new_tokens > self.max_seq_len:
            raise ConfigError(f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the cache "
                              f"length max_seq_len={self.max_seq_len}")
        sched = self.scheduler_for([len(s) for s in seqs], max_new_tokens, prefill, decode, chunk=chunk)
        reqs = []
        try:
            for i, s in enumerate(seqs):
                cb = None if on_token is None else (lambda r, t, d, i=i: t is not None and on_token(i, t))
                reqs.append(sched.submit(Request(prompt=s, max_tokens=max_new_tokens, temperature=temperature,
                                                 top_p=top_p, seed=seed, stop=tuple(stop), on_token=cb)))
            sched.run()
        finally:
            sched.close()  # the pool goes now, not when Python collects the scheduler
        refused = next((r for r in reqs if r.error), None)
        if refused is not None:
            raise ConfigError(refused.error)
        out = []
        for r in reqs:
            decode_s = r.finish_time - r.first_token_time - r.compile_seconds
            out.append(GenerateOutput(
                text=r.text, tokens=r.tokens, prompt_tokens=len(r.prompt), prefill_seconds=r.prefill_seconds,
                ttft_seconds=r.ttft_seconds,
                decode_seconds=decode_s,
                decode_tokens_per_second=(len(r.tokens) - 1) / decode_s if decode_s > 0 else 0.0,
                finish_reason=r.finish_reason))
        return out

    def scheduler_for(self, prompt_lengths: Sequence[int], max_new_tokens: int,
                      prefill: Union[str, PrefillConfig] = "dense", decode: Union[str, DecodeConfig] = "dense", *,
                      chunk: int = 16, **params) -> Scheduler:
        """A scheduler that holds prompts of `prompt_lengths` plus `max_new_tokens` each all at once, its pages
        sized to that work (at most 1/8 padding): what `generate` runs. Refuses with one line when the pages
        and the prefill activations cannot fit the device's free memory."""
        prefill, decode = methods_from(prefill, decode, params)
        n = len(prompt_lengths)
        ps = decode.page_size
        shards = self._data_shards()
        slots = -(-cache.ladder(n) // shards) * shards
        need = [cache.pages_for(length + max_new_tokens, ps) for length in prompt_lengths]
        per_shard = [1 + sum(need[i] for i in range(n) if i // (slots // shards) == d) for d in range(shards)]
        pages = shards * cache.ladder(max(per_shard))
        width = cache.ladder(max(need))
        pool = self._pool_bytes(pages, ps)
        t = prefill_length(max(prompt_lengths))
        act = lambda b: memory.prefill_bytes(self.config, b, t, self.dtype, self._model_shards())  # noqa: E731
        free, _ = memory.free_bytes()
        batch = n
        while batch > 1 and (pool + act(batch)) * self._sharing() > memory.HEADROOM * free:
            batch = -(-batch // 2)
        memory.check({"KV cache": pool, "prefill activations": act(batch)}, devices_sharing=self._sharing(), free=free,
                     hint="use fewer or shorter prompts or fewer new tokens, or shard over more devices with "
                          "--mesh model=N")
        return Scheduler(self, prefill, decode, slots=slots, pages_per_seq=width, num_pages=pages, chunk=chunk,
                         max_prefill_tokens=batch * t)

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

        lp, lastlp = self.steps.run(("score", prefill, last), fn, (self.state, tokens, lengths),
                                    f"score ({prefill.method}) for {tuple(tokens.shape)}")
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

        out = np.asarray(self.steps.run((kind, prefill), fn, (self.state, toks, lengths),
                                        f"{kind} ({prefill.method}) for {tuple(toks.shape)}"))
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
        roles = decode.schedule(self.config.num_layers)
        ps, budget, recent = decode.page_size, decode.budget, decode.recent
        need = [cache.pages_for(len(s) + steps + 1, ps) for s in seqs]
        sched = Scheduler(self, PrefillConfig(), decode, slots=len(seqs), pages_per_seq=max(need),
                          num_pages=1 + sum(need), chunk=1)
        for s in seqs:
            sched.submit(Request(prompt=s, max_tokens=steps + 2))
        sched._admit()  # prefill every prompt into its pages and insert it into its slot
        graphdef, b = self.graphdef, len(seqs)

        def fn(state, pages, slots):
            model = nnx.merge(graphdef, state)
            logits, pages, (mass, score, idx, valid) = model.decode(
                slots.tokens, slots.positions, slots.active, pages, slots.page_table, decode, record=True)
            covered = jnp.sum(jnp.take_along_axis(mass, idx, -1) * valid, -1)          # [L, b]
            oracle = jnp.sum(jax.lax.top_k(mass, min(budget, mass.shape[-1]))[0], -1)  # [L, b]
            sel = jax.vmap(lambda sc: select_pages(sc, slots.positions + 1, page_size=ps, budget=budget,
                                                   recent=recent))(score)               # [L, b, budget]
            matrix = jnp.sum(jnp.take_along_axis(mass[None], sel[0][:, None], -1) * sel[1][:, None], -1)
            slots = slots._replace(tokens=jnp.argmax(logits, -1).astype(jnp.int32),
                                   positions=slots.positions + slots.active)
            return pages, slots, covered, oracle, valid.any(-1), matrix.mean(-1)

        pages, slots, cov, orc, mat = sched.pages, sched.slots, [], [], []
        for _ in range(steps):
            pages, slots, c, o, sparse, m = self.steps.run(
                ("coverage", decode), fn, (self.state, pages, slots), f"coverage step for {b} prompts",
                donate_argnums=(1, 2))
            cov.append(np.where(np.asarray(sparse), np.asarray(c), 1.0)[:, :b])
            orc.append(np.asarray(o)[:, :b])
            mat.append(np.asarray(m))
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
