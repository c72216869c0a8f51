"""``load_pretrained`` / ``save_pretrained``: HF-format and mamba_ssm-format directories.

Reading: ``config.json`` (HF or mamba_ssm keys, see :mod:`mamba2_jax.config`) plus the weights
found by :func:`mamba2_jax.convert.readers.read_tensors` (``model.safetensors``, a sharded
``model.safetensors.index.json`` or ``pytorch_model.bin``). Every model parameter must be present
with the shape the config implies; any key left over is an error (except ``lm_head.weight`` of a
tied model, which mamba_ssm checkpoints store as a copy of the embedding).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mamba2_jax.config import Mamba2Config
from mamba2_jax.convert.errors import CheckpointError
from mamba2_jax.convert.hf_layout import (
    canonical_key,
    from_hf,
    hf_key,
    hf_shape,
    param_dtype,
    path_to_str,
    to_hf,
)
from mamba2_jax.convert.readers import find_weights, read_tensors
from mamba2_jax.nn.model import Mamba2ForCausalLM
from mamba2_jax.sharding.layout import check_tp
from mamba2_jax.sharding.mesh import axis_size
from mamba2_jax.sharding.params import layout_param, param_sharding, unlayout_param


def abstract_model(config: Mamba2Config, dtype=jnp.float32, mesh=None):
    """The model's structure with ShapeDtypeStruct leaves (no memory, no init cost)."""
    return nnx.eval_shape(lambda: Mamba2ForCausalLM(config, param_dtype=dtype, rngs=nnx.Rngs(0),
                                                    mesh=mesh))


@functools.lru_cache(maxsize=8)
def natural_param_paths(config: Mamba2Config) -> tuple:
    """``((path, natural shape), ...)`` of every parameter of a ``config`` model (tp = 1), in
    model order (cached: loading, checking and converting all walk it)."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return tuple((path, tuple(var.get_value().shape)) for path, var in nnx.to_flat_state(state))


def model_from_tensors(config: Mamba2Config, tensors, *, dtype, mesh=None, where="checkpoint",
                       progress: bool = False) -> Mamba2ForCausalLM:
    """Build a model from HF-named, HF-layout numpy ``tensors`` (laid out and placed for ``mesh``).

    Every parameter must be present with the shape ``config`` implies; any key left over is an
    error (except the tied ``lm_head.weight`` copy mamba_ssm writes). ``CheckpointError`` names
    ``where`` and the key.
    """
    dtype = jnp.dtype(dtype)
    tp = axis_size(mesh, "tensor")
    if mesh is not None:
        try:
            check_tp(config, tp)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
    check_tensors(config, tensors, where=where)
    graphdef, state = nnx.split(abstract_model(config, dtype, mesh))
    flat = nnx.to_flat_state(state)
    for path, var in tqdm(flat, desc="loading", unit="tensor", disable=not progress):
        if not isinstance(var, nnx.Param):
            continue
        value = np.asarray(from_hf(path, tensors[hf_key(path)])).astype(param_dtype(path, dtype))
        value = layout_param(path_to_str(path), value, config, tp)
        var.set_value(jnp.asarray(value) if mesh is None else
                      jax.device_put(value, param_sharding(var, mesh)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def check_tensors(config: Mamba2Config, tensors, *, where="checkpoint") -> list[str]:
    """Check that HF-named ``tensors`` hold exactly the parameters of a ``config`` model.

    Every parameter must be present with the (HF-layout) shape ``config`` implies, and no other
    key may be left over except the tied ``lm_head.weight`` copy mamba_ssm writes. Returns the
    parameters' HF keys in model order; ``CheckpointError`` names ``where`` and the key.
    """
    keys = []
    for path, shape in natural_param_paths(config):
        key = hf_key(path)
        if key not in tensors:
            raise CheckpointError(f"{where}: missing key {key!r} (needed for a model with "
                                  f"{config.num_hidden_layers} layers, tie_word_embeddings="
                                  f"{config.tie_word_embeddings})")
        expected = hf_shape(path, shape)
        if tuple(tensors[key].shape) != expected:
            raise CheckpointError(f"{where}: {key!r} has shape {tuple(tensors[key].shape)}, but the "
                                  f"config implies {expected}")
        keys.append(key)
    tied_copy = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(set(tensors) - set(keys) - tied_copy)
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected key(s) for this config: {shown}")
    return keys


def load_pretrained(path, *, dtype=None, mesh=None, progress: bool = False) -> Mamba2ForCausalLM:
    """Load a Mamba-2 LM from an HF, mamba_ssm or mamba2-jax orbax checkpoint directory.

    ``dtype``: parameter dtype (e.g. ``jnp.bfloat16``); ``None`` keeps the checkpoint's dtype
    (that of the embedding). ``A_log``, ``D`` and ``dt_bias`` are always float32. ``mesh``: lay
    the parameters out for its ``"tensor"`` size (group duplication included) and place each
    with its NamedSharding. The returned model has ``.config`` and ``.mesh``.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected config.json + weights)")
    from mamba2_jax.convert import orbax_format
    if orbax_format.is_orbax_checkpoint(directory):
        return orbax_format.load(directory, dtype=dtype, mesh=mesh, progress=progress)
    config = Mamba2Config.from_pretrained(directory)
    tensors = {canonical_key(k): v for k, v in read_tensors(directory).items()}
    if dtype is None:
        emb = tensors.get("backbone.embeddings.weight")
        dtype = emb.dtype if emb is not None else np.float32
    return model_from_tensors(config, tensors, dtype=dtype, mesh=mesh,
                              where=str(find_weights(directory)), progress=progress)


def hf_state_dict(model: Mamba2ForCausalLM, *, progress: bool = False) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named numpy arrays in HF layouts (tp layout undone)."""
    out = {}
    tp = axis_size(model.mesh, "tensor")
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for path, var in tqdm(flat, desc="gathering", unit="tensor", disable=not progress):
        value = np.asarray(jax.device_get(var.get_value()))
        value = unlayout_param(path_to_str(path), value, model.config, tp)
        out[hf_key(path)] = to_hf(path, value)
    return out


def save_pretrained(model: Mamba2ForCausalLM, path, *, overwrite: bool = False) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (HF transformers format) into ``path``.

    Files are written to temporary names and renamed at the end, so a failure leaves no partial
    checkpoint behind. An existing checkpoint is refused unless ``overwrite``.
    """
    from safetensors.numpy import save_file

    directory = Path(path)
    targets = [directory / "config.json", directory / "model.safetensors"]
    if not overwrite and any(t.exists() for t in targets):
        raise FileExistsError(f"{directory}: already holds a checkpoint (pass overwrite=True)")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model)
    tmp = [t.with_name(t.name + ".tmp") for t in targets]
    try:
        tmp[0].write_text(json.dumps(model.config.to_hf_dict(), indent=2))
        save_file(tensors, str(tmp[1]), metadata={"format": "pt"})
        for src, dst in zip(tmp, targets):
            os.replace(src, dst)
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return directory
