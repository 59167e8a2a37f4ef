"""The `taylor` variant's kernels (block-aligned window, far statistics) against float64 references
on fresh random inputs, on every backend (gpu and tpu kernels in interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_prefill as sp
from pallas_kernels.sparse_prefill import reference as ref

from .test_sparse_prefill import BACKENDS, SMALL, _highest_precision, _inputs, _kw, ref64, rel_err  # noqa: F401

# T (not always a multiple of gamma), window, sinks, gamma, q heads, kv heads, lengths
CASES = [
    (150, 20, 4, 16, 4, 2, (150, 101)),   # group 2, the second sequence right-padded
    (133, 37, 0, 24, 8, 2, (70, 133)),    # group 4, no sinks, gamma not a power of two
    (96, 8, 16, 16, 2, 2, None),          # window < gamma: anchors see keys past themselves
]


def _far_numpy(q, k, v, window, sinks, gamma):
    """Per anchor a * gamma and phase p, softmax statistics of the anchor's query over the far keys of
    block a - 1 + p, `[sinks, (a - 1 + p) gamma - window]` (float64 loops)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    grp = H // k.shape[2]
    n = -(-T // gamma)
    mk, mv = np.zeros((B, n, H, 3, D)), np.zeros((B, n, H, 3, D))
    lse = np.full((B, n, H, 3), -np.inf)
    for b in range(B):
        for a in range(n):
            for h in range(H):
                sc = k[b, :, h // grp] @ q[b, a * gamma, h] / np.sqrt(D)
                for p in range(3):
                    keys = np.arange(sinks, min((a - 1 + p) * gamma - window, T - 1) + 1)
                    if keys.size == 0:
                        continue
                    w = np.exp(sc[keys] - sc[keys].max())
                    lse[b, a, h, p] = sc[keys].max() + np.log(w.sum())
                    w /= w.sum()
                    mk[b, a, h, p] = w @ k[b, keys, h // grp]
                    mv[b, a, h, p] = w @ v[b, keys, h // grp]
    return mk, mv, lse


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_statistics(backend):
    T, window, sinks, gamma, H, Hkv, _ = CASES[1]
    q, k, v = _inputs(20, 2, T, H, Hkv)
    mk, mv, lse = sp.far_statistics(q, k, v, window=window, sinks=sinks, gamma=gamma, **_kw(backend))
    want_k, want_v, want_lse = _far_numpy(q, k, v, window, sinks, gamma)
    assert mk.shape == want_k.shape and lse.shape == want_lse.shape
    finite = np.isfinite(want_lse)
    assert finite.mean() > 0.5 and (~finite).any()   # both empty and non-empty far ranges occur
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    assert rel_err(np.asarray(lse)[finite], want_lse[finite]) < 1e-5
    assert rel_err(mk, want_k) < 1e-5 and rel_err(mv, want_v) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_aligned_window(backend):
    # row t attends [t - t % gamma - window + 1, t] and the sinks
    q, k, v = _inputs(21, 2, 140, 4, 2)
    window, sinks, gamma = 30, 5, 24
    out, lse = sp.sparse_attention(q, k, v, window=window, sinks=sinks, gamma=gamma, return_lse=True, **_kw(backend))
    t = np.arange(140)[:, None]
    s = np.arange(140)[None, :]
    mask = (s <= t) & ((s > t - t % gamma - window) | (s < sinks))
    want, want_lse = ref64(ref.masked_attention, q, k, v, jnp.asarray(np.broadcast_to(mask, (2, 140, 140))))
    assert rel_err(out, want) < 1e-5 and rel_err(lse, want_lse) < 1e-5
    assert rel_err(out, ref64(ref.sparse_attention_reference, q, k, v, window=window, sinks=sinks)) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_taylor_equals_the_xla_reference(backend):
    for i, (T, window, sinks, gamma, H, Hkv, lengths) in enumerate(CASES):
        q, k, v = _inputs(30 + i, 2, T, H, Hkv)
        lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
        out = sp.delta_attention(q, k, v, window=window, sinks=sinks, gamma=gamma, tail=0, variant="taylor",
                                 lengths=lens, far_block_sizes=SMALL, **_kw(backend))
        want = ref64(ref.taylor_reference, q, k, v, window=window, sinks=sinks, gamma=gamma, lengths=lens)
        for b, n in enumerate(lengths or (T, T)):
            assert rel_err(out[b, :n], want[b, :n]) < 1e-5, (T, b)
        # the far part matters: the sparse base alone is far from it
        assert rel_err(sp.sparse_attention(q, k, v, window=window, sinks=sinks, backend="xla"), want) > 1e-2


def test_taylor_reference_rows():
    # the reference against its definition for a few rows, in float64 loops: row t merges its window
    # and sinks, its band and the far part of the anchor with the tightest tangent bound
    T, window, sinks, gamma = 100, 20, 3, 16
    q, k, v = _inputs(40, 1, T, 2, 1)
    want, margin = ref64(ref.taylor_reference, q, k, v, window=window, sinks=sinks, gamma=gamma, return_margin=True)
    mk, mv, lse = _far_numpy(q, k, v, window, sinks, gamma)
    q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    n = -(-T // gamma)
    for t in (5, 37, 50, 77, 99):
        j = t // gamma
        r = j * gamma
        anchors = [(max(j - 1, 0), 2 if j else 1), (j, 1), (min(j + 1, n - 1), 0 if j + 1 < n else 1)]
        for h in range(2):
            sc = k[:, 0] @ q[t, h] / np.sqrt(64)
            local = [s for s in range(t + 1) if s > r - window or s < sinks]
            bounds = [lse[0, a, h, p] + (q[t, h] - q[a * gamma, h]) @ mk[0, a, h, p] / 8.0 for a, p in anchors]
            best = int(np.argmax(bounds))
            z_loc = np.exp(sc[local] - sc[local].max())
            parts = [(sc[local].max() + np.log(z_loc.sum()), (z_loc / z_loc.sum()) @ v[local, 0])]
            if np.isfinite(bounds[best]):
                parts.append((bounds[best], mv[0, anchors[best][0], h, anchors[best][1]]))
            top = max(p[0] for p in parts)
            w = np.array([np.exp(p[0] - top) for p in parts])
            row = sum(wi * p[1] for wi, p in zip(w / w.sum(), parts))
            np.testing.assert_allclose(want[0, t, h], row, rtol=1e-9, atol=1e-9)
            if np.isfinite(bounds[best]):
                assert np.isclose(margin[0, t, h], bounds[best] - sorted(bounds)[-2], rtol=1e-9, atol=1e-9)
            else:
                assert margin[0, t, h] == np.inf  # no far keys: no anchor to choose, no tie


@pytest.mark.parametrize("backend", ["xla", "gpu"])
def test_taylor_tail_and_padding(backend):
    # exact tail rows per sequence; a right-padded sequence equals the sequence alone
    T, window, sinks, gamma = 120, 16, 4, 16
    q, k, v = _inputs(50, 2, T, 4, 2)
    lengths = jnp.asarray([120, 83], jnp.int32)
    kw = dict(window=window, sinks=sinks, gamma=gamma, tail=10, variant="taylor", far_block_sizes=SMALL,
              **_kw(backend))
    out = np.asarray(sp.delta_attention(q, k, v, lengths=lengths, **kw))
    alone = np.asarray(sp.delta_attention(q[1:, :83], k[1:, :83], v[1:, :83], **kw))
    assert rel_err(out[1, :83], alone[0]) < 1e-5
    for b, n in enumerate((120, 83)):
        dense = ref64(ref.sparse_attention_reference, q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n],
                      window=None, sinks=0)[0]
        assert rel_err(out[b, n - 10:n], dense[n - 10:]) < 1e-5
        assert rel_err(out[b, :n - 10], dense[:n - 10]) > 1e-3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_taylor_kernels_lower_to_triton_and_mosaic(dtype):
    # Lowering only (no GPU or TPU here): Pallas -> Triton and Pallas -> Mosaic with the default tiles
    from jax import export
    q = jax.ShapeDtypeStruct((1, 1000, 8, 128), dtype)
    kv = jax.ShapeDtypeStruct((1, 1000, 2, 128), dtype)
    for backend, platform, call in (("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")):
        fn = jax.jit(lambda q_, k_, v_: sp.delta_attention(q_, k_, v_, window=256, sinks=16, gamma=64,
                                                           variant="taylor", backend=backend))
        checks = [export.DisabledSafetyCheck.custom_call(call)] if backend == "gpu" else []
        module = export.export(fn, platforms=[platform], disabled_checks=checks)(q, kv, kv).mlir_module()
        assert module.count(call) >= 3, backend  # block-aligned window, far statistics, exact tail
