"""Benchmark the decode-step selective state update on a GPU: ours (Pallas, in place on a donated
pool) against mamba_ssm's Triton ``selective_state_update``, same inputs, same timer, same process.

    python scripts/bench_decode.py --peers .peers --out benchmarks/results

Timer: as ``bench_kernels.py`` (wall clock around back-to-back calls + sync, median), plus, for
mamba_ssm, the replay of a captured CUDA graph. Achieved state bandwidth = 2 x (state bytes of
the b rows) / time, reported against the measured copy bandwidth. The device-time loop runs
ours with the default kernel and with ``kernel="mgpu"`` (the Mosaic GPU kernel in place;
``ours_mgpu_in_loop_ms``, or why it failed).

    python scripts/bench_decode.py --conv --out benchmarks/results

``--conv`` runs only the decode conv update instead: ours (Pallas, in place on a donated pool)
against our XLA reference (``impl="xla"``, also jitted with the pool donated); mamba_ssm's conv
update is a CUDA extension, not a Triton kernel, so it is not a peer here. Achieved bandwidth =
(pool bytes of the b rows read + written, x, y, weight and bias bytes) / time. Writes
``conv_update_<device>.json``.

    python scripts/bench_decode.py --conv-prefill --out benchmarks/results

``--conv-prefill`` runs only the prefill ``causal_conv1d`` instead: ours (``impl="pallas"``)
against our XLA reference (``impl="xla"``), both jitted, bf16, c=5376, k=4, dense b=1 l=8192,
b=4 l=4096 and packed varlen (4 sequences, 8192 tokens), each without states and with initial
states in + final states out. Our kernel is also timed at a few (block_t, block_c, num_warps)
configurations; the default one and the best are reported. Achieved bandwidth = (x read + y
written + weight and bias + initial states read + final states written) / time, against the
measured copy bandwidth. Writes ``conv_prefill_<device>.json``. (``--smoke``, hidden: tiny
shapes, interpret mode, runs on the CPU.)

    python scripts/bench_decode.py --ssu-sweep "64:4,32:4,16:2,mgpu" --out benchmarks/results

``--ssu-sweep`` times only our state-update kernels, the Triton one at each
``block_p:num_warps`` given and (``mgpu``) the Mosaic GPU one, at every batch of the table, as
the main table's device time (``mgpu_fresh``: the Mosaic GPU kernel writing a fresh pool
buffer instead of in place, the slots no row names left undefined: the kernel's own time where
the in-place call cannot lower) (32 updates straight-line in one compiled program, the pool
donated), against the measured copy bandwidth. Writes ``ssu_sweep_<device>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import ceilings, cuda_graph, timeit  # noqa: E402

SHAPES = [(h, p, g, n, b) for (h, p, g, n) in ((80, 64, 1, 128), (128, 64, 8, 128))
          for b in (1, 64, 256)]
CONV_SHAPES = [(5376, 4, b) for b in (1, 64, 256)]  # (channels c, width k, batch b), bf16
# Prefill conv: (name, b, l, cu_seqlens or None), c=5376, k=4, bf16.
PREFILL_SHAPES = [("dense", 1, 8192, None), ("dense", 4, 4096, None),
                  ("varlen", 1, 8192, (0, 1000, 1003, 5000, 8192))]
PREFILL_C, PREFILL_K = 5376, 4
# --ssu-sweep's named configs: the Mosaic GPU kernel's keywords (mgpu_fresh: a fresh pool buffer)
MGPU_SWEEP = {"mgpu": {}, "mgpu_fresh": {"alias": False}}
# Kernel configurations tried for ours: (block_t, block_c, num_warps); the first is the default.
PREFILL_CONFIGS = [(32, 256, 4), (16, 256, 4), (64, 128, 4), (64, 256, 8), (32, 128, 4),
                   (128, 64, 4)]


def parse_configs(value: str, names) -> list:
    """','-separated block_p:num_warps pairs (powers of two, block_p <= 64: the head dim) or
    named configs; a ValueError says which item is wrong."""
    configs = []
    for c in (c.strip() for c in value.split(",")):
        if c in names:
            configs.append(c)
            continue
        try:
            pair = tuple(int(v) for v in c.split(":"))
        except ValueError:
            pair = ()
        if len(pair) != 2 or any(v < 1 or v & (v - 1) for v in pair) or pair[0] > 64:
            raise ValueError(f"{c!r} is not block_p:num_warps with powers of two and block_p "
                             f"<= 64 (the head dim), nor one of {', '.join(names)}")
        configs.append(pair)
    return configs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default=".peers")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--conv", action="store_true",
                    help="benchmark the conv1d update (ours vs XLA) instead of the state update")
    ap.add_argument("--conv-prefill", action="store_true",
                    help="benchmark the prefill causal_conv1d (ours vs XLA) instead")
    ap.add_argument("--ssu-sweep", default=None,
                    help="time our state update kernels at these block_p:num_warps (and 'mgpu': "
                         "the Mosaic GPU kernel), ','-separated")
    ap.add_argument("--mixer-step", default=None,
                    help="time the fused decode step (kernels/mixer_step) at these "
                         "block_p:num_warps ('default': its launch rule) against the unfused "
                         "ops through XLA ('xla'), and with the folded step's inputs added "
                         f"one at a time ({', '.join(FOLDED_INPUTS)}; folded_loads_first: "
                         "the model's call with every load first), ','-separated")
    # CPU smoke test of --conv-prefill: tiny shapes, the kernel in interpret mode.
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag, names in (("ssu_sweep", MGPU_SWEEP), ("mixer_step", MIXER_STEP_NAMED)):
        if getattr(args, flag) is not None:
            try:
                setattr(args, flag, parse_configs(getattr(args, flag), names))
            except ValueError as e:
                ap.error(f"--{flag.replace('_', '-')}: {e}")
    return args


def conv_bytes(b, c, k, itemsize=2):
    """Bytes one conv update must move: the b named pool rows read and written, x in, y out,
    weight and bias (each once)."""
    return (2 * b * c * (k - 1) + 2 * b * c + c * k + c) * itemsize


def bench_conv(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mamba2_jax.kernels.conv1d import causal_conv1d_update

    try:  # the copy-bandwidth ceiling is measured with torch when it is there
        import torch

        bandwidth = ceilings(torch)[0] if torch.cuda.is_available() else None
    except ImportError:
        bandwidth = None
    device = jax.devices()[0].device_kind
    jsync = lambda out: jax.block_until_ready(out) if out is not None else None
    rows = []
    for c, k, b in CONV_SHAPES:
        rng = np.random.default_rng(0)
        slots = 2 * b
        f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
        x, weight, bias, pool0 = f(b, c), f(c, k), f(c), f(slots, c, k - 1)
        idx = jnp.asarray(rng.permutation(slots)[:b], jnp.int32)
        row = dict(shape=dict(c=c, k=k, b=b, slots=slots), dtype="bfloat16")
        outs = {}
        for impl in ("pallas", "xla"):
            step = jax.jit(functools.partial(causal_conv1d_update, activation="silu", impl=impl),
                           donate_argnums=1)
            box = [jnp.array(pool0)]  # a private copy, updated in place step after step

            def run(step=step, box=box):
                y, box[0] = step(x, box[0], weight, bias, conv_state_indices=idx)
                return y

            outs[impl] = (run(), jnp.array(box[0]))
            name = "ours" if impl == "pallas" else "xla"
            row[f"{name}_ms"] = timeit(run, jsync, iters=100, reps=7)
            row[f"{name}_GBps"] = conv_bytes(b, c, k) / (row[f"{name}_ms"] * 1e-3) / 1e9
            if bandwidth:
                row[f"{name}_bandwidth_fraction"] = row[f"{name}_GBps"] * 1e9 / bandwidth
        (y_p, pool_p), (y_x, pool_x) = outs["pallas"], outs["xla"]
        y_p, y_x = y_p.astype(jnp.float32), y_x.astype(jnp.float32)
        row["first_step_rel_err"] = float(jnp.linalg.norm(y_p - y_x) / jnp.linalg.norm(y_x))
        row["first_step_pool_equal"] = bool(jnp.array_equal(pool_p, pool_x))
        rows.append(row)
        print(json.dumps(row))

    result = dict(op="causal_conv1d_update", device=device, date=datetime.date.today().isoformat(),
                  jax=jax.__version__, copy_bandwidth_Bps=bandwidth, dtype="bfloat16",
                  bytes="2*b*c*(k-1) pool + 2*b*c x/y + c*k weight + c bias, x 2 bytes",
                  timer="wall clock over back-to-back jitted calls (pool donated) + sync, median",
                  rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("conv_update_" + device.replace(" ", "_") + ".json")).write_text(
        json.dumps(result, indent=2))
    print("| c, k | b | XLA µs | ours µs | ours GB/s | ours / copy bw |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        s = r["shape"]
        frac = r.get("ours_bandwidth_fraction")
        print(f"| {s['c']}, {s['k']} | {s['b']} | {r['xla_ms'] * 1e3:.1f} "
              f"| {r['ours_ms'] * 1e3:.1f} | {r['ours_GBps']:.0f} "
              f"| {'n/a' if frac is None else f'{frac:.0%}'} |")


def conv_prefill_bytes(t, c, k, nseq, states, itemsize=2):
    """Bytes one prefill conv must move: x in, y out (t tokens), weight and bias, and with
    ``states`` the initial states read and the final states written ([nseq, c, k-1] each)."""
    return (2 * t * c + c * k + c + (2 * nseq * c * (k - 1) if states else 0)) * itemsize


def bench_conv_prefill(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mamba2_jax.kernels.conv1d import causal_conv1d
    from mamba2_jax.kernels.conv1d.pallas_prefill import causal_conv1d_pallas

    smoke = args.smoke
    shapes, configs, c, k = PREFILL_SHAPES, PREFILL_CONFIGS, PREFILL_C, PREFILL_K
    iters, reps = 20, 7
    if smoke:  # tiny, interpret mode: checks the script runs, times mean nothing
        shapes = [("dense", 2, 19, None), ("varlen", 1, 19, (0, 2, 2, 11, 19))]
        configs, c, iters, reps = [(8, 16, 4), (16, 32, 4)], 40, 2, 2
    bandwidth = None
    if not smoke:
        try:  # the copy-bandwidth ceiling is measured with torch when it is there
            import torch

            bandwidth = ceilings(torch)[0] if torch.cuda.is_available() else None
        except ImportError:
            pass
    device = jax.devices()[0].device_kind
    jsync = lambda out: jax.block_until_ready(out) if out is not None else None
    rows = []
    for name, b, l, cu in shapes:
        rng = np.random.default_rng(0)
        f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(jnp.bfloat16)
        t = b * l
        nseq = b if cu is None else len(cu) - 1
        x = f(t, c) if cu is not None else f(b, l, c)
        weight, bias, init = f(c, k), f(c), f(nseq, c, k - 1)
        cu_arr = None if cu is None else jnp.asarray(cu, jnp.int32)
        for states in (False, True):
            row = dict(shape=dict(layout=name, b=b, l=l, c=c, k=k, nseq=nseq,
                                  cu_seqlens=None if cu is None else list(cu)),
                       dtype="bfloat16", initial_and_final_states=states)
            nbytes = conv_prefill_bytes(t, c, k, nseq, states)
            init_s = init if states else None

            def timed(fn, key, row=row, nbytes=nbytes, init_s=init_s):
                run = lambda: fn(x, weight, bias, init_s, cu_arr)
                out = run()
                row[f"{key}_ms"] = timeit(run, jsync, iters=iters, reps=reps)
                row[f"{key}_GBps"] = nbytes / (row[f"{key}_ms"] * 1e-3) / 1e9
                if bandwidth:
                    row[f"{key}_bandwidth_fraction"] = row[f"{key}_GBps"] * 1e9 / bandwidth
                return out

            xla = jax.jit(lambda x, w, bi, ini, cs: causal_conv1d(
                x, w, bi, initial_states=ini, cu_seqlens=cs, return_final_states=states,
                impl="xla"))
            ref = timed(xla, "xla")
            best, configs_ms = None, {}
            for bt, bc, nw in configs:
                ours = jax.jit(functools.partial(
                    causal_conv1d_pallas, silu=True, return_final_states=states, block_t=bt,
                    block_c=bc, num_warps=nw, interpret=smoke))
                key = f"ours_t{bt}_c{bc}_w{nw}"
                try:
                    out = timed(ours, key)
                except Exception as e:  # a configuration that does not compile or run
                    row.setdefault("ours_config_errors", {})[key] = f"{type(e).__name__}: {e}"[:200]
                    continue
                configs_ms[key] = row.pop(f"{key}_ms")
                if (bt, bc, nw) == configs[0]:  # the default configuration
                    for suffix in ("GBps", "bandwidth_fraction"):
                        if f"{key}_{suffix}" in row:
                            row[f"ours_{suffix}"] = row[f"{key}_{suffix}"]
                    row["ours_ms"] = configs_ms[key]
                    y_o, y_r = (out[0], ref[0]) if states else (out, ref)
                    y_o, y_r = y_o.astype(jnp.float32), y_r.astype(jnp.float32)
                    row["rel_err_vs_xla"] = float(jnp.linalg.norm(y_o - y_r)
                                                  / jnp.linalg.norm(y_r))
                    if states:
                        row["final_states_equal"] = bool(jnp.array_equal(out[1], ref[1]))
                for suffix in ("GBps", "bandwidth_fraction"):
                    row.pop(f"{key}_{suffix}", None)
                if best is None or configs_ms[key] < configs_ms[best]:
                    best = key
            row["ours_configs_ms"] = configs_ms
            if best is None:
                rows.append(row)
                print(json.dumps(row))
                continue
            row["ours_best_config"], row["ours_best_ms"] = best, configs_ms[best]
            row["ours_best_GBps"] = nbytes / (configs_ms[best] * 1e-3) / 1e9
            if bandwidth:
                row["ours_best_bandwidth_fraction"] = row["ours_best_GBps"] * 1e9 / bandwidth
            rows.append(row)
            print(json.dumps(row))

    result = dict(op="causal_conv1d (prefill)", device=device,
                  date=datetime.date.today().isoformat(), jax=jax.__version__,
                  copy_bandwidth_Bps=bandwidth, dtype="bfloat16", activation="silu",
                  smoke_interpret=smoke,
                  bytes="2*t*c x/y + c*k weight + c bias (+ 2*nseq*c*(k-1) states), 2 bytes",
                  default_config="block_t=%d, block_c=%d, num_warps=%d" % configs[0],
                  timer="wall clock over back-to-back jitted calls + sync, median", rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("conv_prefill_" + device.replace(" ", "_") + ".json")).write_text(
        json.dumps(result, indent=2))
    fmt = lambda v: "n/a" if v is None else f"{v:.0%}"
    print("| layout | b × l | states | XLA ms | XLA / copy bw | ours ms (default) "
          "| ours / copy bw | ours best ms (config) | best / copy bw | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["shape"]
        if "ours_ms" not in r or "ours_best_ms" not in r:
            print(f"| {s['layout']} | {s['b']} × {s['l']} | kernel failed: "
                  f"{r.get('ours_config_errors')} |")
            continue
        print(f"| {s['layout']} | {s['b']} × {s['l']} | {'in+out' if r['initial_and_final_states'] else 'none'} "
              f"| {r['xla_ms']:.3f} | {fmt(r.get('xla_bandwidth_fraction'))} "
              f"| {r['ours_ms']:.3f} | {fmt(r.get('ours_bandwidth_fraction'))} "
              f"| {r['ours_best_ms']:.3f} ({r['ours_best_config'][5:]}) "
              f"| {fmt(r.get('ours_best_bandwidth_fraction'))} | {r['rel_err_vs_xla']:.1e} |")


def time_steps(run, state: list, row: dict, config, nbytes: int, bandwidth: float,
               steps: int = 32) -> list:
    """Time ``run(*state) -> (*new state, acc)`` (jitted, the state donated, ``steps`` steps a
    call; 3 calls + sync, median of 5) into ``row["us"]`` / ``row["bandwidth_fraction"]`` under
    the config's name, or its error into ``row["errors"]`` (a config that does not compile is
    recorded, not timed). Returns the live state buffers (a failed compile donates nothing)."""
    import jax

    box = list(state)

    def call():
        *box[:], acc = run(*box)
        return acc
    key = config if isinstance(config, str) else ":".join(map(str, config))
    try:
        ms = timeit(call, lambda out: jax.block_until_ready(out) if out is not None else None,
                    iters=3, reps=5) / steps
    except Exception as e:  # noqa: BLE001
        row.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:300]
        return box
    row["us"][key] = ms * 1e3
    row["bandwidth_fraction"][key] = nbytes / (ms * 1e-3) / bandwidth
    return box


def bench_ssu_sweep(args):
    import jax
    import jax.numpy as jnp
    import torch

    from mamba2_jax.kernels.state_update.mgpu_ssu import selective_state_update_mgpu
    from mamba2_jax.kernels.state_update.pallas_ssu import selective_state_update_pallas

    bandwidth, _ = ceilings(torch)
    device = torch.cuda.get_device_name()
    configs = args.ssu_sweep
    rows = []
    for h, p, g, n, b in SHAPES:
        ks = jax.random.split(jax.random.PRNGKey(0), 8)
        slots = 2 * b
        pool = jax.random.normal(ks[0], (slots, h, p, n), jnp.float32)
        x = jax.random.normal(ks[1], (b, h, p), jnp.bfloat16)
        dt = jax.random.normal(ks[2], (b, h)) - 1.0
        A = -jax.random.uniform(ks[3], (h,)) * 4 - 0.5
        B = jax.random.normal(ks[4], (b, g, n), jnp.bfloat16)
        C = jax.random.normal(ks[5], (b, g, n), jnp.bfloat16)
        D, bias = jax.random.normal(ks[6], (h,)), jax.random.normal(ks[7], (h,))
        idx = jax.random.permutation(jax.random.PRNGKey(1), slots)[:b].astype(jnp.int32)
        row = dict(shape=dict(h=h, p=p, g=g, n=n, b=b), us={}, bandwidth_fraction={})
        for config in configs:
            if config in MGPU_SWEEP:
                update = functools.partial(selective_state_update_mgpu, **MGPU_SWEEP[config])
            else:
                update = functools.partial(selective_state_update_pallas, block_p=config[0],
                                           num_warps=config[1])

            def run(pool, update=update, steps=32):
                acc = jnp.float32(0)
                for _ in range(steps):
                    y, pool = update(pool, x, dt, A, B, C, D, bias, None, idx, softplus=True)
                    acc = acc + y[0, 0, 0].astype(jnp.float32)
                return pool, acc
            (pool,) = time_steps(jax.jit(run, donate_argnums=0), [pool], row, config,
                                 2 * b * h * p * n * 4, bandwidth)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("ssu_sweep_" + device.replace(" ", "_") + ".json")).write_text(json.dumps(dict(
        op="selective_state_update kernels: Triton at block_p:num_warps, Mosaic GPU (mgpu)",
        device=device,
        date=datetime.date.today().isoformat(), jax=jax.__version__, copy_bandwidth_Bps=bandwidth,
        timer="32 updates straight-line in one jitted program (pool donated), 3 calls + sync, "
              "median of 5, per update", rows=rows), indent=2))


# --mixer-step's named configs: XLA, the kernel's default launch, and the folded decode step's
# inputs added one at a time (each name takes the ones before it): the in_proj partials, the
# block norm's squares, the gated norm's weight, its squares out ("folded": the model's call;
# "folded_loads_first": that call with the kernel's loads_first)
FOLDED_INPUTS = ("partials", "partials_in_ss", "partials_in_ss_norm", "folded")
MIXER_STEP_NAMED = ("xla", "default") + FOLDED_INPUTS + ("folded_loads_first",)
MIXER_STEP_SHAPE = dict(heads=80, head_dim=64, groups=1, state_size=128)  # Mamba2-2.7B


def bench_mixer_step(args):
    """The fused decode step's kernel configs and the same math through XLA (the reference:
    what impl="auto" ran before the fusion), b = 1 and 64, the 2.7B mixer, bf16 activations,
    float32 state; 32 steps in a ``lax.fori_loop`` of one jitted program, states donated."""
    import jax
    import jax.numpy as jnp
    import torch

    from mamba2_jax.kernels.mixer_step import mixer_step

    bandwidth, _ = ceilings(torch)
    device = torch.cuda.get_device_name()
    h, p, g, n = (MIXER_STEP_SHAPE[k] for k in ("heads", "head_dim", "groups", "state_size"))
    i, c, k = h * p, h * p + 2 * g * n, 4
    rows = []
    for b in (1, 64):
        ks = jax.random.split(jax.random.PRNGKey(b), 6)
        zx = jax.random.normal(ks[0], (b, i + c + h), jnp.bfloat16)
        conv = jax.random.normal(ks[1], (b, c, k - 1), jnp.bfloat16)
        w = jax.random.normal(ks[2], (c, k), jnp.bfloat16)
        cb = jax.random.normal(ks[3], (c,), jnp.bfloat16)
        ssm = jax.random.normal(ks[4], (b, h, p, n), jnp.float32)
        A_log, D, dtb = jnp.zeros((h,)), jnp.ones((h,)), jax.random.normal(ks[5], (h,)) - 2
        nbytes = 2 * ssm.nbytes + 2 * conv.nbytes + zx.nbytes + b * i * 4
        row = dict(b=b, bytes=nbytes, us={}, bandwidth_fraction={})
        # the folded decode step's inputs (in_proj's 8 split-K partials, the block norm's 8
        # slots of squares, the gated norm's weight), each FOLDED_INPUTS name adding one
        parts = jax.random.normal(ks[0], (8, b, i + c + h), jnp.float32) / 8
        added = (dict(zx_dtype=jnp.bfloat16),
                 dict(in_ss=jnp.full((b, 8), 320.0), in_count=2560, in_eps=1e-5),
                 dict(norm_weight=jnp.ones((i,), jnp.bfloat16)), dict(sum_squares=True))
        folded, so_far = {}, {}
        for name, extra in zip(FOLDED_INPUTS, added):
            so_far = folded[name] = dict(so_far, **extra)
        folded["folded_loads_first"] = dict(so_far, loads_first=True)  # the model's call,
        # every load issued before any compute
        for config in args.mixer_step:
            src = zx
            if config == "xla":
                kw = dict(impl="xla")
            elif config == "default":
                kw = dict(impl="pallas")
            elif config in folded:
                kw, src = dict(impl="pallas", **folded[config]), parts
            else:
                kw = dict(impl="pallas", block_p=config[0], num_warps=config[1])

            def run(conv, ssm, kw=kw, src=src, steps=32):
                # a rolled loop: straight-line steps of the XLA version fuse into one pass over
                # the state (each step is elementwise in it), which no decode loop can do
                def body(_, carry):
                    conv, ssm, acc = carry
                    y, conv, ssm, *_ = mixer_step(src, conv, w, cb, ssm, A_log, D, dtb,
                                                  a_is_log=True, **MIXER_STEP_SHAPE, **kw)
                    return conv, ssm, acc + y[0, 0].astype(jnp.float32)
                return jax.lax.fori_loop(0, steps, body, (conv, ssm, jnp.float32(0)))
            conv, ssm = time_steps(jax.jit(run, donate_argnums=(0, 1)), [conv, ssm], row, config,
                                   nbytes, bandwidth)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("mixer_step_" + device.replace(" ", "_") + ".json")).write_text(json.dumps(dict(
        op="fused decode step (conv update + state update + gate), 2.7B mixer", device=device,
        shape=MIXER_STEP_SHAPE, date=datetime.date.today().isoformat(), jax=jax.__version__,
        copy_bandwidth_Bps=bandwidth, timer="32 steps in a lax.fori_loop of one jitted program "
        "(states donated), 3 calls + sync, median of 5, per step", rows=rows), indent=2))


def main():
    args = parse_args()
    if args.ssu_sweep:
        bench_ssu_sweep(args)
        return
    if args.mixer_step:
        bench_mixer_step(args)
        return
    if args.conv_prefill or args.smoke:
        bench_conv_prefill(args)
        return
    if args.conv:
        bench_conv(args)
        return

    import jax
    import jax.numpy as jnp
    import torch
    import triton

    sys.path.insert(0, str(Path(args.peers).resolve()))
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update as theirs_ssu

    from mamba2_jax.kernels.state_update import selective_state_update

    bandwidth, _ = ceilings(torch)
    device = torch.cuda.get_device_name()
    jsync = lambda out: jax.block_until_ready(out) if out is not None else None
    tsync = lambda _: torch.cuda.synchronize()
    rows = []
    for h, p, g, n, b in SHAPES:
        torch.manual_seed(0)
        dev = dict(device="cuda")
        slots = 2 * b
        tstate = torch.randn(slots, h, p, n, dtype=torch.float32, **dev)
        tx = torch.randn(b, h, p, dtype=torch.bfloat16, **dev)
        tdt = torch.randn(b, h, dtype=torch.float32, **dev) - 1.0
        tA = -torch.rand(h, dtype=torch.float32, **dev) * 4 - 0.5
        tB = torch.randn(b, g, n, dtype=torch.bfloat16, **dev)
        tC = torch.randn(b, g, n, dtype=torch.bfloat16, **dev)
        tD = torch.randn(h, dtype=torch.float32, **dev)
        tbias = torch.randn(h, dtype=torch.float32, **dev)
        tidx = torch.randperm(slots, device="cuda")[:b].to(torch.int32)
        x, dt, A, B, C, D, bias, idx = (jnp.from_dlpack(t) for t in (tx, tdt, tA, tB, tC, tD, tbias, tidx))
        state = jnp.array(jnp.from_dlpack(tstate))  # our own copy of the pool (updated in place)

        # mamba_ssm takes per-(head, channel) dt/A/D/dt_bias; expanded views (stride 0), as HF does.
        e_dt = tdt[:, :, None].expand(b, h, p)
        e_A = tA[:, None, None].expand(h, p, n)
        e_D, e_bias = tD[:, None].expand(h, p), tbias[:, None].expand(h, p)

        def theirs():
            return theirs_ssu(tstate, tx, e_dt, e_A, tB, tC, D=e_D, dt_bias=e_bias,
                              dt_softplus=True, state_batch_indices=tidx)

        step = jax.jit(functools.partial(selective_state_update, dt_softplus=True, impl="pallas"),
                       donate_argnums=0)
        box = [state]

        def ours():
            y, box[0] = step(box[0], x, dt, A, B, C, D=D, dt_bias=bias, state_batch_indices=idx)
            return y

        y_ours = ours()
        y_theirs = theirs()
        err = float(jnp.linalg.norm(y_ours.astype(jnp.float32) - jnp.from_dlpack(y_theirs).astype(jnp.float32))
                    / jnp.linalg.norm(jnp.from_dlpack(y_theirs).astype(jnp.float32)))
        row = dict(shape=dict(h=h, p=p, g=g, n=n, b=b), first_step_rel_err=err)
        row["ours_ms"] = timeit(ours, jsync, iters=50, reps=7)

        # Device time without host dispatch: 64 updates in one compiled program, straight-line
        # (no while loop, whose per-iteration condition check would be counted), the pool
        # threaded through and donated; for ours and for the XLA reference.
        def looped(impl, n=64, kernel="auto"):
            def run(pool):
                acc = jnp.float32(0)
                for _ in range(n):
                    y, pool = selective_state_update(pool, x, dt, A, B, C, D=D, dt_bias=bias,
                                                     state_batch_indices=idx, dt_softplus=True,
                                                     impl=impl, kernel=kernel)
                    acc = acc + y[0, 0, 0].astype(jnp.float32)
                return pool, acc
            run = jax.jit(run, donate_argnums=0)
            pool_box = [box[0]]

            def call():
                pool_box[0], acc = run(pool_box[0])
                return acc
            ms = timeit(call, jsync, iters=3, reps=5) / n
            box[0] = pool_box[0]
            return ms
        row["ours_in_loop_ms"] = looped("pallas")
        row["xla_in_loop_ms"] = looped("xla")
        try:  # the Mosaic GPU kernel in place (opt-in kernel="mgpu"), same program
            row["ours_mgpu_in_loop_ms"] = looped("pallas", kernel="mgpu")
        except Exception as e:  # recorded, not timed
            row["ours_mgpu_in_loop_ms"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
        row["mamba_ssm_ms"] = timeit(theirs, tsync, iters=50, reps=7)
        try:
            graph = cuda_graph(torch, theirs)
            row["mamba_ssm_graph_ms"] = timeit(lambda: graph.replay(), tsync, iters=50, reps=7)
        except Exception as e:
            row["mamba_ssm_graph_ms"] = f"capture failed: {type(e).__name__}: {str(e)[:120]}"
        state_bytes = 2 * b * h * p * n * 4
        for k in ("ours", "ours_in_loop", "xla_in_loop", "mamba_ssm", "ours_mgpu_in_loop"):
            if isinstance(row[f"{k}_ms"], float):
                row[f"{k}_bandwidth_fraction"] = state_bytes / (row[f"{k}_ms"] * 1e-3) / bandwidth
        if isinstance(row["mamba_ssm_graph_ms"], float):
            row["mamba_ssm_graph_bandwidth_fraction"] = state_bytes / (row["mamba_ssm_graph_ms"] * 1e-3) / bandwidth
        rows.append(row)
        print(json.dumps(row))

    result = dict(op="selective_state_update", device=device, date=datetime.date.today().isoformat(),
                  jax=jax.__version__, triton=triton.__version__, torch=torch.__version__,
                  copy_bandwidth_Bps=bandwidth, state_dtype="float32", x_dtype="bfloat16",
                  timer="wall clock over back-to-back calls + sync, median", rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("ssu_" + device.replace(" ", "_") + ".json")).write_text(json.dumps(result, indent=2))
    print("| h, p, g, n | b | mamba_ssm µs (graph) | ours µs | ours in loop µs | XLA in loop µs "
          "| ours in loop / copy bw | mamba_ssm graph / copy bw |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["shape"]
        g_ms = r["mamba_ssm_graph_ms"]
        print(f"| {s['h']}, {s['p']}, {s['g']}, {s['n']} | {s['b']} | {r['mamba_ssm_ms'] * 1e3:.1f} "
              f"({g_ms * 1e3 if isinstance(g_ms, float) else float('nan'):.1f}) | {r['ours_ms'] * 1e3:.1f} | "
              f"{r['ours_in_loop_ms'] * 1e3:.1f} | {r['xla_in_loop_ms'] * 1e3:.1f} | "
              f"{r['ours_in_loop_bandwidth_fraction']:.0%} | "
              f"{r.get('mamba_ssm_graph_bandwidth_fraction', float('nan')):.0%} |")


if __name__ == "__main__":
    main()
