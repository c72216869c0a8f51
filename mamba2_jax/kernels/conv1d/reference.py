"""Pure-JAX causal depthwise conv1d: the ground truth for the conv kernels.

For channel ``c`` of one sequence, with kernel width ``k`` (tap ``k-1`` multiplies the current
token, tap ``0`` the oldest)::

    y[t, c] = act( sum_{w=0}^{k-1} weight[c, w] * xin[t - (k-1) + w, c] + bias[c] )

where ``xin[-j]`` (``1 <= j <= k-1``) is the sequence's initial conv state ``state[c, k-1-j]``
(layout ``[.., c, k-1]``: oldest input first, newest last), or zero without one. The final
state is the last ``k-1`` inputs ``xin[l-k+1 : l]`` in the same layout, so a sequence shorter
than ``k-1`` keeps the newer part of its initial state in the older slots. ``act`` is ``silu``
or the identity. The single-token update applies the same formula to the window
``concat(state, x_new)`` and shifts the state left by one.

Dtype policy: float32 arithmetic; ``y`` is cast to ``x.dtype``; final states are in
``initial_states.dtype`` when given, else ``x.dtype``; an updated state pool keeps its dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba2_jax.kernels.common import read_slots, write_slots
from mamba2_jax.typing import Array

_F32 = jnp.float32


def _activate(y, activation):
    return jax.nn.silu(y) if activation in ("silu", "swish") else y


def _conv_windows(windows, weight, bias, activation):
    """``windows [.., c, k]`` (float32) -> ``act(windows . weight + bias)`` of shape [.., c]."""
    y = jnp.sum(windows * weight.astype(_F32), axis=-1)
    if bias is not None:
        y = y + bias.astype(_F32)
    return _activate(y, activation)


def _batched(x, weight, bias, initial_states, activation):
    b, l, c = x.shape
    k = weight.shape[-1]
    if initial_states is None:
        hist = jnp.zeros((b, k - 1, c), _F32)
    else:
        hist = jnp.swapaxes(initial_states, -1, -2).astype(_F32)  # [b, k-1, c]
    xin = jnp.concatenate([hist, x.astype(_F32)], axis=1)  # [b, l+k-1, c]
    windows = jnp.stack([xin[:, w:w + l] for w in range(k)], axis=-1)  # [b, l, c, k]
    y = _conv_windows(windows, weight, bias, activation)
    final = jnp.swapaxes(xin[:, l:], -1, -2)  # [b, c, k-1]: the last k-1 inputs
    return y, final


def _packed(x, weight, bias, initial_states, cu_seqlens, activation):
    t, c = x.shape
    k = weight.shape[-1]
    nseq = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.astype(jnp.int32)
    xf = x.astype(_F32)
    if initial_states is None:
        init = jnp.zeros((nseq, c, k - 1), _F32)
    else:
        init = initial_states.astype(_F32)

    def inputs_at(seq, rel):
        """Input at sequence-relative position ``rel >= -(k-1)`` of sequence ``seq`` -> [.., c]."""
        from_x = xf[jnp.clip(cu[seq] + rel, 0, t - 1)]
        from_init = init[seq, :, jnp.clip(k - 1 + rel, 0, k - 2)]
        return jnp.where((rel >= 0)[..., None], from_x, from_init)

    # Token t belongs to sequence seq[t] (the number of sequence ends <= t; empty ones skip).
    tok = jnp.arange(t)
    seq = jnp.searchsorted(cu[1:], tok, side="right")
    pos = tok - cu[seq]
    taps = jnp.arange(k) - (k - 1)  # relative offsets of taps 0..k-1
    windows = inputs_at(seq[:, None], pos[:, None] + taps)  # [t, k, c]
    y = _conv_windows(jnp.swapaxes(windows, -1, -2), weight, bias, activation)

    return y, packed_final_states(x, initial_states, cu_seqlens, k)


def packed_final_states(x, initial_states, cu_seqlens, k):
    """The last k-1 inputs of each packed sequence of ``x [t, c]`` (t >= 1), oldest first:
    float32 ``[nseq, c, k-1]``. Position ``len - (k-1) + j`` of a sequence comes from ``x`` when
    it is >= 0, else from column ``k-1 + (len - (k-1) + j)`` of its initial state (zeros when
    ``initial_states`` is None). Shared by the reference and the Pallas prefill.
    """
    t = x.shape[0]
    cu = cu_seqlens.astype(jnp.int32)
    lens = cu[1:] - cu[:-1]
    rel = lens[:, None] - (k - 1) + jnp.arange(k - 1, dtype=jnp.int32)  # [nseq, k-1]
    from_x = x[jnp.clip(cu[:-1, None] + rel, 0, t - 1)].astype(_F32)     # [nseq, k-1, c]
    if initial_states is None:
        from_init = jnp.zeros((), _F32)
    else:
        col = jnp.clip(k - 1 + rel, 0, k - 2)                             # [nseq, k-1]
        from_init = jnp.take_along_axis(initial_states.astype(_F32), col[:, None, :], axis=2)
        from_init = jnp.swapaxes(from_init, 1, 2)                         # [nseq, k-1, c]
    final = jnp.where((rel >= 0)[:, :, None], from_x, from_init)
    return jnp.swapaxes(final, 1, 2)


def causal_conv1d_ref(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    initial_states: Array | None = None,
    cu_seqlens: Array | None = None,
    activation: str | None = "silu",
    return_final_states: bool = False,
):
    """Causal depthwise conv1d over ``x [b, l, c]`` or packed ``x [t, c]`` with ``cu_seqlens``.

    ``weight [c, k]``, ``bias [c]``; ``initial_states [b, c, k-1]`` (or ``[nseq, c, k-1]``
    packed). Returns ``y`` like ``x`` [, final states ``[b|nseq, c, k-1]``]. Inputs are not
    validated here; see ``causal_conv1d``.
    """
    if cu_seqlens is None:
        y, final = _batched(x, weight, bias, initial_states, activation)
    elif x.shape[0] == 0:  # no tokens: nothing to gather from
        nseq, c, k = cu_seqlens.shape[0] - 1, x.shape[-1], weight.shape[-1]
        y = jnp.zeros(x.shape, _F32)
        final = (jnp.zeros((nseq, c, k - 1), _F32) if initial_states is None
                 else initial_states)
    else:
        y, final = _packed(x, weight, bias, initial_states, cu_seqlens, activation)
    y = y.astype(x.dtype)
    if not return_final_states:
        return y
    state_dtype = x.dtype if initial_states is None else initial_states.dtype
    return y, final.astype(state_dtype)


def causal_conv1d_update_ref(
    x: Array,
    conv_state: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    activation: str | None = "silu",
    conv_state_indices: Array | None = None,
):
    """One decode step: ``x [b, c]`` against the state pool ``conv_state [slots, c, k-1]``.

    Row ``r`` uses slot ``conv_state_indices[r]`` (identity when ``None``); its window is
    ``concat(state, x[r])`` along time and the slot becomes ``window[:, 1:]``. A row whose
    index is outside ``[0, slots)`` (vLLM marks padding with -1) reads a zero state and writes
    nothing. Returns ``(y [b, c] in x.dtype, new pool in conv_state.dtype)``.
    """
    state = read_slots(conv_state, conv_state_indices)
    window = jnp.concatenate([state, x.astype(_F32)[:, :, None]], axis=-1)  # [b, c, k]
    y = _conv_windows(window, weight, bias, activation).astype(x.dtype)
    return y, write_slots(conv_state, conv_state_indices, window[..., 1:])
