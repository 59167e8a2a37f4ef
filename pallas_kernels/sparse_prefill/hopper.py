"""Pallas Mosaic GPU (Hopper) kernel: causal window + sinks attention with wgmma and TMA.

One program per (query head, pair of query tiles, batch). Two compute warpgroups own one tile of
`block_q` rows each; a third warpgroup streams the key and value blocks of the pair's schedule
(the sink blocks, then the window band) into a ring of `stages` shared-memory slots with TMA. Both
compute warpgroups walk the same blocks (so their barrier counts match), each masking only where its
own rows need it: the sink blocks, the lower band edge and the diagonal. Masked scores are -inf and
the running maximum starts finite, so a block with no key for a row leaves that row's state as it
was. Row masks follow `schedule.valid_mask` (window, sinks, and `gamma`'s block-aligned window).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import softmax

from .schedule import block_start, div, valid_mask

_M0 = -1e30  # start of the running maximum: finite, so a fully masked block changes nothing


@dataclasses.dataclass(frozen=True)
class HopperBlocks:
    """block_q: rows per compute warpgroup (a program holds two tiles); block_k: keys per block;
    stages: key/value blocks in flight (shared-memory slots)."""

    block_q: int = 64
    block_k: int = 128
    stages: int = 2

    def __post_init__(self):
        if self.block_q % 64 or self.block_k % 64:
            raise ValueError(f"block_q and block_k must be multiples of 64, got {self.block_q}, {self.block_k}")
        if self.stages < 2:
            raise ValueError(f"stages must be at least 2, got {self.stages}")


def supported(q, k) -> bool:
    """Whether `attend_window` takes these operands: a Hopper GPU, bf16/f16, head_dim a multiple of 64."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or q.shape[-1] % 64:
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def _schedule(tmin, tmax, *, block_k, num_k_blocks, window, sinks, gamma):
    """Blocks of rows [tmin, tmax]: sink blocks [0, sink_n), then the band [lo, hi)."""
    hi = jnp.minimum(div(tmax, block_k) + 1, num_k_blocks)
    lo = jnp.minimum(div(jnp.maximum(block_start(tmin, gamma) - window + 1, 0), block_k), hi)
    sink_n = jnp.minimum(-(-sinks // block_k), lo) if sinks else jnp.int32(0)
    return sink_n, lo, hi


def attend_window(q, k, v, *, window, sinks, gamma=None, blocks: HopperBlocks = HopperBlocks(), interpret=None):
    """q [B, T, H, D], k/v [B, T, Hkv, D] (T a multiple of 2 * block_q and of block_k) -> out
    [B, T, H, D], lse float32 [B, H, T] (natural log)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, D = q.shape
    hkv = k.shape[2]
    group = H // hkv
    bq, bk, stages = blocks.block_q, blocks.block_k, blocks.stages
    if T % (2 * bq) or T % bk:
        raise ValueError(f"T={T} must be a multiple of 2 * block_q={2 * bq} and of block_k={bk}")
    nkb = T // bk
    dtype = q.dtype
    scale2 = softmax.scale2(D)
    sched = functools.partial(_schedule, block_k=bk, num_k_blocks=nkb, window=window, sinks=sinks, gamma=gamma)

    # register layouts are hints to the compiler; the CPU interpreter takes the plain arrays
    cast = (lambda x, layout: x) if interpret else plgpu.layout_cast
    iota = functools.partial(plgpu.broadcasted_iota, layout=plgpu.Layout.WGMMA) if not interpret else (
        lambda dtype, shape, dim: lax.broadcasted_iota(dtype, shape, dim))

    def block_of(j, sink_n, lo):
        return jnp.where(j < sink_n, j, lo + j - sink_n)

    def kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
        batch, head = lax.axis_index("batch"), lax.axis_index("heads")
        wg = lax.axis_index("wg")
        (qo_smem2, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
        pair_min = lax.axis_index("q_seq") * (2 * bq)
        sink_n, lo, hi = sched(pair_min, pair_min + 2 * bq - 1)
        steps = sink_n + hi - lo

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            tmin = pair_min + wg * bq
            tmax = tmin + bq - 1
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(tmin, bq), head], qo_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            rows = tmin + iota(jnp.int32, (bq, bk), 0)
            cols = iota(jnp.int32, (bq, bk), 1)
            m = cast(jnp.full((bq,), _M0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l = cast(jnp.full((bq,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = cast(jnp.full((bq, D), 0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            pl.when(wg == 1)(take_turn)

            def step(j, carry, masked):
                acc, m, l = carry
                slot = lax.rem(j, jnp.int32(stages))

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    take_turn()
                    return acc_ref[...]

                if interpret:  # the CPU interpreter takes no transposed shared-memory operand
                    s = softmax.logits(qo_smem[...], k_smem[slot], 1.0, None)
                    take_turn()
                else:
                    s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                s = s * scale2
                if masked:
                    kb = block_of(j, sink_n, lo)
                    s = jnp.where(valid_mask(rows, kb * bk + cols, window, sinks, gamma), s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1))
                corr = jnp.exp2(m - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(corr, acc.shape, [0])
                l = l * corr + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    @pl.when(j + 1 < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(j + 1, jnp.int32(stages))])

                    return acc_ref[...]

                if interpret:  # nor a register operand of wgmma
                    acc = acc + lax.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)

                    @pl.when(j + 1 < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(j + 1, jnp.int32(stages))])
                else:
                    acc = acc + pl.run_scoped(pv, plgpu.ACC((bq, D), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            # steps whose block needs no mask for this tile's rows: band blocks below the diagonal
            # and inside every row's window
            inner_lo = div(jnp.maximum(block_start(tmax, gamma) - window + 1, 0) + bk - 1, bk)
            inner_lo = jnp.clip(inner_lo, lo, hi) - lo + sink_n
            inner_hi = jnp.clip(div(tmin + 1, bk), lo, hi) - lo + sink_n
            inner_hi = jnp.maximum(inner_hi, inner_lo)
            carry = (acc, m, l)
            carry = lax.fori_loop(0, inner_lo, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(inner_lo, inner_hi, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(inner_hi, steps, functools.partial(step, masked=True), carry)
            pl.when(wg == 0)(take_turn)

            l_safe = jnp.where(l == 0, 1.0, l)
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            lse_smem[...] = jnp.where(l == 0, -jnp.inf, (m + jnp.log2(l_safe)) * softmax.LN2)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[batch, pl.ds(tmin, bq), head])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(tmin, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(group))

            def load(j, slot):
                ks = (batch, pl.ds(block_of(j, sink_n, lo) * bk, bk), kv_head)
                plgpu.copy_gmem_to_smem(k_ref.at[ks], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[ks], v_smem.at[slot], v_ready.at[slot])

            for i in range(stages):
                pl.when(i < steps)(functools.partial(load, jnp.int32(i), i))

            @pl.loop(stages, jnp.maximum(steps, stages))
            def _(j):
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                load(j, slot)

            @pl.loop(jnp.maximum(steps - stages, 0), steps)
            def _(j):  # the last blocks' releases, so that every barrier phase is observed
                slot = lax.rem(j, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    def sparse_prefill_hopper(q_ref, k_ref, v_ref, out_ref, lse_ref):  # named for profilers
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, out_ref, lse_ref, scoped),
            (plgpu.SMEM((2, bq, D), dtype, transforms=transforms),
             plgpu.SMEM((stages, bk, D), dtype, transforms=transforms),
             plgpu.SMEM((stages, bk, D), dtype, transforms=transforms),
             plgpu.SMEM((2, bq), jnp.float32)),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        sparse_prefill_hopper,
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
        grid=(H, T // (2 * bq), B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(q, k, v)
