"""``MambaMixer2``: the Mamba-2 token mixer with vLLM's semantics (HF transformers >= 5 agrees).

    zxbcdt = in_proj(u) [* mup_vector]       # [.., 2i + 2gn + h], order [z | x | B | C | dt]
    xBC    = silu(causal_conv1d(xBC) + bias)  # depthwise over i + 2gn channels, width k
    dt     = clip(softplus(dt + dt_bias), time_step_limit)          # float32
    A      = -exp(A_log)                                             # float32, per head
    y      = SSD(x, dt, A, B, C) + D * x      # head j reads group j // (h / g)
    y      = GatedGroupRMSNorm(y, gate=z)     # gate before the norm, per original group
    out    = out_proj(y)

Recurrent state per layer (:class:`MixerState`): ``conv [b, i + 2gn, k - 1]`` (the last k-1
conv inputs, oldest first, model dtype) and ``ssm [b, h, p, n]`` (``config.ssm_state_dtype``,
float32 by default). ``__call__`` runs a prefill (optionally continuing from a state) and
``step`` decodes one token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mamba2_jax.config import Mamba2Config
from mamba2_jax.kernels.conv1d import causal_conv1d, causal_conv1d_update
from mamba2_jax.kernels.ssd import ssd_chunk_scan
from mamba2_jax.kernels.state_update import selective_state_update
from mamba2_jax.nn.norm import GatedGroupRMSNorm


class MixerState(NamedTuple):
    """One layer's recurrent state: ``conv [b, i + 2gn, k - 1]`` and ``ssm [b, h, p, n]``."""

    conv: jax.Array
    ssm: jax.Array


def init_mixer_state(config: Mamba2Config, batch_size: int, dtype=jnp.float32) -> MixerState:
    """All-zero state (the state before any token) for ``batch_size`` sequences."""
    c = config
    return MixerState(
        conv=jnp.zeros((batch_size, c.conv_dim, c.conv_kernel - 1), dtype),
        ssm=jnp.zeros((batch_size, c.num_heads, c.head_dim, c.state_size), c.ssm_state_dtype),
    )


class DepthwiseConv1d(nnx.Module):
    """Parameters of the causal depthwise conv: ``weight [c, k]`` (HF's [c, 1, k] squeezed), ``bias [c]``."""

    def __init__(self, channels: int, kernel: int, *, use_bias: bool, param_dtype, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(kernel)
        uniform = jax.nn.initializers.uniform(2 * bound)
        self.weight = nnx.Param(uniform(rngs.params(), (channels, kernel), param_dtype) - bound)
        self.bias = (nnx.Param(uniform(rngs.params(), (channels,), param_dtype) - bound)
                     if use_bias else None)


class MambaMixer2(nnx.Module):
    """The Mamba-2 mixer of one layer (module names follow HF: in_proj, conv1d, A_log, D, dt_bias, norm, out_proj).

    Params are created in ``param_dtype``; ``A_log``, ``D`` and ``dt_bias`` are always float32.
    """

    def __init__(self, config: Mamba2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        c = self.config = config
        d, i, h = c.hidden_size, c.intermediate_size, c.num_heads
        linear = dict(use_bias=c.use_bias, dtype=param_dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = nnx.Linear(d, c.in_proj_size, **linear)
        self.conv1d = DepthwiseConv1d(c.conv_dim, c.conv_kernel, use_bias=c.use_conv_bias,
                                      param_dtype=param_dtype, rngs=rngs)
        # mamba_ssm's init: A = -U(1, 16); dt = logU(dt_min, dt_max) stored as softplus^-1(dt).
        key_a, key_dt = jax.random.split(rngs.params())
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(key_a, (h,), jnp.float32, 1.0, 16.0)))
        dt = jnp.exp(jax.random.uniform(key_dt, (h,), jnp.float32, math.log(dt_min), math.log(dt_max)))
        dt = jnp.maximum(dt, dt_floor)
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))
        self.D = nnx.Param(jnp.ones((i,) if c.d_has_hdim else (h,), jnp.float32))
        self.norm = GatedGroupRMSNorm(i, c.n_groups, eps=c.layer_norm_epsilon,
                                      use_rms_norm=c.use_rms_norm, param_dtype=param_dtype)
        self.out_proj = nnx.Linear(i, d, **linear)

    # -- pieces shared by prefill and decode -------------------------------------------------

    def _project(self, u, mup_vector):
        c = self.config
        zxbcdt = self.in_proj(u)
        if mup_vector is not None:
            zxbcdt = zxbcdt * mup_vector
        i, cd = c.intermediate_size, c.conv_dim
        return zxbcdt[..., :i], zxbcdt[..., i:i + cd], zxbcdt[..., i + cd:]

    def _split_xbc(self, xbc):
        c = self.config
        i, gn = c.intermediate_size, c.n_groups * c.state_size
        lead = xbc.shape[:-1]
        x = xbc[..., :i].reshape(*lead, c.num_heads, c.head_dim)
        B = xbc[..., i:i + gn].reshape(*lead, c.n_groups, c.state_size)
        C = xbc[..., i + gn:].reshape(*lead, c.n_groups, c.state_size)
        return x, B, C

    def _ssm_params(self):
        c = self.config
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        D = self.D[...]
        if c.d_has_hdim:
            D = D.reshape(c.num_heads, c.head_dim)
        return A, D

    def _conv_params(self):
        bias = self.conv1d.bias
        return self.conv1d.weight[...], (None if bias is None else bias[...])

    def _finish(self, y, z):
        return self.out_proj(self.norm(y.reshape(z.shape), z))

    # -- prefill / decode -------------------------------------------------------------------------

    def __call__(self, u, *, state: MixerState | None = None, return_state: bool = False,
                 mup_vector=None, impl: str = "auto"):
        """Prefill ``u [b, l, d]`` (from ``state`` when given) -> ``out [b, l, d]`` [, new state]."""
        c = self.config
        z, xbc, dt = self._project(u, mup_vector)
        weight, bias = self._conv_params()
        conv = causal_conv1d(
            xbc, weight, bias, initial_states=None if state is None else state.conv,
            activation="silu", return_final_states=return_state, impl=impl)
        xbc_act, conv_state = conv if return_state else (conv, None)
        x, B, C = self._split_xbc(xbc_act)
        A, D = self._ssm_params()
        scan = ssd_chunk_scan(
            x, dt, A, B, C, chunk_size=c.chunk_size, D=D, dt_bias=self.dt_bias[...],
            dt_softplus=True, dt_limit=c.time_step_limit,
            initial_states=None if state is None else state.ssm,
            return_final_states=return_state, impl=impl)
        if not return_state:  # the final states are only computed when asked for
            return self._finish(scan, z)
        y, ssm_state = scan
        return self._finish(y, z), MixerState(conv_state.astype(xbc.dtype),
                                              ssm_state.astype(c.ssm_state_dtype))

    def step(self, u, state: MixerState, *, mup_vector=None, impl: str = "auto"):
        """Decode one token per sequence: ``u [b, d]`` -> ``(out [b, d], new state)``."""
        c = self.config
        z, xbc, dt = self._project(u, mup_vector)
        weight, bias = self._conv_params()
        xbc, conv_state = causal_conv1d_update(xbc, state.conv, weight, bias, activation="silu",
                                               impl=impl)
        x, B, C = self._split_xbc(xbc)
        A, D = self._ssm_params()
        y, ssm_state = selective_state_update(
            state.ssm, x, dt, A, B, C, D=D, dt_bias=self.dt_bias[...], dt_softplus=True,
            dt_limit=c.time_step_limit, impl=impl)
        return self._finish(y, z), MixerState(conv_state, ssm_state)
