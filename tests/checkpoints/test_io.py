"""Orbax round trip, casting, and restoring straight onto a sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import checkpoints
from checkpoints import CheckpointError

from .conftest import leaves_by_path


def random_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embed": {"embedding": rng.normal(size=(16, 8)).astype(np.float32)},
        "layers": {str(i): {"attn": {"q_proj": {"kernel": rng.normal(size=(8, 12)).astype(ml_dtypes.bfloat16),
                                                "bias": rng.normal(size=(12,)).astype(np.float32)}},
                            "attn_norm": {"scale": rng.normal(size=(8,)).astype(np.float32)}}
                   for i in range(2)},
        "final_norm": {"scale": rng.normal(size=(8,)).astype(np.float32)},
    }


def test_round_trip_exact_and_dtypes(tmp_path):
    tree = random_tree(1)
    checkpoints.save_params(tree, tmp_path / "ck", config={"model_type": "llama"})
    assert checkpoints.is_converted(tmp_path / "ck")
    got = checkpoints.load_params(tmp_path / "ck")
    assert isinstance(got["embed"]["embedding"], jax.Array)
    want, have = leaves_by_path(tree), leaves_by_path(got)
    assert set(want) == set(have)
    for k in want:
        assert have[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(have[k], want[k], err_msg=str(k))
    shapes = checkpoints.param_shapes(tmp_path / "ck")
    assert shapes["layers"]["1"]["attn"]["q_proj"]["kernel"].shape == (8, 12)
    cast = leaves_by_path(checkpoints.load_params(tmp_path / "ck", dtype="bfloat16"))
    for k in want:
        assert cast[k].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(cast[k], want[k].astype(ml_dtypes.bfloat16))
    assert checkpoints.load_config(tmp_path / "ck") == {"model_type": "llama"}
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoints.save_params(tree, tmp_path / "ck")


def test_restore_onto_named_sharding_one_device(tmp_path):
    tree = random_tree(2)
    checkpoints.save_params(tree, tmp_path / "ck")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))

    def rule(path):
        return NamedSharding(mesh, P(None, "model") if path.endswith("kernel") else P())

    got = checkpoints.load_params(tmp_path / "ck", shardings=rule)
    k = got["layers"]["0"]["attn"]["q_proj"]["kernel"]
    assert k.sharding == NamedSharding(mesh, P(None, "model"))
    assert got["final_norm"]["scale"].sharding == NamedSharding(mesh, P())
    np.testing.assert_array_equal(np.asarray(k), tree["layers"]["0"]["attn"]["q_proj"]["kernel"])
    one = NamedSharding(mesh, P())
    got = checkpoints.load_params(tmp_path / "ck", shardings=one)
    assert all(a.sharding == one for a in jax.tree.leaves(got))
    tree_of = jax.tree.map(lambda _: one, tree)
    got = checkpoints.load_params(tmp_path / "ck", shardings=tree_of)
    np.testing.assert_array_equal(np.asarray(got["embed"]["embedding"]), tree["embed"]["embedding"])


def test_shardings_errors(tmp_path):
    checkpoints.save_params(random_tree(3), tmp_path / "ck")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    with pytest.raises(CheckpointError, match="does not match"):
        checkpoints.load_params(tmp_path / "ck", shardings={"embed": {"embedding": NamedSharding(mesh, P())}})
    with pytest.raises(CheckpointError, match="not a Sharding"):
        checkpoints.load_params(tmp_path / "ck", shardings=lambda path: "model")
    with pytest.raises(CheckpointError, match="params"):
        checkpoints.load_params(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="int8"):
        checkpoints.load_params(tmp_path / "ck", dtype="int8")


_FOUR_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import checkpoints
    folder = sys.argv[1]
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    want = {"a": {"kernel": NamedSharding(mesh, P(None, "model"))},
            "b": {"kernel": NamedSharding(mesh, P("data", "model"))},
            "c": {"scale": NamedSharding(mesh, P())}}
    got = checkpoints.load_params(folder, shardings=want, dtype="float32")
    ref = np.load(folder + "/ref.npz")
    for name, leaf in (("a", "kernel"), ("b", "kernel"), ("c", "scale")):
        arr = got[name][leaf]
        assert arr.sharding == want[name][leaf], (name, arr.sharding)
        assert arr.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(arr), ref[name])
        for shard in arr.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), ref[name][shard.index])
    assert [s.data.shape for s in got["b"]["kernel"].addressable_shards] == [(4, 3)] * 4
    assert [s.data.shape for s in got["a"]["kernel"].addressable_shards] == [(8, 3)] * 4
    print("ok")
""")


def test_restore_onto_four_host_devices(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    tree = {"a": {"kernel": rng.normal(size=(8, 6)).astype(np.float32)},
            "b": {"kernel": rng.normal(size=(8, 6)).astype(ml_dtypes.bfloat16)},
            "c": {"scale": rng.normal(size=(6,)).astype(np.float32)}}
    monkeypatch.setattr(checkpoints.io, "CHUNK_BYTES", 48)
    checkpoints.save_params(tree, tmp_path)
    meta = checkpoints.io._metadata_tree(checkpoints.io._checkpointer(), str(tmp_path / "params"))
    chunk = meta["a"]["kernel"].storage.chunk_shape
    assert np.prod(chunk) * 4 <= 48 and tuple(chunk) != (8, 6), chunk
    np.savez(tmp_path / "ref.npz", a=tree["a"]["kernel"], b=tree["b"]["kernel"].astype(np.float32),
             c=tree["c"]["scale"])
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    root = os.path.dirname(os.path.dirname(checkpoints.__file__))
    r = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
