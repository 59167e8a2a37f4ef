"""Placing DELTA's selection layers from measured coverage, once per model.

`matrix[i, j]` is the share of layer j's attention mass (head averaged) that falls on the pages DELTA
selects from layer i's scores (`Engine.coverage(...)["matrix"]`). With selection layers
s_1 < s_2 < ..., layer j reads the pages of the last selection layer at or before it; this module
picks the selection layers that maximise the total covered mass (dynamic programming).
"""

from __future__ import annotations

import numpy as np

from delta_jax.config import ConfigError


def schedule_coverage(matrix: np.ndarray, full: int, selection: tuple[int, ...]) -> float:
    """Mean covered mass over the non-full layers for a schedule (selection layers count 1)."""
    n = matrix.shape[0]
    total, current = 0.0, None
    for j in range(full, n):
        if j in selection:
            current = j
            total += 1.0
        elif current is None:
            raise ConfigError(f"layer {j} has no selection layer before it in {selection}")
        else:
            total += float(matrix[current, j])
    return total / max(n - full, 1)


def best_selection_layers(matrix: np.ndarray, *, full: int, count: int) -> tuple[int, ...]:
    """The `count` selection layers (the first at layer `full`) maximising the covered mass."""
    m = np.asarray(matrix, np.float64)
    n = m.shape[0]
    if m.shape != (n, n):
        raise ConfigError(f"coverage matrix must be square, got {m.shape}")
    if not 1 <= count <= n - full:
        raise ConfigError(f"count={count} selection layers must be in 1..{n - full}")
    seg = np.zeros((n, n + 1))            # seg[a, b]: coverage of layers a..b-1 read from selection layer a
    for a in range(full, n):
        acc = 0.0
        for b in range(a, n):
            acc += 1.0 if b == a else m[a, b]
            seg[a, b + 1] = acc
    best = np.full((count + 1, n + 1), -np.inf)
    back = np.zeros((count + 1, n + 1), int)
    for s in range(full, n):              # first selection layer is `full`
        best[1, s] = 0.0 if s == full else -np.inf
    for k in range(2, count + 1):
        for s in range(full + 1, n):
            cands = [best[k - 1, p] + seg[p, s] for p in range(full, s)]
            p = int(np.argmax(cands))
            best[k, s], back[k, s] = cands[p], full + p
    finals = [best[count, s] + seg[s, n] for s in range(full, n)]
    last = full + int(np.argmax(finals))
    layers = [last]
    for k in range(count, 1, -1):
        layers.append(back[k, layers[-1]])
    return tuple(sorted(int(x) for x in layers))
