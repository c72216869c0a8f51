"""Map our parameter paths to HF transformers checkpoint keys and layouts (pure functions).

Our tree mirrors HF names; the differences are Flax's naming and orientation:
  ``*.kernel [in, out]``                  <-> ``*.weight [out, in]`` (transposed)
  ``backbone.embeddings.embedding``       <-> ``backbone.embeddings.weight``
  ``*.conv1d.weight [c, k]``              <-> ``*.conv1d.weight [c, 1, k]``
mamba_ssm checkpoints name the embedding ``backbone.embedding.weight``; :func:`canonical_key`
renames it (as HF's load hook does).
"""

from __future__ import annotations

import numpy as np

FLOAT32_PARAMS = ("A_log", "D", "dt_bias")  # per-head SSM parameters are always float32
MAMBA_SSM_EMBEDDING = "backbone.embedding."
HF_EMBEDDING = "backbone.embeddings."


def path_to_str(path) -> str:
    return ".".join(str(p) for p in path)


def hf_key(path) -> str:
    """HF key of the parameter at ``path`` (a tuple of names and layer indices)."""
    key = path_to_str(path)
    if key.endswith(".kernel"):
        return key[: -len("kernel")] + "weight"
    if key == "backbone.embeddings.embedding":
        return "backbone.embeddings.weight"
    return key


def canonical_key(key: str) -> str:
    """Checkpoint key in HF spelling (mamba_ssm's ``backbone.embedding.`` -> ``embeddings.``)."""
    if key.startswith(MAMBA_SSM_EMBEDDING):
        return HF_EMBEDDING + key[len(MAMBA_SSM_EMBEDDING):]
    return key


def from_hf(path, tensor: np.ndarray) -> np.ndarray:
    """HF tensor -> our layout for ``path``."""
    key = path_to_str(path)
    if key.endswith(".kernel"):
        return tensor.T if tensor.ndim == 2 else tensor
    if key.endswith("conv1d.weight") and tensor.ndim == 3 and tensor.shape[1] == 1:
        return tensor[:, 0, :]
    return tensor


def hf_shape(path, shape) -> tuple[int, ...]:
    """Shape of the HF tensor for our parameter of ``shape`` at ``path``."""
    key = path_to_str(path)
    if key.endswith(".kernel"):
        return tuple(reversed(shape))
    if key.endswith("conv1d.weight"):
        return (shape[0], 1, shape[1])
    return tuple(shape)


def to_hf(path, array: np.ndarray) -> np.ndarray:
    """Our parameter -> HF tensor layout (inverse of :func:`from_hf`)."""
    key = path_to_str(path)
    if key.endswith(".kernel"):
        return np.ascontiguousarray(array.T)
    if key.endswith("conv1d.weight"):
        return np.ascontiguousarray(array[:, None, :])
    return np.asarray(array)


def param_dtype(path, dtype) -> np.dtype:
    """Storage dtype of the parameter at ``path`` for a model in ``dtype`` (float32 for A_log, D, dt_bias)."""
    return np.dtype(np.float32) if str(path[-1]) in FLOAT32_PARAMS else np.dtype(dtype)
