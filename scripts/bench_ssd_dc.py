"""Time the SSD backward's dC kernel alone on a GPU: the Mosaic GPU kernel (``mgpu_dc.py``)
against the Triton one (``pallas_bwd.dC_partials``), on the same inputs with the same timer,
for several heads per program.

    python scripts/bench_ssd_dc.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import SHAPES  # noqa: E402
from bench_ssd_output import forward_inputs, write_rows  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for ssd_dc_<device>.json")
    ap.add_argument("--shapes", default="0,1,2", help="indices into bench_kernels.SHAPES")
    ap.add_argument("--heads", default="2,4,8", help="heads per program to time")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from bench_kernels import timeit
    from mamba2_jax.kernels.ssd.mgpu_dc import dC_partials_mgpu
    from mamba2_jax.kernels.ssd.pallas_bwd import dC_partials, heads_per_program

    rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
    rows = []
    for i in args.shapes.split(","):
        shape = SHAPES[int(i)]
        b, l, h, p, g, n, q = shape
        x, B, C, D, first, index, h0, _, end, dec = forward_inputs(shape)
        dY = jax.random.normal(jax.random.PRNGKey(7), x.shape, x.dtype)
        end32 = end.astype(jnp.float32)
        sync = jax.block_until_ready
        row = dict(shape=dict(zip("b l h p g n chunk".split(), shape)))
        for heads in map(int, args.heads.split(",")):
            hb = heads_per_program(h, g, heads)
            triton = jax.jit(lambda x, B, C, dY, dec, end32, hb=hb: dC_partials(
                x, B, C, dY, dec, first, index, h0, end32, chunk_size=q, heads=hb))
            ref_dc, ref_inter = triton(x, B, C, dY, dec, end32)
            entry = dict(triton_ms=timeit(lambda: triton(x, B, C, dY, dec, end32), sync))
            try:
                mgpu = jax.jit(lambda x, B, C, dY, dec, end, hb=hb: dC_partials_mgpu(
                    x, B, C, dY, dec.acum, dec.dt, h0, end, chunk_size=q,
                    heads_per_program=hb))
                dc, inter = mgpu(x, B, C, dY, dec, end)
                entry.update(mgpu_ms=timeit(lambda: mgpu(x, B, C, dY, dec, end), sync),
                             rel_err_vs_triton=dict(dC=rel(dc, ref_dc),
                                                    inter=rel(inter, ref_inter)))
                entry["ratio"] = entry["triton_ms"] / entry["mgpu_ms"]
            except Exception as e:  # a kernel that fails is reported, not hidden
                entry["mgpu"] = f"failed: {type(e).__name__}: {str(e)[:500]}"
            row[f"heads_{hb}"] = entry
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        write_rows(args.out, "ssd_dc",
                   "SSD backward dC kernel alone (dC partials + inter row sums)", rows)

if __name__ == "__main__":
    main()
