"""End-to-end decode speed of a Mamba2-2.7B-shaped model: ours (several XLA flag sets) vs the
weight-streaming floor and HF transformers ``generate``, on one GPU, same weights.

    python scripts/bench_generate.py --out benchmarks/results [--batch 1 64]

Each variant runs in its own process (XLA flags are read at start-up):

* ``unfused``: ``impl="auto"`` with the conv update, state update and gate as separate ops
  (``mixer.FUSED_STEP_AUTO = False``) instead of the fused ``kernels/mixer_step`` kernel.
* ``unfolded``: ``impl="auto"`` with the norms as their own launches
  (``mixer.FOLD_NORMS_AUTO = False``) instead of folded into the launches around the
  projections.
* ``pdl``: ``impl="auto"`` with XLA's programmatic dependent launch (``--xla_gpu_enable_pdl``).
* ``loads_first``: ``impl="auto"`` with ``mixer.STEP_LOADS_FIRST`` (the fused step's kernel
  issuing every load before any compute).
* ``ours/<flags>``: ``decode_step`` jitted functionally with the state donated (ms / step), and
  ``mamba2_jax.generate`` (compiled prefill + ``lax.while_loop`` decode): per-token time from two
  generation lengths, ``(T(n2) - T(n1)) / (n2 - n1)``, so prefill and dispatch cancel; with
  ``impl="auto"``, or ``"pallas"`` (variant ``pallas``: every op's kernel and the LM head through
  the Pallas GEMV), or ``"xla"`` (``xla_ops``).
* ``breakdown``: the projection GEMVs alone, the lm_head alone, and the decode step inside a
  compiled 16-step loop (device time without host dispatch).
* ``hf``: ``transformers.Mamba2ForCausalLM`` (bf16, CUDA, same weights), greedy ``generate``,
  per-token time the same way.

Floor per step: (weight bytes + 2 x recurrent-state bytes of the batch) / measured copy bandwidth.
Random bf16 weights (seed 0), tied embeddings, prompt 64 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import streaming_bandwidth, timeit  # noqa: E402  (the shared timer)

CONFIG = dict(hidden_size=2560, num_hidden_layers=64, num_heads=80, head_dim=64, n_groups=1,
              state_size=128, vocab_size=50288, chunk_size=256, expand=2, conv_kernel=4,
              tie_word_embeddings=True)
VARIANTS = {  # (jax 0.11.2's XLA captures Triton custom calls in command buffers by default)
    "default": "",
    "command_buffers_off": "--xla_gpu_enable_command_buffer=",
}
EXTRA_FLAGS = {  # flags of the other variants (xla_ops, hf, breakdown*)
    "breakdown_no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "xla_ops_no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
    "pdl": "--xla_gpu_enable_pdl=true",  # programmatic dependent launch (Hopper+; no gain)
}
KNOB_VARIANTS = {  # impl auto with nn/mixer.py's launch knobs set
    "loads_first": dict(STEP_LOADS_FIRST=True),
}
TINY = dict(CONFIG, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16,
            vocab_size=256, chunk_size=16)  # --tiny: a smoke test of the script
PROMPT = 64


def _median_time(fn, sync, reps=5):
    """Seconds per call of one long call (``bench_kernels.timeit`` with one call a repetition)."""
    return timeit(fn, sync, iters=1, reps=reps, warmup=1) * 1e-3


def worker_ours(batches, n1, n2, impl):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.generate import generate
    from mamba2_jax.nn.model import Mamba2ForCausalLM

    config = Mamba2Config(**CONFIG)
    model = Mamba2ForCausalLM(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    read_bw, copy_bw = streaming_bandwidth(), streaming_bandwidth(copy=True)
    bandwidth = max(read_bw, copy_bw)  # the floor uses the best streaming rate measured
    step = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).decode_step(t, s, impl=impl),
                   donate_argnums=2)
    rows = []
    for b in batches:
        ids = jnp.asarray(np.random.default_rng(b).integers(0, config.vocab_size, (b, PROMPT)),
                          jnp.int32)
        state = model.init_state(b)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        tok = ids[:, -1]
        box = [state]

        def one():
            out, box[0] = step(params, tok, box[0])
            return out

        step_ms = timeit(one, jax.block_until_ready, iters=50, reps=3)
        gen = {n: _median_time(lambda n=n: generate(model, ids, n, impl=impl),
                               jax.block_until_ready, reps=3) for n in (n1, n2)}
        per_token_ms = (gen[n2] - gen[n1]) / (n2 - n1) * 1e3
        tokens = np.asarray(generate(model, ids, n2, impl=impl))[:, PROMPT:]
        floor_ms = (weight_bytes + 2 * state_bytes) / bandwidth * 1e3
        rows.append(dict(batch=b, decode_step_ms=step_ms, generate_ms_per_step=per_token_ms,
                         generate_tokens_per_s=b / per_token_ms * 1e3, floor_ms=floor_ms,
                         generate_fraction_of_floor=floor_ms / per_token_ms,
                         weight_bytes=weight_bytes, state_bytes=state_bytes,
                         read_bandwidth_Bps=read_bw, copy_bandwidth_Bps=copy_bw,
                         tokens_sha1=hashlib.sha1(tokens.tobytes()).hexdigest()[:12]))
    return dict(jax=jax.__version__, device=jax.devices()[0].device_kind, impl=impl, rows=rows)


def worker_breakdown(batches):
    """Where a b=1 step's time goes: the 128 projection GEMVs alone, the lm_head alone, and the
    whole decode step inside a compiled 16-step loop (no host dispatch)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.nn.model import Mamba2ForCausalLM

    config = Mamba2Config(**CONFIG)
    model = Mamba2ForCausalLM(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    i = config.intermediate_size
    ws = [(l.mixer.in_proj.kernel[...], l.mixer.out_proj.kernel[...]) for l in model.backbone.layers]
    emb = model.backbone.embeddings.embedding[...]
    read_bw = streaming_bandwidth()

    @jax.jit
    def gemvs(ws, h):
        for wi, wo in ws:  # a dependency chain, as in the model
            h = (h @ wi)[:, :i] @ wo + h
        return h

    head = jax.jit(lambda e, h: jnp.einsum("bd,vd->bv", h, e, preferred_element_type=jnp.float32))
    head_vd = jax.jit(lambda e, h: jnp.einsum("vd,bd->vb", e, h,       # weight-major output
                                              preferred_element_type=jnp.float32).T)
    head_bf16 = jax.jit(lambda e, h: jnp.einsum("bd,vd->bv", h, e))    # bf16 output

    def loop(p, tok, state):
        def body(_, carry):
            tok, state = carry
            logits, state = nnx.merge(graphdef, p).decode_step(tok, state, impl="xla")
            return jnp.argmax(logits, -1).astype(jnp.int32), state
        return jax.lax.fori_loop(0, 16, body, (tok, state))
    loop = jax.jit(loop, donate_argnums=2)
    rows = []
    for b in batches:
        h = jnp.ones((b, config.hidden_size), jnp.bfloat16)
        gemv_s = _median_time(lambda: gemvs(ws, h), jax.block_until_ready, reps=7)
        gemv_bytes = sum(wi.nbytes + wo.nbytes for wi, wo in ws)
        head_s = _median_time(lambda: head(emb, h), jax.block_until_ready, reps=7)
        head_vd_s = _median_time(lambda: head_vd(emb, h), jax.block_until_ready, reps=7)
        head_bf16_s = _median_time(lambda: head_bf16(emb, h), jax.block_until_ready, reps=7)
        box = [model.init_state(b)]
        tok = jnp.zeros((b,), jnp.int32)

        def run():
            out, box[0] = loop(params, tok, box[0])
            return out
        step_s = _median_time(run, jax.block_until_ready, reps=5) / 16
        rows.append(dict(batch=b, projections_ms=gemv_s * 1e3,
                         projections_fraction_of_read_bw=gemv_bytes / gemv_s / read_bw,
                         lm_head_ms=head_s * 1e3, lm_head_fraction_of_read_bw=emb.nbytes / head_s / read_bw,
                         lm_head_weight_major_ms=head_vd_s * 1e3, lm_head_bf16_out_ms=head_bf16_s * 1e3,
                         step_in_compiled_loop_ms=step_s * 1e3, read_bandwidth_Bps=read_bw))
    return dict(jax=jax.__version__, device=jax.devices()[0].device_kind, rows=rows)


def worker_hf(batches, n1, n2):
    import numpy as np
    import torch
    import transformers
    import jax.numpy as jnp
    from flax import nnx

    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.convert.pretrained import hf_state_dict
    from mamba2_jax.nn.model import Mamba2ForCausalLM

    config = Mamba2Config(**CONFIG)
    tensors = hf_state_dict(Mamba2ForCausalLM(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    hf_config = transformers.Mamba2Config(**config.to_hf_dict())
    with torch.device("cuda"):
        model = transformers.Mamba2ForCausalLM(hf_config).to(torch.bfloat16).eval()
    state = {k: torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16)
             for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    sync = lambda _: torch.cuda.synchronize()
    rows = []
    for b in batches:
        ids = torch.from_numpy(np.random.default_rng(b).integers(0, config.vocab_size,
                                                                 (b, PROMPT))).cuda()
        def run(n):
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        try:
            gen = {n: _median_time(lambda n=n: run(n), sync, reps=2) for n in (n1, n2)}
        except torch.OutOfMemoryError as e:  # HF's torch path materialises [b, c, q, q, h, n]
            rows.append(dict(batch=b, error=f"OutOfMemoryError: {str(e)[:160]}"))
            torch.cuda.empty_cache()
            continue
        per_token_ms = (gen[n2] - gen[n1]) / (n2 - n1) * 1e3
        rows.append(dict(batch=b, generate_ms_per_step=per_token_ms,
                         generate_tokens_per_s=b / per_token_ms * 1e3))
    fast = getattr(transformers.models.mamba2.modeling_mamba2, "is_fast_path_available", None)
    return dict(transformers=transformers.__version__, torch=torch.__version__,
                fast_path_available=bool(fast), rows=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS) + ["pallas", "xla_ops", "hf"],
                    help="default / command_buffers_off (impl auto: in_proj through the GEMV "
                         "kernel at b <= 16), unfused (auto without the fused step), unfolded "
                         "(auto, the norms' own launches), pdl, " + ", ".join(KNOB_VARIANTS)
                         + " (auto with mixer knobs), pallas (impl pallas: every op's kernel, "
                         "in_proj, out_proj and the LM head through the GEMV), xla_ops (impl "
                         "xla), hf, breakdown*")
    ap.add_argument("--name", default="generate_2.7b", help="result file prefix")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="a tiny config (smoke test)")
    args = ap.parse_args()
    if args.tiny:
        CONFIG.update(TINY)
    if args.worker is not None:
        if args.worker == "hf":
            result = worker_hf(args.batch, 4, 12)
        elif args.worker.startswith("breakdown"):
            result = worker_breakdown(args.batch)
        else:
            impl = ("xla" if args.worker.startswith("xla_ops") else
                    "pallas" if args.worker == "pallas" else "auto")
            import mamba2_jax.nn.mixer as mixer
            if args.worker in ("unfused", "unfolded"):  # impl auto, parts of the step unfused
                mixer.FUSED_STEP_AUTO = args.worker != "unfused"
                mixer.FOLD_NORMS_AUTO = False
            for name, value in KNOB_VARIANTS.get(args.worker, {}).items():
                setattr(mixer, name, value)
            result = worker_ours(args.batch, 16, 80, impl)
        print("RESULT " + json.dumps(result), flush=True)
        return

    results = {}
    for variant in args.variants:  # "name#k": variant name again (a repeat in the same run)
        base = variant.split("#")[0]
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + {**VARIANTS, **EXTRA_FLAGS}.get(base, "")).strip()
        cmd = [sys.executable, __file__, "--worker", base, "--batch", *map(str, args.batch),
               *(["--tiny"] if args.tiny else [])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            results[variant] = dict(error=(proc.stderr or proc.stdout)[-800:])
        else:
            results[variant] = dict(json.loads(lines[-1][7:]), xla_flags=env["XLA_FLAGS"])
        print(variant, json.dumps(results[variant])[:600], flush=True)
        if any("device" in r for r in results.values()):  # after every variant (a later one
            write_results(args, results)  # may not finish), once the device is known
    if not any("device" in r for r in results.values()):
        write_results(args, results)  # every variant failed: keep their errors


def write_results(args, results):
    device = next((r["device"] for r in results.values() if "device" in r), "unknown")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}_{device.replace(' ', '_')}.json").write_text(json.dumps(dict(
        model="mamba2-2.7b-shaped, random bf16, tied", prompt=PROMPT,
        date=datetime.date.today().isoformat(), variants=results), indent=2))


if __name__ == "__main__":
    main()
