"""Selective state update: one Mamba-2 decode step against a slot-indexed state pool."""

from mamba2_jax.kernels.state_update.api import selective_state_update
from mamba2_jax.kernels.state_update.reference import selective_state_update_ref

__all__ = ["selective_state_update", "selective_state_update_ref"]
