"""Pallas (Triton backend) fused mixer decode step: conv update + state update + gate, one launch.

Grid (b, h, p / bp): program (r, j, q) owns rows q bp : (q + 1) bp of head j of row r (group
g = j // (h / groups)). From the in_proj output row it convolves those bp x channels and the
group's n B and n C channels (every program of the group recomputes them) with the
k-1 conv-state columns (tap by tap, as ``conv1d/pallas_update.py``; silu; rounded to xBC's
dtype, as the unfused conv's output), then updates its [bp, n] block of the head's state
(``s' = exp(dt A) s + dt x B^T``, ``y = s' C + D x``, as ``state_update/pallas_ssu.py``) and
writes ``float32(y in x's dtype) * silu(z)``. The math is ``reference.mixer_step_ref``.

State: the ssm state is aliased input -> output (in place under ``jax.jit`` with it donated);
the conv state goes to a fresh buffer: the B / C channels are read by every head of a group and
written by its first head, so writing them in place would race with the other heads' reads (a
fresh buffer costs the same traffic: every column of a conv-state row is rewritten each step);
the first program of a group's first head writes them.

Why fused: in a batch-1 decode step every launch costs ~1.5 µs whatever its work (H200
profile, ``scripts/profile_decode.py``); the unfused XLA path spends ~13 launches a layer between
the two projections (slices, conv, softplus, the state update, the gate).

Measured (H200, jax 0.11.2, 2.7B shape): end to end at batch 1 the fused step takes a token
from 2.506 / 2.703 / 2.824 to 2.306 / 2.448 / 2.547 ms (``scripts/bench_generate.py``, three
runs, each against the unfused ops in the same run; the later runs also had the norms of
``kernels/rms_norm`` and the summed partials); at batch 64 it was slower than XLA's fused
ops (10.63 / 11.26 against 9.20 / 9.25 ms; alone, 131-147 µs against XLA's 102 µs a step:
``scripts/bench_decode.py --mixer-step``), so the model takes it up to 16 rows only.

Load order (``loads_first``, off by default): a warp issues in order, and a load written after a
cross-thread reduction or a layout change (a barrier) is issued only once that is done, so a
batch-1 step is a chain of memory round trips. Issuing every load first shortens the chain: in
sm_90 SASS built offline by pip Triton 3.6 (``scripts/sass_phases.py``, the folded step's call
at b = 1) a warp waits through 2 runs of global loads instead of 7 (168 registers instead of
120, no spills). Not yet timed on a GPU.

Scope (``api.mixer_step_unsupported``): p and n powers of two, a dense batch. Dtype policy:
float32 arithmetic; the ssm state keeps its dtype; the conv state takes ``conv_state.dtype``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mamba2_jax.kernels.common import next_pow2, static_index
from mamba2_jax.kernels.state_update.pallas_ssu import _softplus

NUM_WARPS = 4
MIN_PROGRAMS = 1024  # see default_block_p
# ``loads_first`` takes blocks of at most this many rows: in offline sm_90 SASS of the 2.7B
# step (scripts/sass_phases.py) 16 rows hold every load in 168 registers, 32 spill 384 bytes
LOADS_FIRST_MAX_BLOCK_P = 16


def _step_kernel(zx_ref, conv_ref, w_ref, cb_ref, ssm_ref, A_ref, D_ref, dtb_ref, *refs, p, bp,
                 n, groups, heads_per_group, k, limit, d_per_channel, a_is_log, splits,
                 zx_dtype, in_norm, gated_norm, loads_first):
    refs = list(refs)
    in_ss_ref = refs.pop(0) if in_norm else None
    gnw_ref = refs.pop(0) if gated_norm else None
    y_ref, conv_out_ref, ssm_out_ref, *ss_ref = refs
    r, j, pb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = j // heads_per_group
    h = pl.num_programs(1)
    i = h * p
    c0 = pl.multiple_of(j * p + pb * bp, bp)  # this program's x channels (and z, y columns)
    ps = pl.ds(pl.multiple_of(pb * bp, bp), bp)
    c_b, c_c = i + g * n, i + (groups + g) * n  # the group's B and C channels of xBC

    def zx_load(start, size=None):
        """in_proj output columns start : start + size (one scalar when size is None): the
        value, or with ``splits`` the list of its float32 partials."""
        cols = start if size is None else pl.ds(start, size)
        if splits is None:
            return zx_ref[r, cols]
        return [zx_ref[q, r, cols] for q in range(splits)]

    def conv_load(c, size):
        cs = pl.ds(c, size)
        return dict(taps=[conv_ref.at[r, cs, static_index(w)][...] for w in range(k - 1)],
                    new=zx_load(i + c, size), bias=cb_ref.at[cs][...],
                    weight=[w_ref.at[cs, static_index(w)][...] for w in range(k)])

    # The loads. ``loads_first``: all issued here, before any compute (a batch-1 step is a
    # chain of memory round trips, and a load written after a cross-thread reduction or a
    # layout change is issued only once that is done); else each where it is used.
    thunks = dict(
        s=lambda: ssm_ref[r, j, ps, :], x=lambda: conv_load(c0, bp),
        B=lambda: conv_load(c_b, n), C=lambda: conv_load(c_c, n),
        dt=lambda: zx_load(i + i + 2 * groups * n + j), z=lambda: zx_load(c0, bp),
        dtb=lambda: dtb_ref[j], A=lambda: A_ref[j],
        D=lambda: D_ref[j, ps] if d_per_channel else D_ref[j],
        gnw=lambda: gnw_ref[pl.ds(c0, bp)] if gated_norm else None,
        in_ss=lambda: plt.load(
            in_ss_ref.at[r, pl.ds(0, in_norm["slots_block"])],
            mask=jnp.arange(in_norm["slots_block"], dtype=jnp.int32) < in_norm["slots"],
            other=0) if in_norm else None)
    early = {name: f() for name, f in thunks.items()} if loads_first else {}

    def load(name):
        return early[name] if name in early else thunks[name]()

    rstd = None
    if in_norm:  # the in_proj input's 1 / RMS (its norm's row scale, applied to the product)
        rstd = jax.lax.rsqrt(jnp.sum(load("in_ss")) / in_norm["count"] + in_norm["eps"])

    def zx(raw):
        """float32 of loaded in_proj output columns: with ``splits`` the sum of the GEMV's
        partials rounded to ``zx_dtype`` (the product the GEMV would have returned)."""
        if splits is None:
            return raw.astype(jnp.float32)
        acc = raw[0]
        for part in raw[1:]:
            acc = acc + part
        if rstd is not None:
            acc = acc * rstd
        return acc.astype(zx_dtype).astype(jnp.float32)

    def conv(c, size, ld, store):
        """silu(conv) of xBC channels c : c + size (float32 of the xBC-dtype value); the
        shifted window goes to the new conv state when ``store``."""
        taps = [t.astype(jnp.float32) for t in ld["taps"]] + [zx(ld["new"])]
        acc = ld["bias"].astype(jnp.float32)
        for w in range(k):
            acc = acc + ld["weight"][w].astype(jnp.float32) * taps[w]
        acc = acc * jax.nn.sigmoid(acc)

        @pl.when(store)
        def _():
            for w in range(k - 1):
                conv_out_ref.at[r, pl.ds(c, size), static_index(w)][...] = taps[w + 1].astype(
                    conv_out_ref.dtype)

        return acc.astype(zx_dtype).astype(jnp.float32)

    first_of_group = (j % heads_per_group == 0) & (pb == 0)  # writes the group's B / C state
    x = conv(c0, bp, load("x"), True)  # [bp]
    Bv = conv(c_b, n, load("B"), first_of_group)  # [n]
    Cv = conv(c_c, n, load("C"), first_of_group)  # [n]

    dt = _softplus(zx(load("dt")) + load("dtb"))
    if limit is not None:
        dt = jnp.minimum(jnp.maximum(dt, limit[0]), limit[1])
    A = -jnp.exp(load("A")) if a_is_log else load("A")
    s = load("s").astype(jnp.float32) * jnp.exp(dt * A) + (dt * x)[:, None] * Bv[None, :]
    y = jnp.sum(s * Cv[None, :], axis=1) + x * load("D")
    zv = zx(load("z"))
    y = y.astype(zx_dtype).astype(jnp.float32)
    gated = y * zv * jax.nn.sigmoid(zv)
    if gated_norm:  # the gated norm's weight (its 1 / RMS is the consumer's), y's dtype
        y_ref[r, j, ps] = (gated * load("gnw").astype(jnp.float32)).astype(y_ref.dtype)
    else:
        y_ref[r, j, ps] = gated
    ssm_out_ref[r, j, ps, :] = s.astype(ssm_out_ref.dtype)
    if ss_ref:  # this program's slot of the gated norm's sums of squares
        ss_ref[0][r, j * pl.num_programs(2) + pb] = jnp.sum(gated * gated)


def default_block_p(b: int, h: int, p: int) -> int:
    """Rows of a head per program: the whole head once b h programs fill the GPU (MIN_PROGRAMS),
    else a quarter of it (at least 16), so a batch-1 step still has several programs an SM."""
    return p if b * h >= MIN_PROGRAMS else max(16, p // 4)


@functools.partial(jax.jit, static_argnames=("heads", "head_dim", "groups", "state_size",
                                             "limit", "a_is_log", "zx_dtype", "block_p",
                                             "sum_squares", "in_count", "in_eps",
                                             "num_warps", "loads_first", "interpret"))
def mixer_step_pallas(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias,
                      in_ss=None, norm_weight=None, *, heads: int, head_dim: int, groups: int,
                      state_size: int, limit=None, a_is_log: bool = False, zx_dtype=None,
                      block_p=None, sum_squares: bool = False, in_count=None, in_eps=None,
                      num_warps: int = NUM_WARPS, loads_first: bool = False,
                      interpret: bool = False):
    """``(gated y [b, h p] float32, new conv state, new ssm state)`` (``mixer_step_ref``'s
    contract; ``limit`` (lo, hi) or None for no clip; ``a_is_log``: A holds A_log and the
    kernel takes A = -exp(A_log), saving the step an XLA launch; ``block_p`` None:
    ``default_block_p``). ``zxbcdt`` [S, b, N] float32 (the in_proj GEMV's split-K partials,
    summed here and rounded to ``zx_dtype``: the XLA sum's launch saved) or [b, N].
    ``sum_squares``: a fourth output, [b, h p / bp] float32, each program's sum of its gated
    y squared (slots head-major: the gated norm's statistics). ``in_ss`` [b, slots] float32
    (with ``in_count``, ``in_eps``): the summed partials are scaled by
    ``1 / sqrt(sum(in_ss) / in_count + in_eps)`` (the in_proj input's norm) before the
    rounding; ``norm_weight`` [h p]: the output is ``gated * norm_weight`` in norm_weight's
    dtype (the gated norm's weight, its 1 / RMS left to the consumer). ``loads_first``: every
    global load issued before any compute, for blocks of at most LOADS_FIRST_MAX_BLOCK_P rows
    (larger ones keep the default order; not yet timed on a GPU; the default order is the one
    the BENCHMARKS numbers ran). Inputs are the caller's to check."""
    splits = zxbcdt.shape[0] if zxbcdt.ndim == 3 else None
    zx_dtype = jnp.dtype(zxbcdt.dtype if zx_dtype is None else zx_dtype)
    b = zxbcdt.shape[-2]
    c, k = conv_weight.shape
    h, p, n = heads, head_dim, state_size
    bp = min(p, default_block_p(b, h, p) if block_p is None else block_p)
    kernel = functools.partial(_step_kernel, p=p, bp=bp, n=n, groups=groups,
                               heads_per_group=h // groups, k=k, limit=limit,
                               d_per_channel=D.ndim == 2, a_is_log=a_is_log, splits=splits,
                               zx_dtype=zx_dtype, gated_norm=norm_weight is not None,
                               loads_first=loads_first and bp <= LOADS_FIRST_MAX_BLOCK_P,
                               in_norm=None if in_ss is None else dict(
                                   slots=in_ss.shape[1], slots_block=next_pow2(in_ss.shape[1]),
                                   count=float(in_count), eps=float(in_eps)))
    if conv_bias is None:
        conv_bias = jnp.zeros((c,), jnp.float32)
    y_dtype = jnp.float32 if norm_weight is None else norm_weight.dtype
    out_shape = (jax.ShapeDtypeStruct((b, h, p), y_dtype),
                 jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
                 jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype))
    if sum_squares:
        out_shape += (jax.ShapeDtypeStruct((b, h * (p // bp)), jnp.float32),)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape,
        grid=(b, h, p // bp),
        input_output_aliases={4: 2},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="mixer_step",
    )(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A.astype(jnp.float32),
      D.astype(jnp.float32), dt_bias.astype(jnp.float32),
      *(a for a in (in_ss, norm_weight) if a is not None))
    return (outs[0].reshape(b, h * p),) + tuple(outs[1:])
