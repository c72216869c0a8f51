"""Static look at the decode step's Triton kernels without a GPU: registers, spills, and the
global-memory round trips a warp waits through, from SASS built offline for sm_90.

    python scripts/sass_phases.py --triton-python /path/to/venv/bin/python \
        --out benchmarks/results/sass_phases_sm90_offline.json

Each kernel of the Mamba2-2.7B decode step (``kernels/mixer_step`` as the folded step calls it,
with and without ``loads_first`` and the gated sums of squares, at b = 1 and 16:
``STEP_KERNELS``; ``gemv.residual_gemv`` for in_proj at b = 1) is lowered for "cuda" by this
process's jax (the CPU is enough), its Triton IR taken from the custom call, and compiled by
pip Triton (``--triton-python``: an interpreter that imports triton, e.g. a venv with
``pip install triton==3.6.0``) for sm_90 with the launch's num_warps / num_stages; ``ptxas -v``
gives registers and spills, ``cuobjdump -sass`` the listing.

Round trips (``round_trips``): a warp issues in order, so a run of global loads (LDG) ends where
an instruction reads a register one of them wrote; the count is the runs that issue a load,
one pass over the listing (a loop body counted once; ``LDGSTS`` async copies are not loads
here: they are waited on by DEPBAR). Each run costs about one memory latency, so in a
latency-bound launch (a batch-1 decode step) fewer runs should mean a shorter kernel. This
is a model: the GPU's compiler (XLA's Triton and ptxas) is not pip Triton's, and only a
timing on the GPU says what a launch costs (``bench_decode.py --mixer-step``,
``profile_decode.py``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import MIXER_STEP_SHAPE  # noqa: E402

SM = 90
SM_COUNT = 132  # H100 SXM / H200: the GEMV's launch plan
COMPILE = r"""
import json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
path, warps, stages, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
k = triton.compile(path, target=GPUTarget("cuda", %d, 32),
                   options=dict(num_warps=warps, num_stages=stages))
open(out + ".ptx", "w").write(k.asm["ptx"])
open(out + ".cubin", "wb").write(k.asm["cubin"])
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = subprocess.run([os.path.join(tools, "ptxas"), "-arch=sm_%da", "-v", out + ".ptx",
                        "-o", os.devnull], capture_output=True, text=True, check=True)
sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", out + ".cubin"],
                      capture_output=True, text=True, check=True).stdout
print(json.dumps(dict(triton=triton.__version__, ptxas=ptxas.stderr, sass=sass)))
""" % (SM, SM)


def _unescape(s: str) -> bytes:
    """An MLIR string attribute's bytes (``\\XX`` hex escapes, ``\\\\`` and ``\\"``)."""
    out, i = bytearray(), 0
    while i < len(s):
        if s[i] == "\\":
            if s[i + 1] in '\\"':
                out.append(ord(s[i + 1]))
                i += 2
            else:
                out.append(int(s[i + 1:i + 3], 16))
                i += 3
        else:
            out += s[i].encode()
            i += 1
    return bytes(out)


def triton_kernels(lowered_text: str) -> list[dict]:
    """Each Triton custom call of a lowered (StableHLO) module: its Triton IR as text (no
    debug locations) and its launch's num_warps / num_stages."""
    from jax._src.lib import triton as jax_triton
    from jax._src.lib.mlir import ir

    kernels = []
    for m in re.finditer(r'ir = "((?:[^"\\]|\\.)*)"(.*?)\}', lowered_text):
        with ir.Context() as ctx:
            jax_triton.dialect.register_dialect(ctx)
            text = ir.Module.parse(_unescape(m.group(1))).operation.get_asm(
                enable_debug_info=False)
        launch = {k: int(v) for k, v in re.findall(r"(num_warps|num_stages) = (\d+)",
                                                    m.group(2))}
        kernels.append(dict(ttir=text, **launch))
    return kernels


def _instructions(sass: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", sass)]


def _unguarded(ins: str) -> str:
    """An instruction without its predicate guard (``@P0``, ``@!UP1``)."""
    return re.sub(r"^@!?U?P\w+\s+", "", ins)


def round_trips(instructions: list[str]) -> tuple[list[int], int | None]:
    """Loads (LDG) per run of the in-order model in the module docstring, and how many runs
    had ended (waits on a load) before the first async copy (LDGSTS; None: none)."""
    runs, pending, open_run, waits, async_after = [], set(), False, 0, None
    for ins in instructions:
        op, _, rest = _unguarded(ins).partition(" ")
        operands = [o.strip() for o in rest.split(",")]
        writes_first = not op.startswith(("ST", "BAR", "RED", "ATOM"))
        read = ",".join(operands[1:]) if writes_first else rest
        if pending & {int(r) for r in re.findall(r"\bR(\d+)", read)}:
            pending.clear()
            open_run = False
            waits += 1
        if op.startswith("LDGSTS") and async_after is None:
            async_after = waits
        if re.match(r"LDG(\.|$)", op):  # (not LDGSTS, LDGDEPBAR)
            dst = re.match(r"R(\d+)", operands[0])
            width = {"64": 2, "128": 4}.get((re.search(r"\.(64|128)\b", op) or [0, ""])[1], 1)
            if dst:
                pending |= set(range(int(dst.group(1)), int(dst.group(1)) + width))
            if not open_run:
                runs.append(0)
                open_run = True
            runs[-1] += 1
    return runs, async_after


def summarize(ptxas: str, sass: str) -> dict:
    ins = _instructions(sass)
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    runs, async_after = round_trips(ins)
    count = lambda pat: sum(bool(re.match(pat, _unguarded(i))) for i in ins)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_bytes=(int(spills.group(1)) + int(spills.group(2))) if spills else None,
                instructions=len(ins), LDG=count(r"LDG(\.| )"), LDGSTS=count(r"LDGSTS"),
                BAR=count(r"BAR\."), round_trips=len(runs), loads_per_round_trip=runs,
                waits_before_first_async_copy=async_after)


# name: (rows b, the gated squares out, loads_first, block_p (None: the kernel's default))
STEP_KERNELS = {
    "mixer_step": (1, True, False, None),  # the folded step's call at b = 1 (16-row blocks)
    "mixer_step_loads_first": (1, True, True, None),
    "mixer_step_no_squares": (1, False, False, None),
    "mixer_step_no_squares_loads_first": (1, False, True, None),
    "mixer_step_block32_loads_first_uncapped": (1, True, True, 32),  # LOADS_FIRST_MAX_BLOCK_P
    # lifted for this one
    "mixer_step_b16": (16, True, False, None),  # (64-row blocks)
    "mixer_step_b16_block16": (16, True, False, 16),
    "mixer_step_b16_block16_loads_first": (16, True, True, 16),
}


def decode_kernels() -> dict:
    """name -> lowered text of the 2.7B decode-step kernels (STEP_KERNELS and in_proj's
    residual_gemv at b = 1)."""
    import jax
    import jax.numpy as jnp

    import mamba2_jax.kernels.mixer_step.pallas_step as pallas_step
    from mamba2_jax.kernels.gemv.pallas_gemv import plan, residual_gemv_call

    S, f32, bf16 = jax.ShapeDtypeStruct, jnp.float32, jnp.bfloat16
    h, p, g, n = (MIXER_STEP_SHAPE[key] for key in ("heads", "head_dim", "groups", "state_size"))
    k, d = 4, 2560  # conv kernel, hidden size
    i, c = h * p, h * p + 2 * g * n
    lower = lambda fn, args: jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    out, cap = {}, pallas_step.LOADS_FIRST_MAX_BLOCK_P
    for name, (b, squares, first, block_p) in STEP_KERNELS.items():
        args = [S((8, b, i + c + h), f32), S((b, c, k - 1), bf16), S((c, k), bf16),
                S((c,), bf16), S((b, h, p, n), f32), S((h,), f32), S((h,), f32),
                S((h,), f32), S((b, 8), f32), S((i,), bf16)]
        step = pallas_step.mixer_step_pallas  # (unjitted: the cap is read at each trace)
        fn = functools.partial(getattr(step, "__wrapped__", step), **MIXER_STEP_SHAPE,
                               zx_dtype="bfloat16",
                               sum_squares=squares, in_count=float(d), in_eps=1e-5,
                               a_is_log=True, loads_first=first, block_p=block_p)
        pallas_step.LOADS_FIRST_MAX_BLOCK_P = p if name.endswith("_uncapped") else cap
        try:
            out[name] = lower(fn, args)
        finally:
            pallas_step.LOADS_FIRST_MAX_BLOCK_P = cap
    gemv_args = [S((1, d), f32), S((d,), bf16), S((d, i + c + h), bf16), S((1, d), bf16),
                 S((1, 320), f32)]
    fn = functools.partial(residual_gemv_call, p=plan(1, d, i + c + h, method="dot",
                                                      sm_count=SM_COUNT),
                           delta_count=i, delta_eps=1e-5, in_dtype=bf16)
    out["residual_gemv"] = lower(fn, gemv_args)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton-python", default=sys.executable,
                    help="a Python that imports triton (pip triton bundles ptxas)")
    ap.add_argument("--out", default=None, help="a JSON file for the results")
    args = ap.parse_args()
    try:
        subprocess.run([args.triton_python, "-c", "import triton"], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        ap.error(f"--triton-python {args.triton_python!r} cannot import triton (a venv with "
                 "pip install triton==3.6.0 will do)")
    import jax

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in decode_kernels().items():
            (kernel,) = triton_kernels(text)
            path = Path(tmp) / f"{name}.ttir"
            path.write_text(kernel["ttir"])
            done = subprocess.run([args.triton_python, "-c", COMPILE, str(path),
                                   str(kernel.get("num_warps", 4)),
                                   str(kernel.get("num_stages", 1)), str(Path(tmp) / name)],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: the offline compile failed:\n{done.stderr[-2000:]}")
            built = json.loads(done.stdout.strip().splitlines()[-1])
            rows[name] = dict(summarize(built["ptxas"], built["sass"]),
                              num_warps=kernel.get("num_warps"),
                              num_stages=kernel.get("num_stages"))
            print(name, json.dumps(rows[name]), flush=True)
    result = dict(target=f"sm_{SM}a", date=datetime.date.today().isoformat(),
                  jax=jax.__version__, triton=built["triton"],
                  model=("in-order issue: runs of LDG ended by a read of a loaded register; "
                         "a loop body counted once; LDGSTS not counted"),
                  kernels=rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
