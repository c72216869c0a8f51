"""``mamba2-generate``: load a checkpoint directory and generate, from a jit-compiled loop.

    mamba2-generate DIR --ids 1,2,3 [--max-new-tokens 32] [--temperature 0.8 --top-p 0.95]
    mamba2-generate DIR --prompt "Mamba is" (needs the ``tokenizers`` package and DIR/tokenizer.json)

Prints the generated token ids (and the decoded text when a tokenizer is used) and the time per
new token after compilation. Errors (bad directory, bad ids, missing tokenizer) are one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _parser():
    ap = argparse.ArgumentParser(prog="mamba2-generate", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF, mamba_ssm or mamba2-jax orbax checkpoint directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated prompt token ids")
    src.add_argument("--prompt", help="prompt text (tokenized with DIR/tokenizer.json)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--eos", type=int, action="append", default=None,
                    help="stop id (repeatable; default: the config's eos_token_id)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="parameter dtype (default: the checkpoint's)")
    ap.add_argument("--tensor", type=int, default=1,
                    help="tensor-parallel size: a mesh over the first tensor x context devices")
    ap.add_argument("--context", type=int, default=1, help="context-parallel size")
    return ap


def _tokenizer(directory: Path):
    path = directory / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("--prompt needs the 'tokenizers' package (pip install tokenizers)") from None
    if not path.exists():
        raise ValueError(f"{path}: not found (--prompt needs a tokenizer.json; use --ids instead)")
    return Tokenizer.from_file(str(path))


def run(args) -> int:
    from mamba2_jax import generate, load_pretrained

    directory = Path(args.model)
    tokenizer = _tokenizer(directory) if args.prompt is not None else None
    if tokenizer is not None:
        ids = tokenizer.encode(args.prompt).ids
    else:
        try:
            ids = [int(v) for v in args.ids.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
    mesh = None
    if args.tensor * args.context > 1:
        from mamba2_jax.sharding import make_mesh
        n = args.tensor * args.context
        if n > jax.device_count():
            raise ValueError(f"--tensor {args.tensor} x --context {args.context} needs {n} "
                             f"devices, {jax.device_count()} present")
        mesh = make_mesh(tensor=args.tensor, context=args.context, devices=jax.devices()[:n])
    model = load_pretrained(directory, dtype=None if args.dtype is None else DTYPES[args.dtype],
                            mesh=mesh)
    if not ids or min(ids) < 0 or max(ids) >= model.config.vocab_size:
        raise ValueError(f"prompt ids must be non-empty and in [0, {model.config.vocab_size}), got {ids}")
    eos = args.eos if args.eos is not None else model.config.eos_token_id
    prompt = np.asarray([ids], np.int32)
    kwargs = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  eos_token_id=eos, seed=args.seed)
    jax.block_until_ready(generate(model, prompt, args.max_new_tokens, **kwargs))  # compile
    t0 = time.perf_counter()
    out = jax.block_until_ready(generate(model, prompt, args.max_new_tokens, **kwargs))
    per_token = (time.perf_counter() - t0) / args.max_new_tokens
    new = np.asarray(out[0, len(ids):]).tolist()
    print("ids:", new)
    if tokenizer is not None:
        print("text:", tokenizer.decode(new))
    print(f"{per_token * 1e3:.2f} ms/token after compilation (jax {jax.__version__}, "
          f"{jax.default_backend()})")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # CheckpointError / ConfigError are ValueErrors
        print(f"mamba2-generate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
