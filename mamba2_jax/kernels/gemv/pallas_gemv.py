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

from mamba2_jax.kernels.common import cdiv, check_pow2, next_pow2

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


def _gemv_kernel(*refs, m, mp, K, N, bn, bk, ks, n_k, method, ragged_k, precision, out_in,
                 norm=None):
    """One program's slab; ``norm`` (a static dict, see ``normed_gemv_call``) adds the RMS-norm
    prologue."""
    if norm:
        x_ref, w_ref, ss_ref, wn_ref, o_ref = refs
    else:
        (x_ref, w_ref, o_ref), ss_ref, wn_ref = refs, None, None
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

    if norm:  # 1 / RMS of each row [mp, 1] from its ss slots (rows past m read as zeros)
        sl = jnp.arange(norm["spg_block"], dtype=jnp.int32)
        ss = plt.load(ss_ref.at[pl.ds(0, mp), pl.ds(0, norm["spg_block"])],
                      mask=(rows < m)[:, None] & (sl < norm["spg"])[None, :], other=0)
        rstd = jax.lax.rsqrt(jnp.sum(ss, axis=1, keepdims=True) / K + norm["eps"])

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
        if norm:  # x is the raw input: normalise this tile (rms_norm_ref's roundings)
            r = x.astype(norm["in_dtype"]).astype(jnp.float32)
            y = (r * rstd).astype(norm["norm_dtype"]).astype(jnp.float32)
            wn = wn_ref.at[pl.ds(k0, bk)]
            wn = (wn[...] if not ragged_k else plt.load(wn, mask=kk < K, other=0))
            x = (wn.astype(jnp.float32)[None, :] * y).astype(norm["out_dtype"]).astype(w.dtype)
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


def normed_gemv_call(x, ss, norm_weight, w, *, p, eps, in_dtype, norm_dtype, out_dtype,
                     num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=False):
    """``gemv_partials`` of the RMS-normalised x: float32 partials [S, m, N].

    x [m, K] is the norm's raw input (one norm group: the whole row) and ss [m, slots] float32
    its sums of squares (each slot a partial sum of ``x.astype(in_dtype)^2`` written by the
    producer of x); every program sums the slots (1 / RMS before its loop) and normalises each
    tile of x as ``rms_norm_ref`` does (rounded to ``norm_dtype``, times ``norm_weight`` [K],
    rounded to ``out_dtype``, the norm's output dtype), then casts it to w's dtype for the
    product. (Per-group statistics inside the loop, for a grouped gated norm, gave NaN on an
    H200 at m = 1 with 8 groups, correct at m = 4 and 16 and in interpret mode: not kept.)"""
    m, K = x.shape
    N = w.shape[1]
    norm = dict(spg=ss.shape[1], spg_block=next_pow2(ss.shape[1]), eps=eps,
                in_dtype=jnp.dtype(in_dtype), norm_dtype=jnp.dtype(norm_dtype),
                out_dtype=jnp.dtype(out_dtype))
    precision = jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
    kernel = functools.partial(
        _gemv_kernel, m=m, mp=p["mp"], K=K, N=N, bn=p["bn"], bk=p["bk"], ks=p["ks"],
        n_k=p["n_k"], method=p["method"], ragged_k=p["S"] * p["ks"] != K, precision=precision,
        out_in=False, norm=norm)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((p["S"], m, N), jnp.float32), grid=p["grid"],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="normed_gemv",
    )(x, w, ss, norm_weight)


RESIDUAL_BLOCK = 64  # columns a program of residual_sum


def _residual_sum_kernel(part_ref, res_ref, h_ref, ss_ref, *, S, m, mp, N, bn, out_dtype,
                         in_dtype):
    j = pl.program_id(0)
    cols = j * bn + jnp.arange(bn, dtype=jnp.int32)
    rows = jnp.arange(mp, dtype=jnp.int32)
    mask = (rows < m)[:, None] & (cols < N)[None, :]
    cs = pl.ds(pl.multiple_of(j * bn, bn), bn)
    tile = lambda ref: ref.at[pl.ds(0, mp), cs]
    part = lambda s, a: a + plt.load(part_ref.at[s, pl.ds(0, mp), cs], mask=mask, other=0)
    acc = jax.lax.fori_loop(0, S, part, jnp.zeros((mp, bn), jnp.float32))
    res = plt.load(tile(res_ref), mask=mask, other=0).astype(jnp.float32)
    h = (res + acc.astype(out_dtype).astype(jnp.float32)).astype(h_ref.dtype)
    plt.store(tile(h_ref), h, mask=mask)
    r = jnp.where(mask, h.astype(in_dtype).astype(jnp.float32), 0.0)
    plt.store(ss_ref.at[pl.ds(0, mp), pl.ds(j, 1)], jnp.sum(r * r, axis=1, keepdims=True),
              mask=(rows < m)[:, None])


def residual_sum(partials, residual, *, out_dtype, in_dtype, block_n=RESIDUAL_BLOCK,
                 num_warps=NUM_WARPS, interpret=False):
    """``h = residual + sum(partials, 0).astype(out_dtype)`` (float32 sums, h in
    promote(residual, out_dtype)) and ss [m, cdiv(N, block_n)] float32, the sums of squares of
    ``h.astype(in_dtype)`` over each column block (the next norm's statistics): one launch,
    grid over column blocks. partials [S, m, N] float32, residual [m, N]."""
    S, m, N = partials.shape
    kernel = functools.partial(_residual_sum_kernel, S=S, m=m, mp=next_pow2(m), N=N,
                               bn=block_n, out_dtype=jnp.dtype(out_dtype),
                               in_dtype=jnp.dtype(in_dtype))
    nb = cdiv(N, block_n)
    return pl.pallas_call(
        kernel, grid=(nb,),
        out_shape=(jax.ShapeDtypeStruct((m, N), jnp.promote_types(residual.dtype, out_dtype)),
                   jax.ShapeDtypeStruct((m, nb), jnp.float32)),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="residual_sum",
    )(partials, residual)


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
