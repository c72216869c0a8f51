"""SPMD sharding: the mesh (``mesh``), logical-axis rules (``rules``) and the tensor-parallel
layout of the fused projections (``layout``, pure numpy)."""

from mamba2_jax.sharding.mesh import MESH_AXES, make_mesh
from mamba2_jax.sharding.rules import RULES, logical_to_spec, named_sharding
from mamba2_jax.sharding.layout import (
    LocalSizes,
    check_tp,
    conv_shard_rows,
    duplicated_groups,
    groups_per_shard,
    in_proj_shard_rows,
    local_config,
    shard_conv,
    shard_groups,
    shard_in_proj,
    shard_norm_weight,
    shard_per_head,
    unshard_conv,
    unshard_in_proj,
)

__all__ = [
    "MESH_AXES",
    "RULES",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "LocalSizes",
    "check_tp",
    "conv_shard_rows",
    "duplicated_groups",
    "groups_per_shard",
    "in_proj_shard_rows",
    "local_config",
    "shard_conv",
    "shard_groups",
    "shard_in_proj",
    "shard_norm_weight",
    "shard_per_head",
    "unshard_conv",
    "unshard_in_proj",
]
