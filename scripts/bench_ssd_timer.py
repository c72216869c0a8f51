"""How the timer's run length changes a jitted SSD forward's wall clock (one GPU, one shape).

    python scripts/bench_ssd_timer.py            # then again with
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python scripts/bench_ssd_timer.py

Prints one JSON line: ms per call over runs of 1, 10 and 50 back-to-back calls + one sync
(``bench_kernels.timeit``), the host time to issue a call without waiting, the same with only
y returned, and a trivial jitted call for the dispatch floor. Inputs are made in JAX (no
DLPack). The results of one session are in ``benchmarks/results/ssd_wall_vs_span_*.json``.
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_kernels import timeit  # noqa: E402
from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, ssd_pallas  # noqa: E402


def main():
    b, l, h, p, g, n, q = 1, 8192, 80, 64, 1, 128, 256
    k = jax.random.split(jax.random.PRNGKey(0), 7)
    args = (jax.random.normal(k[0], (b, l, h, p), jnp.bfloat16),
            jax.random.normal(k[1], (b, l, h), jnp.float32) - 1,
            -jax.random.uniform(k[2], (h,)) * 4 - 0.5,
            jax.random.normal(k[3], (b, l, g, n), jnp.bfloat16),
            jax.random.normal(k[4], (b, l, g, n), jnp.bfloat16),
            jax.random.normal(k[5], (h,)), jax.random.normal(k[6], (h,)) - 1)
    cfg = SSDKernelConfig(chunk_size=q, dt_softplus=True)
    fwd = jax.jit(lambda *a: ssd_pallas(cfg, *a[:5], a[5], None, a[6], None, None)[:2])
    sync = lambda o: jax.block_until_ready(o) if o is not None else None
    out = dict(flags=os.environ.get("XLA_FLAGS", ""))
    for it in (1, 10, 50):
        out[f"wall_ms_iters{it}"] = timeit(lambda: fwd(*args), sync, iters=it)
    issue, whole = [], []
    for _ in range(5):
        jax.block_until_ready(fwd(*args))
        t0 = time.perf_counter()
        for _ in range(50):
            o = fwd(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(o)
        issue.append((t1 - t0) / 50 * 1e3)
        whole.append((time.perf_counter() - t0) / 50 * 1e3)
    out["host_issue_ms_per_call"] = statistics.median(issue)
    out["wall_ms_per_call_50"] = statistics.median(whole)
    fwd_y = jax.jit(lambda *a: ssd_pallas(cfg, *a[:5], a[5], None, a[6], None, None)[0])
    out["wall_ms_y_only"] = timeit(lambda: fwd_y(*args), sync, iters=10)
    tiny = jax.jit(lambda a: a + 1)
    out["tiny_jit_wall_ms"] = timeit(lambda: tiny(args[5]), sync, iters=50)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
