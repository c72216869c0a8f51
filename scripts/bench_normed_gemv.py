"""Benchmark the norms folded into the decode projections (``gemv.normed_gemv``) on a GPU,
bf16, the Mamba-2 2.7B shapes, m in {1, 4}, against what the model ran before them:

* in_proj 2560 x 10576: ``normed_gemv(h, ss, w_norm, W, partials=True)`` (the block norm in the
  product's prologue) against ``rms_norm`` (one launch) then ``gemv(..., partials=True)``;
* out_proj 5120 x 2560: ``normed_gemv(y, ss, w_norm, W, residual)`` (the gated norm in the
  prologue; then ``residual_sum``: the split-K sum, the residual add and the next norm's sums
  of squares) over a few launch configs, against the gated ``rms_norm``, XLA's ``jnp.dot``
  and the residual add + next block norm (``rms_norm`` with ``delta``).

    python scripts/bench_normed_gemv.py --out benchmarks/results

Each timed function applies its ops to R distinct weight copies (>= 256 MiB, so L2 does not
serve them), time / R; same timer as ``bench_gemv.py``. Writes ``normed_gemv_<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import streaming_bandwidth, timeit  # noqa: E402

D_MODEL, D_INNER, D_IN_PROJ, HEADS = 2560, 5120, 10576, 80
OUT_CONFIGS = [dict(), dict(block_n=64, block_k=128, num_stages=4), dict(splits=20),
               dict(splits=80), dict(block_n=128, block_k=128, num_stages=4)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from mamba2_jax.kernels.gemv import gemv, normed_gemv
    from mamba2_jax.kernels.rms_norm import rms_norm

    if jax.default_backend() != "gpu":
        raise SystemExit("bench_normed_gemv.py needs a GPU")
    device = jax.devices()[0].device_kind
    bw = streaming_bandwidth(4 << 30, iters=args.iters, reps=args.reps)
    sync = jax.block_until_ready
    BF, F32, eps = jnp.bfloat16, jnp.float32, 1e-5
    key = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    rows = []

    def copies(K, N):
        R = max(2, -(-(256 << 20) // (K * N * 2)))
        make = jax.jit(lambda k: (jax.random.normal(k, (K, N), F32) / math.sqrt(K)).astype(BF))
        return [make(next(key)) for _ in range(R)]

    def time_it(name, m, f, ws, *a, bytes_=None, **extra):
        entry = dict(name=name, m=m, **extra)
        try:
            fn = jax.jit(lambda ws, *a: tuple(f(w, *a) for w in ws))
            ms = timeit(functools.partial(fn, ws, *a), sync, iters=args.iters,
                        reps=args.reps) / len(ws)
            entry.update(us=ms * 1e3, bw_fraction=bytes_ / (ms * 1e-3) / bw)
        except Exception as e:  # noqa: BLE001 (record and go on)
            entry["error"] = f"{type(e).__name__}: {e}"[:1500]
            traceback.print_exc(limit=2)
        rows.append(entry)
        print(json.dumps(entry), flush=True)

    for m in (1, 4):
        h = jax.random.normal(next(key), (m, D_MODEL), F32)
        ss = jnp.sum(jnp.square(h.astype(BF).astype(F32)), -1, keepdims=True)
        wn = (1 + 0.1 * jax.random.normal(next(key), (D_MODEL,))).astype(BF)
        ws = copies(D_MODEL, D_IN_PROJ)
        b = D_MODEL * D_IN_PROJ * 2
        time_it("in_proj: rms_norm + gemv partials", m, lambda w, h, wn: gemv(
            rms_norm(h, wn, eps=eps, in_dtype=BF), w, partials=True, impl="pallas"), ws, h, wn,
            bytes_=b)
        time_it("in_proj: normed_gemv partials", m, lambda w, h, ss, wn: normed_gemv(
            h, ss, wn, w, eps=eps, in_dtype=BF, partials=True, impl="pallas"), ws, h, ss, wn,
            bytes_=b)
        ws = None
        y = jax.random.normal(next(key), (m, D_INNER), F32)
        gss = jnp.sum(jnp.square(y).reshape(m, HEADS, -1), -1)
        gw = (1 + 0.1 * jax.random.normal(next(key), (D_INNER,))).astype(BF)
        ws = copies(D_INNER, D_MODEL)
        b = D_INNER * D_MODEL * 2

        def before(w, y, gw, h, wn):  # the unfolded path: gated norm, XLA dot, residual norm
            x = rms_norm(y, gw, eps=eps, norm_dtype=BF, impl="pallas")
            return rms_norm(h, wn, delta=jnp.dot(x.astype(BF), w), eps=eps, in_dtype=BF,
                            impl="pallas")
        time_it("out_proj: gated rms_norm + XLA dot + residual rms_norm", m, before, ws, y, gw,
                h, wn, bytes_=b)
        for cfg in OUT_CONFIGS:
            time_it("out_proj: normed_gemv residual", m, lambda w, y, gss, gw, h, cfg=cfg:
                    normed_gemv(y, gss, gw, w, h, eps=eps, in_dtype=F32, norm_dtype=BF,
                                res_in_dtype=BF, impl="pallas", **cfg), ws, y, gss, gw, h,
                    bytes_=b, config=cfg)
        ws = None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("normed_gemv_" + device.replace(" ", "_") + ".json")
    path.write_text(json.dumps(dict(
        op="normed_gemv", device=device, date=datetime.date.today().isoformat(),
        jax=jax.__version__, read_bandwidth_Bps=bw, dtype="bfloat16",
        timer="wall clock over back-to-back jitted calls + sync, median; one jit over R "
              "distinct weight copies, time / R; bw_fraction = weight bytes / time / read bw",
        rows=rows), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
