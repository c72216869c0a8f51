"""Time the SSD chunk-output kernel alone on a GPU: the Mosaic GPU kernel (``mgpu_output.py``,
both of Mosaic GPU's lowerings) against the Triton one, on the same inputs with the same timer.

    python scripts/bench_ssd_output.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(1, 8192, 80, 64, 1, 128, 256), (1, 8192, 128, 64, 8, 128, 256)]


def forward_inputs(shape, seed=0):
    """Random bf16 inputs of one shape and our forward's results on them: (x, B, C, D, is_first,
    init_index, h0, y, end states in bf16, decay terms), dense layout, zero initial states."""
    import jax
    import jax.numpy as jnp

    from bench_kernels import dense_layout
    from mamba2_jax.kernels.ssd import pallas_fwd as k

    b, l, h, p, g, n, q = shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(ks[0], (b, l, h, p), jnp.bfloat16)
    B = (0.3 * jax.random.normal(ks[1], (b, l, g, n))).astype(jnp.bfloat16)
    C = (0.3 * jax.random.normal(ks[2], (b, l, g, n))).astype(jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(ks[3], (b, l, h)) - 2.0)
    A = -jnp.exp(0.5 * jax.random.normal(ks[4], (h,)))
    D = jax.random.normal(ks[5], (h,))
    first, index, h0 = dense_layout(x, B, q)
    y, end, _, dec = k.ssd_forward_chunked(
        x, dt, A, B, C, D, None, h0, first, index, chunk_size=q, block_n=32,
        full_states=False, return_decays=True)
    return x, B, C, D, first, index, h0, y, end, dec


def write_rows(folder, prefix, op, rows):
    """``<folder>/<prefix>_<device>.json``: the rows of a kernel-alone benchmark, with the
    device, the versions and the timer."""
    import jax
    import triton

    device = jax.devices()[0].device_kind
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{prefix}_{device.replace(' ', '_')}.json").write_text(json.dumps(dict(
        op=op, device=device, jax=jax.__version__, triton=triton.__version__,
        timer="bench_kernels.timeit (wall clock, median)", rows=rows), indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for ssd_output_<device>.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from mamba2_jax.kernels.ssd import pallas_fwd as k
    from mamba2_jax.kernels.ssd.mgpu_output import chunk_outputs_mgpu

    from bench_kernels import timeit

    rows = []
    for shape in SHAPES:
        q = shape[-1]
        x, B, C, D, first, index, h0, y_tri, end, dec = forward_inputs(shape)
        sync = jax.block_until_ready
        triton = jax.jit(lambda x, B, C, dec, end: k.chunk_outputs(
            x, B, C, dec, first, index, h0, end, D, None, chunk_size=q, block_m=64,
            block_n=32, row_blocks=4))
        row = dict(shape=dict(zip("b l h p g n chunk".split(), shape)),
                   triton_ms=timeit(lambda: triton(x, B, C, dec, end), sync))
        for semantics in ("lane", "warpgroup"):
            try:
                mgpu = jax.jit(lambda x, B, C, dec, end, s=semantics: chunk_outputs_mgpu(
                    x, B, C, dec.acum, dec.dt, h0, end, D, None, chunk_size=q, semantics=s))
                y = mgpu(x, B, C, dec, end).astype(jnp.float32)
                err = jnp.linalg.norm(y - y_tri.astype(jnp.float32)) / jnp.linalg.norm(
                    y_tri.astype(jnp.float32))
                row[f"mgpu_{semantics}"] = dict(
                    ms=timeit(lambda: mgpu(x, B, C, dec, end), sync),
                    rel_err_vs_triton=float(err))
            except Exception as e:  # a lowering that fails is reported, not hidden
                row[f"mgpu_{semantics}"] = f"failed: {type(e).__name__}: {str(e)[:500]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        write_rows(args.out, "ssd_output", "SSD chunk-output kernel alone", rows)


if __name__ == "__main__":
    main()
