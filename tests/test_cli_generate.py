"""mamba2-generate on a real saved checkpoint: output equals the library call; errors are one line."""

import subprocess
import sys

import numpy as np
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2ForCausalLM, generate, save_pretrained
from mamba2_jax.cli.generate import main

CFG = Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=16,
                   chunk_size=16, num_hidden_layers=2, vocab_size=64, eos_token_id=None)


def test_generate_cli_matches_library(tmp_path, capsys):
    model = Mamba2ForCausalLM(CFG, rngs=nnx.Rngs(4))
    save_pretrained(model, tmp_path / "m")
    assert main([str(tmp_path / "m"), "--ids", "3,1,4,1,5", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    want = np.asarray(generate(model, np.asarray([[3, 1, 4, 1, 5]]), 6))[0, 5:].tolist()
    assert f"ids: {want}" in printed and "ms/token" in printed


def test_generate_cli_on_a_mesh(tmp_path, capsys):
    """--tensor / --context: the same greedy tokens on a tensor x context mesh (8 CPU devices)."""
    model = Mamba2ForCausalLM(CFG, rngs=nnx.Rngs(4))
    save_pretrained(model, tmp_path / "m")
    want = np.asarray(generate(model, np.asarray([[3, 1, 4, 1, 5, 9, 2, 6]]), 6))[0, 8:].tolist()
    argv = [str(tmp_path / "m"), "--ids", "3,1,4,1,5,9,2,6", "--max-new-tokens", "6"]
    assert main(argv + ["--tensor", "2", "--context", "2"]) == 0
    assert f"ids: {want}" in capsys.readouterr().out
    assert main(argv + ["--tensor", "3"]) == 2                 # 4 heads over 3 shards
    assert "multiple of tp (3)" in capsys.readouterr().err


def test_generate_cli_errors_are_one_line(tmp_path):
    model = Mamba2ForCausalLM(CFG, rngs=nnx.Rngs(4))
    save_pretrained(model, tmp_path / "m")
    cases = [([str(tmp_path / "missing"), "--ids", "1"], "not a directory"),
             ([str(tmp_path / "m"), "--ids", "1,x"], "comma-separated integers"),
             ([str(tmp_path / "m"), "--ids", "1,99"], "in [0, 64)"),
             ([str(tmp_path / "m"), "--prompt", "hi"], "tokenizer.json")]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, "-m", "mamba2_jax.cli.generate", *argv],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0
