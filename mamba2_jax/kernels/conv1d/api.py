"""Public causal depthwise conv1d (prefill) and its single-token update: validation + dispatch.

``y[t, c] = act( sum_{w<k} weight[c, w] * xin[t - (k-1) + w, c] + bias[c] )``, where inputs
before a sequence's first token come from its initial conv state ``[.., c, k-1]`` (oldest
first) or are zero; ``act`` is ``silu`` (alias ``"swish"``) or ``None`` (identity). See
``reference.py`` for the full statement.

Dtype policy: float32 arithmetic; ``y`` in ``x.dtype``; returned states in the dtype of the
states passed in (``x.dtype`` when none are).

Backends: the prefill ``causal_conv1d`` has a Pallas (Triton) kernel (``pallas_prefill.py``)
that runs on ``impl="pallas"``; ``impl="auto"`` keeps it on the XLA reference (k shifted
multiply-adds that fuse into one memory-bound loop) until a GPU benchmark shows the kernel
faster. The decode ``causal_conv1d_update`` has a Pallas (Triton) kernel that updates the state
pool in place (``pallas_update.py``).
"""

from __future__ import annotations


import logging

import jax.numpy as jnp

from mamba2_jax.kernels.common import check_cu_seqlens, resolve_impl, with_reference_gradient
from mamba2_jax.kernels.conv1d.pallas_prefill import causal_conv1d_pallas
from mamba2_jax.kernels.conv1d.pallas_update import causal_conv1d_update_pallas
from mamba2_jax.kernels.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref
from mamba2_jax.typing import Array

ACTIVATIONS = (None, "silu", "swish")
log = logging.getLogger("mamba2_jax")


def _shape(a):
    return tuple(a.shape)


def _check_activation(op, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_float(op, name, a):
    if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{op}: {name} must be a floating-point array, got dtype {a.dtype}")


def _check_indices(op, name, a, b):
    if a.ndim != 1 or a.shape[0] != b:
        raise ValueError(f"{op}: {name} must be [b] with b == {b}, got {_shape(a)}")
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"{op}: {name} must be an integer array, got dtype {a.dtype}")


def _check_weight_bias(op, weight, bias, c):
    if weight.ndim != 2 or weight.shape[0] != c:
        raise ValueError(f"{op}: weight must be [c, k] with c == x.shape[-1] == {c}, "
                         f"got {_shape(weight)}")
    if weight.shape[1] < 2:
        raise ValueError(f"{op}: the kernel width k = weight.shape[1] must be >= 2, "
                         f"got {_shape(weight)}")
    if bias is not None and _shape(bias) != (c,):
        raise ValueError(f"{op}: bias must be [c] == ({c},), got {_shape(bias)}")
    _check_float(op, "weight", weight)
    _check_float(op, "bias", bias)


def _prefill_pallas_unsupported(x, cu_seqlens) -> str | None:
    """Why the Pallas prefill kernel cannot take these inputs, or None. Any l, t and c work
    (ragged token and channel blocks are masked); empty arrays do not."""
    if 0 in x.shape:
        return f"empty input: x {_shape(x)}"
    if cu_seqlens is not None and cu_seqlens.shape[0] < 2:
        return f"no sequences: cu_seqlens {_shape(cu_seqlens)}"
    return None


def _update_pallas_unsupported(x, conv_state) -> str | None:
    """Why the Pallas update kernel cannot take these inputs, or None. Any c works (a ragged
    last channel block is masked); empty arrays do not."""
    if 0 in x.shape or conv_state.shape[0] == 0:
        return f"empty input: x {_shape(x)}, conv_state {_shape(conv_state)}"
    return None


# Gradients of the Pallas prefill come from the XLA reference (a named fallback, as for SSD).
PREFILL_BACKWARD = "xla"


def _prefill_forward(static, x, weight, bias, initial_states, cu_seqlens):
    silu, return_final, interpret = static
    # Block sizes from the H100 sweep (benchmarks/results/conv_prefill_*.json): 16-token blocks
    # for dense batches, 32 for packed sequences; 256 channels.
    return causal_conv1d_pallas(x, weight, bias, initial_states, cu_seqlens, silu=silu,
                                return_final_states=return_final,
                                block_t=16 if cu_seqlens is None else 32, interpret=interpret)


def _prefill_reference(static, x, weight, bias, initial_states, cu_seqlens):
    silu, return_final, _ = static
    return causal_conv1d_ref(x, weight, bias, initial_states=initial_states,
                             cu_seqlens=cu_seqlens, activation="silu" if silu else None,
                             return_final_states=return_final)


_prefill_pallas = with_reference_gradient(_prefill_forward, _prefill_reference)


def causal_conv1d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    initial_states: Array | None = None,
    cu_seqlens: Array | None = None,
    activation: str | None = "silu",
    return_final_states: bool = False,
    impl: str = "auto",
    interpret: bool = False,
):
    """Causal depthwise conv1d over a batch or a packed set of sequences.

    Args:
      x: [b, l, c], or packed [t, c] together with ``cu_seqlens``.
      weight: [c, k] (k >= 2; tap k-1 multiplies the current token); bias: [c] or None.
      initial_states: [b, c, k-1] (packed: [nseq, c, k-1]) inputs preceding each sequence,
        oldest first; None means zeros.
      cu_seqlens: [nseq + 1] int offsets of the packed sequences (0, non-decreasing, ends at t;
        empty sequences allowed). Its values may be traced; they are not checked.
      activation: "silu" / "swish" or None.
      return_final_states: also return the last k-1 inputs of each sequence, [b|nseq, c, k-1],
        in ``initial_states.dtype`` (``x.dtype`` without initial states).
      impl: "auto" | "xla" | "pallas" ("auto": the Pallas kernel on a GPU, measured 2.2-3.7x
        faster than XLA on dense batches and on par on packed ones, H100; XLA elsewhere);
        "pallas" on the CPU needs ``interpret``; inputs the kernel cannot take (empty ones) fall
        back to XLA with a logged reason. Gradients of the kernel come from the XLA reference
        (``PREFILL_BACKWARD == "xla"``, a named fallback).
      interpret: run the Pallas kernel in interpret mode (CPU).

    Returns:
      ``y`` (shape and dtype of ``x``), or ``(y, final_states)``.
    """
    op = "causal_conv1d"
    _check_activation(op, activation)
    _check_float(op, "x", x)
    if cu_seqlens is None:
        if x.ndim != 3:
            raise ValueError(f"{op}: x must be [b, l, c] (or packed [t, c] with cu_seqlens), "
                             f"got {_shape(x)}")
        nseq = x.shape[0]
    else:
        if x.ndim != 2:
            raise ValueError(f"{op}: with cu_seqlens, x must be packed [t, c], got {_shape(x)}")
        check_cu_seqlens(op, cu_seqlens, x.shape[0])
        nseq = cu_seqlens.shape[0] - 1
    c = x.shape[-1]
    _check_weight_bias(op, weight, bias, c)
    k = weight.shape[1]
    if initial_states is not None:
        lead = "b" if cu_seqlens is None else "nseq"
        if _shape(initial_states) != (nseq, c, k - 1):
            raise ValueError(f"{op}: initial_states must be [{lead}, c, k-1] == "
                             f"{(nseq, c, k - 1)}, got {_shape(initial_states)}")
        _check_float(op, "initial_states", initial_states)
    backend = resolve_impl(impl, op=op, pallas_available=True, interpret=interpret)
    if backend == "pallas":
        reason = _prefill_pallas_unsupported(x, cu_seqlens)
        if reason is None:
            static = (activation is not None, return_final_states, interpret)
            return _prefill_pallas(static, x, weight, bias, initial_states, cu_seqlens)
        log.warning("%s: Pallas kernel cannot take this input (%s); using the XLA reference",
                    op, reason)
    return causal_conv1d_ref(x, weight, bias, initial_states=initial_states,
                             cu_seqlens=cu_seqlens, activation=activation,
                             return_final_states=return_final_states)


def causal_conv1d_update(
    x: Array,
    conv_state: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    activation: str | None = "silu",
    conv_state_indices: Array | None = None,
    impl: str = "auto",
    interpret: bool = False,
):
    """One decode step of the causal conv against a pool of conv states.

    Args:
      x: [b, c], one new token per row.
      conv_state: [slots, c, k-1] pool of states (oldest input first).
      weight: [c, k]; bias: [c] or None; activation: "silu" / "swish" or None.
      conv_state_indices: [b] int slot of each row, or None (then slots == b, row r -> slot r).
        A negative index marks a padding row: it reads a zero state and writes nothing
        (indices >= slots are treated the same way). Repeated valid indices are undefined.
      impl: "auto" | "xla" | "pallas" (auto: the Pallas kernel on a GPU for a slot-indexed pool,
        XLA for a dense batch or off a GPU; inputs the kernel cannot take fall back to XLA with
        a logged reason); interpret: run the Pallas
        kernel in interpret mode (CPU). The Pallas kernel updates the pool in place when the
        caller donates it (``jax.jit(..., donate_argnums=...)``).

    Returns:
      ``(y [b, c] in x.dtype, new pool [slots, c, k-1] in conv_state.dtype)``: each named slot
      holds its window shifted left by one (the new token last); other slots are unchanged.
    """
    op = "causal_conv1d_update"
    _check_activation(op, activation)
    _check_float(op, "x", x)
    _check_float(op, "conv_state", conv_state)
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be [b, c], got {_shape(x)}")
    b, c = x.shape
    _check_weight_bias(op, weight, bias, c)
    k = weight.shape[1]
    if conv_state.ndim != 3 or conv_state.shape[1:] != (c, k - 1):
        raise ValueError(f"{op}: conv_state must be [slots, c, k-1] with (c, k-1) == "
                         f"{(c, k - 1)}, got {_shape(conv_state)}")
    if conv_state_indices is None:
        if conv_state.shape[0] != b:
            raise ValueError(f"{op}: without conv_state_indices, conv_state must hold one slot "
                             f"per row (slots == b == {b}), got {_shape(conv_state)}")
    else:
        _check_indices(op, "conv_state_indices", conv_state_indices, b)
    backend = resolve_impl(impl, op=op, pallas_available=True, interpret=interpret)
    if impl == "auto" and conv_state_indices is None:
        # A dense batch: XLA fuses the update with its neighbours, measured faster inside the
        # compiled decode step (benchmarks/BENCHMARKS.md); the kernel serves slot-indexed pools.
        backend = "xla"
    if backend == "pallas":
        reason = _update_pallas_unsupported(x, conv_state)
        if reason is None:
            idx = (jnp.arange(b, dtype=jnp.int32) if conv_state_indices is None
                   else conv_state_indices.astype(jnp.int32))
            return causal_conv1d_update_pallas(x, conv_state, weight, bias, idx,
                                               silu=activation is not None, interpret=interpret)
        log.warning("%s: Pallas kernel cannot take this input (%s); using the XLA reference",
                    op, reason)
    return causal_conv1d_update_ref(x, conv_state, weight, bias, activation=activation,
                                    conv_state_indices=conv_state_indices)
