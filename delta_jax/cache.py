"""The paged KV cache: per layer a pool of pages, per sequence a page table, and the host allocator.

Layout (that of jax's Pallas `paged_attention`, GPU and TPU): per layer `k_pages, v_pages
[kv_heads, num_pages, page_size, head_dim]`; `page_table int32 [slots, pages_per_seq]` maps logical
page i of a slot (tokens `i * page_size ... (i + 1) * page_size - 1`) to a physical page. DELTA's page
is the pool's page, so its selection indexes the page table directly.

Under a mesh the pool is sharded by kv heads over `model` and by pages over `data`: each data shard
owns `num_pages / data` pages and the slots `[d * slots / data, (d + 1) * slots / data)`; page tables
hold page numbers local to the shard. Local page 0 of every shard is the trash page: writes of
inactive rows and of padding land there and nothing reads it.

Sizes (pages, page tables, slots, prefill batches and lengths) round up on one ladder (`ladder`): 8 values
per octave, so padding is at most 1/8 and the number of compiled shapes stays logarithmic in the size.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from delta_jax.config import ConfigError, ModelConfig

TRASH_PAGE = 0


def ladder(n: int, minimum: int = 1) -> int:
    """Smallest `m * 2^k >= max(n, minimum)` with `8 <= m <= 15` (or `n` itself below 16): at most 1/8 padding."""
    n = max(int(n), int(minimum), 1)
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)  # 2^k with 8 * 2^k <= n < 16 * 2^k
    return -(-n // step) * step


def pages_for(tokens: int, page_size: int) -> int:
    return -(-int(tokens) // page_size)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Shape of a paged cache: `num_pages` in all (over `shards` data shards, trash pages included)."""

    num_layers: int
    kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    pages_per_seq: int
    slots: int
    shards: int = 1
    dtype: str = "float32"

    def __post_init__(self):
        ps = self.page_size
        if ps < 1 or ps & (ps - 1) or ps > 128:
            raise ConfigError(f"page_size must be a power of two <= 128, got {ps}")
        if self.num_pages % self.shards or self.slots % self.shards:
            raise ConfigError(f"num_pages={self.num_pages} and slots={self.slots} must divide into "
                              f"{self.shards} data shards")

    @classmethod
    def for_model(cls, cfg: ModelConfig, *, page_size: int, num_pages: int, pages_per_seq: int, slots: int,
                  shards: int = 1, dtype: str = "float32") -> "CacheSpec":
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, page_size, num_pages, pages_per_seq, slots,
                   shards, dtype)

    @property
    def pages_per_shard(self) -> int:
        return self.num_pages // self.shards

    @property
    def max_tokens(self) -> int:
        """The longest sequence (prompt plus new tokens) a slot can hold."""
        return self.pages_per_seq * self.page_size

    def nbytes(self) -> int:
        """Bytes of the whole pool (all layers, k and v, all shards)."""
        return (2 * self.num_layers * self.kv_heads * self.num_pages * self.page_size * self.head_dim
                * jnp.dtype(self.dtype).itemsize)


def pool_shape(spec: CacheSpec) -> tuple[int, ...]:
    return (spec.kv_heads, spec.num_pages, spec.page_size, spec.head_dim)


def abstract_pool(spec: CacheSpec, sharding=None):
    """`empty_pool`'s shapes, dtypes and shardings (default: the first device), nothing allocated: what a prefill is
    compiled against while the pool is being sized."""
    shape, dtype = pool_shape(spec), jnp.dtype(spec.dtype)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    page = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return tuple((page, page) for _ in range(spec.num_layers))


def empty_pool(spec: CacheSpec, sharding=None):
    """Zeroed pages: a tuple per layer of (k_pages, v_pages) `[kv_heads, num_pages, page_size, head_dim]`."""
    shape, dtype = pool_shape(spec), jnp.dtype(spec.dtype)

    def make():
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(spec.num_layers))

    if sharding is None:
        return jax.jit(make)()
    return jax.jit(make, out_shardings=tuple((sharding, sharding) for _ in range(spec.num_layers)))()


class PageAllocator:
    """Free pages per data shard (host side). Local page 0 of each shard is never handed out."""

    def __init__(self, spec: CacheSpec):
        self.spec = spec
        self._free = [list(range(spec.pages_per_shard - 1, 0, -1)) for _ in range(spec.shards)]

    def shard_of(self, slot: int) -> int:
        return slot // (self.spec.slots // self.spec.shards)

    def free_pages(self, shard: int = None) -> int:
        if shard is None:
            return sum(len(f) for f in self._free)
        return len(self._free[shard])

    @property
    def capacity(self) -> int:
        """Pages that can be handed out per shard."""
        return self.spec.pages_per_shard - 1

    def pages_in_use(self) -> int:
        return self.spec.shards * self.capacity - self.free_pages()

    def alloc(self, shard: int, n: int) -> list[int]:
        free = self._free[shard]
        if n > len(free):
            raise ConfigError(f"{n} pages needed, {len(free)} free on data shard {shard}")
        out = free[len(free) - n:][::-1]
        del free[len(free) - n:]
        return out

    def free(self, shard: int, pages: Sequence[int]) -> None:
        self._free[shard].extend(int(p) for p in reversed(pages))


# ------------------------------------------------------------------ device side: writes and reads

def write_prompt(pages: jax.Array, x: jax.Array, page_table: jax.Array, owned: jax.Array) -> jax.Array:
    """Writes prompt keys or values `x [b, T, kv_heads, D]` into their pages.

    pages `[kv_heads, P, page_size, D]`, page_table `[b, W]` (local page numbers), owned `[b]` bool:
    rows this shard holds (the others write to the trash page). Valid tokens of a row fit in its
    W pages; positions past `W * page_size` are padding and are dropped.
    """
    b, t, kvh, d = x.shape
    ps = pages.shape[2]
    n = min(t // ps, page_table.shape[1])
    xp = x[:, :n * ps].reshape(b, n, ps, kvh, d).transpose(3, 0, 1, 2, 4).reshape(kvh, b * n, ps, d)
    ids = jnp.where(owned[:, None], page_table[:, :n], TRASH_PAGE).reshape(-1)
    return pages.at[:, ids].set(xp.astype(pages.dtype))


def write_token(pages: jax.Array, x: jax.Array, page_table: jax.Array, positions: jax.Array,
                active: jax.Array) -> jax.Array:
    """Writes one token per row `x [b, kv_heads, D]` at `positions [b]`; inactive rows hit the trash page."""
    ps = pages.shape[2]
    page = jnp.take_along_axis(page_table, (positions // ps)[:, None], 1)[:, 0]
    page = jnp.where(active, page, TRASH_PAGE)
    slot = jnp.where(active, positions % ps, 0)
    return pages.at[:, page, slot].set(jnp.swapaxes(x, 0, 1).astype(pages.dtype))


def gather(pages: jax.Array, page_table: jax.Array) -> jax.Array:
    """The contiguous cache `[b, kv_heads, W * page_size, D]` of each row's pages (diagnostics, XLA path)."""
    kvh, _, ps, d = pages.shape
    b, w = page_table.shape
    x = pages[:, page_table]                                   # [kvh, b, W, ps, D]
    return jnp.moveaxis(x, 0, 1).reshape(b, kvh, w * ps, d)


def table_array(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """Page tables of `rows` (lists of local page numbers) padded with the trash page to `width`."""
    out = np.full((len(rows), width), TRASH_PAGE, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out
