"""The benchmark scripts' config syntax and device-span arithmetic (no GPU needed)."""

import math
import time
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench_decode import parse_args as decode_args  # noqa: E402
from bench_gemv import FIT_MIN_TILES, fit_line, scaling_fit  # noqa: E402
from bench_kernels import config_fields  # noqa: E402
from profile_ssd import device_span_us  # noqa: E402


def test_config_fields_parse_overrides():
    assert config_fields("default") == {} and config_fields(" ") == {}
    assert config_fields("block_n=64, pass_block_p=none,backward=xla") == dict(
        block_n=64, pass_block_p=None, backward="xla")
    assert config_fields("bwd_fused_dD=True,decays=xla") == dict(bwd_fused_dD=True, decays="xla")


@pytest.mark.parametrize("spec,says", [("block_n", "is not field=value"),
                                       ("block_n=64,=3", "is not field=value"),
                                       ("block_n=24", "block_n"),
                                       ("nosuch=1", "nosuch"),
                                       ("backward=triton", "backward"),
                                       ("bwd_fused_dD=yes", "bwd_fused_dD must be a bool")])
def test_config_fields_name_a_bad_spec(spec, says):
    with pytest.raises(ValueError, match=says) as err:
        config_fields(spec)
    assert repr(spec) in str(err.value)


def test_ssu_sweep_specs_parse_or_name_the_bad_one(capsys):
    assert decode_args(["--ssu-sweep", "64:8, 16:1"]).ssu_sweep == [(64, 8), (16, 1)]
    assert decode_args(["--ssu-sweep", "64:8, mgpu"]).ssu_sweep == [(64, 8), "mgpu"]
    assert decode_args([]).ssu_sweep is None
    assert decode_args(["--mixer-step", "xla,default, 16:4"]).mixer_step == [
        "xla", "default", (16, 4)]
    for flag in ("--ssu-sweep", "--mixer-step"):
        for bad, says in (("64x4", "'64x4'"), ("64:3", "'64:3'"), ("128:4", "'128:4'"),
                          ("64", "'64' is"), ("mgpu2", "'mgpu2'")):
            with pytest.raises(SystemExit):
                decode_args([flag, bad])
            assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        decode_args(["--mixer-step", "mgpu"])  # an --ssu-sweep name only
    assert "'mgpu'" in capsys.readouterr().err
    assert decode_args(["--mixer-step", "partials,folded, 32:4,folded_loads_first"]).mixer_step == [
        "partials", "folded", (32, 4), "folded_loads_first"]


def test_fit_line_recovers_intercept_and_rate():
    rate, intercept_ms = 3.9e12, 7.5e-3  # bytes / s, and ms
    points = [(b, intercept_ms + b / rate * 1e3) for b in (5.4e7, 1.1e8, 2.2e8, 4.3e8)]
    fit = fit_line(points)
    assert math.isclose(fit["intercept_us"], 7.5, rel_tol=1e-9)
    assert math.isclose(fit["rate_Bps"], rate, rel_tol=1e-9) and fit["points"] == 4
    assert fit_line(points[:1]) is None
    # scaling_fit: only launches with >= FIT_MIN_TILES tiles a slab are on the line
    rows = [dict(weight_bytes=b, ours_default=dict(ms=t, plan=dict(n_k=FIT_MIN_TILES + k)))
            for k, (b, t) in enumerate(points)]
    rows.insert(0, dict(weight_bytes=1e7, ours_default=dict(ms=1.0, plan=dict(n_k=1))))
    assert scaling_fit(rows) == fit


def test_device_span_is_the_median_call_from_first_start_to_last_end():
    # three calls of two kernels each (ns); call spans 30, 50 and 20 us
    calls = [[(0, 10_000), (12_000, 30_000)], [(100_000, 140_000), (141_000, 150_000)],
             [(300_000, 305_000), (306_000, 320_000)]]
    spans = [k for call in calls for k in call][::-1]  # any order
    assert device_span_us(spans, 3) == 30.0
    assert math.isnan(device_span_us(spans[:5], 3))  # not one group per call


def test_timer_runs_last_long_enough_to_amortize_the_first_launch():
    from bench_kernels import timeit

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ms = timeit(fn, lambda _: None, reps=3, warmup=1, min_rep_s=0.05)
    per_run = (len(calls) - 2) // 3  # after the warmup call and the one that sizes the runs
    # ceil(50 ms / the sizing call's time): 25 for a 2 ms call, fewer when sleeps overrun
    assert 10 < per_run <= 26 and (len(calls) - 2) % 3 == 0
    assert ms >= 2.0
    calls.clear()
    timeit(fn, lambda _: None, iters=4, reps=2, warmup=0)
    assert len(calls) == 8  # fixed run length: no sizing call


@pytest.mark.parametrize("decays", ["pallas", "xla"])
def test_breakdowns_run_each_decays_path(decays):
    """bench_kernels.breakdown / backward_breakdown (interpret mode): every stage of our forward
    and backward timed alone."""
    import jax
    import jax.numpy as jnp

    from bench_kernels import backward_breakdown, breakdown
    from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    b, l, h, p, g, n, q = 1, 64, 4, 16, 1, 16, 32
    x, dt = jax.random.normal(k[0], (b, l, h, p)), jax.random.normal(k[1], (b, l, h))
    B, C = jax.random.normal(k[2], (b, l, g, n)), jax.random.normal(k[3], (b, l, g, n))
    cfg = SSDKernelConfig(chunk_size=q, dt_softplus=True, decays=decays, block_k=16,
                          block_m=16, block_n=16, bwd_block_m=16, bwd_dx_block_n=16)
    sync = lambda o: jax.block_until_ready(o) if o is not None else None
    args = (cfg, x, dt, -jnp.ones(h), B, C, jnp.ones(h), jnp.zeros(h))
    out = breakdown(*args, sync, interpret=True)
    assert set(out) == {"prologue", "states", "outputs"} and min(out.values()) > 0
    out = backward_breakdown(*args, jax.random.normal(k[0], x.shape), sync, interpret=True)
    assert set(out) == {"backward", "gradient_states", "dx_dB", "dC"} and min(out.values()) > 0


def test_time_steps_records_a_time_or_the_error():
    import jax
    import jax.numpy as jnp

    from bench_decode import time_steps

    run = jax.jit(lambda a, b: (a + 1, b * 2, jnp.sum(a)), donate_argnums=(0, 1))
    row = dict(us={}, bandwidth_fraction={})
    a, b = time_steps(run, [jnp.zeros(4), jnp.ones(4)], row, (16, 4), nbytes=64, bandwidth=1e9)
    assert row["us"]["16:4"] > 0 and row["bandwidth_fraction"]["16:4"] > 0
    assert float(a[0]) > 0 and float(b[0]) > 1  # the state went through the calls

    def broken(a):
        raise ValueError("does not compile")
    (c,) = time_steps(broken, [a], row, "xla", nbytes=64, bandwidth=1e9)
    assert "does not compile" in row["errors"]["xla"] and "xla" not in row["us"] and c is a
