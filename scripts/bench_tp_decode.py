"""Decode-step time of a Mamba-2 LM with and without tensor parallelism, on the GPUs present.

    python scripts/bench_tp_decode.py --out benchmarks/results [--config 2.7b] [--batch 1 64]

Runs the same random bf16 weights (a state-spaces mamba2-2.7b-shaped config by default; no
download) as: one device without a mesh, a ``tensor=1`` mesh (the shard_map path), and
``tensor=N`` for every N > 1 that divides the GPU count and the head count. Checks the prefill
logits of each mesh run against the one-device run, then times ``decode_step`` (jitted, the state
donated) after a 128-token prefill. Timer: wall clock over back-to-back steps + sync, median of 7.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import timeit  # noqa: E402  (same timer as the other benchmarks)

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CONFIGS = {
    "2.7b": dict(hidden_size=2560, num_hidden_layers=64, num_heads=80, head_dim=64, n_groups=1,
                 state_size=128, vocab_size=50288, chunk_size=256),
    "780m": dict(hidden_size=1536, num_hidden_layers=48, num_heads=48, head_dim=64, n_groups=1,
                 state_size=128, vocab_size=50288, chunk_size=256),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, n_groups=1,
                 state_size=16, vocab_size=256, chunk_size=16),               # a smoke test
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="2.7b", choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.convert.pretrained import hf_state_dict, model_from_tensors
    from mamba2_jax.nn.model import Mamba2ForCausalLM
    from mamba2_jax.sharding import make_mesh

    config = Mamba2Config(expand=2, conv_kernel=4, tie_word_embeddings=True, **CONFIGS[args.config])
    n_gpus = jax.device_count()
    base = Mamba2ForCausalLM(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    tensors = hf_state_dict(base)
    runs = [("no mesh", None)] + [
        (f"tensor={tp}", make_mesh(tensor=tp, devices=jax.devices()[:tp]))
        for tp in range(1, n_gpus + 1) if n_gpus % tp == 0 and config.num_heads % tp == 0]
    rng = np.random.default_rng(0)
    rows = []
    reference = {}
    for name, mesh in runs:
        model = base if mesh is None else model_from_tensors(config, tensors, dtype=jnp.bfloat16,
                                                             mesh=mesh)
        graphdef, params = nnx.split(model)  # functional jit: no module traversal per call
        prefill = jax.jit(lambda p, i: nnx.merge(graphdef, p).prefill(i))
        step = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).decode_step(t, s), donate_argnums=2)
        for b in args.batch:
            ids = jnp.asarray(rng.integers(0, config.vocab_size, (b, args.prompt)), jnp.int32) \
                if b not in reference else reference[b][0]
            logits, state = prefill(params, ids)
            last = np.asarray(logits[:, -1], np.float32)
            if b not in reference:
                reference[b] = (ids, last)
            ref_last = reference[b][1]
            rel = float(np.abs(last - ref_last).max() / np.abs(ref_last).max())
            tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            box = [state]

            def one():
                out, box[0] = step(params, tok, box[0])
                return out

            ms = timeit(one, jax.block_until_ready, iters=20, reps=7)
            row = dict(run=name, tp=1 if mesh is None else mesh.shape["tensor"], batch=b,
                       prefill_last_logits_rel_diff_vs_no_mesh=rel, decode_step_ms=ms,
                       tokens_per_s=b / (ms * 1e-3))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    device = jax.devices()[0].device_kind
    result = dict(op="decode_step", config=args.config, dtype="bfloat16", prompt=args.prompt,
                  gpus=n_gpus, device=device, jax=jax.__version__,
                  date=datetime.date.today().isoformat(),
                  timer="wall clock over 20 back-to-back jitted decode steps + sync, median of 7",
                  rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"tp_decode_{args.config}_{n_gpus}x{device.replace(' ', '_')}.json"
    (out / name).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
