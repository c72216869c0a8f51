"""Pallas (Triton backend) split-K GEMV for small batch: ``out = x @ w (+ bias)``.

x [m, K], w [K, N] (row-major, Flax orientation [in, out]), m small (<= 16 is the target);
``w_layout="out_in"`` takes w as [N, K] instead (a tied embedding matrix [vocab, d] as the
LM head: each output is a dot with one contiguous row of w), with the same tiles transposed.
At batch 1 a decode step is a chain of matrix-vector products that must stream every weight
byte once; the kernel is built to read ``w`` at memory speed.

Grid (cdiv(N, bn), S): program (j, s) owns columns ``j*bn : (j+1)*bn`` and the K slab
``s*ks : (s+1)*ks`` (``ks`` a multiple of ``bk``). It walks the slab in ``bk``-row tiles
(``lax.fori_loop`` when there is more than one); each tile row is ``bn`` contiguous elements
of ``w`` (coalesced), the matching ``x`` tile ``[mp, bk]`` is loaded once per k-tile (it is tiny
and stays in L2). It writes its float32 partial sums ``[m, bn]`` into ``partials[s]``; an XLA
``sum(axis=0)`` (+ bias, cast to ``x.dtype``) finishes: a second launch, and ``S * m * N * 4``
bytes of extra traffic (0.6% of the weight bytes for m=1, K=2560, N=10576, S=8).

Two ways to combine a tile (``method``):

* ``"fma"``: ``acc[mp, bk, bn] += x[:, :, None] * w[None, :, :]`` in
  float32, elementwise (no tensor cores: m is below the 16 rows ``tl.dot`` wants); the sum over
  the ``bk`` axis is deferred to one reduction after the loop, so the loop body has no
  cross-thread traffic. The accumulator costs ``mp * bk * bn`` float32 registers per program,
  so the default ``bk`` shrinks as m grows (``ACC_BUDGET``).
* ``"dot"`` (the default): ``acc[mp, bn] += dot(x[mp, bk], w[bk, bn])`` with ``mp >= 16``
  (rows beyond m load as zeros), float32 accumulation on the tensor cores; float32 inputs use
  ``precision=HIGHEST`` (no TF32). The default at every m: in an H200 sweep (bf16, best
  config of each) it beat "fma" on in_proj 2560x10576 (m = 1: 20.0 vs 21.7 us; m = 4: 22.0 vs
  38.6) and the LM head 50280x2560 (70.1 vs 84.3 at m = 1), and out_proj 5120x2560 at m = 4;
  on out_proj at m = 1 "fma" was 0.8 us ahead (11.1 vs 11.9).

``mp`` is ``next_pow2(m)`` (at least 16 for ``"dot"``): Triton needs power-of-two arrays, so
x rows ``>= m`` are masked loads of zero and never stored. Ragged shapes are masked, nothing is
padded in memory: a last column block past N (10576 = 82.6 * 128) masks its ``w`` columns and
its stores, a last K slab past K masks its ``w`` rows and ``x`` columns.

Defaults (``default_config``): ``bn = 128`` and ``bk = 64`` (``"fma"``: ``bn`` 64 for m > 2 and
``bk`` from the accumulator budget), and ``S`` the smallest divisor of the number of k-tiles that
gives at least ``PROGRAMS_PER_SM * sm_count`` programs (4 x 132 on an H100), so that every SM
has several programs streaming at once; without such a divisor, ``S = cdiv(target, nb)`` and the
last slab is masked.

``residual_gemv_call``: the same "dot" kernel with a decode block's residual add and RMS norm
in its x tiles (``h + delta * s``, times the norm weight; the norm's 1 / RMS is left to the
consumer), the column-block-0 programs writing the new stream and the norm's sums of squares.

Dtype policy: x and w share one float dtype; products and sums in float32; the output in
``x.dtype`` (``nnx.Linear`` computes ``dot_general`` in the param dtype with float32
accumulation on GPU, so the two agree within one rounding of the output).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mamba2_jax.kernels.common import cdiv, check_pow2, next_pow2, static_index

SM_COUNT = 132  # H100 SXM; the API passes the device's count when it runs on a GPU
PROGRAMS_PER_SM = 4
ACC_BUDGET = 8192  # float32 accumulator elements per program ("fma": mp * bk * bn)
MAX_BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 3
METHODS = ("fma", "dot")
DEFAULT_METHOD = "dot"  # at every m (see the module docstring)
W_LAYOUTS = ("in_out", "out_in")  # w [K, N] (Flax kernels), or [N, K] (e.g. a tied embedding)


def check_layout(w_layout: str) -> bool:
    """Whether ``w_layout`` is "out_in" (w [N, K]); a ValueError unless it is one of W_LAYOUTS."""
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"gemv: w_layout must be one of {W_LAYOUTS}, got {w_layout!r}")
    return w_layout == "out_in"


def padded_rows(m: int, method: str) -> int:
    mp = next_pow2(m)
    return max(mp, 16) if method == "dot" else mp


def default_config(m: int, K: int, N: int, *, method: str | None = None,
                   sm_count: int = SM_COUNT, programs_per_sm: int = PROGRAMS_PER_SM):
    """``(block_n, block_k, splits)`` for an [m, K] @ [K, N] product (see the module docstring)."""
    method = method or DEFAULT_METHOD
    mp = padded_rows(m, method)
    if method == "fma":
        bn = 128 if mp <= 2 else 64
        bk = min(MAX_BLOCK_K, max(8, ACC_BUDGET // (mp * bn)))
    else:
        bn, bk = 128, 64
    bn = max(16, min(bn, next_pow2(N)))
    bk = max(16 if method == "dot" else 1, min(bk, next_pow2(K)))
    nb, n_tiles = cdiv(N, bn), cdiv(K, bk)
    want = min(n_tiles, max(1, cdiv(programs_per_sm * sm_count, nb)))
    exact = [s for s in range(want, min(2 * want, n_tiles) + 1) if n_tiles % s == 0]
    return bn, bk, (exact[0] if exact else want)


def plan(m: int, K: int, N: int, *, block_n=None, block_k=None, splits=None, method=None,
         sm_count: int = SM_COUNT):
    """The static launch plan: a dict with method, mp, bn, bk, ks (rows per slab), n_k (tiles
    per slab), S (slabs, none empty) and grid."""
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"gemv: method must be one of {METHODS}, got {method!r}")
    dbn, dbk, dS = default_config(m, K, N, method=method, sm_count=sm_count)
    bn = dbn if block_n is None else check_pow2("block_n", block_n, op="gemv")
    bk = dbk if block_k is None else check_pow2("block_k", block_k, op="gemv")
    if method == "dot" and (bn < 16 or bk < 16):
        raise ValueError(f"gemv: method='dot' needs block_n and block_k >= 16, got {bn}, {bk}")
    if splits is None:
        S = dS if (block_n is None and block_k is None) else None
    else:
        if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
            raise ValueError(f"gemv: splits must be a positive integer, got {splits!r}")
        S = splits
    n_tiles = cdiv(K, bk)
    if S is None:  # block sizes given, splits not: the default rule for these blocks
        nb = cdiv(N, bn)
        S = min(n_tiles, max(1, cdiv(PROGRAMS_PER_SM * sm_count, nb)))
    n_k = cdiv(n_tiles, min(S, n_tiles))
    S = cdiv(n_tiles, n_k)  # no empty slab
    mp = padded_rows(m, method)
    return dict(method=method, mp=mp, bn=bn, bk=bk, ks=n_k * bk, n_k=n_k, S=S,
                grid=(cdiv(N, bn), S))


def _gemv_kernel(x_ref, w_ref, o_ref, *, m, mp, K, N, bn, bk, ks, n_k, method, ragged_k,
                 precision, out_in):
    """One program's slab (see the module docstring)."""
    j, s = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(j * bn, bn)
    ragged_n = N % bn != 0
    cols = n0 + jnp.arange(bn, dtype=jnp.int32)
    rows = jnp.arange(mp, dtype=jnp.int32)
    # w tiles are [bk, bn] ("in_out") or [bn, bk] ("out_in"); ``tile_of`` orients a [bk]- and
    # a [bn]-indexed mask (or index) pair into that tile's shape.
    tile_shape = (bn, bk) if out_in else (bk, bn)

    def tile_of(k_part, n_part):
        if out_in:
            return jnp.broadcast_to(k_part[None, :], tile_shape), jnp.broadcast_to(
                n_part[:, None], tile_shape)
        return jnp.broadcast_to(k_part[:, None], tile_shape), jnp.broadcast_to(
            n_part[None, :], tile_shape)

    def tile(t, acc):
        k0 = pl.multiple_of(s * ks + t * bk, bk)
        kk = k0 + jnp.arange(bk, dtype=jnp.int32)
        # w tile: rows of K past K (last slab) and of N past N (last block) masked.
        km, nm = tile_of(kk < K, cols < N)
        wmask = None
        if ragged_k:
            wmask = km
        if ragged_n:
            wmask = nm if wmask is None else wmask & nm
        wt = (w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)] if out_in
              else w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)])
        w = wt[...] if wmask is None else plt.load(wt, mask=wmask, other=0)
        # x tile [mp, bk]: rows past m and columns past K read as zero.
        xmask = None
        if ragged_k:
            xmask = jnp.broadcast_to((kk < K)[None, :], (mp, bk))
        if mp != m:
            rm = jnp.broadcast_to((rows < m)[:, None], (mp, bk))
            xmask = rm if xmask is None else xmask & rm
        xt = x_ref.at[pl.ds(0, mp), pl.ds(k0, bk)]
        x = xt[...] if xmask is None else plt.load(xt, mask=xmask, other=0)
        if method == "fma":
            xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
            if out_in:  # acc [mp, bn, bk]
                return acc + xf[:, None, :] * wf[None, :, :]
            return acc + xf[:, :, None] * wf[None, :, :]  # acc [mp, bk, bn]
        dims = (((1,), (1,)) if out_in else ((1,), (0,)), ((), ()))
        return acc + jax.lax.dot_general(x, w, dims, precision=precision,
                                         preferred_element_type=jnp.float32)

    if method == "fma":
        acc = jnp.zeros((mp, bn, bk) if out_in else (mp, bk, bn), jnp.float32)
    else:
        acc = jnp.zeros((mp, bn), jnp.float32)
    acc = tile(0, acc) if n_k == 1 else jax.lax.fori_loop(0, n_k, tile, acc)
    if method == "fma":  # the one cross-thread reduction, after the loop
        acc = jnp.sum(acc, axis=2 if out_in else 1)
    out = o_ref.at[s, pl.ds(0, mp), pl.ds(n0, bn)]
    if mp != m or ragged_n:
        omask = (jnp.broadcast_to((rows < m)[:, None], (mp, bn))
                 & jnp.broadcast_to((cols < N)[None, :], (mp, bn)))
        plt.store(out, acc, mask=omask)
    else:
        out[...] = acc


def gemv_partials(x, w, *, p, w_layout="in_out", num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                  interpret=False):
    """The float32 split-K partial products ``[S, m, N]`` of ``x [m, K] @ w`` (w [K, N], or
    [N, K] with ``w_layout="out_in"``) for the launch plan ``p`` (from ``plan``); their sum
    over axis 0 is the product."""
    m, K = x.shape
    out_in = check_layout(w_layout)
    N = w.shape[0] if out_in else w.shape[1]
    precision = (jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None)
    kernel = functools.partial(
        _gemv_kernel, m=m, mp=p["mp"], K=K, N=N, bn=p["bn"], bk=p["bk"], ks=p["ks"],
        n_k=p["n_k"], method=p["method"], ragged_k=p["S"] * p["ks"] != K, precision=precision,
        out_in=out_in)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((p["S"], m, N), jnp.float32),
        grid=p["grid"],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="gemv_splitk",
    )(x, w)


def _residual_gemv_kernel(*refs, m, mp, K, N, bn, bk, ks, n_k, ragged_k, precision,
                          delta, in_dtype):
    """One program's slab of ``residual_gemv_call``: h' = h + delta_scale * delta per x tile
    (the column-block-0 programs store h' and their slab's sums of squares), then the product
    of ``bf16(norm_weight * h'.astype(in_dtype))`` with the w tile."""
    if delta:
        h_ref, d_ref, dss_ref, wn_ref, w_ref, part_ref, hn_ref, ss_ref = refs
    else:
        (h_ref, wn_ref, w_ref, part_ref, hn_ref, ss_ref), d_ref, dss_ref = refs, None, None
    j, s = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(j * bn, bn)
    cols = n0 + jnp.arange(bn, dtype=jnp.int32)
    rows = jnp.arange(mp, dtype=jnp.int32)
    if delta:  # the delta's row scale 1 / RMS from its producer's sums of squares, a row at
        # a time (an [mp, slots] tile of them took registers the loop then missed: +10 µs)
        sl = jnp.arange(delta["slots_block"], dtype=jnp.int32)
        dscale = jnp.zeros((mp, 1), jnp.float32)
        for row in range(m):
            dss = plt.load(dss_ref.at[static_index(row), pl.ds(0, delta["slots_block"])],
                           mask=sl < delta["slots"], other=0)
            dscale = jnp.where(rows[:, None] == row, jax.lax.rsqrt(
                jnp.sum(dss) / delta["count"] + delta["eps"]), dscale)

    def tile(t, carry):
        acc, sq = carry
        k0 = pl.multiple_of(s * ks + t * bk, bk)
        kk = k0 + jnp.arange(bk, dtype=jnp.int32)
        wmask = (kk < K)[:, None] & (cols < N)[None, :]
        w = plt.load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)], mask=wmask, other=0)
        xmask = (rows < m)[:, None] & (kk < K)[None, :]
        xs = (pl.ds(0, mp), pl.ds(k0, bk))
        hv = plt.load(h_ref.at[xs], mask=xmask, other=0).astype(jnp.float32)
        if delta:
            hv = hv + dscale * plt.load(d_ref.at[xs], mask=xmask, other=0).astype(jnp.float32)
        hv = hv.astype(hn_ref.dtype)
        # a predicated store, no branch in the loop (a branch there stopped its pipelining)
        plt.store(hn_ref.at[xs], hv, mask=xmask & first)
        v = hv.astype(in_dtype).astype(jnp.float32)
        wn = plt.load(wn_ref.at[pl.ds(k0, bk)], mask=kk < K, other=0).astype(jnp.float32)
        x = (wn[None, :] * v).astype(wn_ref.dtype).astype(w.dtype)
        acc = acc + jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32)
        return acc, sq + v * v  # (summed over the tile's columns after the loop)

    first = j == 0  # the column-block-0 programs write h' and the squares
    carry = (jnp.zeros((mp, bn), jnp.float32), jnp.zeros((mp, bk), jnp.float32))
    acc, sq = tile(0, carry) if n_k == 1 else jax.lax.fori_loop(0, n_k, tile, carry)
    omask = (rows < m)[:, None] & (cols < N)[None, :]
    plt.store(part_ref.at[s, pl.ds(0, mp), pl.ds(n0, bn)], acc, mask=omask)
    plt.store(ss_ref.at[pl.ds(0, mp), s], jnp.sum(sq, axis=1), mask=(rows < m) & first)


def residual_gemv_call(h, norm_weight, w, delta=None, delta_ss=None, *, p, delta_count=None,
                       delta_eps=None, in_dtype, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                       interpret=False):
    """``(partials [S, m, N] float32, h' [m, K], ss [m, S] float32)`` of
    ``reference.residual_gemv_ref`` for the "dot" launch plan ``p``: each program adds the
    scaled delta to its x tiles, the programs of column block 0 write h' and their slab's
    sums of squares (slot s of ss)."""
    m, K = h.shape
    N = w.shape[1]
    hn_dtype = h.dtype if delta is None else jnp.promote_types(h.dtype, delta.dtype)
    d = None
    if delta is not None:
        d = dict(slots=delta_ss.shape[1], slots_block=next_pow2(delta_ss.shape[1]),
                 count=float(delta_count), eps=float(delta_eps))
    kernel = functools.partial(
        _residual_gemv_kernel, m=m, mp=p["mp"], K=K, N=N, bn=p["bn"], bk=p["bk"], ks=p["ks"],
        n_k=p["n_k"], ragged_k=p["S"] * p["ks"] != K,
        precision=jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None, delta=d,
        in_dtype=jnp.dtype(in_dtype))
    args = (h,) + (() if delta is None else (delta, delta_ss)) + (norm_weight, w)
    return pl.pallas_call(
        kernel, grid=p["grid"],
        out_shape=(jax.ShapeDtypeStruct((p["S"], m, N), jnp.float32),
                   jax.ShapeDtypeStruct((m, K), hn_dtype),
                   jax.ShapeDtypeStruct((m, p["S"]), jnp.float32)),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="residual_gemv",
    )(*args)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "method",
                                             "w_layout", "out_dtype", "num_warps", "num_stages",
                                             "sm_count", "interpret"))
def gemv_pallas(x, w, bias=None, *, block_n=None, block_k=None, splits=None, method=None,
                w_layout: str = "in_out", out_dtype=None, num_warps: int = NUM_WARPS,
                num_stages: int = NUM_STAGES, sm_count: int = SM_COUNT, interpret: bool = False):
    """``x [m, K] @ w (+ bias [N])`` in ``out_dtype`` (None: ``x.dtype``; w [K, N], or [N, K]
    with ``w_layout="out_in"``): the kernel's partials, summed (and the bias added) in float32
    by XLA. Shapes and dtypes are the caller's to check (``api.gemv`` does)."""
    m, K = x.shape
    N = w.shape[0] if check_layout(w_layout) else w.shape[1]
    p = plan(m, K, N, block_n=block_n, block_k=block_k, splits=splits, method=method,
             sm_count=sm_count)
    out = jnp.sum(gemv_partials(x, w, p=p, w_layout=w_layout, num_warps=num_warps,
                                num_stages=num_stages, interpret=interpret), axis=0)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype if out_dtype is None else out_dtype)
