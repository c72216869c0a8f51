"""load_pretrained / save_pretrained: round trips and every error path, on real files."""

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_oracle import hf_logits, make_hf_model, max_rel, write_mamba_ssm_dir
from mamba2_jax import CheckpointError, load_pretrained, save_pretrained


@pytest.fixture
def hf_dir(tmp_path):
    model = make_hf_model(seed=3, n_groups=2, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_save_load_round_trip_and_bf16(hf_dir, tmp_path):
    path, hf = hf_dir
    ours = load_pretrained(path)
    out = save_pretrained(ours, tmp_path / "ours")
    again = load_pretrained(out)
    ids = np.random.default_rng(0).integers(0, 96, (1, 11))
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(ours(ids)))
    assert max_rel(again(ids), hf_logits(hf, ids)) < 1e-4
    saved, original = load_file(str(out / "model.safetensors")), load_file(str(path / "model.safetensors"))
    assert saved.keys() == original.keys()
    for k in saved:
        np.testing.assert_array_equal(saved[k], original[k])
    half = load_pretrained(path, dtype=jnp.bfloat16)
    assert half.backbone.embeddings.embedding[...].dtype == jnp.bfloat16
    assert half.backbone.layers[0].mixer.A_log[...].dtype == jnp.float32
    assert max_rel(half(ids), hf_logits(hf, ids)) < 5e-2


def test_save_refuses_existing_and_leaves_nothing_on_failure(hf_dir, tmp_path, monkeypatch):
    ours = load_pretrained(hf_dir[0])
    with pytest.raises(FileExistsError):
        save_pretrained(ours, hf_dir[0])
    import safetensors.numpy

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(ours, tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []


def test_not_a_directory_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path / "empty")


def test_missing_key(hf_dir):
    path, _ = hf_dir
    rewrite(path, lambda t: t.pop("backbone.layers.1.mixer.dt_bias"))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*backbone.layers.1.mixer.dt_bias"):
        load_pretrained(path)


def test_untied_model_needs_lm_head(hf_dir):
    path, _ = hf_dir
    rewrite(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_pretrained(path)


def test_unexpected_key(hf_dir):
    path, _ = hf_dir
    rewrite(path, lambda t: t.update({"backbone.layers.2.norm.weight": np.ones(64, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*backbone.layers.2.norm.weight"):
        load_pretrained(path)


def test_shape_mismatch_against_config(hf_dir):
    path, _ = hf_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["state_size"] = 8  # in_proj and conv1d no longer fit
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: 'backbone.layers.0.mixer.\S+' has shape .* config implies"):
        load_pretrained(path)


def test_truncated_safetensors(hf_dir):
    path, _ = hf_dir
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(path)


def test_mamba_ssm_dir_without_torch(tmp_path, monkeypatch):
    hf = make_hf_model(seed=4, n_groups=1, tie_word_embeddings=True)
    path = write_mamba_ssm_dir(hf, tmp_path / "ssm")
    ids = np.random.default_rng(1).integers(0, 96, (2, 7))
    assert max_rel(load_pretrained(path)(ids), hf_logits(hf, ids)) < 1e-4
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.*torch"):
        load_pretrained(path)
