"""Selective state update on Mosaic GPU (Hopper: TMA bulk copies), in place on a slot pool.

The same math as ``pallas_ssu._ssu_kernel``: per row r (slot ``idx[r]``) and head j (group
g = j // (h / groups)),

    dt = clip(softplus(dt_rj + bias_j)),  s' = exp(dt A_j) s + dt x_rj B_rg^T
    y  = s' C_rg + D_j x_rj,  y *= silu(z_rj)

One program per (row, head), one warpgroup. The slot's [p, n] state comes into shared memory
with one TMA copy (x, z, B, C beside it), the update runs in registers (the WGMMA layout:
x / y along rows, B / C along columns), s' goes back to shared memory and out to the same slot
with one TMA copy; y is stored from registers. Many programs share an SM (one state block of
shared memory each), so the copies of several heads are in flight at once. A negative slot (or
one >= slots) is a padding row: no copy of the state in or out, y from a zero state (as the
reference). The pool is an aliased operand (:func:`in_place_route`: ``pallas_call`` with
``input_output_aliases`` on jax 0.10, a ``jax.new_ref`` operand of ``plgpu.kernel`` on jax 0.11),
so under ``jax.jit`` with the pool donated it is updated in place.

Scope (``mgpu_ssu_unsupported`` says why a call cannot take it): a Hopper GPU (or Mosaic GPU
interpret mode), head_dim p 64 / 128 / 256 (rows of the WGMMA layout), state size n a multiple
of 128 bytes of the pool dtype (the swizzled tiles: 32 float32 / 64 bf16), rows of x and B of
128-byte multiples (the vector copies), and a jax with one of the two in-place routes.
Dtype policy: float32 arithmetic (the softplus as ``max(v, 0) + log(1 + exp(-|v|))``), y in x's
dtype, the pool keeps its dtype.

On the CPU the kernel runs in Mosaic GPU's interpret mode through ``plgpu.kernel``: on jax 0.11
by the GPU's route (the pool a ``jax.new_ref``), on jax 0.10 copying the pool in first (its
interpreter runs a multi-program ``pallas_call`` wrong).

Measured on an H200 (jax 0.11.2), float32 pool, in place (the ``jax.new_ref`` route), in the
device-time loop of ``scripts/bench_decode.py`` beside the Triton kernel (one run,
benchmarks/results/ssu_in_place_mgpu_NVIDIA_H200.json): b = 64 / 256 94.7 / 351.4 µs (83.3 /
89.8 % of the copy bandwidth) against 94.3 / 361.5 for (h, p, g, n) = (80, 64, 1, 128), and
145.7 / 554.3 µs (86.6 / 91.1 %) against 148.3 / 579.1 for (128, 64, 8, 128); b = 1 5.7 / 8.8
µs against 6.7 / 5.9. Hence ``kernel="auto"`` takes it from 64 rows on (``api.which_kernel``).
Its GPU tests (in place at b 1 / 64 / 256, a bf16 pool, the pool's buffer unchanged; the
fresh-pool variant) passed on that H200.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mamba2_jax.kernels.ssd.mgpu_output import (_device_reason, _plgpu, interpret_params,
                                                layout_caster)


def mgpu_ssu_unsupported(state, x, B, *, interpret: bool = False) -> str | None:
    """Why the Mosaic GPU state-update kernel cannot take this call (None when it can)."""
    p, n = state.shape[-2:]
    if p not in (64, 128, 256):
        return f"head_dim p={p} is not 64, 128 or 256"
    per_tile = 128 // jnp.dtype(state.dtype).itemsize
    if n % per_tile:
        return f"state size n={n} is not a multiple of {per_tile} ({state.dtype} pool)"
    for name, a, size in (("x", x, p), ("B", B, n)):  # a vector copy moves 128-byte multiples
        if size * jnp.dtype(a.dtype).itemsize % 128:
            return (f"{name} rows of {size} {jnp.dtype(a.dtype).name} are not a multiple of "
                    f"128 bytes")
    if interpret:
        return None
    if in_place_route() is None:
        return f"jax {jax.__version__}: no way to run the Mosaic GPU kernel in place"
    return _device_reason()


@functools.cache
def in_place_route() -> str | None:
    """How this jax runs the kernel in place: "pallas_call" (``input_output_aliases``; jax
    0.10.2 registers Mosaic GPU's ``pallas_call`` lowering when ``pallas_call_registration`` is
    imported), "ref" (the pool as a mutable ``jax.new_ref`` operand of ``plgpu.kernel``, which
    lowers to an aliased operand: jax 0.11.2, whose ``pallas_call`` has no Mosaic GPU
    lowering), or None (neither)."""
    from jax._src.pallas import core as pallas_core

    try:
        importlib.import_module("jax._src.pallas.mosaic_gpu.pallas_call_registration")
    except Exception:  # noqa: BLE001  (a private module: any failure means no rule)
        pass
    if pallas_core.get_lowering_rule(_plgpu().CompilerParams, "gpu") is not None:
        return "pallas_call"
    if jax.__version_info__ >= (0, 11) and hasattr(jax, "new_ref") and hasattr(jax, "freeze"):
        return "ref"  # (jax 0.10.2's plgpu.kernel refuses a jax.new_ref operand under jit)
    return None


def _softplus(v):
    return jnp.maximum(v, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(v)))


def _ssu_kernel(idx_ref, state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,
                y_ref, out_ref, *, heads_per_group, softplus, limit, has_z, d_per_channel,
                interpret, named_grid):
    plgpu = _plgpu()
    if named_grid:  # plgpu.kernel's grid (see selective_state_update_mgpu)
        r, j = lax.axis_index("rows"), lax.axis_index("heads")
    else:
        r, j = pl.program_id(0), pl.program_id(1)
    p, n = state_ref.shape[-2:]
    per_tile = 128 // jnp.dtype(state_ref.dtype).itemsize
    pl.run_scoped(
        functools.partial(_update, r, j, idx_ref, state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref,
                          D_ref, bias_ref, z_ref, y_ref, out_ref, heads_per_group=heads_per_group,
                          softplus=softplus, limit=limit, has_z=has_z,
                          d_per_channel=d_per_channel, interpret=interpret),
        plgpu.SMEM((p, n), state_ref.dtype, transforms=(
            plgpu.TilingTransform((8, per_tile)), plgpu.SwizzleTransform(128))),
        plgpu.SMEM((p,), x_ref.dtype), plgpu.SMEM((p,), z_ref.dtype),
        plgpu.SMEM((n,), B_ref.dtype), plgpu.SMEM((n,), C_ref.dtype),
        plgpu.SMEM((p,), jnp.float32), plgpu.Barrier(num_barriers=6))


def _update(r, j, idx_ref, state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,
            y_ref, out_ref, s_s, x_s, z_s, B_s, C_s, D_s, bars, *, heads_per_group, softplus,
            limit, has_z, d_per_channel, interpret):
    plgpu = _plgpu()
    cast = layout_caster(interpret)
    rows, cols = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    g = lax.div(j, heads_per_group)
    p, n = s_s.shape
    slot = idx_ref[r]
    valid = (slot >= 0) & (slot < state_ref.shape[0])

    @pl.when(valid)
    def _():
        plgpu.copy_gmem_to_smem(state_ref.at[slot, j], s_s, bars.at[0])

    plgpu.copy_gmem_to_smem(x_ref.at[r, j], x_s, bars.at[1])
    plgpu.copy_gmem_to_smem(B_ref.at[r, g], B_s, bars.at[2])
    plgpu.copy_gmem_to_smem(C_ref.at[r, g], C_s, bars.at[3])
    if has_z:
        plgpu.copy_gmem_to_smem(z_ref.at[r, j], z_s, bars.at[4])
    if d_per_channel:
        plgpu.copy_gmem_to_smem(D_ref.at[j], D_s, bars.at[5])
    dt = dt_ref[r, j] + bias_ref[j]
    if softplus:
        dt = _softplus(dt)
    if limit is not None:
        dt = jnp.minimum(jnp.maximum(dt, limit[0]), limit[1])
    decay = jnp.exp(dt * A_ref[j])
    for k in (1, 2, 3) + ((4,) if has_z else ()) + ((5,) if d_per_channel else ()):
        plgpu.barrier_wait(bars.at[k])
    x = cast(x_s[...], rows).astype(jnp.float32)
    D = cast(D_s[...], rows) if d_per_channel else D_ref[j]

    Bv = cast(B_s[...], cols).astype(jnp.float32)
    Cv = cast(C_s[...], cols).astype(jnp.float32)

    @pl.when(valid)
    def _():
        plgpu.barrier_wait(bars.at[0])

    s = jnp.where(valid, cast(s_s[...], plgpu.Layout.WGMMA).astype(jnp.float32), 0.0)
    s = s * decay + (lax.broadcast_in_dim(dt * x, (p, n), [0])
                     * lax.broadcast_in_dim(Bv, (p, n), [1]))

    @pl.when(valid)
    def _():
        s_s[...] = s.astype(s_s.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_s, out_ref.at[slot, j])

    y = x * D + jnp.sum(s * lax.broadcast_in_dim(Cv, (p, n), [1]), axis=1)
    if has_z:
        zv = cast(z_s[...], rows).astype(jnp.float32)
        y = y * zv / (1.0 + jnp.exp(-zv))
    y_ref.at[r, j][...] = y.astype(y_ref.dtype)

    @pl.when(valid)
    def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("softplus", "limit", "interpret", "alias"))
def selective_state_update_mgpu(state, x, dt, A, B, C, D, dt_bias, z, idx, *, softplus: bool,
                                limit=None, interpret: bool = False, alias: bool = True):
    """``(y, new pool)``: ``pallas_ssu.selective_state_update_pallas``'s contract (D [h] or
    [h, p], dt_bias [h], z or None, idx [b] int32, ``limit`` (lo, hi) or None).

    ``alias=False`` (benchmarks only): the kernel writes a fresh pool buffer, so the slots no
    row names are undefined in it; the kernel's work is the same as in place."""
    plgpu = _plgpu()
    b, h, p = x.shape
    g, n = B.shape[1:]
    route = in_place_route()
    named_grid = interpret or not alias or route == "ref"
    kernel = functools.partial(
        _ssu_kernel, heads_per_group=h // g, softplus=softplus, limit=limit,
        has_z=z is not None, d_per_channel=D.ndim == 2, interpret=interpret,
        named_grid=named_grid)
    out_type = (jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct(state.shape, state.dtype))
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)
    args = (idx, state, x, dt.astype(jnp.float32), A.astype(jnp.float32), B, C,
            D.astype(jnp.float32), dt_bias.astype(jnp.float32), x if z is None else z)
    kernel_over_grid = functools.partial(plgpu.kernel, grid=(b, h), grid_names=("rows", "heads"),
                                         compiler_params=params,
                                         interpret=interpret_params(interpret))
    if not alias:
        return kernel_over_grid(kernel, out_type=out_type)(*args)
    if interpret and route != "ref":
        # jax 0.10's interpreter runs a multi-program pallas_call wrong (every program after
        # the first loses its outputs), and its plgpu.kernel takes no jax.new_ref: the
        # interpreted kernel copies the pool in and returns it whole (unnamed slots included).
        def copy_then_update(*refs):
            @pl.when((lax.axis_index("rows") == 0) & (lax.axis_index("heads") == 0))
            def _():  # the interpreter runs the programs one after another, this one first
                refs[11][...] = refs[1][...]

            kernel(*refs)
        return kernel_over_grid(copy_then_update, out_type=out_type)(*args)
    if route == "ref":  # (interpreted too on jax 0.11: the GPU's route)
        pool = jax.new_ref(state)  # the kernel reads and writes it: an aliased operand
        y = kernel_over_grid(lambda *refs: kernel(*refs, refs[1]), out_type=out_type[0])(
            *args[:1], pool, *args[2:])
        return y, jax.freeze(pool)
    gmem = pl.BlockSpec(memory_space=plgpu.GMEM)
    return pl.pallas_call(
        kernel, out_shape=out_type, grid=(b, h), in_specs=[gmem] * 10, out_specs=[gmem, gmem],
        input_output_aliases={1: 1}, compiler_params=params, name="selective_state_update_mgpu",
    )(*args)
