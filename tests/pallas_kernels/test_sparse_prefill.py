"""Block-sparse prefill kernels against float64 dense-mask references, on every backend
(gpu and tpu kernels in interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_prefill as sp
from pallas_kernels.sparse_prefill import reference as ref
from pallas_kernels.sparse_prefill.topk_blocks import block_mask_from_indices

BACKENDS = ["xla", "gpu", "tpu"]
SMALL = sp.BlockSizes(block_q=32, block_k=16, block_rows=32)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(seed, B, T, H, Hkv, D=64, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype),
            jax.random.normal(kk, (B, T, Hkv, D), jnp.float32).astype(dtype),
            jax.random.normal(kv, (B, T, Hkv, D), jnp.float32).astype(dtype))


def ref64(fn, *args, **kw):
    """Runs a reference in float64 on float64 copies of the array arguments."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        conv = lambda a: jnp.asarray(np.asarray(a, np.float64)) if (
            hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)) else a
        out = fn(*[conv(a) for a in args], **{k: conv(v) for k, v in kw.items()})
        return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), out)
    finally:
        jax.config.update("jax_enable_x64", prev)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), "non-finite output"
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _kw(backend):
    return dict(backend=backend, interpret=backend != "xla", block_sizes=SMALL)


def test_reference_matches_explicit_loop():
    q, k, v = _inputs(0, 1, 23, 2, 1, D=64)
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    window, sinks = 5, 3
    want = np.zeros_like(q)
    for h in range(2):
        for t in range(23):
            keys = [s for s in range(t + 1) if t - s < window or s < sinks]
            sc = q[0, t, h] @ k[0, keys, 0].T / 8.0
            p = np.exp(sc - sc.max())
            want[0, t, h] = (p / p.sum()) @ v[0, keys, 0]
    got = ref64(ref.sparse_attention_reference, q, k, v, window=window, sinks=sinks)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_attention_and_lse(backend):
    # T = 150: no multiple of 32 or 16; group 4; sinks not a block multiple.
    q, k, v = _inputs(1, 2, 150, 8, 2)
    out, lse = sp.sparse_attention(q, k, v, window=37, sinks=20, return_lse=True, **_kw(backend))
    want, want_lse = ref64(ref.sparse_attention_reference, q, k, v, window=37, sinks=20, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 8, 150)
    assert rel_err(out, want) < 1e-5
    assert rel_err(lse, want_lse) < 1e-5
    if backend == "gpu":  # the group's heads folded into one tile; sinks a block multiple
        bs = sp.BlockSizes(block_q=32, block_k=16, fold_heads=True)
        out, lse = sp.sparse_attention(q, k, v, window=37, sinks=16, return_lse=True, backend="gpu",
                                       interpret=True, block_sizes=bs)
        want, want_lse = ref64(ref.sparse_attention_reference, q, k, v, window=37, sinks=16, return_lse=True)
        assert rel_err(out, want) < 1e-5
        assert rel_err(lse, want_lse) < 1e-5


@pytest.mark.parametrize("tiles", [1, 3, None])
def test_xla_tiles_at_once_walked_in_steps(tiles, monkeypatch):
    """The XLA body walks its query tiles `tiles` at a time (3: 5 tiles, a last step of 2); the same output and
    lse as the reference."""
    monkeypatch.setattr(sp, "_xla_tiles_at_once", lambda window: tiles)
    jax.clear_caches()  # the jitted attention was traced with the setting of an earlier call
    q, k, v = _inputs(9, 2, 150, 8, 2)
    out, lse = sp.sparse_attention(q, k, v, window=150, sinks=0, return_lse=True, **_kw("xla"))
    want, want_lse = ref64(ref.sparse_attention_reference, q, k, v, window=150, sinks=0, return_lse=True)
    assert rel_err(out, want) < 1e-5 and rel_err(lse, want_lse) < 1e-5


def test_xla_dense_attention_adds_no_buffer_per_layer():
    """Dense attention on the CPU walks its tiles in a loop; layer after layer, the loops reuse one output
    buffer (results started from constants kept one per layer: a query's size per layer of a prefill)."""
    def temp(layers):
        def fn(q, k, v):
            for _ in range(layers):
                q = q + sp.sparse_attention(q, k, v, window=q.shape[1], sinks=0, backend="xla")
            return q

        q, kv = jax.ShapeDtypeStruct((1, 2048, 8, 64), jnp.float32), jax.ShapeDtypeStruct((1, 2048, 2, 64),
                                                                                        jnp.float32)
        return jax.jit(fn).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    assert temp(6) - temp(2) < 2048 * 8 * 64 * 4


def test_gpu_window_kernel_in_one_loop():
    # sinks, band edges and interior walked by one loop with every block masked, heads folded or not
    q, k, v = _inputs(13, 2, 150, 8, 2)
    want, want_lse = ref64(ref.sparse_attention_reference, q, k, v, window=37, sinks=20, return_lse=True)
    for fold in (False, True):
        bs = sp.BlockSizes(block_q=32, block_k=16, fold_heads=fold, one_loop=True)
        out, lse = sp.sparse_attention(q, k, v, window=37, sinks=20, return_lse=True, backend="gpu",
                                       interpret=True, block_sizes=bs)
        assert rel_err(out, want) < 1e-5 and rel_err(lse, want_lse) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_covering_all_and_gamma_one_give_dense(backend):
    q, k, v = _inputs(2, 1, 100, 4, 4)
    dense = ref64(ref.sparse_attention_reference, q, k, v, window=None, sinks=0)
    assert rel_err(sp.sparse_attention(q, k, v, window=100, sinks=0, **_kw(backend)), dense) < 1e-5
    out = sp.delta_attention(q, k, v, window=8, sinks=4, gamma=1, tail=1, **_kw(backend))
    assert rel_err(out, dense) < 1e-5
    # the sparse base alone is far from dense here, so the comparison above can fail
    assert rel_err(sp.sparse_attention(q, k, v, window=8, sinks=4, **_kw(backend)), dense) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_rows_group8_unsorted(backend):
    q, k, v = _inputs(3, 2, 130, 8, 1)
    rows = jnp.array([[0, 129, 64, 5, 77, 31, 32, 100, 1, 128],
                      [7, 7, 50, 3, 99, 120, 11, 0, 64, 129]], jnp.int32)
    out, lse = sp.exact_rows_attention(q, k, v, rows, return_lse=True, **_kw(backend))
    want, want_lse = ref64(ref.exact_rows_reference, q, k, v, rows, return_lse=True)
    assert out.shape == (2, 10, 8, 64) and lse.shape == (2, 8, 10)
    assert rel_err(out, want) < 1e-5
    assert rel_err(lse, want_lse) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_lengths_smooth_equal_each_sequence_alone(backend):
    # gamma 24 does not divide 140; group 1; sinks = 0; per-sequence tails.
    q, k, v = _inputs(4, 2, 140, 2, 2)
    lengths = jnp.array([140, 91], jnp.int32)
    kw = dict(window=30, sinks=0, gamma=24, tail=30, smooth=True)
    out = sp.delta_attention(q, k, v, lengths=lengths, **kw, **_kw(backend))
    want = ref64(ref.delta_attention_reference, q, k, v, lengths=np.array([140, 91]), **kw)
    assert rel_err(out[0], want[0]) < 1e-5
    assert rel_err(out[1, :91], want[1, :91]) < 1e-5
    assert np.all(np.isfinite(np.asarray(out)))
    alone = ref64(ref.delta_attention_reference, q[1:, :91], k[1:, :91], v[1:, :91], **kw)
    assert rel_err(out[1:, :91], alone) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_delta_window_base_no_smooth_head_dim_128(backend):
    q, k, v = _inputs(5, 1, 120, 4, 1, D=128)
    kw = dict(window=20, sinks=16, gamma=16, tail=16)
    out = sp.delta_attention(q, k, v, **kw, **_kw(backend))
    want = ref64(ref.delta_attention_reference, q, k, v, **kw)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_blocks_base(backend):
    q, k, v = _inputs(6, 2, 112, 4, 2)
    bq, bk = SMALL.block_q, SMALL.block_k
    idx, cnt = sp.select_blocks(q, k, block_q=bq, block_k=bk, window=20, sinks=8, topk=2)
    mask = np.asarray(block_mask_from_indices(idx, cnt, -(-112 // bk)))
    # every query block keeps its diagonal block and sink block; blocks are causal
    nq = idx.shape[2]
    assert mask[..., 0].all()
    for i in range(nq):
        assert mask[:, :, i, min(i * bq + bq - 1, 111) // bk].all()
        assert not mask[:, :, i, (min(i * bq + bq, 112) + bk - 1) // bk:].any()
    out = sp.block_sparse_attention(q, k, v, idx, cnt, block_q=bq, block_k=bk, **_kw(backend))
    want_bs = ref64(ref.block_sparse_reference, q, k, v, mask, block_q=bq, block_k=bk)
    assert rel_err(out, want_bs) < 1e-5

    def base(q_, k_, v_):
        return ref.block_sparse_reference(q_, k_, v_, jnp.asarray(mask), block_q=bq, block_k=bk)
    kw = dict(window=20, sinks=8, gamma=16, tail=20)
    out = sp.delta_attention(q, k, v, base="topk_blocks", topk=2, **kw, **_kw(backend))
    want = ref64(ref.delta_attention_reference, q, k, v, sparse_fn=base, **kw)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16(backend):
    q, k, v = _inputs(7, 1, 96, 4, 2, dtype=jnp.bfloat16)
    out = sp.sparse_attention(q, k, v, window=24, sinks=8, **_kw(backend))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref64(ref.sparse_attention_reference, q, k, v, window=24, sinks=8)) < 1e-2
    rows = jnp.array([[0, 32, 64, 90, 95]], jnp.int32)
    out = sp.exact_rows_attention(q, k, v, rows, **_kw(backend))
    assert rel_err(out, ref64(ref.exact_rows_reference, q, k, v, rows)) < 1e-2


@pytest.mark.parametrize("backend", ["gpu", "tpu", "xla"])
def test_skipped_blocks_are_never_read(backend):
    # Key/value blocks outside the last query tile's band and sinks hold NaN: its rows stay exact.
    q, k, v = _inputs(8, 1, 160, 2, 1)
    want = ref64(ref.sparse_attention_reference, q, k, v, window=20, sinks=16)
    poison = (jnp.arange(160) >= 16) & (jnp.arange(160) < 96)
    kp = jnp.where(poison[None, :, None, None], jnp.nan, k)
    vp = jnp.where(poison[None, :, None, None], jnp.nan, v)
    out = sp.sparse_attention(q, kp, vp, window=20, sinks=16, **_kw(backend))
    assert rel_err(out[:, 128:], want[:, 128:]) < 1e-5
    rows = jnp.array([[3, 20, 40, 63]], jnp.int32)
    out = sp.exact_rows_attention(q, jnp.where(jnp.arange(160)[None, :, None, None] >= 64, jnp.nan, k),
                                  jnp.where(jnp.arange(160)[None, :, None, None] >= 64, jnp.nan, v),
                                  rows, **_kw(backend))
    assert rel_err(out, ref64(ref.exact_rows_reference, q, k, v, rows)) < 1e-5


def test_delta_correct_row_layout():
    B, T, H, D, gamma, tail = 2, 50, 2, 64, 8, 5
    lengths = jnp.array([50, 20])
    rows = sp.delta_rows(T, gamma, tail, lengths)
    assert rows.shape == (2, 7 + 5)
    np.testing.assert_array_equal(rows[0], [0, 8, 16, 24, 32, 40, 48, 45, 46, 47, 48, 49])
    np.testing.assert_array_equal(rows[1, 7:], [15, 16, 17, 18, 19])
    sparse = jax.random.normal(jax.random.PRNGKey(9), (B, T, H, D))
    exact = jax.random.normal(jax.random.PRNGKey(10), (B, 12, H, D))
    out = sp.delta_correct(sparse, exact, lengths, gamma=gamma, tail=tail)
    # a sampled row gets its exact value, a row of its block the same shift, tail rows exact
    np.testing.assert_allclose(out[0, 16], exact[0, 2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[0, 19] - sparse[0, 19], exact[0, 2] - sparse[0, 16], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1, 17], exact[1, 9], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[1, 30], sparse[1, 30], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=0, sinks=0), "window"),
    (dict(window=4, sinks=-1), "sinks"),
    (dict(window=4, sinks=0, gamma=0), "gamma"),
    (dict(window=4, sinks=0, tail=65), "tail"),
    (dict(window=4, sinks=0, base="dense"), "base"),
    (dict(window=4, sinks=0, base="topk_blocks"), "topk"),
    (dict(window=4, sinks=0, lengths=jnp.array([3, 4, 5])), "lengths"),
    (dict(window=4, sinks=0, backend="cuda"), "backend"),
])
def test_bad_arguments(kwargs, match):
    q, k, v = _inputs(11, 2, 64, 4, 2)
    with pytest.raises(ValueError, match=match):
        sp.delta_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("shapes, match", [
    (((1, 64, 3, 64), (1, 64, 2, 64), (1, 64, 2, 64)), "3"),
    (((1, 64, 4, 64), (1, 64, 2, 64), (1, 64, 1, 64)), "k and v"),
    (((64, 4, 64), (1, 64, 2, 64), (1, 64, 2, 64)), "rank 4"),
    (((1, 64, 4, 96), (1, 64, 2, 96), (1, 64, 2, 96)), "96"),
])
def test_bad_shapes(shapes, match):
    q, k, v = (jnp.ones(s, jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        sp.sparse_attention(q, k, v, window=8, sinks=0, backend="xla")


def test_bad_rows_and_block_lists():
    q, k, v = _inputs(12, 1, 64, 2, 1)
    with pytest.raises(ValueError, match="64"):
        sp.exact_rows_attention(q, k, v, jnp.array([[0, 64]]), backend="xla")
    with pytest.raises(ValueError, match="block_indices"):
        sp.block_sparse_attention(q, k, v, jnp.zeros((1, 1, 3, 2), jnp.int32), jnp.ones((1, 1, 3), jnp.int32),
                                  block_q=32, block_k=16, backend="xla")
    with pytest.raises(ValueError, match="block_k"):
        sp.block_sparse_attention(q, k, v, jnp.zeros((1, 1, 2, 2), jnp.int32), jnp.ones((1, 1, 2), jnp.int32),
                                  block_q=32, block_k=12, backend="xla")


def test_tpu_kernels_lower_to_mosaic():
    # Lowering only (no TPU here): Pallas -> Mosaic with the default TPU tiles.
    from jax import export
    q = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    fn = jax.jit(lambda q_, k_, v_: sp.delta_attention(q_, k_, v_, window=128, sinks=64, backend="tpu"))
    exported = export.export(fn, platforms=["tpu"])(q, kv, kv)
    assert "tpu_custom_call" in exported.mlir_module()
