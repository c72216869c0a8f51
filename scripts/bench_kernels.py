"""Benchmark the SSD chunk scan on a GPU: ours (Pallas), the XLA reference, and mamba_ssm's Triton
``mamba_chunk_scan_combined``, on the same inputs, with the same timer, in the same process.

    python scripts/bench_kernels.py --peers .peers --out benchmarks/results [--quick]

Timer: wall clock around ``iters`` back-to-back calls followed by a device sync, median of
``reps`` repetitions, after warm-up (the same function times JAX and PyTorch). Inputs are made
once in PyTorch on the GPU and handed to JAX through DLPack (zero copy), so both sides read the
same bytes. Writes ``ssd_<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SHAPES = [  # b, l, h, p, g, n, chunk
    (1, 8192, 80, 64, 1, 128, 256),
    (4, 4096, 80, 64, 1, 128, 256),
    (1, 8192, 128, 64, 8, 128, 256),
    (1, 65536, 80, 64, 1, 128, 256),
]


def timeit(fn, sync, *, iters=None, reps=7, warmup=2, min_rep_s=0.02):
    """Median ms per call over ``reps`` runs of ``iters`` back-to-back calls, each run ended by
    one sync: steady-state throughput. ``iters`` None: enough calls for each run to last about
    ``min_rep_s`` (at least 10), so the first call's launch latency (~0.2 ms for a jitted call
    from idle, measured on the H200) is amortized alike for every side timed."""
    for _ in range(warmup):
        sync(fn())
    if iters is None:
        t0 = time.perf_counter()
        sync(fn())
        iters = max(10, math.ceil(min_rep_s / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(reps):
        sync(None)
        t0 = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn()
        sync(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times) * 1e3  # ms


def streaming_bandwidth(nbytes: int = 4 << 30, *, copy: bool = False, iters=3, reps=7):
    """Bytes per second jitted JAX streams over a bf16 array of ``nbytes``: a ``jnp.sum`` (read),
    or with ``copy`` an elementwise ``x * 2`` (read + write, both counted)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit((lambda v: v * 2) if copy else (lambda v: jnp.sum(v, dtype=jnp.float32)))
    ms = timeit(lambda: f(a), jax.block_until_ready, iters=iters, reps=reps)
    return (2 if copy else 1) * nbytes / (ms * 1e-3)


def cuda_graph(torch, fn):
    """Capture ``fn`` (already warmed up, autotuned) into a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls from other threads (JAX's) must not invalidate the capture (a
    # global-mode capture failed once that way, and left torch's CUDA generator unusable)
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph


def ceilings(torch):
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    sync = lambda _: torch.cuda.synchronize()
    copy_ms = timeit(lambda: b.copy_(a), sync, iters=10, reps=5)
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = timeit(lambda: m @ m, sync, iters=10, reps=5)
    return 2 * (2 << 30) / (copy_ms * 1e-3), 2 * 8192**3 / (mm_ms * 1e-3)


def torch_inputs(shape):
    """The benchmark's inputs of one shape on the GPU, made in PyTorch (seed 0): a dict of
    x, dt, A, B, C, D, dt_bias and the output cotangent dy."""
    import torch

    b, l, h, p, g, n, _ = shape
    torch.manual_seed(0)
    dev = dict(device="cuda")
    return dict(
        x=torch.randn(b, l, h, p, dtype=torch.bfloat16, **dev),
        dt=torch.randn(b, l, h, dtype=torch.float32, **dev) - 1.0,
        A=-torch.rand(h, dtype=torch.float32, **dev) * 4 - 0.5,
        B=torch.randn(b, l, g, n, dtype=torch.bfloat16, **dev),
        C=torch.randn(b, l, g, n, dtype=torch.bfloat16, **dev),
        D=torch.randn(h, dtype=torch.float32, **dev),
        dt_bias=torch.randn(h, dtype=torch.float32, **dev) - 1.0,
        dy=torch.randn(b, l, h, p, dtype=torch.bfloat16, **dev))


def ours_fwd_bwd(cfg, dy, x, dt, A, B, C, D, bias):
    """Our forward + backward as timed and profiled: y and the vjp of dy, what mamba_ssm's
    ``y = f(...); y.backward(dy)`` computes, with no loss around y (under ``jax.grad`` of
    ``sum(y * dy)`` XLA drops the forward's output kernel, which no gradient reads without a
    gate, and adds the loss's fusions)."""
    import jax

    from mamba2_jax.kernels.ssd.pallas import ssd_pallas

    f = lambda *a: ssd_pallas(cfg, *a[:5], a[5], None, a[6], None, None)[0]
    y, pullback = jax.vjp(f, x, dt, A, B, C, D, bias)
    return y, pullback(dy)


def theirs_fwd_bwd(scan, inputs, q):
    """mamba_ssm's forward + backward as timed and profiled: a function running
    ``y = scan(...); y.backward(dy)`` on leaf copies of ``inputs`` (a :func:`torch_inputs` dict;
    ``scan``: ``mamba_chunk_scan_combined``), clearing their gradients first; returns (that
    function, the leaves x, dt, A, B, C, D, dt_bias)."""
    leaves = [inputs[k].detach().clone().requires_grad_(True)
              for k in ("x", "dt", "A", "B", "C", "D", "dt_bias")]

    def run():
        for leaf in leaves:
            leaf.grad = None
        y = scan(*leaves[:5], q, D=leaves[5], dt_bias=leaves[6], dt_softplus=True)
        y.backward(inputs["dy"])
        return y

    return run, leaves


def ssd_cost(b, l, h, p, g, n, q, itemsize=2):
    """Minimal FLOPs and bytes of one forward.

    FLOPs: C.B^T once per (chunk, group), causal half (q^2 n); per (chunk, head) the causal half
    of (C.B^T * decay) @ x (q^2 p), the chunk state and the state read-out (2 q n p each).
    Bytes: x, B, C, y in the input dtype, dt float32, final states float32, each moved once.
    """
    c = l // q
    flops = b * c * (g * q * q * n + h * (q * q * p + 4 * q * n * p))
    bytes_ = (2 * b * l * h * p + 2 * b * l * g * n) * itemsize + b * l * h * 4 + b * h * p * n * 4
    return flops, bytes_


def dense_layout(x, B, q):
    """The chunk layout of a dense, chunk-aligned batch (l a multiple of q, as in every benchmark
    shape): is_first / init_index [b, c] and zero initial states [b, h, p, n]."""
    import jax.numpy as jnp

    b, l, h, p = x.shape
    first = jnp.zeros((b, l // q), jnp.int32).at[:, 0].set(1)
    index = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, l // q))
    return first, index, jnp.zeros((b, h, p, B.shape[-1]), jnp.float32)


def breakdown(cfg, x, dt, A, B, C, D, bias, sync, interpret=False):
    """Time each stage of our forward alone (same inputs, same timer)."""
    import jax

    from mamba2_jax.kernels.common import process_dt
    from mamba2_jax.kernels.ssd import pallas_fwd as k
    from mamba2_jax.kernels.ssd.decays import decays_for
    from mamba2_jax.kernels.ssd.pallas import decays_launch

    q = cfg.chunk_size
    first, index, h0 = dense_layout(x, B, q)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, interpret=interpret)
    state_kw = dict(block_k=cfg.block_k, block_p=cfg.block_p)
    pass_kw = dict(pass_block_p=cfg.pass_block_p, full_states=cfg.chunk_states)

    def prologue_fn(dt, bias):  # processed dt and its decay terms
        return decays_for(cfg.decays, process_dt(dt, bias, True), A, q,
                          launch=decays_launch(cfg), interpret=interpret)

    def states_fn(x, B, dec):  # the inference path's state copy unless cfg.chunk_states
        loc = k.local_states(x, B, dec.w, chunk_size=q, **state_kw, **launch)
        return k.state_pass(loc, dec.total, first, index, h0, x.dtype, **pass_kw, **launch)

    prologue, states = jax.jit(prologue_fn), jax.jit(states_fn)
    dec = prologue(dt, bias)
    end, _ = states(x, B, dec)
    out_launch = dict(launch, num_warps=cfg.out_num_warps or cfg.num_warps,
                      num_stages=cfg.out_num_stages or cfg.num_stages)
    if k.output_kernel(cfg.out_kernel, x, B, q, True) == "mgpu":
        outputs = jax.jit(lambda x, B, C, dec, end: k.chunk_outputs_mgpu(
            x, B, C, dec.acum, dec.dt, h0, end, D, None, chunk_size=q))
    else:
        outputs = jax.jit(lambda x, B, C, dec, end: k.chunk_outputs(
            x, B, C, dec, first, index, h0, end, D, None, chunk_size=q, block_m=cfg.block_m,
            row_blocks=cfg.row_blocks, block_n=cfg.block_n, **out_launch))
    return dict(
        prologue=timeit(lambda: prologue(dt, bias), sync),
        states=timeit(lambda: states(x, B, dec), sync),
        outputs=timeit(lambda: outputs(x, B, C, dec, end), sync))


def backward_breakdown(cfg, x, dt, A, B, C, D, bias, dy, sync, interpret=False):
    """Time our backward alone and each of its kernels alone (same inputs, same timer); the
    inputs are chunk-aligned (l a multiple of q), as in every benchmark shape."""
    import jax
    import jax.numpy as jnp

    from mamba2_jax.kernels.common import process_dt
    from mamba2_jax.kernels.ssd import pallas_bwd as kb
    from mamba2_jax.kernels.ssd import pallas_fwd as kf
    from mamba2_jax.kernels.ssd.pallas import backward_kwargs, decays_launch

    q = cfg.chunk_size
    first, index, h0 = dense_layout(x, B, q)
    dtp = jax.jit(lambda dt, bias: process_dt(dt, bias, True))(dt, bias)
    _, end, _, dec, end_bf16 = kf.ssd_forward_chunked(
        x, dtp, A, B, C, D, None, h0, first, index, chunk_size=q, decays=cfg.decays,
        decays_launch=decays_launch(cfg), return_decays=True, return_operand_states=True,
        dense=True, interpret=interpret)
    bwd_kw = dict(backward_kwargs(cfg), dense=True, interpret=interpret)
    dfinal = jnp.zeros_like(h0)
    launch = dict(num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages, interpret=interpret)
    blocks = dict(chunk_size=q, block_m=cfg.bwd_block_m, heads=cfg.bwd_heads, **launch)
    whole = jax.jit(lambda *a: kb.ssd_backward_chunked(*a, **bwd_kw))
    states = jax.jit(lambda dy, dec, end, dfinal: kb.gradient_states(
        dy, C, dec, first, index, h0, end, dfinal, chunk_size=q, block_k=cfg.block_k,
        pass_block_p=cfg.pass_block_p, **launch))
    _, G, _ = states(dy, dec, end, dfinal)
    dxdb = jax.jit(lambda dy, dec, G: kb.dx_dB(x, B, C, dy, dec, G, D,
                                               block_n=cfg.bwd_dx_block_n,
                                               with_dD=cfg.bwd_fused_dD, **blocks))
    if kb.which_dc_kernel(cfg.bwd_dc_kernel, x, B, q, True, interpret) == "mgpu":
        hb = kb.heads_per_program(x.shape[2], B.shape[2], cfg.bwd_dc_heads)
        dc = jax.jit(lambda dy, dec, end: kb.dC_partials_mgpu(
            x, B, C, dy, dec.acum, dec.dt, h0, end_bf16, chunk_size=q, heads_per_program=hb,
            interpret=interpret))
    else:
        dc = jax.jit(lambda dy, dec, end: kb.dC_partials(
            x, B, C, dy, dec, first, index, h0, end, block_n=cfg.bwd_dc_block_n, **blocks))
    return dict(
        # the whole backward as the custom VJP runs it: on the forward's decay terms
        backward=timeit(lambda: whole(x, dtp, A, B, C, D, None, h0, first, index, None, end,
                                      dy, dfinal, None, dec, end_bf16), sync),
        gradient_states=timeit(lambda: states(dy, dec, end, dfinal), sync),
        dx_dB=timeit(lambda: dxdb(dy, dec, G), sync),
        dC=timeit(lambda: dc(dy, dec, end), sync))


def config_fields(spec: str) -> dict:
    """``"default"`` or ``"field=value,field=value"`` -> SSDKernelConfig overrides (values: ints,
    ``none``, ``true`` / ``false``, or strings); a spec that is not of that form or that
    SSDKernelConfig rejects raises ValueError naming it."""
    from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig

    if spec.strip() in ("", "default"):
        return {}
    fields = {}
    for item in spec.split(","):
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise ValueError(f"config {spec!r}: {item!r} is not field=value")
        value = value.strip()
        fields[name.strip()] = (None if value.lower() == "none" else
                                value.lower() == "true" if value.lower() in ("true", "false")
                                else int(value) if value.lstrip("-").isdigit() else value)
    try:
        SSDKernelConfig(chunk_size=256, **fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config {spec!r}: {e}") from None
    return fields


def grad_errors(grad_ours, their_fwd_bwd, leaves, args, q, dy):
    """Relative (Frobenius) error of ours' and mamba_ssm's bf16 gradients of sum(y * dy) against
    the XLA reference's (float32 arithmetic on the same bf16 inputs)."""
    import jax
    import jax.numpy as jnp

    from mamba2_jax.kernels.ssd import ssd_chunk_scan

    def loss(x, dt, A, B, C, D, bias):
        y = ssd_chunk_scan(x, dt, A, B, C, chunk_size=q, D=D, dt_bias=bias, dt_softplus=True,
                           impl="xla")
        return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))

    want = jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*args)
    ours = grad_ours(*args)[1]  # (y, gradients)
    their_fwd_bwd()
    theirs = [jnp.from_dlpack(t.grad.contiguous()) for t in leaves]

    def rel(a, b):
        a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    names = ("x", "dt", "A", "B", "C", "D", "dt_bias")
    return dict(ours={k: rel(a, w) for k, a, w in zip(names, ours, want)},
                mamba_ssm={k: rel(a, w) for k, a, w in zip(names, theirs, want)})


def _fmt(v, spec=".3f"):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def markdown_table(result):
    lines = [f"{result['device']}, jax {result['jax']}, triton {result['triton']}, {result['date']}",
             "",
             "| b, l, h, p, g, n, q | mamba_ssm fwd ms (graph) | ours fwd ms | ratio | roofline | "
             "mamba_ssm fwd+bwd ms (graph) | ours fwd+bwd ms | ratio (vs graph) | XLA fwd ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        shape = ", ".join(str(v) for v in r["shape"].values())
        lines.append(
            f"| {shape} | {_fmt(r['mamba_ssm_fwd_ms'])} ({_fmt(r.get('mamba_ssm_fwd_graph_ms'))}) | "
            f"{_fmt(r['ours_fwd_ms'])} | {_fmt(r['ratio_fwd'], '.2f')} | "
            f"{_fmt(r['ours_fraction_of_roofline'], '.0%')} | "
            f"{_fmt(r.get('mamba_ssm_fwd_bwd_ms'))} "
            f"({_fmt(r.get('mamba_ssm_fwd_bwd_graph_ms'))}) | "
            f"{_fmt(r.get('ours_fwd_bwd_ms'))} | {_fmt(r.get('ratio_fwd_bwd'), '.2f')} "
            f"({_fmt(r.get('ratio_fwd_bwd_vs_graph'), '.2f')}) | "
            f"{_fmt(r.get('xla_fwd_ms'))} |")
    return "\n".join(lines)


def write_results(out, device, bandwidth, matmul_rate, rows):
    """Write ``ssd_<device>.json`` (after every shape, so a run stopped early keeps its rows)."""
    import jax
    import torch
    import triton

    result = dict(
        op="ssd_chunk_scan", device=device, date=datetime.date.today().isoformat(),
        jax=jax.__version__, triton=triton.__version__, torch=torch.__version__,
        copy_bandwidth_Bps=bandwidth, bf16_matmul_flops=matmul_rate,
        timer=("wall clock over back-to-back calls + sync, median; runs of >= 20 ms (at least "
               "10 calls) unless fixed"), rows=rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = "ssd_" + device.replace(" ", "_").replace("/", "_") + ".json"
    (out / name).write_text(json.dumps(result, indent=2))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=".peers", help="folder holding mamba_ssm's Triton ops")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--no-xla", action="store_true", help="skip the XLA reference timings")
    ap.add_argument("--no-bwd", action="store_true", help="skip forward+backward timings")
    ap.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0,1")
    ap.add_argument("--configs", default="default",
                    help="our forward configs to try, ';'-separated, each 'default' or "
                         "SSDKernelConfig overrides 'field=value,...' (e.g. block_n=64,out_num_warps=8)")
    ap.add_argument("--bwd-configs", default="default",
                    help="our backward configs to try with the best forward, as --configs "
                         "(e.g. bwd_dx_block_n=32,bwd_dc_block_n=32)")
    ap.add_argument("--grad-check", action="store_true",
                    help="on the first shape, compare ours' and mamba_ssm's bf16 gradients with "
                         "the XLA reference's (float32 arithmetic)")
    args = ap.parse_args()
    for spec in args.configs.split(";") + args.bwd_configs.split(";"):  # before any GPU work
        try:
            config_fields(spec)
        except ValueError as e:
            ap.error(str(e))

    import jax
    import jax.numpy as jnp
    import torch

    sys.path.insert(0, str(Path(args.peers).resolve()))
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    from mamba2_jax.kernels.ssd import ssd_chunk_scan
    from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, ssd_pallas

    bandwidth, matmul_rate = ceilings(torch)
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {bandwidth / 1e12:.2f} TB/s, bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s")
    jsync = lambda out: jax.block_until_ready(out) if out is not None else None
    tsync = lambda _: torch.cuda.synchronize()
    configs = args.configs.split(";")

    rows = []
    picked = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        picked = [SHAPES[int(i)] for i in args.shapes.split(",")]
    for shape in picked:
        b, l, h, p, g, n, q = shape
        tin = torch_inputs(shape)
        tx, tdt, tA, tB, tC, tD, tbias, tdy = tin.values()
        x, dt, A, B, C, D, bias, dy = (jnp.from_dlpack(t) for t in (tx, tdt, tA, tB, tC, tD, tbias, tdy))

        def theirs():
            return mamba_chunk_scan_combined(tx, tdt, tA, tB, tC, q, D=tD, dt_bias=tbias,
                                             dt_softplus=True, return_final_states=True)

        def ours_with(cfg):
            fwd = jax.jit(lambda *a: ssd_pallas(cfg, *a[:5], a[5], None, a[6], None, None)[:2])
            return lambda: fwd(x, dt, A, B, C, D, bias)

        row = dict(shape=dict(zip("b l h p g n chunk".split(), shape)))
        y_theirs, final_theirs = theirs()
        row["mamba_ssm_fwd_ms"] = timeit(theirs, tsync)
        try:  # their device time without Python launch overhead: replay a captured CUDA graph
            graph = cuda_graph(torch, theirs)
            row["mamba_ssm_fwd_graph_ms"] = timeit(lambda: graph.replay(), tsync)
        except Exception as e:
            row["mamba_ssm_fwd_graph_ms"] = f"capture failed: {type(e).__name__}: {str(e)[:120]}"
        best = None
        for name in configs:
            cfg = SSDKernelConfig(chunk_size=q, dt_softplus=True, **config_fields(name))
            try:
                fn = ours_with(cfg)
                ms = timeit(fn, jsync)
            except Exception as e:  # a config that does not compile or fit is reported, not hidden
                print(f"  config {name} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            row.setdefault("ours_fwd_ms_by_config", {})[name] = ms
            if best is None or ms < best[0]:
                best = (ms, name, fn, cfg)
        ms, name, fn, cfg = best
        row["ours_breakdown_ms"] = breakdown(cfg, x, dt, A, B, C, D, bias, jsync)
        row["ours_fwd_ms"], row["ours_config"] = ms, name
        y_ours, final_ours = fn()
        y_t = jnp.from_dlpack(y_theirs.contiguous()).astype(jnp.float32)
        err = float(jnp.linalg.norm(y_ours.astype(jnp.float32) - y_t) / jnp.linalg.norm(y_t))
        f_t = jnp.from_dlpack(final_theirs.contiguous()).astype(jnp.float32)
        ferr = float(jnp.linalg.norm(final_ours - f_t) / jnp.linalg.norm(f_t))
        row["rel_err_vs_mamba_ssm"] = dict(y=err, final_states=ferr)

        flops, nbytes = ssd_cost(*shape)
        floor_ms = max(flops / matmul_rate, nbytes / bandwidth) * 1e3
        row.update(flops=flops, bytes=nbytes, floor_ms=floor_ms,
                   ours_fraction_of_roofline=floor_ms / row["ours_fwd_ms"],
                   ratio_fwd=row["mamba_ssm_fwd_ms"] / row["ours_fwd_ms"])
        if args.no_bwd:
            rows.append(row)
            print(json.dumps(row))
            write_results(args.out, device, bandwidth, matmul_rate, rows)
            continue
        # forward + backward: ours through the Pallas backward kernels
        best_bwd = None
        for spec in args.bwd_configs.split(";"):
            bcfg = dataclasses.replace(cfg, **config_fields(spec))
            grad_fn = jax.jit(functools.partial(ours_fwd_bwd, bcfg, dy))
            try:
                ms = timeit(lambda: grad_fn(x, dt, A, B, C, D, bias), jsync, reps=5)
            except Exception as e:
                print(f"  backward config {spec} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            row.setdefault("ours_fwd_bwd_ms_by_config", {})[spec] = ms
            if best_bwd is None or ms < best_bwd[0]:
                best_bwd = (ms, spec, grad_fn)
        row["ours_fwd_bwd_ms"], row["ours_bwd_config"], grad_fn = best_bwd
        bcfg = dataclasses.replace(cfg, **config_fields(row["ours_bwd_config"]))
        try:
            row["ours_bwd_breakdown_ms"] = backward_breakdown(bcfg, x, dt, A, B, C, D, bias, dy,
                                                              jsync)
        except Exception as e:
            row["ours_bwd_breakdown_ms"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        row["ours_backward"] = "pallas"
        their_fwd_bwd, leaves = theirs_fwd_bwd(mamba_chunk_scan_combined, tin, q)
        row["mamba_ssm_fwd_bwd_ms"] = timeit(their_fwd_bwd, tsync, reps=5)
        try:  # their fwd+bwd device time: a CUDA graph of forward + autograd backward
            graph = cuda_graph(torch, their_fwd_bwd)
            row["mamba_ssm_fwd_bwd_graph_ms"] = timeit(lambda: graph.replay(), tsync, reps=5)
        except Exception as e:
            row["mamba_ssm_fwd_bwd_graph_ms"] = (f"capture failed: {type(e).__name__}: "
                                                 f"{str(e)[:120]}")
        if args.grad_check and shape == picked[0]:
            row["grad_rel_err_vs_xla_fp32"] = grad_errors(
                grad_fn, their_fwd_bwd, leaves, (x, dt, A, B, C, D, bias), q, dy)
        if not args.no_xla:
            ref = jax.jit(lambda *a: ssd_chunk_scan(*a[:5], chunk_size=q, D=a[5], dt_bias=a[6],
                                                    dt_softplus=True, impl="xla"))
            row["xla_fwd_ms"] = timeit(lambda: ref(x, dt, A, B, C, D, bias), jsync, iters=3, reps=3)
        graph_bwd = row.get("mamba_ssm_fwd_bwd_graph_ms")
        row["ratio_fwd_bwd"] = row["mamba_ssm_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
        if isinstance(graph_bwd, float):
            row["ratio_fwd_bwd_vs_graph"] = graph_bwd / row["ours_fwd_bwd_ms"]
        rows.append(row)
        print(json.dumps(row))
        write_results(args.out, device, bandwidth, matmul_rate, rows)

    result = write_results(args.out, device, bandwidth, matmul_rate, rows)
    print(markdown_table(result))


if __name__ == "__main__":
    main()
