"""scripts/sass_phases.py's readers: the in-order round-trip model over a SASS listing, the
ptxas summary, and the Triton IR taken from a kernel lowered for "cuda" (no GPU, no triton)."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from sass_phases import round_trips, summarize, triton_kernels  # noqa: E402

LISTING = """
        /*0000*/                   LDG.E R4, desc[UR6][R2.64] ;                 /* 0x0 */
        /*0010*/                   LDG.E.64 R6, desc[UR6][R2.64+0x10] ;         /* 0x0 */
        /*0020*/                   FADD R8, R7, R1 ;                            /* 0x0 */
        /*0030*/                   LDG.E R9, desc[UR6][R2.64+0x20] ;            /* 0x0 */
        /*0040*/              @P0  LDG.E R10, desc[UR6][R2.64+0x30] ;           /* 0x0 */
        /*0050*/                   FMUL R11, R4, R1 ;                           /* 0x0 */
        /*0060*/                   LDGDEPBAR ;                                  /* 0x0 */
        /*0070*/                   FADD R12, R10, R1 ;                          /* 0x0 */
        /*0080*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR6][R2.64] ; /* 0x0 */
        /*0090*/                   STG.E desc[UR6][R2.64], R9 ;                 /* 0x0 */
        /*00a0*/                   LDG.E R13, desc[UR6][R2.64+0x40] ;           /* 0x0 */
        /*00b0*/                   STG.E desc[UR6][R2.64], R13 ;                /* 0x0 */
"""


def test_round_trips_follow_the_reads_of_loaded_registers():
    from sass_phases import _instructions

    ins = _instructions(LISTING)
    assert len(ins) == 12 and ins[4].startswith("@P0")
    # run 1: R4, R6-R7 (the 64-bit load's R7 read by FADD R8); run 2: R9, R10 (R4 was waited
    # for already: FMUL is no wait; FADD R12 reads R10); the async copy after 2 waits; run 3:
    # R13 (read by STG)
    assert round_trips(ins) == ([2, 2, 1], 2)
    assert round_trips(ins[:3]) == ([2], None)


def test_summary_reads_ptxas_and_counts_the_listing():
    ptxas = ("ptxas info    : Function properties for k\n"
             "    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
             "ptxas info    : Used 120 registers, used 1 barriers\n")
    s = summarize(ptxas, LISTING)
    assert (s["registers"], s["spill_bytes"], s["instructions"]) == (120, 12, 12)
    assert (s["LDG"], s["LDGSTS"], s["BAR"], s["round_trips"]) == (5, 1, 0, 3)


def test_triton_ir_of_a_kernel_lowered_for_cuda():
    from mamba2_jax.kernels.mixer_step.pallas_step import mixer_step_pallas

    S, f32, bf16 = jax.ShapeDtypeStruct, jnp.float32, jnp.bfloat16
    h, p, n, k = 4, 16, 16, 4
    i, c = h * p, h * p + 2 * n
    args = [S((1, i + c + h), bf16), S((1, c, k - 1), bf16), S((c, k), bf16), S((c,), bf16),
            S((1, h, p, n), f32), S((h,), f32), S((h,), f32), S((h,), f32)]
    fn = functools.partial(mixer_step_pallas, heads=h, head_dim=p, groups=1, state_size=n)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    (kernel,) = triton_kernels(text)
    assert (kernel["num_warps"], kernel["num_stages"]) == (4, 1)
    assert "tt.func" in kernel["ttir"] and "tt.load" in kernel["ttir"]
    assert "loc(" not in kernel["ttir"]  # printed without debug locations
