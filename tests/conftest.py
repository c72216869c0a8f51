"""Shared fixtures."""

from __future__ import annotations

import jax
import pytest

from hf_oracle import make_hf_model

# Tests compare float32 results with float32/float64 oracles: on a GPU, XLA's default float32
# matmul precision (TF32-like) would blur that, so tests ask for full precision everywhere.
jax.config.update("jax_default_matmul_precision", "highest")
# Sharding tests need several devices: 8 fake CPU devices (computations default to device 0).
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """Factory: (dir, hf_model) for a tiny random model saved in HF format."""

    def make(seed=0, *, max_shard_size=None, **overrides):
        model = make_hf_model(seed, **overrides)
        path = tmp_path / f"hf_{seed}"
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kwargs)
        return path, model

    return make
