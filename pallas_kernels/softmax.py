"""The online softmax shared by the Pallas kernel bodies (GPU Triton, TPU Mosaic) and their
blockwise XLA twins.

Base 2 throughout: logits are `s2 = (q . k) * scale2` with `scale2 = log2(e) / sqrt(head_dim)`,
so `p = exp2(s2 - lse2)`; `LN2 * lse2` is the natural log-partition. The running state of a tile
of `rows` queries is a `Carry`: the running maximum `m` and sum `l` (shape [rows] or
[rows, 1], whichever the body keeps) and one float32 accumulator [rows, width] per value
operand (a kernel may accumulate several, e.g. the values and the keys themselves).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


class Carry(NamedTuple):
    m: jnp.ndarray
    l: jnp.ndarray
    accs: tuple


def precision(dtype):
    """float32 inputs get exact float32 dots (no tf32); others the default."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def scale2(head_dim: int) -> float:
    """Softmax scale 1/sqrt(head_dim) in base 2."""
    return LOG2E / math.sqrt(head_dim)


def init(rows: int, widths, column: bool = False) -> Carry:
    """Empty state for `rows` queries and accumulators of the given widths; `column` keeps m and l
    as [rows, 1] (the TPU layout) instead of [rows]."""
    shape = (rows, 1) if column else (rows,)
    return Carry(jnp.full(shape, MASK_VALUE, jnp.float32), jnp.zeros(shape, jnp.float32),
                 tuple(jnp.zeros((rows, w), jnp.float32) for w in widths))


def logits(q, k, scale: float, prec):
    """Base-2 logits [rows, cols] of q [rows, D] against k [cols, D], float32."""
    return lax.dot_general(q, k, _NT, precision=prec, preferred_element_type=jnp.float32) * scale


def _col(x):
    return x.reshape(x.shape[0], 1)


def update(carry: Carry, s, keep, values, prec) -> Carry:
    """One online-softmax step over a key block: logits s [rows, cols] (base 2), `keep` bool mask
    broadcastable to s (None: every entry), `values` one [cols, width] operand per accumulator."""
    m, l, accs = carry
    if keep is not None:
        s = jnp.where(keep, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True).reshape(m.shape))
    p = jnp.exp2(s - _col(m_new))
    if keep is not None:  # rows with every key masked so far have m_new = MASK_VALUE
        p = jnp.where(keep, p, 0.0)
    corr = jnp.exp2(m - m_new)
    l = l * corr + jnp.sum(p, axis=1, keepdims=True).reshape(l.shape)
    accs = tuple(a * _col(corr) + lax.dot_general(p.astype(v.dtype), v, _NN, precision=prec,
                                                  preferred_element_type=jnp.float32)
                 for a, v in zip(accs, values))
    return Carry(m_new, l, accs)


def finish(carry: Carry):
    """Normalised accumulators (float32) and the base-2 log-partition (-inf for a row with no key;
    its outputs are 0)."""
    m, l, accs = carry
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    outs = tuple(a / _col(l_safe) for a in accs)
    return outs, jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe))

