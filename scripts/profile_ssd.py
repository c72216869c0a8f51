"""Per-kernel device times of the SSD chunk scan on a GPU, ours and mamba_ssm's.

    python scripts/profile_ssd.py --side ours --shapes 0,3 [--config block_n=32,pass_block_p=8]
    python scripts/profile_ssd.py --side mamba_ssm --peers .peers --shapes 0,3

Ours: ``jax.profiler.trace`` around ``iters`` calls of the jitted forward and of forward +
backward (``bench_kernels.ours_fwd_bwd``: y and the vjp of dy), read back with
``jax.profiler.ProfileData``: every kernel event on the GPU's stream lines, summed by name
and divided by ``iters``, and the device span of a call (first kernel start to last kernel
end: kernel time plus the gaps between kernels). mamba_ssm:
``torch.profiler`` around the same number of calls of ``mamba_chunk_scan_combined`` (forward,
forward + autograd backward), kernel device times by name. One side per process (both
profilers use CUPTI). Same inputs as ``bench_kernels.py``. Writes
``profile_ssd_<side>_<device>.json`` and prints the kernels.
(Nsight Compute was tried first: the profiled JAX process segfaulted while compiling.)
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import (SHAPES, config_fields, ours_fwd_bwd, theirs_fwd_bwd,  # noqa: E402
                           torch_inputs)


def kernel_table(totals_ns: dict, iters: int):
    rows = sorted(((name, ns / iters / 1e3) for name, ns in totals_ns.items()),
                  key=lambda r: -r[1])
    return dict(total_us=sum(us for _, us in rows),
                kernels=[dict(name=name[:160], us=us) for name, us in rows])


def print_kernels(table: dict, top: int, width: int = 100):
    """The ``top`` longest kernels of a ``kernel_table``, one line each (µs, name)."""
    for k in table["kernels"][:top]:
        print(f"    {k['us']:9.2f} us  {k['name'][:width]}")


def device_kernels(trace_dir: str) -> tuple[dict, list]:
    """(kernel name -> summed duration (ns), [(start, end) ns of every kernel]) over the GPU
    planes' stream lines of a trace (if no line is named as a stream, every line's events,
    keyed "line: event")."""
    from jax.profiler import ProfileData

    streams, every = collections.Counter(), collections.Counter()
    spans, every_spans = [], []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                for event in line.events:
                    every[f"{line.name}: {event.name}"] += event.duration_ns
                    every_spans.append((event.start_ns, event.end_ns))
                    if line.name.lower().startswith("stream"):
                        streams[event.name] += event.duration_ns
                        spans.append((event.start_ns, event.end_ns))
    return (streams, spans) if streams else (every, every_spans)


def device_span_us(spans: list, iters: int) -> float:
    """Median over the calls of first kernel start to last kernel end (us): the calls ran one
    at a time (each waited for), so the kernels sorted by start split into ``iters`` equal
    groups."""
    spans = sorted(spans)
    k = len(spans) // iters
    if not k or len(spans) % iters:
        return float("nan")
    groups = [spans[i * k:(i + 1) * k] for i in range(iters)]
    return sorted((max(e for _, e in g) - g[0][0]) / 1e3 for g in groups)[iters // 2]


def profile_ours(shape, config: dict, iters: int):
    import jax
    import jax.numpy as jnp

    from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, ssd_pallas

    t = torch_inputs(shape)
    x, dt, A, B, C, D, bias, dy = (jnp.from_dlpack(t[k]) for k in (
        "x", "dt", "A", "B", "C", "D", "dt_bias", "dy"))
    cfg = SSDKernelConfig(chunk_size=shape[-1], dt_softplus=True, **config)
    fwd = jax.jit(lambda *a: ssd_pallas(cfg, *a[:6], None, a[6], None, None)[:2])
    grad = jax.jit(functools.partial(ours_fwd_bwd, cfg, dy))
    out = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", grad)):
        for _ in range(3):
            jax.block_until_ready(fn(x, dt, A, B, C, D, bias))
        trace_dir = tempfile.mkdtemp()
        with jax.profiler.trace(trace_dir):
            for _ in range(iters):
                jax.block_until_ready(fn(x, dt, A, B, C, D, bias))
        totals, spans = device_kernels(trace_dir)
        out[name] = dict(kernel_table(totals, iters), span_us=device_span_us(spans, iters))
    return out


def profile_mamba_ssm(shape, peers: str, iters: int):
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(peers).resolve()))
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    t = torch_inputs(shape)
    q = shape[-1]

    def fwd():
        return mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], q, D=t["D"],
                                         dt_bias=t["dt_bias"], dt_softplus=True,
                                         return_final_states=True)

    fwd_bwd, _ = theirs_fwd_bwd(mamba_chunk_scan_combined, t, q)

    out = {}
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        for _ in range(3):  # autotune, warm up
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        totals = collections.Counter()
        for evt in prof.key_averages():
            us = getattr(evt, "device_time_total", None)
            if us is None:
                us = evt.cuda_time_total
            if us:
                totals[evt.key] += us * 1e3  # us -> ns
        out[name] = kernel_table(totals, iters)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=("ours", "mamba_ssm"), required=True)
    ap.add_argument("--peers", default=".peers", help="folder holding mamba_ssm's Triton ops")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--shapes", default="0", help="indices into bench_kernels.SHAPES")
    ap.add_argument("--config", default="default",
                    help="SSDKernelConfig overrides (ours), as one --configs item of bench_kernels")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    try:
        config = config_fields(args.config)
    except ValueError as e:
        ap.error(str(e))

    import jax
    import torch

    device = torch.cuda.get_device_name()
    result = dict(side=args.side, device=device, jax=jax.__version__, torch=torch.__version__,
                  config=config, iters=args.iters, shapes=[])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"profile_ssd_{args.side}_" + device.replace(" ", "_").replace("/", "_") + ".json"
    for i in (int(v) for v in args.shapes.split(",")):
        shape = SHAPES[i]
        calls = (profile_ours(shape, config, args.iters) if args.side == "ours"
                 else profile_mamba_ssm(shape, args.peers, args.iters))
        result["shapes"].append(dict(shape=shape, calls=calls))
        (out / name).write_text(json.dumps(result, indent=2))
        print(f"{args.side} {shape}")
        for call, table in calls.items():
            print(f"  {call}: {table['total_us']:.1f} us of kernels per call, first kernel start "
                  f"to last kernel end {table.get('span_us', float('nan')):.1f} us")
            print_kernels(table, 12)


if __name__ == "__main__":
    main()
