"""How the timer's run length changes a jitted SSD call's wall clock (one GPU).

    python scripts/bench_ssd_timer.py            # then again with
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python scripts/bench_ssd_timer.py
    python scripts/bench_ssd_timer.py --fwd-bwd --peers .peers [--shapes 0,1]

Forward (default; first benchmark shape): one JSON line with ms per call over runs of 1, 10 and
50 back-to-back calls + one sync (``bench_kernels.timeit``), the host time to issue a call
without waiting, the same with only y returned, and a trivial jitted call for the dispatch
floor; inputs made in JAX. ``--fwd-bwd``: per shape, our forward + backward
(``bench_kernels.ours_fwd_bwd``) and mamba_ssm's CUDA graph of forward + ``y.backward(dy)`` on
the same inputs (made in PyTorch, shared through DLPack), each over runs of 1, 12, 50 and 200
calls, and the host time to issue one of ours (also on JAX-owned copies of the inputs, of our
forward alone, and of a trivial jitted call on the same arguments). The results of the
sessions are in ``benchmarks/results/ssd_wall_vs_span_*.json``.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench_kernels import (SHAPES, cuda_graph, ours_fwd_bwd, theirs_fwd_bwd, timeit,  # noqa: E402
                           torch_inputs)
from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, ssd_pallas  # noqa: E402


RUN_LENGTHS = (1, 12, 50, 200)


def host_events(fn, calls=20, top=25):
    """The host's side of ``calls`` calls of ``fn`` under ``jax.profiler.trace``: the ``top``
    event names by summed duration per call (us), over every plane but the GPUs'."""
    import collections
    import glob
    import tempfile

    from jax.profiler import ProfileData

    jax.block_until_ready(fn())
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        for _ in range(calls):
            o = fn()
        jax.block_until_ready(o)
    totals = collections.Counter()
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                for event in line.events:
                    totals[f"{line.name}: {event.name}"[:120]] += event.duration_ns
    return {k: v / calls / 1e3 for k, v in totals.most_common(top)}


def host_issue_ms(fn, calls=50, reps=5):
    """Median host ms to issue one call of ``fn`` (``calls`` back to back, no wait)."""
    issue = []
    for _ in range(reps):
        jax.block_until_ready(fn())
        t0 = time.perf_counter()
        for _ in range(calls):
            o = fn()
        issue.append((time.perf_counter() - t0) / calls * 1e3)
        jax.block_until_ready(o)
    return statistics.median(issue)


def fwd_bwd_study(peers, shapes):
    import torch

    sys.path.insert(0, str(Path(peers).resolve()))
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    jsync = lambda o: jax.block_until_ready(o) if o is not None else None
    tsync = lambda _: torch.cuda.synchronize()
    for shape in shapes:
        q = shape[-1]
        t = torch_inputs(shape)
        x, dt, A, B, C, D, bias, dy = (jnp.from_dlpack(v) for v in t.values())
        cfg = SSDKernelConfig(chunk_size=q, dt_softplus=True)
        ours = jax.jit(lambda *a: ours_fwd_bwd(cfg, dy, *a))
        call = lambda: ours(x, dt, A, B, C, D, bias)
        theirs, _ = theirs_fwd_bwd(mamba_chunk_scan_combined, t, q)
        theirs()
        graph = cuda_graph(torch, theirs)
        out = dict(shape=shape, flags=os.environ.get("XLA_FLAGS", ""))
        for it in RUN_LENGTHS:
            out[f"ours_ms_iters{it}"] = timeit(call, jsync, iters=it, reps=5)
            out[f"mamba_ssm_graph_ms_iters{it}"] = timeit(lambda: graph.replay(), tsync,
                                                          iters=it, reps=5)
        out["ours_host_issue_ms_per_call"] = host_issue_ms(call)
        # the same call on JAX-owned copies of the inputs (not DLPack views of PyTorch's)
        owned = [jnp.array(v, copy=True) for v in (x, dt, A, B, C, D, bias, dy)]
        ours_owned = jax.jit(lambda *a: ours_fwd_bwd(cfg, owned[-1], *a))
        call_owned = lambda: ours_owned(*owned[:-1])
        out["ours_owned_inputs_ms_iters12"] = timeit(call_owned, jsync, iters=12, reps=5)
        out["ours_owned_inputs_host_issue_ms_per_call"] = host_issue_ms(call_owned)
        fwd = jax.jit(lambda *a: ssd_pallas(cfg, *a[:5], a[5], None, a[6], None, None)[0])
        out["ours_fwd_host_issue_ms_per_call"] = host_issue_ms(lambda: fwd(*owned[:-1]))
        tiny = jax.jit(lambda *a: a[5] + 1)
        out["tiny_jit_same_args_host_issue_ms"] = host_issue_ms(lambda: tiny(*owned[:-1]))
        out["ours_host_events_us_per_call"] = host_events(call_owned)
        print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fwd-bwd", action="store_true")
    ap.add_argument("--peers", default=".peers")
    ap.add_argument("--shapes", default="0,1", help="indices into bench_kernels.SHAPES")
    args = ap.parse_args()
    if args.fwd_bwd:
        return fwd_bwd_study(args.peers, [SHAPES[int(i)] for i in args.shapes.split(",")])
    b, l, h, p, g, n, q = SHAPES[0]
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
    out["host_issue_ms_per_call"] = host_issue_ms(lambda: fwd(*args))
    fwd_y = jax.jit(lambda *a: ssd_pallas(cfg, *a[:5], a[5], None, a[6], None, None)[0])
    out["wall_ms_y_only"] = timeit(lambda: fwd_y(*args), sync, iters=10)
    tiny = jax.jit(lambda a: a + 1)
    out["tiny_jit_wall_ms"] = timeit(lambda: tiny(args[5]), sync, iters=50)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
