"""Shared fixtures."""

from __future__ import annotations

import pytest

from hf_oracle import make_hf_model


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
