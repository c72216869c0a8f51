"""Tensor-parallel sharding of the Mamba-2 mixer (``layout``: pure-numpy layout of the fused projections)."""

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
