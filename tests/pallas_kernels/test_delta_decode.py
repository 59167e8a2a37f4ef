"""DELTA decode kernels over a fragmented paged KV cache against the contiguous-cache references
(`reference.py`, themselves checked against float64 NumPy), every backend in interpret mode."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.delta_decode import (BlockSizes, default_block_sizes, gpu, page_scores_from_token_maxima,
                                         paged_decode_attention, paged_sparse_decode_attention, reference,
                                         select_pages)
from pallas_kernels.delta_decode.selection import top_indices

PS = 16
PPS = 9  # pages per sequence: not a multiple of the test's pages_per_block
LENGTHS = (37, 0, PPS * PS, 100)  # a partial last page, an empty slot, a full table, another partial
BACKENDS = ("xla", "gpu", "tpu")
# Small tiles so that the tests cross split and block boundaries.
SMALL = {"gpu": BlockSizes(pages_per_block=2, num_splits=2), "tpu": BlockSizes(pages_per_block=2), "xla": None}
GARBAGE = 30.0  # scale of what lies past the lengths: read into a result, it would dominate it


def _paged(seed, group, head_dim, lengths=LENGTHS, pps=PPS, hkv=2, spare=6, dtype=jnp.float32):
    """A logical contiguous cache and the same tokens in a shuffled pool shared by the batch.

    -> q, k_pages, v_pages, page_table, lengths, k_cache, v_cache. Tokens past each length, unused
    pool pages and the table entries past each length (random in-range pages, other sequences'
    included) hold garbage."""
    rng = np.random.default_rng(seed)
    B, S = len(lengths), pps * PS
    q = rng.standard_normal((B, hkv * group, head_dim)) * 1.5
    caches = [rng.standard_normal((B, hkv, S, head_dim)) for _ in range(2)]
    past = np.arange(S)[None, :] >= np.asarray(lengths)[:, None]
    for c in caches:
        c[np.broadcast_to(past[:, None, :, None], c.shape)] = GARBAGE * rng.standard_normal(int(past.sum()) * hkv * head_dim)
    P = B * pps + spare
    pools = [GARBAGE * rng.standard_normal((hkv, P, PS, head_dim)) for _ in range(2)]
    table = rng.permutation(P)[:B * pps].reshape(B, pps)
    for b, n in enumerate(lengths):
        used = -(-n // PS)
        for pool, c in zip(pools, caches):
            pool[:, table[b, :used]] = c[b, :, :used * PS].reshape(hkv, used, PS, head_dim)
        table[b, used:] = rng.integers(0, P, pps - used)
    q, k_pages, v_pages, k_cache, v_cache = (jnp.asarray(x, dtype) for x in (q, *pools, *caches))
    return (q, k_pages, v_pages, jnp.asarray(table, jnp.int32), jnp.asarray(lengths, jnp.int32), k_cache,
            v_cache)


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x))
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


# ---------------------------------------------------------------- float64 NumPy, for the references

def _np_probs(q, k, keep):
    """float64 softmax probabilities [B, Hq, S] over the tokens where keep [B, S]."""
    B, hq, D = q.shape
    kk = np.repeat(k, hq // k.shape[1], axis=1)
    s = np.einsum("bhd,bhsd->bhs", q, kk) / math.sqrt(D)
    s = np.where(keep[:, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


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


def test_references_match_numpy():
    lengths = (37, 128, 100)
    q, _, _, _, ln, k, v = _paged(21, 4, 64, lengths=lengths, pps=8)
    qd, kd, vd = (np.asarray(x, np.float64) for x in (q, k, v))
    keep = np.arange(128)[None, :] < np.asarray(lengths)[:, None]
    p = _np_probs(qd, kd, keep)
    out = np.einsum("bhs,bhsd->bhd", p, np.repeat(vd, 4, axis=1))
    np.testing.assert_allclose(reference.dense_decode_reference(q, k, v, ln), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reference.token_maxima_reference(q, k, ln), p.reshape(3, 2, 4, 128).max(2),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(reference.page_scores_reference(q, k, ln, PS),
                               p.max(1).reshape(3, 8, PS).sum(-1), rtol=1e-5, atol=1e-7)
    idx, valid = np.array([[0, 2, 2], [1, 5, 7], [6, 0, 3]]), np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1]], bool)
    skeep = keep & np.stack([np.isin(np.arange(128) // PS, i[m]) for i, m in zip(idx, valid)])
    sout = np.einsum("bhs,bhsd->bhd", _np_probs(qd, kd, skeep), np.repeat(vd, 4, axis=1))
    np.testing.assert_allclose(reference.sparse_decode_reference(q, k, v, jnp.asarray(idx), jnp.asarray(valid),
                                                                 ln, PS), sout, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- paged kernels

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group,head_dim", [(4, 64), (3, 32)])
def test_paged_decode_all_score_modes(backend, group, head_dim):
    q, kp, vp, table, lengths, kc, vc = _paged(1 + group, group, head_dim)
    run = lambda scores: paged_decode_attention(q, kp, vp, table, lengths, scores=scores, backend=backend,
                                                block_sizes=SMALL[backend], interpret=True)
    ref_out = reference.dense_decode_reference(q, kc, vc, lengths)
    out = run(None)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref_out) <= 1e-5
    assert np.all(np.asarray(out)[1] == 0.0)  # the empty slot

    out_p, scores = run("pages")
    assert scores.shape == (4, PPS) and scores.dtype == jnp.float32
    assert _rel(out_p, ref_out) <= 1e-5
    np.testing.assert_allclose(scores, reference.page_scores_reference(q, kc, lengths, PS), rtol=1e-4, atol=1e-6)
    s = np.asarray(scores)
    assert np.all(s[0, 3:] == 0.0) and np.all(s[1] == 0.0) and np.all(s[3, 7:] == 0.0) and np.all(s[[0, 2, 3], 0] > 0)

    out_t, tmax = run("tokens")
    assert tmax.shape == (4, kp.shape[0], PPS * PS) and tmax.dtype == jnp.float32
    assert _rel(out_t, ref_out) <= 1e-5
    np.testing.assert_allclose(tmax, reference.token_maxima_reference(q, kc, lengths), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(page_scores_from_token_maxima(tmax, PS), scores, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_decode_default_blocks_single_token(backend):
    """Default tile sizes, batch 1, a one-token sequence (its output is its value row)."""
    q, kp, vp, table, lengths, kc, vc = _paged(7, 4, 64, lengths=(1,), pps=4)
    out, scores = paged_decode_attention(q, kp, vp, table, lengths, scores="pages", backend=backend,
                                         interpret=True)
    expect = np.repeat(np.asarray(vc[:, :, :1]), 4, axis=1).reshape(q.shape)
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    np.testing.assert_allclose(scores, np.eye(1, 4), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group,head_dim", [(4, 64), (3, 32)])
def test_paged_sparse_decode(backend, group, head_dim):
    q, kp, vp, table, lengths, kc, vc = _paged(11 + group, group, head_dim)
    scores = reference.page_scores_reference(q, kc, lengths, PS)
    idx, valid = select_pages(scores, lengths, page_size=PS, budget=4, recent=1)
    assert not bool(valid[0].all()) and not bool(valid[1].any())  # padding; the empty slot
    out = paged_sparse_decode_attention(q, kp, vp, table, idx, valid, lengths, backend=backend,
                                        block_sizes=SMALL[backend], interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = reference.sparse_decode_reference(q, kc, vc, idx, valid, lengths, PS)
    assert _rel(out, ref) <= 1e-5
    assert np.all(np.asarray(out)[1] == 0.0)
    dense = reference.dense_decode_reference(q, kc, vc, lengths)
    assert _rel(out, dense) > 1e-3  # the selection matters on rows 2 and 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_sparse_unsorted_with_invalid_entries(backend):
    """Any order, invalid entries pointing anywhere (also past the length): only valid pages count."""
    q, kp, vp, table, lengths, kc, vc = _paged(5, 2, 32)
    idx = jnp.asarray([[2, 0, 8, 1, 5], [3, 0, 1, 2, 4], [8, 3, 0, 6, 7], [6, 1, 4, 0, 8]], jnp.int32)
    valid = jnp.asarray([[1, 1, 0, 0, 1], [1, 0, 1, 1, 0], [1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], bool)
    out = paged_sparse_decode_attention(q, kp, vp, table, idx, valid, lengths, backend=backend,
                                        block_sizes=SMALL[backend], interpret=True)
    assert _rel(out, reference.sparse_decode_reference(q, kc, vc, idx, valid, lengths, PS)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_sparse_with_all_pages_equals_dense(backend):
    q, kp, vp, table, lengths, kc, vc = _paged(9, 2, 64)
    out, scores = paged_decode_attention(q, kp, vp, table, lengths, scores="pages", backend=backend,
                                         block_sizes=SMALL[backend], interpret=True)
    idx, valid = select_pages(scores, lengths, page_size=PS, budget=PPS, recent=2)
    sparse = paged_sparse_decode_attention(q, kp, vp, table, idx, valid, lengths, backend=backend,
                                           block_sizes=SMALL[backend], interpret=True)
    assert _rel(sparse, out) <= 1e-6


# ---------------------------------------------------------------- selection

def test_select_pages_matches_numpy_with_ties():
    rng = np.random.default_rng(3)
    B, P = 6, 40
    lengths = np.array([1, 37, 100, 640, 639, 0], np.int32)
    for budget, recent in ((8, 2), (5, 5), (12, 0), (50, 3), (1, 1)):
        scores = rng.integers(0, 4, size=(B, P)).astype(np.float32)  # many ties
        scores[:, 0] = 1e9  # a sink-like page dominating
        idx, valid = select_pages(jnp.asarray(scores), jnp.asarray(lengths), page_size=PS,
                                  budget=budget, recent=recent)
        ref_idx, ref_valid = _np_select(scores, lengths, PS, budget, recent)
        ref_idx[lengths == 0] = 0
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


@pytest.mark.parametrize("topk_chunk", [0, 7, 16, 64])
def test_two_stage_top_k_equals_one_top_k(topk_chunk):
    """The chunked top-k picks exactly lax.top_k's indices: ties (to the lower index), -inf, P not a multiple
    of the chunk, k above the chunk."""
    rng = np.random.default_rng(topk_chunk)
    for P, k in ((100, 10), (130, 64), (37, 37), (64, 3)):
        key = rng.integers(0, 6, size=(5, P)).astype(np.float32)
        key[1, rng.random(P) < 0.5] = -np.inf
        key[2, :] = 1.0
        got = top_indices(jnp.asarray(key), k, topk_chunk)
        want = jax.lax.top_k(jnp.asarray(key), k)[1]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_select_pages_two_stage_matches_numpy():
    rng = np.random.default_rng(11)
    B, P = 4, 300
    lengths = np.array([P * PS, 37 * PS + 3, 0, 5], np.int32)
    scores = rng.integers(0, 5, size=(B, P)).astype(np.float32)
    for topk_chunk in (0, 32, 128):
        idx, valid = select_pages(jnp.asarray(scores), jnp.asarray(lengths), page_size=PS, budget=40, recent=3,
                                  topk_chunk=topk_chunk)
        ref_idx, ref_valid = _np_select(scores, lengths, PS, 40, 3)
        ref_idx[lengths == 0] = 0
        np.testing.assert_array_equal(np.asarray(idx), ref_idx)
        np.testing.assert_array_equal(np.asarray(valid), ref_valid)


def test_select_pages_tie_goes_to_earlier_page():
    scores = jnp.asarray([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 0.0, 0.0]])
    idx, valid = select_pages(scores, jnp.asarray([128]), page_size=PS, budget=3, recent=1)
    np.testing.assert_array_equal(np.asarray(idx), [[1, 2, 7]])
    assert bool(valid.all())


# ---------------------------------------------------------------- tiles and arguments

@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 32])
def test_gpu_default_tiles_fit_shared_memory(dtype, head_dim, group):
    bs = default_block_sizes("gpu", head_dim, dtype, PS, group)
    need = gpu.smem_bytes(bs.pages_per_block * PS, group, head_dim, jnp.dtype(dtype).itemsize, bs.num_stages)
    assert need <= gpu.SMEM_BYTES
    if dtype == jnp.bfloat16:  # the H100-tuned tiles: 128 tokens per step at head_dim 128, 256 at 64
        assert (bs.pages_per_block * PS, bs.num_stages) == (128 if head_dim == 128 else 256, 2)
    else:  # float32 halves them: the 128-token bfloat16 tile would not fit at head_dim 128
        assert gpu.smem_bytes(128, group, 128, 4, 2) > gpu.SMEM_BYTES
        assert bs.pages_per_block * PS == (64 if head_dim == 128 else 128)


def test_gpu_splits_spread_the_longest_rows():
    """Default gpu splits: a power of two, at most the blocks; a batch gets as many splits per row as one row
    alone (Llama-3.1-8B: 8 kv heads), so its longest rows spread over as much of the GPU."""
    from pallas_kernels.delta_decode import _MAX_BLOCKS_PER_SPLIT, _splits
    for blocks in (1, 3, 16, 17, 288, 1024):
        for batch in (1, 8, 64):
            s = _splits(blocks, batch * 8, None, _MAX_BLOCKS_PER_SPLIT)
            assert s & (s - 1) == 0 and 1 <= s <= blocks
            assert s >= min(_splits(blocks, 8, None), blocks // _MAX_BLOCKS_PER_SPLIT)
    assert _splits(288, 64, None, _MAX_BLOCKS_PER_SPLIT) == 32  # 8 rows of 36K tokens: 4 before
    assert _splits(1024, 8, None, _MAX_BLOCKS_PER_SPLIT) == _splits(1024, 8, None) == 32  # one 128K row: as before
    assert _splits(288, 64, 3, _MAX_BLOCKS_PER_SPLIT) == 3


def test_bad_arguments():
    q, kp, vp, table, lengths, _, _ = _paged(0, 2, 64)
    f = paged_decode_attention
    with pytest.raises(ValueError, match="q heads 3 is not a multiple of kv heads 2"):
        f(q[:, :3], kp, vp, table, lengths)
    with pytest.raises(ValueError, match="batch mismatch"):
        f(q[:2], kp, vp, table, lengths)
    with pytest.raises(ValueError, match="batch mismatch"):
        f(q, kp, vp, table[:3], lengths)
    with pytest.raises(ValueError, match="q must have rank 3"):
        f(q[:, None], kp, vp, table, lengths)
    with pytest.raises(ValueError, match="page_table must have rank 2"):
        f(q, kp, vp, table[0], lengths)
    with pytest.raises(ValueError, match="backend"):
        f(q, kp, vp, table, lengths, backend="cuda")
    with pytest.raises(ValueError, match="shapes differ"):
        f(q, kp, vp[:, :, :8], table, lengths)
    with pytest.raises(ValueError, match="head_dim mismatch: q 32, k_pages 64"):
        f(q[..., :32], kp, vp, table, lengths)
    with pytest.raises(ValueError, match="page_table must be integers"):
        f(q, kp, vp, table.astype(jnp.float32), lengths)
    with pytest.raises(ValueError, match="scores must be None, 'pages' or 'tokens', got 'heads'"):
        f(q, kp, vp, table, lengths, scores="heads")
    with pytest.raises(ValueError, match="pages_per_block must be a positive power of two, got 3"):
        BlockSizes(pages_per_block=3)
    with pytest.raises(ValueError, match="power-of-two page_size, got 12"):
        f(q, kp[:, :, :12], vp[:, :, :12], table, lengths, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="pages_per_block \\* page_size >= 16, got 1 \\* 8"):
        f(q, kp[:, :, :8], vp[:, :, :8], table, lengths, backend="gpu", interpret=True,
          block_sizes=BlockSizes(pages_per_block=1))
    q32, kp32 = q.astype(jnp.float32), kp.astype(jnp.float32)
    with pytest.raises(ValueError, match="more than 229376"):  # the float32 tile that overflowed run 2
        f(q32, kp32, kp32, table, lengths, backend="gpu", interpret=True,
          block_sizes=BlockSizes(pages_per_block=16, num_splits=1, num_warps=8))
    scores = jnp.ones((4, PPS))
    with pytest.raises(ValueError, match="budget=2 must be >= 1 and >= recent=3"):
        select_pages(scores, lengths, page_size=PS, budget=2, recent=3)
    with pytest.raises(ValueError, match="recent must be >= 0"):
        select_pages(scores, lengths, page_size=PS, budget=2, recent=-1)
    with pytest.raises(ValueError, match="does not match"):
        select_pages(scores, lengths[:2], page_size=PS, budget=2, recent=1)
    idx = jnp.zeros((4, 3), jnp.int32)
    sp = paged_sparse_decode_attention
    with pytest.raises(ValueError, match="page_indices must have shape \\[batch=4, n\\], got \\(2, 3\\)"):
        sp(q, kp, vp, table, idx[:2], jnp.ones((2, 3), bool), lengths)
    with pytest.raises(ValueError, match="differ"):
        sp(q, kp, vp, table, idx, jnp.ones((4, 5), bool), lengths)
    with pytest.raises(ValueError, match="page_indices must be integers"):
        sp(q, kp, vp, table, idx.astype(jnp.float32), jnp.ones((4, 3), bool), lengths)
