"""Sharded inference on 8 simulated CPU devices equals one device (run in a subprocess)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from delta_jax.config import ModelConfig, PrefillConfig, DecodeConfig
    from delta_jax.engine import Engine
    from delta_jax.scheduler import Request
    assert jax.device_count() == 8
    cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
                      num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=1024)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, n).tolist() for n in (150, 90)]
    pre = PrefillConfig(method="delta", window=32, sinks=4, gamma=16)
    dec = DecodeConfig(method="delta", full_layers=(0,), selection_layers=(1,), budget=3, recent=1)
    ref = Engine.from_config(cfg, dtype="float32")
    want = {m: ref.generate(prompts, max_new_tokens=5, prefill=p, decode=d)
            for m, (p, d) in {"dense": ("dense", "dense"), "delta": (pre, dec)}.items()}
    want_logits = ref.logits(prompts[0], prefill=pre)
    for mesh in ("data=1,model=8", "data=2,model=4", "data=8,model=1"):
        e = Engine.from_config(cfg, dtype="float32", mesh=mesh)
        kern = e.state["layers"][0]["attn"]["q_proj"]["kernel"][...]
        model = e.mesh.shape["model"]
        assert kern.sharding.spec == jax.sharding.PartitionSpec(None, "model"), kern.sharding
        assert kern.addressable_shards[0].data.shape[1] == kern.shape[1] // model
        for m, (p, d) in {"dense": ("dense", "dense"), "delta": (pre, dec)}.items():
            got = e.generate(prompts, max_new_tokens=5, prefill=p, decode=d)
            assert [g.tokens for g in got] == [w.tokens for w in want[m]], (mesh, m)
        np.testing.assert_allclose(e.logits(prompts[0], prefill=pre), want_logits, atol=1e-5)
        # the paged KV cache is sharded: each device holds 1/8 of it (kv heads over model, pages over data)
        sched = e.scheduler(slots=2, max_seq_len=256)
        k = sched.pages[0][0]
        per_device = {s.device: s.data.size for s in k.addressable_shards}
        assert all(n == k.size // 8 for n in per_device.values()), (mesh, per_device, k.sharding)
        # the prefill compiled against the pool's shapes while sizing it runs the request
        prefills = lambda: sum(sig[0][0] == "prefill" for sig in e.steps._compiled)
        before = prefills()
        r = sched.submit(Request(prompt=prompts[0], max_tokens=5))
        sched.run()
        assert r.tokens == want["dense"][0].tokens and prefills() == before, (mesh, prefills(), before)
        print("ok", mesh)
""")


def test_meshes_match_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") == 3
