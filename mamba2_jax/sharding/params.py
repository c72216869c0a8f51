"""Parameters under a mesh: logical names, the tensor-parallel layout of each parameter, placement.

Every parameter carries logical axis names in its NNX sharding metadata (``embed``, ``vocab``,
``ssm_heads``; see :mod:`mamba2_jax.sharding.rules`). A model built for ``tp`` tensor shards
stores the fused ``in_proj`` columns and the conv channels shard-major with duplicated groups
(:mod:`mamba2_jax.sharding.layout`), so the contiguous split of the ``ssm_heads`` dimension over
``"tensor"`` hands shard ``r`` exactly vLLM's rank-``r`` slice. :func:`layout_param` /
:func:`unlayout_param` convert one parameter between the natural layout (``tp = 1``, HF order,
Flax orientation) and the ``tp`` layout, by indexing only (bit-exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mamba2_jax.config import Mamba2Config
from mamba2_jax.sharding.layout import (
    conv_shard_rows,
    in_proj_shard_rows,
    unshard_conv,
    unshard_in_proj,
)
from mamba2_jax.sharding.rules import RULES, logical_to_spec

_METADATA_KEYS = ("out_sharding", "sharding_names", "sharding")  # across flax versions


def logical_param(value, names: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` whose dimensions carry the logical ``names`` (placed later, not eagerly)."""
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def logical_init(init, names: Sequence[str | None]):
    """``init`` for ``nnx.Linear`` / ``nnx.Embed`` params that carry the logical ``names``."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def logical_names(var) -> tuple[str | None, ...] | None:
    """The logical axis names of an NNX variable, or None when it has none."""
    meta = var.get_metadata()
    for key in _METADATA_KEYS:
        if meta.get(key) is not None:
            return tuple(meta[key])
    return None


def spec_for(names, shape, mesh: Mesh, rules=RULES) -> PartitionSpec:
    """PartitionSpec of an array with logical ``names`` on ``mesh``.

    A dimension whose size the mesh axis does not divide (a vocabulary of 90 over 4 shards) is
    replicated instead; the mixer's head dimensions always divide (checked when the model is built).
    """
    if names is None:
        return PartitionSpec()
    spec = logical_to_spec(names, rules)
    return PartitionSpec(*(axis if axis is not None and size % mesh.shape[axis] == 0 else None
                           for axis, size in zip(spec, shape)))


def param_sharding(var, mesh: Mesh) -> NamedSharding:
    """The NamedSharding of one NNX parameter on ``mesh`` (from its logical names)."""
    return NamedSharding(mesh, spec_for(logical_names(var), var.get_value().shape, mesh))


def place_params(model, mesh: Mesh):
    """Move every parameter of ``model`` (in place) onto ``mesh`` with its NamedSharding."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(jax.device_put(var.get_value(), param_sharding(var, mesh)))
    return model


# -- the tensor-parallel layout of single parameters ---------------------------------------------------


def _kind(key: str) -> str | None:
    for suffix in ("mixer.in_proj.kernel", "mixer.in_proj.bias", "mixer.conv1d.weight",
                   "mixer.conv1d.bias"):
        if key.endswith(suffix):
            return suffix.split(".", 1)[1]
    return None


def layout_param(key: str, array, config: Mamba2Config, tp: int) -> np.ndarray:
    """Natural-layout parameter ``key`` (our dotted path, Flax orientation) -> its ``tp`` layout.

    ``in_proj.kernel [d, 2i+2gn+h]`` -> ``[d, tp * in_proj_local]`` (columns shard-major);
    ``in_proj.bias`` likewise; ``conv1d.weight [c, k]`` / ``conv1d.bias [c]`` ->
    ``[tp * conv_dim_local, ...]``. Every other parameter is returned unchanged.
    """
    kind = _kind(key)
    if tp == 1 or kind is None:
        return array
    array = np.asarray(array)
    if kind == "in_proj.kernel":
        return array[:, in_proj_shard_rows(config, tp).reshape(-1)]
    if kind == "in_proj.bias":
        return array[in_proj_shard_rows(config, tp).reshape(-1)]
    return array[conv_shard_rows(config, tp).reshape(-1)]


def unlayout_param(key: str, array, config: Mamba2Config, tp: int) -> np.ndarray:
    """Inverse of :func:`layout_param`; duplicated groups must agree bit for bit (ValueError)."""
    kind = _kind(key)
    if tp == 1 or kind is None:
        return array
    array = np.asarray(array)
    if kind == "in_proj.kernel":
        d = array.shape[0]
        return unshard_in_proj(array.T.reshape(tp, -1, d), config, tp).T
    if kind == "in_proj.bias":
        return unshard_in_proj(array.reshape(tp, -1), config, tp)
    return unshard_conv(array.reshape(tp, -1, *array.shape[1:]), config, tp)
