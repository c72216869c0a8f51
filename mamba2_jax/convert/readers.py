"""Read a checkpoint directory's tensors into numpy arrays (HF safetensors or a torch state dict).

:func:`read_tensors` looks for, in this order:

1. ``model.safetensors.index.json``: a sharded HF checkpoint; every shard its ``weight_map``
   names is read, and index and shards must agree exactly (no missing shard, no key missing from
   its shard, no key in two shards, no key the index does not list);
2. ``model.safetensors``;
3. ``pytorch_model.bin`` (mamba_ssm / state-spaces): read with
   ``torch.load(path, map_location="cpu", weights_only=True)`` (torch is imported only here).

Dtypes are kept: bfloat16 and float8 come back as ``ml_dtypes`` numpy dtypes. Every failure
(missing, truncated or corrupt file, inconsistent index, a value that is not a tensor) is a
:class:`CheckpointError` naming the file, and the key when there is one.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from mamba2_jax.convert.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
WEIGHT_FILES = (INDEX_FILE, SAFETENSORS_FILE, TORCH_FILE)

# safetensors dtype codes -> numpy dtypes (for the fallback reader below)
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_WEIGHT_LIKE = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".msgpack", ".h5")


def find_weights(directory) -> Path:
    """The weights file of a checkpoint directory (first of :data:`WEIGHT_FILES` that exists)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a checkpoint directory)")
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    others = sorted(p.name for p in directory.iterdir() if p.name.endswith(_WEIGHT_LIKE))
    found = f" (found instead, not supported: {', '.join(others)})" if others else ""
    raise CheckpointError(f"{directory}: no weights file; looked for {', '.join(WEIGHT_FILES)}{found}")


def read_tensors(directory) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint in ``directory``, by key, as numpy arrays."""
    path = find_weights(directory)
    if path.name == INDEX_FILE:
        return read_safetensors_index(path)
    if path.name == SAFETENSORS_FILE:
        return read_safetensors(path)
    return read_torch_bin(path)


# -- safetensors --------------------------------------------------------------------------------


def read_safetensors(path) -> dict[str, np.ndarray]:
    """One ``.safetensors`` file as numpy arrays."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (TypeError, AttributeError):
        # A dtype safetensors' numpy loader lacks (bf16 in e.g. 0.5.x: TypeError; float8 in 0.8:
        # AttributeError): parse the file ourselves; that parser raises CheckpointError if it is bad.
        return _read_safetensors_raw(path)
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError)
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _read_safetensors_raw(path: Path) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file parsed with numpy: u64 header length, JSON header, tensor bytes."""
    data = path.read_bytes()

    def bad(why):
        return CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {why}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, too short for a header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise bad(f"header length {n} exceeds the file size {len(data)}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n:]
    out, covered = {}, 0
    for key, info in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: key {key!r}: unreadable or unsupported header entry {info!r}") from e
        if not 0 <= begin <= end <= len(body) or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(f"{path}: key {key!r}: byte range [{begin}, {end}) does not fit "
                                  f"shape {shape} of {dtype} in {len(body)} data bytes (truncated?)")
        out[key] = np.frombuffer(body[begin:end], dtype).reshape(shape).copy()
        covered += end - begin
    if covered != len(body):
        raise bad(f"tensors cover {covered} of {len(body)} data bytes")
    return out


def _no_duplicate_keys(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise CheckpointError(f"key {k!r} appears twice")
        seen[k] = v
    return seen


def read_safetensors_index(index_path) -> dict[str, np.ndarray]:
    """A sharded HF checkpoint: the index's ``weight_map`` (key -> shard file) and its shards."""
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from e
    except CheckpointError as e:
        raise CheckpointError(f"{index_path}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{index_path}: cannot read it ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())):
        raise CheckpointError(f"{index_path}: expected a non-empty \"weight_map\" object mapping "
                              "each key to its shard file name")

    listed: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        listed.setdefault(shard, set()).add(key)
    out, found_in = {}, {}
    for shard in sorted(listed):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a file name in the "
                                  "checkpoint directory")
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            example = sorted(listed[shard])[0]
            raise CheckpointError(f"{index_path}: shard {shard} is missing ({shard_path} does not "
                                  f"exist; the index lists {len(listed[shard])} key(s) in it, "
                                  f"e.g. {example!r})")
        for key, array in read_safetensors(shard_path).items():
            if key in found_in:
                raise CheckpointError(f"{shard_path}: key {key!r} is also in {found_in[key]}")
            found_in[key] = shard_path
            out[key] = array
        absent = sorted(listed[shard] - found_in.keys())
        if absent:
            raise CheckpointError(f"{index_path}: key {absent[0]!r} is listed in shard {shard}, but "
                                  f"{shard_path} does not hold it ({len(absent)} such key(s))")
    unlisted = sorted(found_in.keys() - weight_map.keys())
    if unlisted:
        raise CheckpointError(f"{found_in[unlisted[0]]}: key {unlisted[0]!r} is not listed in "
                              f"{index_path} ({len(unlisted)} such key(s))")
    return out


# -- torch ---------------------------------------------------------------------------------------


def _torch_load_reason(e: Exception) -> str:
    """A short reason from torch.load's error (never its advice to drop weights_only)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. Please use|\n\n|$)", text, re.S)
    if m:
        return f"it holds something other than tensors and plain containers: {' '.join(m.group(1).split())}"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


def read_torch_bin(path) -> dict[str, np.ndarray]:
    """A torch state dict (``pytorch_model.bin``) as numpy arrays; needs torch."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch (pip install torch)") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # RuntimeError (zip), UnpicklingError, EOFError, ...
        raise CheckpointError(f"{path}: torch.load(weights_only=True) cannot read it (truncated or "
                              f"corrupt?): {_torch_load_reason(e)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (str -> tensor), got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is of type {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: key {key!r} holds a value of type {type(value).__name__}, not a tensor")
        try:
            out[key] = _torch_to_numpy(value, torch)
        except (TypeError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: key {key!r}: cannot convert its {value.dtype} "
                                  f"{tuple(value.shape)} tensor to numpy ({e})") from e
    return out


def _torch_to_numpy(t, torch) -> np.ndarray:
    """CPU tensor -> numpy array of the same dtype (bfloat16/float8 through ml_dtypes)."""
    bitcast = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
               torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    t = t.detach()
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"layout {t.layout}{' (quantized)' if t.is_quantized else ''} is not a dense tensor")
    if t.dtype in bitcast:
        as_int, np_dtype = bitcast[t.dtype]
        return t.contiguous().view(as_int).numpy().view(np_dtype)
    return t.resolve_conj().resolve_neg().numpy()
