"""`delta-jax` command line: convert | generate | serve | score | eval | shift | info."""

from __future__ import annotations

import argparse
import json
import os
import sys

from delta_jax.config import PREFILL_VARIANTS, ConfigError

DEFAULT_MODEL = "smollm2-135m"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found" line: torch is not needed


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _add_model(p: argparse.ArgumentParser):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in model name or converted checkpoint folder (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="weights and activations (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--max-seq-len", type=int, default=None, help="KV cache length (default: the model's context)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,model=4 (default: all devices on model)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host start-up: jax.distributed.initialize() (automatic on Cloud TPU; elsewhere "
                        "give --coordinator, --num-processes, --process-id)")
    p.add_argument("--coordinator", default=None, help="host:port of process 0 (with --distributed)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)


def _add_methods(p: argparse.ArgumentParser, decode: bool = True):
    g = p.add_argument_group("prefill method")
    g.add_argument("--prefill", default="dense", choices=["dense", "window", "delta"])
    g.add_argument("--window", type=int, help="sliding-window keys (default 2048)")
    g.add_argument("--sinks", type=int, help="sink tokens (default 64)")
    g.add_argument("--gamma", type=int, help="one exact row in every gamma (default 64)")
    g.add_argument("--tail", type=int, help="exact tail rows (default: T %% gamma + max(128, gamma))")
    g.add_argument("--smooth", action="store_true", default=None, help="interpolate between deltas")
    g.add_argument("--base", choices=["window", "topk_blocks"], help="sparse base of delta")
    g.add_argument("--variant", help="correction variant of delta: " + ", ".join(PREFILL_VARIANTS))
    g.add_argument("--topk", type=int, help="key blocks per query block for base topk_blocks (default 8)")
    g.add_argument("--dense-layers", type=int, help="first layers with dense prefill (default 0)")
    if decode:
        g = p.add_argument_group("decode method")
        g.add_argument("--decode", default="dense", choices=["dense", "delta"])
        g.add_argument("--full-layers", type=_ints, help="layers with full attention, e.g. 0,1")
        g.add_argument("--selection-layers", type=_ints, help="DELTA selection layers, e.g. 2,15,23")
        g.add_argument("--page-size", type=int, help="tokens per page (default 16)")
        g.add_argument("--budget", type=int, help="pages kept by selection (default 64)")
        g.add_argument("--recent", type=int, help="last pages always kept (default 8)")


def _method_params(a: argparse.Namespace) -> dict:
    names = ["window", "sinks", "gamma", "tail", "smooth", "base", "variant", "topk", "dense_layers", "full_layers",
             "selection_layers", "page_size", "budget", "recent"]
    return {n: getattr(a, n) for n in names if getattr(a, n, None) is not None}


def _prompts(a: argparse.Namespace) -> list[str]:
    if a.prompt is not None:
        return list(a.prompt)
    if a.prompt_file is not None:
        if not os.path.isfile(a.prompt_file):
            raise ConfigError(f"prompt file not found: {a.prompt_file}")
        with open(a.prompt_file) as f:
            text = f.read()
        if a.prompt_file.endswith(".jsonl"):
            return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
        return [text]
    raise ConfigError("give --prompt TEXT (repeatable) or --prompt-file FILE (.txt: one prompt; .jsonl: {\"prompt\": ...} per line)")


def _engine(a: argparse.Namespace):
    from delta_jax.engine import Engine
    if getattr(a, "distributed", False):
        import jax
        jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.num_processes,
                                   process_id=a.process_id)
    return Engine.from_pretrained(a.model, dtype=a.dtype, max_seq_len=a.max_seq_len, mesh=a.mesh)


def cmd_convert(a):
    from checkpoints import convert
    convert(a.src, a.dst, dtype=a.dtype, progress=True)
    print(f"converted {a.src} -> {a.dst}", file=sys.stderr)


def cmd_generate(a):
    engine = _engine(a)
    prompts = _prompts(a)
    stream = not a.json and len(prompts) == 1 and not a.stop  # with stop strings, the text is printed when cut
    state = {"text": ""}
    toks: list[int] = []

    def on_token(i, t):
        toks.append(t)
        text = engine.tokenizer.decode(toks, skip_special_tokens=True)
        sys.stdout.write(text[len(state["text"]):])
        sys.stdout.flush()
        state["text"] = text

    outs = engine.generate(prompts, max_new_tokens=a.max_new_tokens, chat=a.chat,
                           temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                           prefill=a.prefill, decode=a.decode, stop=a.stop or (),
                           on_token=on_token if stream else None, **_method_params(a))
    for p, o in zip(prompts, outs):
        if a.json:
            print(json.dumps({"prompt": p, "text": o.text, "tokens": o.tokens, "prompt_tokens": o.prompt_tokens,
                              "prefill_seconds": o.prefill_seconds, "ttft_seconds": o.ttft_seconds,
                              "decode_tokens_per_second": o.decode_tokens_per_second,
                              "finish_reason": o.finish_reason}))
        elif stream:
            print()
        else:
            print(o.text)
        if not a.json:
            print(f"[{o.prompt_tokens} prompt tokens, prefill {o.prefill_seconds:.3f}s, "
                  f"{len(o.tokens)} new tokens at {o.decode_tokens_per_second:.1f} tok/s, {o.finish_reason}]",
                  file=sys.stderr)


def cmd_serve(a):
    from delta_jax.engine import methods_from
    try:
        from delta_jax import server
    except ImportError as e:
        raise ConfigError(f"delta-jax serve needs fastapi and uvicorn ({e}): pip install fastapi uvicorn")
    for flag, value, least in (("--slots", a.slots, 1), ("--chunk", a.chunk, 1), ("--kv-pages", a.kv_pages, 2)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    name = a.served_model_name or a.model
    if not name.strip():
        raise ConfigError(f"--served-model-name must not be empty, got {name!r}")
    prefill, decode = methods_from(a.prefill, a.decode, _method_params(a))  # bad method flags fail before loading
    sock = server.listen(a.host, a.port)
    engine = _engine(a)
    sched = engine.scheduler(prefill, decode, slots=a.slots, num_pages=a.kv_pages, chunk=a.chunk)
    spec = sched.spec
    server.log(f"{spec.slots} slots of up to {spec.max_tokens} tokens, {spec.num_pages} KV pages of {spec.page_size} "
               f"tokens; prefill {prefill.method}, decode {decode.method}, {sched.chunk} decode steps per dispatch")
    server.serve(engine, sched, sock, model_name=name)


def cmd_score(a):
    engine = _engine(a)
    prompts = _prompts(a)
    outs = engine.score(prompts, prefill=a.prefill, last=a.last, chat=a.chat, **_method_params(a))
    for p, o in zip(prompts, outs):
        rec = {"tokens": o.tokens, "logprobs": o.logprobs.tolist(),
               "mean_logprob": float(o.logprobs.mean()) if len(o.logprobs) else 0.0}
        if o.last_logprobs is not None:
            rec["last_top"] = [[int(i), float(r[i])] for r in o.last_logprobs for i in [int(r.argmax())]]
        if a.json:
            print(json.dumps(rec))
        else:
            print(f"{len(o.tokens)} tokens, mean log-prob {rec['mean_logprob']:.4f}, "
                  f"perplexity {float(__import__('math').exp(-rec['mean_logprob'])):.3f}")


def cmd_info(a):
    import jax
    import flax
    info = {"jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}
    if a.model:
        from checkpoints import builtin, load_config
        folder = builtin.resolve(a.model, progress=True)
        info["model_folder"] = folder
        info["config"] = load_config(folder)
    print(json.dumps(info, indent=2))


def cmd_eval(a):
    from delta_jax.eval import cli as eval_cli
    eval_cli.run_eval_cli(a, _engine(a))


def cmd_shift(a):
    from delta_jax.eval import cli as eval_cli
    eval_cli.run_shift_cli(a, _engine(a))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="delta-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="Hugging Face folder or .gguf -> delta-jax checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                   help="stored dtype (default: the source's; float32 for GGUF)")
    c.set_defaults(fn=cmd_convert)

    for name, fn, helptext in (("generate", cmd_generate, "generate text"),
                               ("score", cmd_score, "log-probabilities of prompt tokens")):
        g = sub.add_parser(name, help=helptext)
        _add_model(g)
        g.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
        g.add_argument("--prompt-file")
        g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
        g.add_argument("--json", action="store_true", help="one JSON object per prompt")
        _add_methods(g, decode=name == "generate")
        if name == "generate":
            g.add_argument("--max-new-tokens", type=int, default=64)
            g.add_argument("--temperature", type=float, default=0.0)
            g.add_argument("--top-p", type=float, default=1.0)
            g.add_argument("--seed", type=int, default=0)
            g.add_argument("--stop", action="append", help="stop string (repeatable); the text ends before it")
        else:
            g.add_argument("--last", type=int, default=0, help="also return the top token at the last N positions")
        g.set_defaults(fn=fn)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    _add_model(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--slots", type=int, default=8, help="decode rows: requests decoding at once (default 8)")
    v.add_argument("--kv-pages", type=int, default=None,
                   help="pages in the KV cache pool (default: every slot at full length, capped by the device memory)")
    v.add_argument("--chunk", type=int, default=16, help="decode steps per device dispatch (default 16)")
    v.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    _add_methods(v)
    v.set_defaults(fn=cmd_serve)

    i = sub.add_parser("info", help="model config, devices, versions")
    i.add_argument("--model", default=None)
    i.set_defaults(fn=cmd_info)

    try:
        from delta_jax.eval import cli as eval_cli
    except ImportError:
        eval_cli = None
    if eval_cli is not None:
        e = sub.add_parser("eval", help="long-context tasks and fidelity, per method")
        _add_model(e)
        eval_cli.add_eval_args(e)
        e.set_defaults(fn=cmd_eval)
        s = sub.add_parser("shift", help="per-layer distribution-shift diagnostic")
        _add_model(s)
        eval_cli.add_shift_args(s)
        s.set_defaults(fn=cmd_shift)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"delta-jax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
