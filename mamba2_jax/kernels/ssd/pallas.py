"""SSD through the Pallas kernels: layout, supported shapes, and the custom VJP.

The forward runs the kernels of ``pallas_fwd.py`` (chunk states, state passing, chunk outputs)
on the chunk layout of ``layout.py``; the backward runs those of ``pallas_bwd.py``. The
``custom_vjp`` sits once, on the chunk-layout core (``_core``); the XLA glue around it (dt
processing, the chunk layout, final and chunk states) is differentiated by JAX.
``SSDKernelConfig(backward="xla")`` selects the named fallback instead: ``jax.vjp`` of the
pure-JAX reference (a recompute), for comparison and as an escape hatch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mamba2_jax.kernels.common import check_pow2, process_dt, with_reference_gradient
from mamba2_jax.kernels.ssd.decays import DECAYS_LAUNCH
from mamba2_jax.kernels.ssd.layout import ChunkPlan
from mamba2_jax.kernels.ssd.pallas_bwd import ssd_backward_chunked, which_dc_kernel
from mamba2_jax.kernels.ssd.pallas_fwd import OUTPUT_KERNELS, ssd_forward_chunked
from mamba2_jax.kernels.ssd.reference import ssd_chunk_scan_ref

BACKWARDS = ("pallas", "xla")  # SSDKernelConfig.backward: Pallas kernels, or the XLA fallback
DECAYS = ("pallas", "xla")  # SSDKernelConfig.decays (see ssd_forward_chunked)


@dataclasses.dataclass(frozen=True)
class SSDKernelConfig:
    """Static settings of one Pallas SSD call (block sizes and launch parameters)."""

    chunk_size: int
    dt_softplus: bool = False
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    block_m: int = 64  # rows of y per block of the output kernel
    block_n: int | None = 32  # columns per step of the output kernel (None: block_m; H200: 32)
    block_k: int = 32  # tokens per step when accumulating a chunk's state
    block_p: int | None = None  # head-dim columns per program of the state kernels (None: all)
    pass_block_p: int | None = 4  # head-dim rows per program of both state passes (None: all p)
    row_blocks: int = 4  # row blocks per program of the output kernel (4: a 256-chunk each)
    num_warps: int = 4
    num_stages: int = 3
    out_num_warps: int | None = None  # the output kernel's launch (None: num_warps)
    out_num_stages: int | None = None  # (None: num_stages)
    out_kernel: str = "mgpu"  # the Mosaic GPU output kernel (mgpu_output.py) on the calls it
    #                          takes (bf16 dense batches on Hopper), else "triton"; H200 fwd ms
    #                          0.334 / 0.614 / 0.487 / 2.328 against 0.377 / 0.705 / 0.573 / 2.693
    chunk_states: bool = False  # also return the float32 state after every chunk
    decays: str = "pallas"  # the decay terms: their Pallas kernel, or "xla" (its twin)
    decays_heads: int = DECAYS_LAUNCH[0]  # at most this many heads per decays program
    decays_num_warps: int = DECAYS_LAUNCH[1]
    backward: str = "pallas"  # "pallas" kernels, or "xla": jax.vjp of the reference (fallback)
    bwd_block_m: int = 64  # rows / columns per block of the backward kernels
    bwd_dx_block_n: int | None = 32  # rows per step of the dx/dB kernel (None: bwd_block_m)
    bwd_dc_block_n: int | None = None  # columns per step of the dC kernel (None: bwd_block_m)
    bwd_heads: int = 4  # at most this many heads (of one group) per dx/dB and dC program
    bwd_dc_kernel: str = "mgpu"  # the Mosaic GPU dC kernel (mgpu_dc.py) on the calls it takes
    #                             (bf16 dense batches on Hopper, n <= 128), else "triton"
    bwd_dc_heads: int = 8  # at most this many heads per program of the Mosaic GPU dC kernel
    #                        (H200 ms, 4 / 8: 0.267 / 0.267, 0.538 / 0.467, 0.408 / 0.363)
    bwd_fused_dD: bool = True  # without a gate, dD from partial sums of the dx/dB kernel (H200:
    #                            1.442 vs 1.473, 2.776 vs 2.787, 2.229 vs 2.247 ms fwd+bwd)
    bwd_num_warps: int = 4
    bwd_num_stages: int = 1  # fastest in the H200 sweep (2.18 vs 2.26 ms fwd+bwd with 2)
    interpret: bool = False

    def __post_init__(self):
        if self.backward not in BACKWARDS:
            raise ValueError(f"SSDKernelConfig.backward must be one of {BACKWARDS}, "
                             f"got {self.backward!r}")
        for name in ("dt_softplus", "chunk_states", "bwd_fused_dD", "interpret"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SSDKernelConfig: {name} must be a bool, got "
                                 f"{getattr(self, name)!r}")
        for name in ("out_kernel", "bwd_dc_kernel"):
            if getattr(self, name) not in OUTPUT_KERNELS:
                raise ValueError(f"SSDKernelConfig.{name} must be one of {OUTPUT_KERNELS}, got "
                                 f"{getattr(self, name)!r}")
        if self.decays not in DECAYS:
            raise ValueError(f"SSDKernelConfig.decays must be one of {DECAYS}, got "
                             f"{self.decays!r}")
        # Blocks tile the chunk exactly (a block that does not divide it leaves rows unwritten);
        # Triton dots need sides >= 16.
        for name in ("block_m", "block_k", "bwd_block_m") + tuple(
                v for v in ("block_n", "block_p", "bwd_dx_block_n", "bwd_dc_block_n")
                if getattr(self, v) is not None):
            if check_pow2(name, getattr(self, name), op="SSDKernelConfig") < 16:
                raise ValueError(f"SSDKernelConfig: {name} must be >= 16, got "
                                 f"{getattr(self, name)}")
        for name in ("row_blocks", "num_warps", "bwd_num_warps", "decays_heads",
                     "decays_num_warps") + tuple(
                v for v in ("pass_block_p", "out_num_warps")  # no dots: any power of two
                if getattr(self, v) is not None):
            check_pow2(name, getattr(self, name), op="SSDKernelConfig")
        for name in ("bwd_heads", "bwd_dc_heads"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"SSDKernelConfig: {name} must be a positive int, got "
                                 f"{getattr(self, name)!r}")


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def pallas_unsupported(x, B, chunk_size: int) -> str | None:
    """Why the Pallas kernels cannot take these shapes (None when they can)."""
    p, n = x.shape[-1], B.shape[-1]
    if not (_pow2(p) and 16 <= p <= 128):
        return f"head_dim p={p} is not a power of two in [16, 128]"
    if not (_pow2(n) and 16 <= n <= 256):
        return f"state size n={n} is not a power of two in [16, 256]"
    if not 16 <= chunk_size <= 256:
        return f"chunk_size={chunk_size} is outside [16, 256]"
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"dtype {x.dtype} is not bf16/fp16/fp32"
    return None


def decays_launch(cfg: SSDKernelConfig) -> tuple[int, int]:
    """The decays kernel's (max heads per program, num_warps) that ``cfg`` sets."""
    return cfg.decays_heads, cfg.decays_num_warps


def _forward_kwargs(cfg: SSDKernelConfig, p: int) -> dict:
    return dict(
        chunk_size=cfg.chunk_size, block_m=min(cfg.block_m, cfg.chunk_size),
        block_n=cfg.block_n,  # the kernels clamp steps to their blocks
        block_k=min(cfg.block_k, cfg.chunk_size),
        block_p=None if cfg.block_p is None else min(cfg.block_p, p),
        pass_block_p=cfg.pass_block_p,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, out_num_warps=cfg.out_num_warps,
        out_num_stages=cfg.out_num_stages, row_blocks=cfg.row_blocks, decays=cfg.decays,
        out_kernel=cfg.out_kernel,
        decays_launch=decays_launch(cfg), interpret=cfg.interpret)


def backward_kwargs(cfg: SSDKernelConfig) -> dict:
    """The keyword arguments of ``ssd_backward_chunked`` that ``cfg`` sets."""
    return dict(
        chunk_size=cfg.chunk_size, block_m=cfg.bwd_block_m, dx_block_n=cfg.bwd_dx_block_n,
        dc_block_n=cfg.bwd_dc_block_n, block_k=cfg.block_k, heads=cfg.bwd_heads,
        pass_block_p=cfg.pass_block_p, fused_dD=cfg.bwd_fused_dD, num_warps=cfg.bwd_num_warps,
        num_stages=cfg.bwd_num_stages, decays=cfg.decays, decays_launch=decays_launch(cfg),
        dc_kernel=cfg.bwd_dc_kernel, dc_heads=cfg.bwd_dc_heads, interpret=cfg.interpret)


def _core_primal(cfg, dense, x, dt, A, B, C, D, z, h0, is_first, init_index):
    # Without a gradient the output kernel is the only reader of every chunk's state: unless
    # they are returned, the pass writes them in the operand dtype (the kernel rounds them to it).
    y, end, final = ssd_forward_chunked(x, dt, A, B, C, D, z, h0, is_first, init_index,
                                        full_states=cfg.chunk_states, dense=dense,
                                        **_forward_kwargs(cfg, x.shape[-1]))
    return y, final, end if cfg.chunk_states else None


def _core_fwd(cfg, dense, x, dt, A, B, C, D, z, h0, is_first, init_index):
    # with a gate, also the output before it (dz needs it); the decay terms, which the
    # backward reads again; and for the Mosaic GPU dC kernel the states in bf16
    mgpu_dc = which_dc_kernel(cfg.bwd_dc_kernel, x, B, cfg.chunk_size, dense,
                              cfg.interpret) == "mgpu"
    outs = ssd_forward_chunked(x, dt, A, B, C, D, z, h0, is_first, init_index,
                               return_pre_gate=z is not None, return_decays=True,
                               return_operand_states=mgpu_dc, dense=dense,
                               **_forward_kwargs(cfg, x.shape[-1]))
    y, end, final, *rest = outs[:-1] if mgpu_dc else outs
    pre, dec = rest if z is not None else (None, rest[0])
    end_operand = outs[-1] if mgpu_dc else None
    out = (y, final, end if cfg.chunk_states else None)
    dec = dec._replace(w=None)  # the backward never reads w
    return out, (x, dt, A, B, C, D, z, h0, is_first, init_index, pre, end, dec, end_operand)


def _core_bwd(cfg, dense, res, cotangents):
    x, dt, A, B, C, D, z, h0, is_first, init_index, pre, end, dec, end_operand = res
    dy, dfinal, dchunks = cotangents
    dx, ddt, dA, dB, dC, dD, dz, dh0 = ssd_backward_chunked(
        x, dt, A, B, C, D, z, h0, is_first, init_index, pre, end, dy, dfinal, dchunks, dec,
        end_operand, dense=dense, **backward_kwargs(cfg))
    return dx, ddt, dA, dB, dC, dD, dz, dh0, None, None


# _core(cfg, dense, x, dt, A, B, C, D, z, h0, is_first, init_index) -> (y, final states, every
# chunk's end state or None) on the chunk layout, forward and backward through the Pallas
# kernels; ``dense``: no packed varlen input (row r is one sequence, from h0[r]).
_core = jax.custom_vjp(_core_primal, nondiff_argnums=(0, 1))
_core.defvjp(_core_fwd, _core_bwd)


def _forward(cfg: SSDKernelConfig, x, dt, A, B, C, D, z, dt_bias, h0, cu_seqlens):
    b, l, h, p = x.shape
    n = B.shape[-1]
    m = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    plan = ChunkPlan(b, l, cfg.chunk_size, cu_seqlens)
    dtp = process_dt(dt, dt_bias, cfg.dt_softplus, cfg.dt_limit)
    h0f = jnp.zeros((m, h, p, n), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    y, final, end = _core(
        cfg, cu_seqlens is None, plan.to_chunks(x), plan.to_chunks(dtp), A.astype(jnp.float32),
        plan.to_chunks(B.astype(x.dtype)), plan.to_chunks(C.astype(x.dtype)),
        jnp.zeros((h,), jnp.float32) if D is None else D.astype(jnp.float32),
        None if z is None else plan.to_chunks(z.astype(x.dtype)), h0f,
        plan.is_first.astype(jnp.int32), plan.init_index.astype(jnp.int32))
    chunks = None if end is None else plan.chunk_states(end)
    return plan.from_chunks(y), plan.final_or_initial(final, h0f), chunks


def _reference(cfg, x, dt, A, B, C, D, z, dt_bias, h0, cu_seqlens):
    out = ssd_chunk_scan_ref(
        x, dt, A, B, C, chunk_size=cfg.chunk_size, D=D, z=z, dt_bias=dt_bias,
        dt_softplus=cfg.dt_softplus, dt_limit=cfg.dt_limit, initial_states=h0,
        cu_seqlens=cu_seqlens, return_final_states=True, return_chunk_states=cfg.chunk_states)
    return out if cfg.chunk_states else (*out, None)


_with_xla_backward = with_reference_gradient(_forward, _reference)


def ssd_pallas(cfg: SSDKernelConfig, x, dt, A, B, C, D, z, dt_bias, h0, cu_seqlens):
    """(y, final_states, chunk_states) from the Pallas kernels (chunk_states None unless
    ``cfg.chunk_states``); differentiable, through the Pallas backward
    (``cfg.backward == "pallas"``) or the XLA-reference fallback ("xla")."""
    if cfg.backward == "xla":
        return _with_xla_backward(cfg, x, dt, A, B, C, D, z, dt_bias, h0, cu_seqlens)
    return _forward(cfg, x, dt, A, B, C, D, z, dt_bias, h0, cu_seqlens)
