"""Does streaming a weight through L2 just before its GEMV speed the GEMV up? (H200: 50 MB L2.)

    python scripts/bench_l2_prefetch.py --out benchmarks/results

The question behind it: a batch-1 decode layer spends ~13 µs in launches that move almost no
bytes (mixer step, norms); if such a kernel also read the next projection's weight (extra
programs), the projection could stream it from L2. Here, for the out_proj shape 5120 x 2560
bf16 (26 MB) and a part of in_proj's (2560 x 4096, 21 MB), over R distinct weight copies:

* ``gemv``: the product alone (XLA ``jnp.dot`` and our split-K ``gemv``), cold weights;
* ``touch``: a Pallas kernel reading the weight (``evict_last``), writing one float a program;
* ``touch_same + gemv``: touch W_i, then the product with W_i (ordered by an optimization barrier);
* ``touch_other + gemv``: touch a different buffer of the same size, then the product with W_i.

Times are device times of the kernels under ``jax.profiler`` (``profile_ssd``'s reader), per
product: the touch kernel's (``l2_touch``) and the product's (every other kernel), so host
dispatch does not enter. (product after touch_other) - (product after touch_same) is what L2
saves the product. Writes ``l2_prefetch_<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import streaming_bandwidth  # noqa: E402
from profile_ssd import device_kernels  # noqa: E402


def touch(w, *, block_rows=32, block_cols=512, eviction_policy="evict_last"):
    """Read all of ``w`` [K, N] through L2 (one [block_rows, block_cols] tile a program); each
    program writes its tile's float32 sum (so the loads are kept)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    K, N = w.shape

    def kernel(w_ref, o_ref):
        t = plt.load(w_ref, eviction_policy=eviction_policy).astype(jnp.float32)
        o_ref[0, 0] = jnp.sum(t)

    return pl.pallas_call(
        kernel, grid=(K // block_rows, N // block_cols),
        in_specs=[pl.BlockSpec((block_rows, block_cols), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((1, 1), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((K // block_rows, N // block_cols), jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1), name="l2_touch",
    )(w)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from mamba2_jax.kernels.gemv import gemv

    device = jax.devices()[0].device_kind
    bw = streaming_bandwidth(4 << 30)
    sync = jax.block_until_ready
    rows = []
    for name, K, N in (("out_proj", 5120, 2560), ("in_proj_part", 2560, 4096)):
        R = max(4, -(-(512 << 20) // (K * N * 2)))
        keys = jax.random.split(jax.random.PRNGKey(K), 2 * R)
        make = jax.jit(lambda k: (jax.random.normal(k, (K, N), jnp.float32)
                                  / math.sqrt(K)).astype(jnp.bfloat16))
        ws = [make(k) for k in keys[:R]]
        others = [make(k) for k in keys[R:]]
        x = jax.random.normal(jax.random.PRNGKey(1), (1, K), jnp.float32).astype(jnp.bfloat16)
        products = {"xla": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32),
                    "gemv": lambda x, w: gemv(x, w, impl="pallas")}
        for pname, prod in products.items():
            def chain(ws, others, x, mode):
                outs = []
                for i, w in enumerate(ws):
                    if mode != "gemv":
                        s = touch(w if mode == "touch_same" else others[i])
                        if mode == "touch":
                            outs.append(s)
                            continue
                        x, s = jax.lax.optimization_barrier((x, s))
                        outs.append(s)
                    outs.append(prod(x, w))
                return outs
            row = dict(product=name, impl=pname, K=K, N=N, weight_bytes=K * N * 2, copies=R)
            for mode in ("gemv", "touch", "touch_same", "touch_other"):
                f = jax.jit(lambda ws, o, x, mode=mode: chain(ws, o, x, mode))
                for _ in range(3):
                    sync(f(ws, others, x))
                trace_dir = tempfile.mkdtemp()
                with jax.profiler.trace(trace_dir):
                    for _ in range(args.iters):
                        sync(f(ws, others, x))
                totals, _ = device_kernels(trace_dir)
                n = R * args.iters
                touch_ns = sum(v for k, v in totals.items() if "l2_touch" in k)
                row[mode + "_touch_us"] = touch_ns / n / 1e3
                row[mode + "_product_us"] = (sum(totals.values()) - touch_ns) / n / 1e3
            row["l2_saves_us"] = row["touch_other_product_us"] - row["touch_same_product_us"]
            row["cold_fraction_of_read_bw"] = K * N * 2 / (row["gemv_product_us"] * 1e-6) / bw
            row["touch_fraction_of_read_bw"] = K * N * 2 / (row["touch_touch_us"] * 1e-6) / bw
            rows.append(row)
            print(json.dumps(row), flush=True)
    try:
        import torch
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
    except Exception:  # noqa: BLE001 - informational only
        l2 = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"l2_prefetch_{device.replace(' ', '_')}.json").write_text(json.dumps(dict(
        device=device, jax=jax.__version__, date=datetime.date.today().isoformat(),
        read_bandwidth_Bps=bw, l2_bytes=l2, rows=rows), indent=2))


if __name__ == "__main__":
    main()
