"""read_tensors on real safetensors / torch files, and every way a checkpoint can be broken."""

import json
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from mamba2_jax.convert import readers
from mamba2_jax.convert.errors import CheckpointError
from mamba2_jax.convert.readers import read_safetensors, read_tensors


def random_tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "backbone.embeddings.weight": torch.randn(12, 8, generator=gen),
        "backbone.layers.0.mixer.in_proj.weight": torch.randn(20, 8, generator=gen),
        "backbone.layers.0.mixer.A_log": torch.rand(4, generator=gen) + 0.5,
        "backbone.layers.0.mixer.conv1d.weight": torch.randn(6, 1, 4, generator=gen),
        "lm_head.weight": torch.randn(12, 8, generator=gen),
    }


def assert_same(got, want):
    assert got.keys() == want.keys()
    for k, t in want.items():
        assert got[k].shape == tuple(t.shape), k
        if t.dtype == torch.bfloat16:
            assert got[k].dtype == ml_dtypes.bfloat16, k
            np.testing.assert_array_equal(got[k].astype(np.float32), t.float().numpy())
        else:
            assert got[k].dtype == t.numpy().dtype, k
            np.testing.assert_array_equal(got[k], t.numpy())


def write_sharded(path, tensors, split, *, index=None):
    """Shards model-0000{i}-of-0000n.safetensors holding the keys of ``split[i]``, plus the index."""
    path.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(split):
        name = f"model-{i + 1:05d}-of-{len(split):05d}.safetensors"
        save_torch({k: tensors[k] for k in keys}, str(path / name))
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map} if index is None else index
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


# -- reading -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_safetensors(tmp_path, dtype):
    tensors = {k: v.to(dtype) for k, v in random_tensors().items()}
    tensors["step"] = torch.arange(5, dtype=torch.int64)
    save_torch(tensors, str(tmp_path / "model.safetensors"))
    assert_same(read_tensors(tmp_path), tensors)


def test_safetensors_written_by_numpy(tmp_path):
    arrays = {k: v.numpy() for k, v in random_tensors(1).items()}
    arrays["bf16"] = np.random.default_rng(0).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    save_numpy(arrays, str(tmp_path / "model.safetensors"))
    got = read_tensors(tmp_path)
    assert got.keys() == arrays.keys()
    for k in arrays:
        assert got[k].dtype == arrays[k].dtype
        np.testing.assert_array_equal(got[k], arrays[k])


def test_fallback_parser_matches_safetensors(tmp_path, monkeypatch):
    """Float8 (safetensors 0.8) and bf16 (older versions) fail in safetensors.numpy: we parse the file."""
    tensors = {k: v.to(torch.bfloat16) for k, v in random_tensors(2).items()}
    tensors["f32"] = torch.randn(7, 3)
    tensors["flags"] = torch.tensor([True, False, True])
    tensors["fp8"] = torch.randn(4, 4).to(torch.float8_e4m3fn)
    f = tmp_path / "model.safetensors"
    save_torch(tensors, str(f), metadata={"format": "pt"})
    expected = read_tensors(tmp_path)
    assert expected["fp8"].dtype == ml_dtypes.float8_e4m3fn
    raw = readers._read_safetensors_raw(f)
    assert raw.keys() == expected.keys()
    for k in raw:
        assert raw[k].dtype == expected[k].dtype and raw[k].shape == expected[k].shape, k
        np.testing.assert_array_equal(raw[k].view(np.uint8), expected[k].view(np.uint8))

    import safetensors.numpy

    def old_load_file(filename):
        raise TypeError("data type 'bfloat16' not understood")

    monkeypatch.setattr(safetensors.numpy, "load_file", old_load_file)
    assert read_tensors(tmp_path).keys() == expected.keys()
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key '.*': byte range .* \(truncated\?\)"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("data", [b"", b"\x05\x00", b"\xff" * 8 + b"{}", b"\x04\x00\x00\x00\x00\x00\x00\x00[1]x",
                                  b"\x02\x00\x00\x00\x00\x00\x00\x00{x"])
def test_fallback_parser_rejects_garbage(tmp_path, data):
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        readers._read_safetensors_raw(f)


def test_sharded_safetensors(tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in random_tensors(3).items()}
    keys = sorted(tensors)
    path = write_sharded(tmp_path / "ckpt", tensors, [keys[:2], keys[2:4], keys[4:]])
    save_torch({"stale": torch.zeros(1)}, str(path / "model.safetensors"))  # the index wins
    assert_same(read_tensors(path), tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_model_bin(tmp_path, dtype):
    tensors = {k: v.to(dtype) for k, v in random_tensors(4).items()}
    tensors["backbone.layers.0.mixer.D"] = torch.randn(8, 2)[:, 0]  # a strided view
    tensors["tied"] = tensors["lm_head.weight"]  # shared storage, as mamba_ssm saves tied heads
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    assert_same(read_tensors(tmp_path), tensors)


def test_order_of_preference(tmp_path):
    save_torch({"from": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    torch.save({"bin": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert list(read_tensors(tmp_path)) == ["from"]


# -- errors --------------------------------------------------------------------------------------------


def test_no_weights_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no weights file; looked for model\.safetensors\.index\.json, "
                                              r"model\.safetensors, pytorch_model\.bin$"):
        read_tensors(tmp_path)
    (tmp_path / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"found instead, not supported: consolidated\.safetensors"):
        read_tensors(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing.*not a directory"):
        read_tensors(tmp_path / "missing")


def test_missing_shard(tmp_path):
    tensors = random_tensors()
    keys = sorted(tensors)
    path = write_sharded(tmp_path, tensors, [keys[:3], keys[3:]])
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: shard "
                                              r"model-00002-of-00002\.safetensors is missing"):
        read_tensors(path)


def test_key_listed_but_not_in_its_shard(tmp_path):
    tensors = random_tensors()
    keys = sorted(tensors)
    path = write_sharded(tmp_path, tensors, [keys[:3], keys[3:]])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["backbone.layers.0.mixer.dt_bias"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: key 'backbone\.layers\.0\.mixer\.dt_bias' is "
                                              r"listed in shard model-00001-of-00002\.safetensors"):
        read_tensors(path)


def test_key_in_two_shards(tmp_path):
    tensors = random_tensors()
    keys = sorted(tensors)
    path = write_sharded(tmp_path, tensors, [keys[:3], keys[2:]])  # keys[2] in both shards
    with pytest.raises(CheckpointError, match=rf"model-00002-of-00002\.safetensors: key '{keys[2]}' is also "
                                              r"in .*model-00001-of-00002\.safetensors"):
        read_tensors(path)


def test_key_listed_twice_in_index(tmp_path):
    tensors = random_tensors()
    keys = sorted(tensors)
    path = write_sharded(tmp_path, tensors, [keys[:3], keys[3:]])
    text = (path / "model.safetensors.index.json").read_text()
    text = text.replace('"weight_map": {', f'"weight_map": {{"{keys[4]}": "model-00001-of-00002.safetensors", ')
    (path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"index\.json: key '{keys[4]}' appears twice"):
        read_tensors(path)


def test_key_in_shard_not_listed(tmp_path):
    tensors = random_tensors()
    keys = sorted(tensors)
    path = write_sharded(tmp_path, tensors, [keys[:3], keys[3:]])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][keys[0]]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"model-00001-of-00002\.safetensors: key '{keys[0]}' is not "
                                              r"listed in .*model\.safetensors\.index\.json"):
        read_tensors(path)


@pytest.mark.parametrize("text,pattern", [
    ('{"weight_map": {"a": "model-00001', r"model\.safetensors\.index\.json: not valid JSON"),
    ("", r"model\.safetensors\.index\.json: not valid JSON"),
    ('{"metadata": {}}', r"model\.safetensors\.index\.json: expected a non-empty \"weight_map\""),
    ('{"weight_map": {"a": 3}}', r"model\.safetensors\.index\.json: expected a non-empty \"weight_map\""),
    ('[1, 2]', r"model\.safetensors\.index\.json: expected a non-empty \"weight_map\""),
    ('{"weight_map": {"a": "../x.safetensors"}}', r"index\.json: shard name '\.\./x\.safetensors' is not"),
])
def test_bad_index(tmp_path, text, pattern):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=pattern):
        read_tensors(tmp_path)


def test_index_that_is_binary_garbage(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        read_tensors(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_torch(random_tensors(), str(tmp_path / "model.safetensors"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("data", [b"", b"abc", b"hello world, not a safetensors file" * 10,
                                  bytes(range(256)) * 4])
def test_garbage_safetensors(tmp_path, data):
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        read_tensors(tmp_path)


def test_truncated_shard_names_the_shard(tmp_path):
    tensors = random_tensors()
    keys = sorted(tensors)
    path = write_sharded(tmp_path, tensors, [keys[:3], keys[3:]])
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: not a readable"):
        read_tensors(path)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.0])
def test_truncated_bin(tmp_path, cut):
    f = tmp_path / "pytorch_model.bin"
    torch.save(random_tensors(), f)
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * cut)])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: torch\.load\(weights_only=True\) cannot read it"):
        read_tensors(tmp_path)


@pytest.mark.parametrize("data", [b"garbage" * 20, bytes(range(256)) * 4])
def test_garbage_bin(tmp_path, data):
    (tmp_path / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: torch\.load") as info:
        read_tensors(tmp_path)
    assert "weights_only` set to `False`" not in str(info.value)  # never advise unsafe loading


def test_bin_with_non_tensor_value(tmp_path):
    tensors = random_tensors()
    tensors["backbone.layers.0.mixer.layer_idx"] = 3
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: key 'backbone\.layers\.0\.mixer\.layer_idx' "
                                              r"holds a value of type int, not a tensor"):
        read_tensors(tmp_path)


def test_bin_with_arbitrary_object_is_not_unpickled(tmp_path):
    import fractions

    torch.save({"a": torch.ones(2), "b": fractions.Fraction(1, 3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: .*fractions\.Fraction") as info:
        read_tensors(tmp_path)
    assert "weights_only` set to `False`" not in str(info.value)


@pytest.mark.parametrize("obj,pattern", [
    ([torch.ones(2)], r"pytorch_model\.bin: expected a state dict \(str -> tensor\), got list"),
    ({3: torch.ones(2)}, r"pytorch_model\.bin: key 3 is of type int, not a string"),
    ({"nested": {"w": torch.ones(2)}}, r"pytorch_model\.bin: key 'nested' holds a value of type dict, not a tensor"),
    ({"sparse": torch.eye(3).to_sparse()}, r"pytorch_model\.bin: key 'sparse': cannot convert"),
])
def test_bin_that_is_not_a_flat_state_dict(tmp_path, obj, pattern):
    torch.save(obj, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=pattern):
        read_tensors(tmp_path)


def test_bin_without_torch(tmp_path, monkeypatch):
    torch.save(random_tensors(), tmp_path / "pytorch_model.bin")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: reading pytorch_model\.bin needs torch "
                                              r"\(pip install torch\)"):
        read_tensors(tmp_path)


def test_missing_file_helpers(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors: no such file"):
        read_safetensors(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match=r"nothing\.bin: no such file"):
        readers.read_torch_bin(tmp_path / "nothing.bin")
