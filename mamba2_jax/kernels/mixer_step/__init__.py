"""Fused mixer decode step (conv update + selective state update + gate) for a dense batch."""

from mamba2_jax.kernels.mixer_step.api import mixer_step, mixer_step_unsupported
from mamba2_jax.kernels.mixer_step.reference import mixer_step_ref

__all__ = ["mixer_step", "mixer_step_ref", "mixer_step_unsupported"]
