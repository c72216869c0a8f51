"""Benchmark the small-batch GEMV on a GPU: ours (Pallas, ``impl="pallas"``: the split-K Triton
kernel and the Mosaic GPU one, ``kernel="mgpu"``) against XLA (``jnp.dot``), bf16, for the
Mamba-2 2.7b decode projections.

    python scripts/bench_gemv.py --out benchmarks/results

Single products: m in {1, 4}, (K, N) in {(2560, 10576) in_proj, (5120, 2560) out_proj,
(2560, 50280) lm_head}; the LM head is the tied embedding, w [N, K] (``w_layout="out_in"``),
against XLA's ``einsum("mk,nk->mn")`` as the model writes it. Ours runs
at its default launch parameters and at a small sweep of (block_n, block_k, splits[, method,
num_warps, num_stages]); a configuration that fails to compile or run is recorded with its
error, not fatal. Each timed call is one jitted function applying the product to R distinct
weight copies (>= 256 MiB in all, so little is served from the 50 MiB L2), time / R.

Chain: the 64-layer decode projection stack ``h = (h @ Wi)[:, :5120] @ Wo + h`` with 64
distinct random (Wi [2560, 10576], Wo [5120, 2560]) pairs (5.14 GB of bf16), one jitted
function, XLA vs ours (the best configuration of each shape from the sweep).

Timer: wall clock around ``iters`` back-to-back calls + sync, median of ``reps``. Achieved
bandwidth = weight bytes / time, against the measured read bandwidth (``jnp.sum`` over a 4 GiB
bf16 array, jitted once, median). Writes ``gemv_<device>.json`` and prints a markdown table.
(``--smoke``, hidden: tiny shapes, interpret mode, runs on the CPU.)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import streaming_bandwidth, timeit  # noqa: E402  (same timer as the other benchmarks)

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROWS = (1, 4)
# (name, K, N, w_layout): lm_head is the tied embedding [vocab, d] read as w [N, K]
SHAPES = [("in_proj", 2560, 10576, "in_out"), ("out_proj", 5120, 2560, "in_out"),
          ("lm_head", 2560, 50280, "out_in")]
LAYERS, D_MODEL, D_INNER, D_IN_PROJ = 64, 2560, 5120, 10576
# Sweep of our launch parameters; None = the default rule. The first entry is the default.
CONFIGS = [
    dict(),  # method "dot", bn 128, bk 64
    dict(block_n=64, block_k=128, num_stages=4),
    dict(block_n=128, block_k=64, num_stages=4),
    dict(block_n=128, block_k=64, splits=4),
    dict(block_n=128, block_k=64, splits=16),
    dict(block_n=256, block_k=64, num_warps=8),
    dict(method="fma", block_n=128, block_k=32),
    dict(method="fma", block_n=256, block_k=32),
    # the Mosaic GPU kernel (kernel="mgpu"); in_out takes block_n 64, out_in block_k 64
    dict(kernel="mgpu"),
    dict(kernel="mgpu", stages=8),
    dict(kernel="mgpu", stages=12),
    dict(kernel="mgpu", splits=1),
    dict(kernel="mgpu", splits=4, stages=8),
    dict(kernel="mgpu", block_k=128, stages=6),
    dict(kernel="mgpu", block_k=256, stages=4),
    dict(kernel="mgpu", block_n=128, stages=6),
    dict(kernel="mgpu", block_n=256, stages=4),
]
SMOKE_CONFIGS = [dict(), dict(block_n=16, block_k=16, splits=3), dict(block_n=48),
                 dict(method="fma", block_n=16, block_k=16), dict(kernel="mgpu")]


SCALING_K = (640, 1280, 2560, 5120, 10240, 20480)  # --scaling: [1, K] @ [K, 10576]
# --scaling fits its line through the launches whose K slabs have at least this many tiles (the
# smaller K get 1-2 tiles a slab from the default rule, a different, unpipelined loop); XLA
# changes its algorithm with the size, so no line is fitted to it
FIT_MIN_TILES = 4


def scaling_fit(rows):
    """``fit_line`` through the (weight bytes, ms) of our default launch in ``rows`` (bench rows
    with ``ours_default``) whose plan has >= FIT_MIN_TILES tiles a slab."""
    return fit_line([(r["weight_bytes"], d["ms"]) for r in rows
                     if (d := r.get("ours_default")) and d["plan"]["n_k"] >= FIT_MIN_TILES])


def fit_line(points):
    """Least squares ``ms = intercept + bytes / rate`` through (bytes, ms) points: a dict of
    the intercept (µs) and the rate (bytes / s), or None with fewer than two points."""
    if len(points) < 2:
        return None
    n = len(points)
    mx, my = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx  # ms per byte
    return dict(intercept_us=(my - slope * mx) * 1e3, rate_Bps=1 / (slope * 1e-3),
                points=len(points))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--iters", type=int, default=20, help="back-to-back calls per repetition")
    ap.add_argument("--reps", type=int, default=7, help="repetitions (the median is reported)")
    ap.add_argument("--no-chain", action="store_true", help="skip the 64-layer chain")
    ap.add_argument("--no-sweep", action="store_true", help="time the default config only")
    ap.add_argument("--copy-mib", type=int, default=256,
                    help="distinct weight copies per timed call, at least this many MiB in all")
    ap.add_argument("--scaling", action="store_true",
                    help="m = 1, N = 10576, K from 640 to 20480, the default config only, no "
                         "chain: time against weight bytes, and a line fitted through ours "
                         "where each slab has >= FIT_MIN_TILES tiles (its intercept the fixed "
                         "cost of a launch, its slope the streaming rate); writes "
                         "gemv_scaling_<device>.json")
    # CPU smoke test: tiny shapes, the kernel in interpret mode.
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from mamba2_jax.kernels.gemv import gemv
    from mamba2_jax.kernels.gemv.api import _sm_count
    from mamba2_jax.kernels.gemv.mgpu_gemv import mgpu_plan
    from mamba2_jax.kernels.gemv.pallas_gemv import plan

    smoke = args.smoke
    if not smoke and jax.default_backend() != "gpu":
        raise SystemExit("bench_gemv.py needs a GPU (use --smoke for the CPU check)")
    rows_m = (1, 2) if smoke else ROWS
    shapes = ([("in_proj", 64, 80, "in_out"), ("out_proj", 96, 32, "in_out"),
               ("lm_head", 64, 112, "out_in")] if smoke else SHAPES)
    configs = SMOKE_CONFIGS if smoke else CONFIGS
    if args.scaling:  # one product shape family, the default launch, m = 1
        shapes = [(f"K{K}", K, shapes[0][2], "in_out")
                  for K in ((16, 32, 64) if smoke else SCALING_K)]
        rows_m, args.no_sweep, args.no_chain = (1,), True, True
    if args.no_sweep:
        configs = configs[:1]
    iters, reps = (1, 1) if smoke else (args.iters, args.reps)
    min_bytes = 1 << 12 if smoke else args.copy_mib << 20
    layers, dm, di, dip = (2, 32, 64, 80) if smoke else (LAYERS, D_MODEL, D_INNER, D_IN_PROJ)
    device = "cpu_smoke" if smoke else jax.devices()[0].device_kind
    sync = lambda out: jax.block_until_ready(out) if out is not None else None
    ours_kw = dict(impl="pallas", interpret=smoke)
    sm = _sm_count()

    bw = streaming_bandwidth((1 << 20) if smoke else (4 << 30), iters=iters, reps=reps)
    print(f"device {device}, jax {jax.__version__}, measured read bandwidth {bw / 1e9:.0f} GB/s")

    def weights(key, n, K, N, w_layout="in_out"):
        keys = jax.random.split(key, n)
        shape = (N, K) if w_layout == "out_in" else (K, N)
        make = jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32)
                                  / math.sqrt(K)).astype(jnp.bfloat16))
        return [make(k) for k in keys]

    rows, best, chain = [], {}, []
    def write():
        result = dict(op="gemv", device=device, date=datetime.date.today().isoformat(),
                      jax=jax.__version__, sm_count=sm, read_bandwidth_Bps=bw, dtype="bfloat16",
                      bytes="weight bytes K*N*2 (x, partials and output not counted)",
                      timer=("wall clock over back-to-back jitted calls + sync, median; single "
                             "products: one jit over R distinct weight copies, time / R"),
                      rows=rows, chain=chain)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.scaling:
            result.update(fit=scaling_fit(rows), fit_min_tiles=FIT_MIN_TILES)
        kind = "gemv_scaling_" if args.scaling else "gemv_"
        path = out / (kind + device.replace(" ", "_").replace("/", "_") + ".json")
        path.write_text(json.dumps(result, indent=2))
        return path

    for name, K, N, layout in shapes:
        wbytes = K * N * 2
        R = max(2, -(-min_bytes // wbytes))
        ws = weights(jax.random.PRNGKey(K + N), R, K, N, layout)
        # XLA as the model calls it: jnp.dot, or the tied head's einsum against [N, K]
        xla_dot = ((lambda x, w: jnp.einsum("mk,nk->mn", x, w)) if layout == "out_in"
                   else jnp.dot)
        for m in rows_m:
            x = jax.random.normal(jax.random.PRNGKey(m), (m, K), jnp.float32).astype(jnp.bfloat16)
            w0 = ws[0].T if layout == "out_in" else ws[0]
            ref = jnp.dot(x.astype(jnp.float32), w0.astype(jnp.float32))
            xla = jax.jit(lambda x, ws, d=xla_dot: tuple(d(x, w) for w in ws))
            xla_ms = timeit(functools.partial(xla, x, ws), sync, iters=iters, reps=reps) / R
            row = dict(name=name, m=m, K=K, N=N, w_layout=layout, weight_bytes=wbytes, copies=R,
                       xla_ms=xla_ms,
                       xla_GBps=wbytes / (xla_ms * 1e-3) / 1e9,
                       xla_bw_fraction=wbytes / (xla_ms * 1e-3) / bw,
                       xla_rel_err=rel(xla(x, ws[:1])[0], ref), ours=[])
            for cfg in configs:
                entry = dict(config=cfg)
                try:
                    mgpu = cfg.get("kernel") == "mgpu"
                    p = (mgpu_plan if mgpu else plan)(m, K, N, sm_count=sm, **{
                        k: v for k, v in cfg.items()
                        if k in ("block_n", "block_k", "splits", "method", "stages")})
                    entry["plan"] = dict(p, grid=list(p["grid"]))
                    f = jax.jit(lambda x, ws, cfg=cfg, lay=layout: tuple(
                        gemv(x, w, w_layout=lay, **ours_kw, **cfg) for w in ws))
                    entry["rel_err"] = rel(f(x, ws[:1])[0], ref)
                    ms = timeit(functools.partial(f, x, ws), sync, iters=iters, reps=reps) / R
                    entry.update(ms=ms, GBps=wbytes / (ms * 1e-3) / 1e9,
                                 bw_fraction=wbytes / (ms * 1e-3) / bw)
                except Exception as e:  # noqa: BLE001 (record the failure and go on)
                    entry["error"] = f"{type(e).__name__}: {e}"[:2000]
                    traceback.print_exc(limit=2)
                row["ours"].append(entry)
                print(json.dumps(dict(name=name, m=m, **entry)))
            ok = [e for e in row["ours"] if "ms" in e]
            if ok:
                row["ours_default"] = row["ours"][0] if "ms" in row["ours"][0] else None
                row["ours_best"] = min(ok, key=lambda e: e["ms"])
                best[(name, m)] = row["ours_best"]["config"]
            rows.append(row)
            write()
        ws = None  # free the copies before the next shape

    if not args.no_chain:
        wis = weights(jax.random.PRNGKey(1), layers, dm, dip)
        wos = weights(jax.random.PRNGKey(2), layers, di, dm)
        chain_bytes = layers * (dm * dip + di * dm) * 2

        def run_chain(h, wis, wos, dot_i, dot_o):
            for wi, wo in zip(wis, wos):
                h = dot_o(dot_i(h, wi)[:, :di], wo) + h
            return h

        for m in rows_m:
            h0 = jax.random.normal(jax.random.PRNGKey(m), (m, dm), jnp.float32).astype(jnp.bfloat16)
            variants = {"xla": (jnp.dot, jnp.dot, None)}
            if ("in_proj", m) in best and ("out_proj", m) in best:
                ci, co = best[("in_proj", m)], best[("out_proj", m)]
                variants["ours_best"] = (lambda x, w, c=ci: gemv(x, w, **ours_kw, **c),
                                         lambda x, w, c=co: gemv(x, w, **ours_kw, **c),
                                         dict(in_proj=ci, out_proj=co))
            variants["ours_default"] = (lambda x, w: gemv(x, w, **ours_kw),
                                        lambda x, w: gemv(x, w, **ours_kw), {})
            outs = {}
            for vname, (di_fn, do_fn, cfg) in variants.items():
                entry = dict(m=m, variant=vname, config=cfg, weight_bytes=chain_bytes)
                try:
                    f = jax.jit(lambda h, wis, wos, a=di_fn, b=do_fn: run_chain(h, wis, wos, a, b))
                    outs[vname] = f(h0, wis, wos)
                    ms = timeit(functools.partial(f, h0, wis, wos), sync, iters=max(1, iters // 4),
                                reps=reps)
                    entry.update(ms=ms, GBps=chain_bytes / (ms * 1e-3) / 1e9,
                                 bw_fraction=chain_bytes / (ms * 1e-3) / bw)
                    if vname != "xla" and "xla" in outs:
                        entry["rel_err_vs_xla"] = rel(outs[vname], outs["xla"])
                except Exception as e:  # noqa: BLE001 (record the failure and go on)
                    entry["error"] = f"{type(e).__name__}: {e}"[:2000]
                    traceback.print_exc(limit=2)
                chain.append(entry)
                write()
                print(json.dumps(entry))

    path = write()
    print(f"\nread bandwidth {bw / 1e9:.0f} GB/s; wrote {path}\n")
    print("| product | m | XLA µs | XLA / bw | ours default µs | ours best µs | best / bw "
          "| best config | failed configs |")
    print("|---|---|---|---|---|---|---|---|---|")
    us = lambda e: "n/a" if not e else f"{e['ms'] * 1e3:.1f}"
    for r in rows:
        d, b = r.get("ours_default"), r.get("ours_best")
        fails = sum("error" in e for e in r["ours"])
        frac = "n/a" if not b else f"{b['bw_fraction']:.0%}"
        cfg = "n/a" if not b else json.dumps(b["config"])
        print(f"| {r['name']} {r['K']}x{r['N']} | {r['m']} | {r['xla_ms'] * 1e3:.1f} "
              f"| {r['xla_bw_fraction']:.0%} | {us(d)} | {us(b)} | {frac} | {cfg} | {fails} |")
    if chain:
        print("\n| chain (64 layers) | m | ms | GB/s | / bw |")
        print("|---|---|---|---|---|")
        for c in chain:
            if "ms" in c:
                print(f"| {c['variant']} | {c['m']} | {c['ms']:.3f} | {c['GBps']:.0f} "
                      f"| {c['bw_fraction']:.0%} |")
            else:
                print(f"| {c['variant']} | {c['m']} | fail | | |")


if __name__ == "__main__":
    main()
