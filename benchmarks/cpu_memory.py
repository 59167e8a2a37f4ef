"""Peak host memory of `Engine.generate` on the CPU: 10 prompts of about 4,000 tokens of the built-in model.

Runs the generation in a child process and reads its peak resident set (VmHWM). Issue 13 measured the
engine before tiled CPU attention aborting here ("Out of memory allocating 27511849088 bytes").

    python benchmarks/cpu_memory.py --out benchmarks/results/cpu_memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = """
import json, sys, time
from delta_jax.engine import Engine
from delta_jax.eval import fidelity
n, length, new = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
engine = Engine.from_pretrained("smollm2-135m", dtype="float32", progress=False)
prompts = fidelity.prose_tokens(engine.tokenizer, length=length, n=n, seed=0)
t0 = time.time()
outs = engine.generate(prompts, max_new_tokens=new)
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"prompt_tokens": [o.prompt_tokens for o in outs], "new_tokens": [len(o.tokens) for o in outs],
                  "seconds": time.time() - t0, "vm_hwm_kib": int(peak)}))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--length", type=int, default=4000)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/cpu_memory")
    a = ap.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", CHILD, str(a.prompts), str(a.length), str(a.new)], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    sys.path.insert(0, root)
    from benchmarks import common
    res.update(env=common.environment(), wall_seconds=time.time() - t0, peak_gib=res["vm_hwm_kib"] / 2**20)
    common.write_json(res, a.out, "cpu_memory.json")
    print(f"{a.prompts} x ~{a.length} tokens: peak resident {res['peak_gib']:.2f} GiB, generate {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
