"""Smoke demo: build a tiny random Mamba-2, save it as an HF checkpoint, load it back, generate.

    python scripts/demo.py [--dir DIR] [--tokens 16]

Runs on CPU in a few seconds; no network, no real weights needed.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

import mamba2_jax as m2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens to generate")
    args = ap.parse_args(argv)

    config = m2.Mamba2Config(hidden_size=64, num_heads=8, head_dim=16, n_groups=2, state_size=16,
                             chunk_size=16, num_hidden_layers=2, vocab_size=128,
                             tie_word_embeddings=True)
    model = m2.Mamba2ForCausalLM(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = m2.save_pretrained(model, args.dir or tmp, overwrite=args.dir is not None)
        loaded = m2.load_pretrained(path)
        print(f"saved and reloaded a {config.num_hidden_layers}-layer Mamba-2 at {path}")

    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (2, 8))
    logits = loaded(prompt)
    print(f"forward: ids {prompt.shape} -> logits {logits.shape} {logits.dtype}")
    for temperature in (0.0, 0.8):
        t0 = time.perf_counter()
        out = m2.generate(loaded, prompt, args.tokens, temperature=temperature, top_p=0.9, seed=1)
        jax.block_until_ready(out)
        print(f"generate(temperature={temperature}) in {time.perf_counter() - t0:.2f}s "
              f"(with compilation): {np.asarray(out[0, 8:]).tolist()}")
    print(f"jax {jax.__version__} on {jax.default_backend()}: demo OK")


if __name__ == "__main__":
    main()
