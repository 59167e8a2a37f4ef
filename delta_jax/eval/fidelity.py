"""Fidelity to dense attention: KL of next-token distributions over a recall tail, and perplexity.

- `recall_samples` (in `families`, with the other recall texts): key: value records listed early, filler,
  then the same records recalled (shuffled) at the end; `tail` is the recall section's token count and
  `value_positions` the indices of the recalled value tokens.
- `kl_fidelity(engine, methods, length=, samples=)`: per method, KL(dense || method) of the next-token
  distributions at the positions predicting the recall tail (mean over positions, then over samples, with
  a t interval), the same at the positions predicting value tokens, the top-1 agreement with dense, and
  every method's teacher-forced top-1 accuracy on the value tokens.
- `perplexity(engine, methods, length=, samples=)`: perplexity of long prose over the positions from
  `start_fraction * length` on, per method, and the paired NLL difference to dense.
- `run_fidelity(engine, methods=, lengths=, out_dir=)`: both over lengths, written to `fidelity.json`.
- `family_fidelity(engine, methods, family=, length=, samples=)`: on a text family of `families`, the KL over
  its exact recall tail and the NLL of its body from one scoring pass per method, with paired differences.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Callable, Optional, Sequence

import numpy as np

from delta_jax.config import PrefillConfig
from delta_jax.eval import methods as methods_lib
from delta_jax.eval.corpus import prose
from delta_jax.eval.families import RecallSample, family_samples, recall_samples
from delta_jax.eval.stats import paired_difference, t_interval
from delta_jax.eval.tasks import encode


def kl_divergence(logp: np.ndarray, logq: np.ndarray, axis: int = -1) -> np.ndarray:
    """KL(p || q) = sum p (log p - log q) along `axis`, from log-probabilities, in the inputs' precision
    (float32 at least: float32 scores of a whole vocabulary are 20x faster than in float64).
    Terms with p = 0 contribute 0; p > 0 where q = 0 gives inf."""
    dtype = np.result_type(logp, logq, np.float32)
    lp = np.asarray(logp, dtype)
    lq = np.asarray(logq, dtype)
    if lp.shape != lq.shape:
        raise ValueError(f"logp shape {lp.shape} != logq shape {lq.shape}")
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    return terms.sum(axis=axis)


def prose_tokens(tokenizer, *, length: int, n: int, seed: int = 0) -> list[list[int]]:
    """`n` token sequences of exactly `length` tokens of built-in prose."""
    out = []
    for i in range(n):
        rng = random.Random(f"prose|{length}|{seed}|{i}")
        ids = encode(tokenizer, prose(rng, length // 4 + 8), add_special_tokens=True)
        if len(ids) < length:
            raise ValueError(f"prose of length={length} ran short ({len(ids)} tokens)")
        out.append(ids[:length])
    return out


def _prefills(methods: dict, length: int) -> dict[str, PrefillConfig]:
    methods_lib.check_methods(methods)
    return {name: methods_lib.resolve(name, spec, length)[0] for name, spec in methods.items()}


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _check_length(engine, length: int):
    cap = getattr(engine, "max_seq_len", None)
    if cap is not None and length > cap:
        raise ValueError(f"length={length} exceeds the engine's max_seq_len={cap}")


def mean_ci(values) -> dict:
    m, lo, hi = t_interval(values)
    return {"mean": m, "ci_low": lo, "ci_high": hi}


def recall_last(texts: Sequence[RecallSample]) -> int:
    """Positions whose full distribution the KL needs: every tail token's and the one after the text."""
    return max(s.tail for s in texts) + 1


def score_all(engine, seqs: Sequence, prefill: PrefillConfig, *, last: int = 0, batch_size: int = 8) -> list:
    """`engine.score` over `seqs` in batches of `batch_size`."""
    out = []
    for batch in _batches(list(seqs), batch_size):
        out += engine.score(batch, prefill=prefill, last=last)
    return out


def score_sets(engine, prefill: PrefillConfig, recall: Sequence[RecallSample], prose: Sequence, *,
               batch_size: int = 8) -> tuple[list, list]:
    """Scores the recall texts and the prose texts in one pass (one compiled shape when they share a
    length): returns (recall scores, prose scores)."""
    res = score_all(engine, [s.tokens for s in recall] + list(prose), prefill, last=recall_last(recall),
                    batch_size=batch_size)
    return res[:len(recall)], res[len(recall):]


def kl_stats(ref: Sequence, res: Sequence, texts: Sequence[RecallSample]) -> dict:
    """Per-sample KL(dense || method) over the recall tail (all positions, value positions), top-1 agreement
    with dense and teacher-forced value accuracy, from score outputs of the two methods."""
    out = {"kl": [], "kl_values": [], "top1_agree": [], "value_top1": []}
    for r, q, s in zip(ref, res, texts):
        last = r.last_logprobs.shape[0]
        k = s.tail + 1  # positions predicting every tail token, and the one after the text
        lp, lq = r.last_logprobs[-k:], q.last_logprobs[-k:]
        kl = kl_divergence(lp, lq)
        start = len(s.tokens) - k
        values = set(s.value_positions)
        vmask = np.array([start + j + 1 in values for j in range(k)])
        out["kl"].append(float(kl.mean()))
        out["kl_values"].append(float(kl[vmask].mean()))
        out["top1_agree"].append(float((lp.argmax(-1) == lq.argmax(-1)).mean()))
        out["value_top1"].append(value_top1(q.last_logprobs, s, last))
    return out


def kl_summary(prefill: PrefillConfig, stats: dict) -> dict:
    """Means with t intervals of `kl_stats` output."""
    return {"prefill": dataclasses.asdict(prefill), "kl": mean_ci(stats["kl"]),
            "kl_values": mean_ci(stats["kl_values"]), "top1_agree": float(np.mean(stats["top1_agree"])),
            "value_top1": float(np.mean(stats["value_top1"])), "per_sample_kl": stats["kl"]}


def kl_fidelity(engine, methods: dict, *, length: int, samples: int = 8, seed: int = 0, pairs: int = 8,
                batch_size: int = 8, texts: Optional[list[RecallSample]] = None,
                reference: Optional[list] = None) -> dict:
    """KL(dense || method) of next-token distributions over the recall tail, per method (see module doc).
    `reference`: dense `score` outputs of `texts` with `last=recall_last(texts)`, if already computed."""
    _check_length(engine, length)
    texts = texts or recall_samples(engine.tokenizer, length=length, n=samples, seed=seed, pairs=pairs)
    prefills = _prefills(methods, length)
    last = recall_last(texts)
    seqs = [s.tokens for s in texts]
    ref = reference or score_all(engine, seqs, PrefillConfig(method="dense"), last=last, batch_size=batch_size)
    out = {"length": length, "samples": len(texts), "pairs": pairs,
           "dense_value_top1": mean_value_top1(ref, texts),
           "methods": {}}
    for name, pre in prefills.items():
        res = ref if pre.method == "dense" else score_all(engine, seqs, pre, last=last, batch_size=batch_size)
        out["methods"][name] = kl_summary(pre, kl_stats(ref, res, texts))
    return out


def mean_value_top1(res: Sequence, texts: Sequence[RecallSample]) -> float:
    """Mean over texts of `value_top1` from their score outputs."""
    return float(np.mean([value_top1(r.last_logprobs, s, r.last_logprobs.shape[0]) for r, s in zip(res, texts)]))


def value_top1(last_logprobs: np.ndarray, s: RecallSample, last: int) -> float:
    """Fraction of value tokens that are the argmax of the prediction before them (teacher forcing)."""
    start = len(s.tokens) - last
    hits = [int(last_logprobs[v - 1 - start].argmax()) == s.tokens[v] for v in s.value_positions]
    return float(np.mean(hits))


def nll_stats(res: Sequence, texts: Sequence, start_fraction: float = 0.5) -> list[float]:
    """Per-text mean negative log-likelihood of the tokens `t` with `start_fraction * len(text) <= t <
    len(text)`; `text` may be a prefix of the scored prompt."""
    out = []
    for r, toks in zip(res, texts):
        first = max(1, int(start_fraction * len(toks)))
        out.append(float(-np.mean(np.asarray(r.logprobs, np.float64)[first - 1:len(toks) - 1])))
    return out


def body_nll(res: Sequence, texts: Sequence[RecallSample], *, exact: int, start_fraction: float = 0.5) -> list[float]:
    """Per-text mean NLL over the body: the tokens predicted by the rows before the last `exact` (which
    every method computes exactly), from `start_fraction` of them on."""
    return nll_stats(res, [s.tokens[:len(s.tokens) - exact + 1] for s in texts], start_fraction)


def nll_summary(prefill: PrefillConfig, nll: list, dense_nll: list) -> dict:
    """Mean NLL and perplexity with t intervals, and the paired difference to dense."""
    m, lo, hi = t_interval(nll)
    return {"prefill": dataclasses.asdict(prefill), "nll": {"mean": m, "ci_low": lo, "ci_high": hi},
            "perplexity": {"mean": math.exp(m), "ci_low": math.exp(lo), "ci_high": math.exp(hi)},
            "nll_minus_dense": mean_ci(np.asarray(nll) - np.asarray(dense_nll)), "per_sample_nll": nll}


def paired(methods: dict, pairs: Sequence[tuple[str, str]]) -> dict:
    """Paired differences `a - b` of the per-sample KL and NLL of method records, for the pairs present."""
    return {f"{x} - {y}": {k: paired_difference(methods[x][f"per_sample_{k}"], methods[y][f"per_sample_{k}"])
                           for k in ("kl", "nll")}
            for x, y in pairs if x in methods and y in methods}


def family_fidelity(engine, methods: dict, *, family: str, length: int, samples: int, seed: int = 0,
                    exact: int = 160, start_fraction: float = 0.5, batch_size: int = 8,
                    pairs: Sequence[tuple[str, str]] = (), skip: Optional[Callable[[str], bool]] = None,
                    done: Optional[Callable[[dict], None]] = None) -> dict:
    """KL(dense || method) over the recall tail and the body NLL (`body_nll`) of `samples` texts of
    `family` (`families.family_samples`), every method with its last `exact` rows exact (covering the
    tail), against one dense pass; per-sample values, t intervals and the paired differences of `pairs`.
    `skip(name)` true leaves a method out (a deadline); `done(cell)` runs after each method."""
    _check_length(engine, length)
    if not 1 < exact < length:
        raise ValueError(f"exact={exact} must lie between 2 and length={length}")
    prefills = {k: v if v.method == "dense" else dataclasses.replace(v, tail=exact)
                for k, v in _prefills(methods, length).items()}
    texts = family_samples(family, engine.tokenizer, length=length, n=samples, seed=seed, tail_tokens=exact - 1)
    seqs = [s.tokens for s in texts]
    ref = score_all(engine, seqs, PrefillConfig(method="dense"), last=exact, batch_size=batch_size)
    dense_nll = body_nll(ref, texts, exact=exact, start_fraction=start_fraction)
    cell = {"family": family, "length": length, "samples": len(texts), "exact": exact,
            "tokens": float(np.mean([len(x) for x in seqs])), "recall_tokens": float(np.mean([s.tail for s in texts])),
            "head_tokens": float(np.mean([s.head for s in texts])),
            "dense": {**nll_summary(PrefillConfig(method="dense"), dense_nll, dense_nll),
                      "value_top1": mean_value_top1(ref, texts)},
            "methods": {}, "paired": {}}
    for name, pre in prefills.items():
        if skip is not None and skip(name):
            continue
        t0 = time.time()
        res = ref if pre.method == "dense" else score_all(engine, seqs, pre, last=exact, batch_size=batch_size)
        nll = body_nll(res, texts, exact=exact, start_fraction=start_fraction)
        cell["methods"][name] = {**kl_summary(pre, kl_stats(ref, res, texts)), **nll_summary(pre, nll, dense_nll),
                                 "seconds": time.time() - t0}
        cell["paired"] = paired(cell["methods"], pairs)
        if done is not None:
            done(cell)
    return cell


def perplexity(engine, methods: dict, *, length: int, samples: int = 4, seed: int = 0,
               start_fraction: float = 0.5, batch_size: int = 8,
               texts: Optional[list[list[int]]] = None) -> dict:
    """Perplexity over positions `t >= start_fraction * length` of prose, per method, with the paired
    mean NLL difference to dense (t intervals over samples). `texts`: your own token sequences."""
    if not 0 <= start_fraction < 1:
        raise ValueError(f"start_fraction={start_fraction} must lie in [0, 1)")
    _check_length(engine, length)
    texts = texts or prose_tokens(engine.tokenizer, length=length, n=samples, seed=seed)
    prefills = _prefills(methods, length)
    prefills.setdefault("dense", PrefillConfig(method="dense"))
    nll = {name: nll_stats(score_all(engine, texts, pre, batch_size=batch_size), texts, start_fraction)
           for name, pre in prefills.items()}
    out = {"length": length, "samples": len(texts), "start_fraction": start_fraction, "methods": {}}
    for name, v in nll.items():
        out["methods"][name] = nll_summary(prefills[name], v, nll["dense"])
    return out


def run_fidelity(engine, *, methods: dict, lengths: Sequence[int], samples: int = 8, seed: int = 0,
                 pairs: int = 8, ppl_samples: Optional[int] = None, start_fraction: float = 0.5,
                 batch_size: int = 8, out_dir: Optional[str] = None, progress: bool = True) -> dict:
    """KL fidelity and perplexity for every length; writes `out_dir/fidelity.json` and returns the dict."""
    from delta_jax.eval.report import progress_bar, write_json
    results = {"kl": [], "perplexity": []}
    bar = progress_bar(total=2 * len(lengths), desc="fidelity", enabled=progress)
    for length in lengths:
        results["kl"].append(kl_fidelity(engine, methods, length=length, samples=samples, seed=seed,
                                          pairs=pairs, batch_size=batch_size))
        bar.update(1)
        results["perplexity"].append(perplexity(engine, methods, length=length,
                                                samples=ppl_samples or samples, seed=seed,
                                                start_fraction=start_fraction, batch_size=batch_size))
        bar.update(1)
    bar.close()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_json(results, os.path.join(out_dir, "fidelity.json"))
    return results
