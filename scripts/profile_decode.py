"""Per-kernel device times of a Mamba2-2.7B-shaped decode step on a GPU: where a token goes.

    python scripts/profile_decode.py --out benchmarks/results [--batch 1 64] [--impl auto]

The decode step (``impl`` as given) inside a compiled ``steps``-step ``lax.fori_loop`` (state
donated, no host dispatch between steps), run ``iters`` times under ``jax.profiler.trace``;
every GPU kernel event summed by name and divided by the number of steps (``profile_ssd``'s
reader), the number of kernel launches a step, and the device span a step (first kernel start to
last kernel end of a loop call, over ``steps``): kernel time plus the gaps between kernels.
Same model and weights as ``bench_generate.py`` (random bf16, seed 0).
Writes ``profile_decode_<device>.json`` and prints the kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import CONFIG, TINY  # noqa: E402
from profile_ssd import device_kernels, device_span_us, kernel_table, print_kernels  # noqa: E402


def profile(model, batch: int, impl: str, steps: int, iters: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params = nnx.split(model)

    def loop(p, tok, state):
        def body(_, carry):
            tok, state = carry
            logits, state = nnx.merge(graphdef, p).decode_step(tok, state, impl=impl)
            return jnp.argmax(logits, -1).astype(jnp.int32), state
        return jax.lax.fori_loop(0, steps, body, (tok, state))

    loop = jax.jit(loop, donate_argnums=2)
    box = [model.init_state(batch)]
    tok = jnp.zeros((batch,), jnp.int32)

    def run():
        out, box[0] = loop(params, tok, box[0])
        jax.block_until_ready(out)

    for _ in range(3):
        run()
    trace_dir = tempfile.mkdtemp()
    with jax.profiler.trace(trace_dir):
        for _ in range(iters):
            run()
    totals, spans = device_kernels(trace_dir)
    table = kernel_table(totals, iters * steps)
    launches = len(spans) / (iters * steps)
    span = device_span_us(spans, iters) / steps
    return dict(table, launches_per_step=launches, span_us_per_step=span,
                gaps_us_per_step=span - table["total_us"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--impl", nargs="+", default=["auto"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny config (smoke test)")
    ap.add_argument("--unfold-norms", action="store_true",
                    help="clear mixer.FOLD_NORMS_AUTO (the norms' own launches, impl auto)")
    ap.add_argument("--loads-first", action="store_true",
                    help="set mixer.STEP_LOADS_FIRST (the mixer step's loads before its compute)")
    args = ap.parse_args()
    import mamba2_jax.nn.mixer as mixer
    mixer.FOLD_NORMS_AUTO = not args.unfold_norms
    mixer.STEP_LOADS_FIRST = args.loads_first

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.nn.model import Mamba2ForCausalLM

    config = Mamba2Config(**(dict(CONFIG, **TINY) if args.tiny else CONFIG))
    model = Mamba2ForCausalLM(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    device = jax.devices()[0].device_kind
    result = dict(device=device, jax=jax.__version__, layers=config.num_hidden_layers,
                  steps=args.steps, iters=args.iters, runs=[],
                  knobs=dict(FOLD_NORMS_AUTO=mixer.FOLD_NORMS_AUTO,
                             STEP_LOADS_FIRST=mixer.STEP_LOADS_FIRST))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "profile_decode_" + device.replace(" ", "_").replace("/", "_") + ".json"
    for impl in args.impl:
        for b in args.batch:
            r = profile(model, b, impl, args.steps, args.iters)
            result["runs"].append(dict(impl=impl, batch=b, **r))
            (out / name).write_text(json.dumps(result, indent=2))
            print(f"impl={impl} b={b}: {r['total_us']:.1f} us of kernels a step, span "
                  f"{r['span_us_per_step']:.1f} us, {r['launches_per_step']:.1f} launches")
            print_kernels(r, 25)


if __name__ == "__main__":
    main()
