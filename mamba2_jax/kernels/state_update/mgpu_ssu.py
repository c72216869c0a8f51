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
import operator

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


def _dt_and_decay(dt_ref, bias_ref, A_ref, r, j, softplus, limit):
    """Row r, head j: ``dt = clip(softplus(dt + bias))`` and ``exp(dt A)``, float32 scalars."""
    dt = dt_ref[r, j] + bias_ref[j]
    if softplus:
        dt = _softplus(dt)
    if limit is not None:
        dt = jnp.minimum(jnp.maximum(dt, limit[0]), limit[1])
    return dt, jnp.exp(dt * A_ref[j])


def _new_state_and_y(s, x, Bv, Cv, D, dt, decay, z_s, has_z, cast):
    """``s' = decay s + dt x B^T`` (s [p, n] float32 in the WGMMA layout, x / D along its rows,
    B / C along its columns) and ``y = s' C + D x`` (times silu(z) from ``z_s``), float32."""
    plgpu = _plgpu()
    p, n = s.shape
    s = s * decay + (lax.broadcast_in_dim(dt * x, (p, n), [0])
                     * lax.broadcast_in_dim(Bv, (p, n), [1]))
    y = x * D + jnp.sum(s * lax.broadcast_in_dim(Cv, (p, n), [1]), axis=1)
    if has_z:
        zv = cast(z_s[...], plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
        y = y * zv / (1.0 + jnp.exp(-zv))
    return s, y


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
    dt, decay = _dt_and_decay(dt_ref, bias_ref, A_ref, r, j, softplus, limit)
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
    s, y = _new_state_and_y(s, x, Bv, Cv, D, dt, decay, z_s, has_z, cast)

    @pl.when(valid)
    def _():
        s_s[...] = s.astype(s_s.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s_s, out_ref.at[slot, j])

    y_ref.at[r, j][...] = y.astype(y_ref.dtype)

    @pl.when(valid)
    def _():
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _ssu_persistent_kernel(idx_ref, state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref,
                           bias_ref, z_ref, y_ref, out_ref, *, programs, buffers, ahead,
                           heads_per_group, softplus, limit, has_z, d_per_channel, interpret):
    """``programs`` programs walk the b * h (row, head) items, program q taking items q,
    q + programs, ...; each keeps ``buffers`` state buffers in shared memory and the copies of
    its next ``ahead`` items in flight while it updates the current one (no wave of programs
    waits for the slowest one). Every item ends with one group of copies out (the state, unless
    the row pads, and y), so the number of groups still reading shared memory says which
    buffers are free again."""
    plgpu = _plgpu()
    b, h, p = x_ref.shape
    n = state_ref.shape[-1]
    items, q = b * h, lax.axis_index("programs")
    steps = -(-items // programs)
    per_tile = 128 // jnp.dtype(state_ref.dtype).itemsize
    cast = layout_caster(interpret)
    rows, cols = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def item(t):
        w = q + t * programs
        r, j = lax.div(w, h), lax.rem(w, h)
        slot = idx_ref[jnp.minimum(r, b - 1)]
        valid = (slot >= 0) & (slot < state_ref.shape[0])
        return w, r, j, jnp.where(valid, slot, 0), valid

    def body(s_s, x_s, z_s, B_s, C_s, D_s, y_s, bars):
        def issue(t):  # item t's copies in, into buffer t % buffers
            w, r, j, slot, valid = item(t)
            k, g = lax.rem(t, buffers), lax.div(j, heads_per_group)

            @pl.when(w < items)
            def _():
                @pl.when(valid)
                def _():
                    plgpu.copy_gmem_to_smem(state_ref.at[slot, j], s_s.at[k], bars.at[k])
                copies = [(x_ref.at[r, j], x_s), (B_ref.at[r, g], B_s), (C_ref.at[r, g], C_s)]
                copies += [(z_ref.at[r, j], z_s)] if has_z else []
                copies += [(D_ref.at[j], D_s)] if d_per_channel else []
                for c, (src, dst) in enumerate(copies, start=1):
                    plgpu.copy_gmem_to_smem(src, dst.at[k], bars.at[c * buffers + k])

        for t in range(min(ahead, steps)):
            issue(t)

        def step(t, carry):
            @pl.when(t + ahead < steps)
            def _():  # item t + ahead's buffer last held item t + ahead - buffers: its copy
                # out is done once at most buffers - ahead - 1 newer groups are pending
                plgpu.wait_smem_to_gmem(buffers - ahead - 1, wait_read_only=True)
                issue(t + ahead)

            w, r, j, slot, valid = item(t)
            k = lax.rem(t, buffers)

            @pl.when(w < items)
            def _():
                dt, decay = _dt_and_decay(dt_ref, bias_ref, A_ref, r, j, softplus, limit)
                kinds = 3 + has_z + d_per_channel
                for c in range(1, kinds + 1):
                    plgpu.barrier_wait(bars.at[c * buffers + k])
                x = cast(x_s.at[k][...], rows).astype(jnp.float32)
                D = cast(D_s.at[k][...], rows) if d_per_channel else D_ref[j]
                Bv = cast(B_s.at[k][...], cols).astype(jnp.float32)
                Cv = cast(C_s.at[k][...], cols).astype(jnp.float32)

                @pl.when(valid)
                def _():
                    plgpu.barrier_wait(bars.at[k])

                s = jnp.where(valid, cast(s_s.at[k][...], plgpu.Layout.WGMMA).astype(
                    jnp.float32), 0.0)
                s, y = _new_state_and_y(s, x, Bv, Cv, D, dt, decay, z_s.at[k], has_z, cast)
                s_s.at[k][...] = s.astype(s_s.dtype)
                y_s.at[k][...] = y.astype(y_s.dtype)
                plgpu.commit_smem()

                @pl.when(valid)
                def _():  # (in the group that y's copy commits)
                    plgpu.copy_smem_to_gmem(s_s.at[k], out_ref.at[slot, j], commit_group=False)

                plgpu.copy_smem_to_gmem(y_s.at[k], y_ref.at[r, j])
            return carry

        lax.fori_loop(0, steps, step, None)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(
        body,
        plgpu.SMEM((buffers, p, n), state_ref.dtype, transforms=(
            plgpu.TilingTransform((8, per_tile)), plgpu.SwizzleTransform(128))),
        plgpu.SMEM((buffers, p), x_ref.dtype), plgpu.SMEM((buffers, p), z_ref.dtype),
        plgpu.SMEM((buffers, n), B_ref.dtype), plgpu.SMEM((buffers, n), C_ref.dtype),
        plgpu.SMEM((buffers, p), jnp.float32), plgpu.SMEM((buffers, p), y_ref.dtype),
        plgpu.Barrier(num_barriers=6 * buffers))


@functools.partial(jax.jit, static_argnames=("softplus", "limit", "interpret", "alias",
                                             "persistent", "sm_count"))
def selective_state_update_mgpu(state, x, dt, A, B, C, D, dt_bias, z, idx, *, softplus: bool,
                                limit=None, interpret: bool = False, alias: bool = True,
                                persistent=None, sm_count: int = 132):
    """``(y, new pool)``: ``pallas_ssu.selective_state_update_pallas``'s contract (D [h] or
    [h, p], dt_bias [h], z or None, idx [b] int32, ``limit`` (lo, hi) or None).

    ``persistent=(buffers, ahead, programs_per_sm)``: ``min(b h, programs_per_sm * sm_count)``
    programs walk the (row, head) items with ``buffers`` state buffers each and the copies of
    ``ahead`` items in flight (``_ssu_persistent_kernel``; 1 <= ahead < buffers); None: one
    program per item. (The jax 0.10 ``pallas_call`` route has no named grid: one program per
    item there.)

    ``alias=False`` (benchmarks only): the kernel writes a fresh pool buffer, so the slots no
    row names are undefined in it; the kernel's work is the same as in place."""
    plgpu = _plgpu()
    b, h, p = x.shape
    g, n = B.shape[1:]
    route = in_place_route()
    named_grid = interpret or not alias or route == "ref"
    common = dict(heads_per_group=h // g, softplus=softplus, limit=limit, has_z=z is not None,
                  d_per_channel=D.ndim == 2, interpret=interpret)
    if persistent is not None and named_grid:
        buffers, ahead, per_sm = persistent
        if not 1 <= ahead < buffers:
            raise ValueError(f"selective_state_update_mgpu: persistent needs 1 <= ahead < "
                             f"buffers, got {persistent}")
        programs = min(b * h, per_sm * sm_count)
        kernel = functools.partial(_ssu_persistent_kernel, programs=programs, buffers=buffers,
                                   ahead=ahead, **common)
        grid, grid_names = (programs,), ("programs",)
    else:
        kernel = functools.partial(_ssu_kernel, named_grid=named_grid, **common)
        grid, grid_names = (b, h), ("rows", "heads")
    out_type = (jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct(state.shape, state.dtype))
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)
    args = (idx, state, x, dt.astype(jnp.float32), A.astype(jnp.float32), B, C,
            D.astype(jnp.float32), dt_bias.astype(jnp.float32), x if z is None else z)
    kernel_over_grid = functools.partial(plgpu.kernel, grid=grid, grid_names=grid_names,
                                         compiler_params=params,
                                         interpret=interpret_params(interpret))
    if not alias:
        return kernel_over_grid(kernel, out_type=out_type)(*args)
    if interpret and route != "ref":
        # jax 0.10's interpreter runs a multi-program pallas_call wrong (every program after
        # the first loses its outputs), and its plgpu.kernel takes no jax.new_ref: the
        # interpreted kernel copies the pool in and returns it whole (unnamed slots included).
        def copy_then_update(*refs):
            @pl.when(functools.reduce(operator.and_, [lax.axis_index(a) == 0
                                                      for a in grid_names]))
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
