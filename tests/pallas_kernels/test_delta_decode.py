"""DELTA decode kernels (dense + page scores, page selection, sparse decode) against float64
NumPy references, every backend in interpret mode on the CPU."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.delta_decode import (BlockSizes, decode_attention_with_page_scores,
                                         page_scores_from_token_maxima, reference, select_pages,
                                         sparse_decode_attention)

PS = 16
S = 128  # 8 pages
BACKENDS = ("xla", "gpu", "tpu")
# (group, head_dim, dtype); every case has lengths not a multiple of page_size and one below
# budget * page_size.
CASES = [(1, 64, jnp.float32), (3, 128, jnp.float32), (8, 64, jnp.bfloat16)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
# Small tiles so that the tests cross split and block boundaries.
SMALL = {"gpu": BlockSizes(block_k=32, pages_per_block=2, num_splits=2),
         "tpu": BlockSizes(block_k=32), "xla": None}


def _inputs(seed, group, head_dim, dtype, batch=3, hkv=2, lengths=(37, 100, 128)):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, hkv * group, head_dim)) * 1.5
    k = rng.standard_normal((batch, hkv, S, head_dim))
    v = rng.standard_normal((batch, hkv, S, head_dim))
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return q, k, v, jnp.asarray(lengths[:batch], jnp.int32)


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _np_probs(q, k, keep):
    """float64 softmax probabilities [B, Hq, S] over the tokens where keep [B, S]."""
    B, hq, D = q.shape
    hkv = k.shape[1]
    kk = np.repeat(k, hq // hkv, axis=1)
    s = np.einsum("bhd,bhsd->bhs", q, kk) / math.sqrt(D)
    s = np.where(keep[:, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _np_attend(q, k, v, keep):
    p = _np_probs(q, k, keep)
    vv = np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    return np.einsum("bhs,bhsd->bhd", p, vv)


def _np_keep_dense(lengths, S):
    return np.arange(S)[None, :] < np.asarray(lengths)[:, None]


def _np_keep_pages(idx, valid, lengths, S, ps):
    keep = np.zeros((len(lengths), S), bool)
    for b in range(len(lengths)):
        for p, ok in zip(idx[b], valid[b]):
            if ok:
                keep[b, p * ps:(p + 1) * ps] = True
    return keep & _np_keep_dense(lengths, S)


def _np_page_scores(q, k, lengths, ps):
    p = _np_probs(q, k, _np_keep_dense(lengths, k.shape[2]))
    tmax = p.max(axis=1)
    return tmax.reshape(len(lengths), -1, ps).sum(-1)


def _np_select(scores, lengths, ps, budget, recent):
    B, P = scores.shape
    idx = np.zeros((B, budget), np.int32)
    valid = np.zeros((B, budget), bool)
    for b in range(B):
        nv = min(P, -(-int(lengths[b]) // ps))
        forced = list(range(max(0, nv - recent), nv))
        rest = sorted(range(0, max(0, nv - recent)), key=lambda p: (-scores[b, p], p))
        chosen = sorted(forced + rest[:budget - len(forced)])
        idx[b, :len(chosen)] = chosen
        idx[b, len(chosen):] = nv - 1
        valid[b, :len(chosen)] = True
    return idx, valid


def _rel(x, ref):
    x = _f64(x)
    assert np.all(np.isfinite(x))
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group,head_dim,dtype", CASES)
def test_dense_decode_and_page_scores(backend, group, head_dim, dtype):
    q, k, v, lengths = _inputs(1 + group, group, head_dim, dtype)
    out, scores = decode_attention_with_page_scores(
        q, k, v, lengths, page_size=PS, backend=backend, block_sizes=SMALL[backend], interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert scores.shape == (3, S // PS) and scores.dtype == jnp.float32
    qd, kd, vd = _f64(q), _f64(k), _f64(v)
    ref = _np_attend(qd, kd, vd, _np_keep_dense(lengths, S))
    assert _rel(out, ref) <= TOL[dtype]
    ref_scores = _np_page_scores(qd, kd, lengths, PS)
    np.testing.assert_allclose(_f64(scores), ref_scores, rtol=1e-4, atol=1e-6)
    # Pages past the length score exactly 0; a page score never exceeds its token count.
    assert np.all(_f64(scores)[0, 3:] == 0.0) and np.all(_f64(scores)[1, 7:] == 0.0)
    assert np.all(_f64(scores)[:, 0] > 0.0)

    _, tmax = decode_attention_with_page_scores(
        q, k, v, lengths, page_size=PS, backend=backend, block_sizes=SMALL[backend], interpret=True,
        reduce_heads=False)
    assert tmax.shape == (3, k.shape[1], S)
    p = _np_probs(qd, kd, _np_keep_dense(lengths, S))
    ref_tmax = p.reshape(3, k.shape[1], group, S).max(axis=2)
    np.testing.assert_allclose(_f64(tmax), ref_tmax, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(_f64(page_scores_from_token_maxima(tmax, PS)), _f64(scores),
                               rtol=1e-6, atol=1e-7)


def test_dense_default_blocks_and_batch_one():
    """Default tile sizes, batch 1, a single-token sequence."""
    q, k, v, lengths = _inputs(7, 4, 64, jnp.float32, batch=1, lengths=(1,))
    ref = _np_attend(_f64(q), _f64(k), _f64(v), _np_keep_dense(lengths, S))
    np.testing.assert_allclose(ref, np.repeat(_f64(v)[:, :, :1], 4, axis=1).reshape(ref.shape), rtol=1e-6)
    for backend in BACKENDS:
        out, scores = decode_attention_with_page_scores(q, k, v, lengths, backend=backend, interpret=True)
        assert _rel(out, ref) <= 1e-5, backend
        np.testing.assert_allclose(_f64(scores), np.eye(1, S // PS), atol=1e-6)


def test_select_pages_matches_numpy_with_ties():
    rng = np.random.default_rng(3)
    B, P = 6, 40
    lengths = np.array([1, 37, 100, 640, 639, 250], np.int32)
    for budget, recent in ((8, 2), (5, 5), (12, 0), (50, 3), (1, 1)):
        scores = rng.integers(0, 4, size=(B, P)).astype(np.float32)  # many ties
        scores[:, 0] = 1e9  # a sink-like page dominating
        idx, valid = select_pages(jnp.asarray(scores), jnp.asarray(lengths), page_size=PS,
                                  budget=budget, recent=recent)
        ref_idx, ref_valid = _np_select(scores, lengths, PS, budget, recent)
        np.testing.assert_array_equal(np.asarray(valid), ref_valid)
        np.testing.assert_array_equal(np.asarray(idx), ref_idx)
        r_idx, r_valid = reference.select_pages_reference(
            jnp.asarray(scores), jnp.asarray(lengths), page_size=PS, budget=budget, recent=recent)
        np.testing.assert_array_equal(np.asarray(r_idx), ref_idx)
        np.testing.assert_array_equal(np.asarray(r_valid), ref_valid)
        for b in range(B):
            nv = -(-int(lengths[b]) // PS)
            sel = np.asarray(idx[b])[np.asarray(valid[b])]
            assert len(sel) == min(nv, budget)
            assert np.all(np.diff(sel) > 0) and np.all(sel < nv)
            assert set(range(max(0, nv - recent), nv)) <= set(sel.tolist())


def test_select_pages_tie_goes_to_earlier_page():
    scores = jnp.asarray([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 0.0, 0.0]])
    idx, valid = select_pages(scores, jnp.asarray([128]), page_size=PS, budget=3, recent=1)
    np.testing.assert_array_equal(np.asarray(idx), [[1, 2, 7]])
    assert bool(valid.all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group,head_dim,dtype", CASES)
def test_sparse_decode(backend, group, head_dim, dtype):
    q, k, v, lengths = _inputs(11 + group, group, head_dim, dtype)
    rng = np.random.default_rng(group)
    scores = jnp.asarray(rng.random((3, S // PS)), jnp.float32)
    idx, valid = select_pages(scores, lengths, page_size=PS, budget=4, recent=1)
    assert not bool(valid[0].all())  # length 37 < budget * page_size: padded entries
    out = sparse_decode_attention(q, k, v, idx, valid, lengths, page_size=PS, backend=backend,
                                  block_sizes=SMALL[backend], interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    keep = _np_keep_pages(np.asarray(idx), np.asarray(valid), np.asarray(lengths), S, PS)
    ref = _np_attend(_f64(q), _f64(k), _f64(v), keep)
    assert _rel(out, ref) <= TOL[dtype]
    dense_ref = _np_attend(_f64(q), _f64(k), _f64(v), _np_keep_dense(lengths, S))
    assert _rel(out, dense_ref) > 10 * TOL[dtype]  # the selection matters on rows 1 and 2
    np.testing.assert_allclose(_f64(reference.sparse_decode_reference(q, k, v, idx, valid, lengths, PS)),
                               ref, rtol=1e-3 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_with_all_pages_equals_dense(backend):
    q, k, v, lengths = _inputs(5, 3, 64, jnp.float32)
    out, scores = decode_attention_with_page_scores(q, k, v, lengths, page_size=PS, backend=backend,
                                                    block_sizes=SMALL[backend], interpret=True)
    idx, valid = select_pages(scores, lengths, page_size=PS, budget=S // PS, recent=2)
    sparse = sparse_decode_attention(q, k, v, idx, valid, lengths, page_size=PS, backend=backend,
                                     block_sizes=SMALL[backend], interpret=True)
    assert _rel(sparse, _f64(out)) <= 1e-6


def test_references_match_numpy():
    q, k, v, lengths = _inputs(21, 4, 64, jnp.float32)
    qd, kd, vd = _f64(q), _f64(k), _f64(v)
    np.testing.assert_allclose(_f64(reference.dense_decode_reference(q, k, v, lengths)),
                               _np_attend(qd, kd, vd, _np_keep_dense(lengths, S)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_f64(reference.page_scores_reference(q, k, lengths, PS)),
                               _np_page_scores(qd, kd, lengths, PS), rtol=1e-5, atol=1e-7)


def test_bad_arguments():
    q, k, v, lengths = _inputs(0, 2, 64, jnp.float32)
    f = decode_attention_with_page_scores
    with pytest.raises(ValueError, match="multiple of kv heads"):
        f(q[:, :3], k, v, lengths)
    with pytest.raises(ValueError, match="max_seq 128 is not a multiple of page_size 48"):
        f(q, k, v, lengths, page_size=48)
    with pytest.raises(ValueError, match="batch mismatch"):
        f(q[:2], k, v, lengths)
    with pytest.raises(ValueError, match="rank 3"):
        f(q[:, None], k, v, lengths)
    with pytest.raises(ValueError, match="backend"):
        f(q, k, v, lengths, backend="cuda")
    with pytest.raises(ValueError, match="shapes differ"):
        f(q, k, v[:, :, :64], lengths)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        f(q[..., :32], k, v, lengths)
    with pytest.raises(ValueError, match="block_k"):
        BlockSizes(block_k=24)
    scores = jnp.ones((3, 8))
    with pytest.raises(ValueError, match="budget=2 must be >= 1 and >= recent=3"):
        select_pages(scores, lengths, page_size=PS, budget=2, recent=3)
    with pytest.raises(ValueError, match="budget=0"):
        select_pages(scores, lengths, page_size=PS, budget=0, recent=0)
    with pytest.raises(ValueError, match="recent must be >= 0"):
        select_pages(scores, lengths, page_size=PS, budget=2, recent=-1)
    with pytest.raises(ValueError, match="does not match"):
        select_pages(scores, lengths[:2], page_size=PS, budget=2, recent=1)
    idx = jnp.zeros((3, 4), jnp.int32)
    with pytest.raises(ValueError, match="page_indices"):
        sparse_decode_attention(q, k, v, idx[:2], jnp.ones((2, 4), bool), lengths)
    with pytest.raises(ValueError, match="differ"):
        sparse_decode_attention(q, k, v, idx, jnp.ones((3, 5), bool), lengths)
