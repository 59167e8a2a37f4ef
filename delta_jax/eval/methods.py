"""Method specifications for evaluations: names -> (PrefillConfig, DecodeConfig), parsing and sweeps.

A method is a `(PrefillConfig, DecodeConfig)` pair, a bare `PrefillConfig` (dense decode), or a callable
`length -> pair` for configurations that scale with the prompt (the authors' proportions).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Union

from delta_jax.config import DecodeConfig, PrefillConfig

MethodSpec = Union[PrefillConfig, tuple, Callable[[int], tuple]]

_PREFILL = {f.name: f for f in dataclasses.fields(PrefillConfig)}
_DECODE = {f.name: f for f in dataclasses.fields(DecodeConfig)}


def resolve(name: str, spec: MethodSpec, length: int) -> tuple[PrefillConfig, DecodeConfig]:
    """The (prefill, decode) pair of method `name` for prompts of `length` tokens."""
    value = spec(length) if callable(spec) else spec
    if isinstance(value, PrefillConfig):
        return value, DecodeConfig()
    if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], PrefillConfig)
            and isinstance(value[1], DecodeConfig)):
        return value
    raise ValueError(f"method {name!r}: expected (PrefillConfig, DecodeConfig), a PrefillConfig or a "
                     f"callable of the length returning one, got {value!r}")


def check_methods(methods: dict) -> None:
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"methods must be a non-empty dict name -> (PrefillConfig, DecodeConfig), got {methods!r}")
    for name, spec in methods.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"method names must be non-empty strings, got {name!r}")
        if not callable(spec):
            resolve(name, spec, 0)


def describe(prefill: PrefillConfig, decode: DecodeConfig) -> dict:
    """JSON-friendly record of a method pair."""
    return {"prefill": dataclasses.asdict(prefill), "decode": dataclasses.asdict(decode)}


def _convert(field: dataclasses.Field, text: str):
    kind = str(field.type)
    if text.lower() in ("none", "null"):
        return None
    if "tuple" in kind:
        return tuple(int(x) for x in text.replace("+", ".").split(".") if x)
    if "bool" in kind:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{field.name} expects true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if "int" in kind:
        return int(text)
    return text


def _part(text: str, fields: dict, cls, what: str):
    method, _, rest = text.partition(":")
    kw = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields or key == "method":
            raise ValueError(f"bad {what} parameter {item!r}; known: {sorted(set(fields) - {'method'})}")
        kw[key] = _convert(fields[key], val.strip())
    return cls(method=method.strip(), **kw)


def parse_method(spec: str) -> tuple[str, tuple[PrefillConfig, DecodeConfig]]:
    """Parses `NAME=PREFILL[:k=v,...][/DECODE[:k=v,...]]`, e.g.
    `delta256=delta:window=256,sinks=16,gamma=64` or `delta-dec=dense/delta:budget=64,selection_layers=2.15.23`
    (tuple values separated by `.`). Without `NAME=` the spec itself is the name."""
    name, eq, body = spec.partition("=")
    if not eq or ":" in name or "/" in name:
        name, body = spec, spec
    pre, _, dec = body.partition("/")
    try:
        prefill = _part(pre, _PREFILL, PrefillConfig, "prefill")
        decode = _part(dec, _DECODE, DecodeConfig, "decode") if dec else DecodeConfig()
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot parse method {spec!r}: {e}") from None
    return name.strip(), (prefill, decode)


def authors_proportions(length: int) -> tuple[int, int]:
    """Window and sinks covering 3/4 of a `length`-token prompt as in the authors' setting
    (window 2048 + sinks 1024 at 4K): window = length / 2, sinks = length / 4."""
    return max(1, length // 2), max(0, length // 4)


def sweep_methods(*, windows: Iterable[int] = (256,), sinks: Iterable[int] = (16,),
                  gammas: Iterable[int] = (64,), kinds: Iterable[str] = ("window", "delta"),
                  tail: Optional[int] = None, recompute: bool = True, dense: bool = True,
                  authors: bool = False, decode: Optional[DecodeConfig] = None) -> dict:
    """Methods over a grid of window x sinks x gamma for the prefill kinds `window` and `delta`.

    `window` with `recompute=True` keeps the exact strided rows and tail (the authors' `recompute`),
    otherwise it has no strided rows and only `tail` exact rows (0 when `tail=None`: `sparse-only`).
    `authors=True` adds length-dependent methods with window + sinks covering 3/4 of the prompt.
    Names: `window w256 s16 g64`, `delta w256 s16 g64`, `delta 3/4 g64`, `dense`.
    """
    decode = decode or DecodeConfig()
    kinds = tuple(kinds)
    bad = set(kinds) - {"window", "delta"}
    if bad:
        raise ValueError(f"unknown prefill kinds {sorted(bad)}; choose window or delta")
    out: dict = {}
    if dense:
        out["dense"] = (PrefillConfig(method="dense"), decode)

    def make(kind, w, s, g):
        if kind == "window" and not recompute:
            return PrefillConfig(method="window", window=w, sinks=s, gamma=None, tail=tail or 0)
        return PrefillConfig(method=kind, window=w, sinks=s, gamma=g, tail=tail)

    for kind in kinds:
        for w in windows:
            for s in sinks:
                gs = gammas if (kind == "delta" or recompute) else (None,)
                for g in gs:
                    name = f"{kind} w{w} s{s}" + (f" g{g}" if g is not None else "")
                    out[name] = (make(kind, w, s, g), decode)
        if authors:
            gs = gammas if (kind == "delta" or recompute) else (None,)
            for g in gs:
                name = f"{kind} 3/4" + (f" g{g}" if g is not None else "")
                out[name] = (lambda length, kind=kind, g=g:
                             (make(kind, *authors_proportions(length), g), decode))
    return out
