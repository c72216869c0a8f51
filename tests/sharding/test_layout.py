"""Tests of the tensor-parallel layout of the fused Mamba-2 projections (mamba2_jax.sharding.layout)."""

from __future__ import annotations

import dataclasses
import itertools

import ml_dtypes
import numpy as np
import pytest

from mamba2_jax.config import Mamba2Config
from mamba2_jax.sharding import (
    LocalSizes,
    check_tp,
    conv_shard_rows,
    duplicated_groups,
    groups_per_shard,
    in_proj_shard_rows,
    local_config,
    shard_conv,
    shard_groups,
    shard_in_proj,
    shard_norm_weight,
    shard_per_head,
    unshard_conv,
    unshard_in_proj,
)

POW2 = (1, 2, 4, 8)
ALL_PAIRS = list(itertools.product(POW2, POW2))                 # (g, tp); all valid for powers of 2
VLLM_PAIRS = [(1, tp) for tp in POW2] + [(g, tp) for g in (2, 4, 8) for tp in POW2 if g % tp == 0]
BEYOND_VLLM = [(g, tp) for g, tp in ALL_PAIRS if 1 < g < tp]     # tp % g == 0, g > 1
assert set(BEYOND_VLLM) == {(2, 4), (2, 8), (4, 8)}


def make_config(g: int, h: int = 16, **kw) -> Mamba2Config:
    """head_dim 8, state 4, conv 4; i = 8 h = expand * hidden (hidden 32 when 4 | h, else expand 2)."""
    hidden, expand = (32, h * 8 // 32) if h % 4 == 0 else (4 * h, 2)
    return Mamba2Config(hidden_size=hidden, head_dim=8, num_heads=h, expand=expand, n_groups=g,
                        state_size=4, conv_kernel=4, **kw)


def rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def rand_int_valued(rng, shape):
    """Integer-valued float64: every matmul / conv below is exact, so results compare bit for bit."""
    return rng.integers(-8, 9, size=shape).astype(np.float64)


# -- oracles --------------------------------------------------------------------------------------


def vllm_sharded_loader(loaded, shard_spec, tp, tp_rank):
    """Plain-numpy statement of vLLM's ``mamba_v2_sharded_weight_loader`` for one rank.

    shard_spec: [(full_dim, extra, duplicate_groups)] along dim 0 of ``loaded``.
    """
    local_rows = sum(full_dim // tp for full_dim, _, _ in shard_spec)
    param = np.full((local_rows,) + loaded.shape[1:], np.nan, loaded.dtype)
    filled = np.zeros(local_rows, bool)
    boundary, loaded_boundary = 0, 0
    for full_dim, extra, duplicate_groups in shard_spec:
        shard_size = full_dim // tp
        rank = 0 if duplicate_groups else tp_rank
        take = min(shard_size, full_dim - extra - rank * shard_size)
        start = loaded_boundary + rank * shard_size
        param[boundary:boundary + take] = loaded[start:start + take]
        filled[boundary:boundary + take] = True
        boundary += shard_size
        loaded_boundary += full_dim - extra
    assert filled.all(), "the loader left rows of the parameter unset"
    return param


def vllm_specs(config, tp):
    i, h, g, n = config.intermediate_size, config.num_heads, config.n_groups, config.state_size
    g_adj = g + (0 if g % tp == 0 else tp - g)
    grp = (g_adj * n, (g_adj - g) * n, g == 1)
    in_proj = [(i, 0, False), (i, 0, False), grp, grp, (h, 0, False)]
    conv = [(i, 0, False), grp, grp]
    return in_proj, conv


def explicit_groups(config, tp, r):
    g = config.n_groups
    if g % tp == 0:
        return list(range(r * g // tp, (r + 1) * g // tp))
    return [r // (tp // g)]          # the one group shard r's heads read, duplicated


def explicit_in_proj_shard(w, config, tp, r):
    i, h, n = config.intermediate_size, config.num_heads, config.state_size
    gn = config.n_groups * n
    il, hl = i // tp, h // tp
    z = w[r * il:(r + 1) * il]
    x = w[i + r * il:i + (r + 1) * il]
    B = np.concatenate([w[2 * i + q * n:2 * i + (q + 1) * n] for q in explicit_groups(config, tp, r)])
    C = np.concatenate([w[2 * i + gn + q * n:2 * i + gn + (q + 1) * n]
                        for q in explicit_groups(config, tp, r)])
    dt = w[2 * i + 2 * gn + r * hl:2 * i + 2 * gn + (r + 1) * hl]
    return np.concatenate([z, x, B, C, dt])


def explicit_conv_shard(w, config, tp, r):
    i, n, gn = config.intermediate_size, config.state_size, config.n_groups * config.state_size
    il = i // tp
    x = w[r * il:(r + 1) * il]
    B = np.concatenate([w[i + q * n:i + (q + 1) * n] for q in explicit_groups(config, tp, r)])
    C = np.concatenate([w[i + gn + q * n:i + gn + (q + 1) * n] for q in explicit_groups(config, tp, r)])
    return np.concatenate([x, B, C])


# -- group bookkeeping ----------------------------------------------------------------------------


@pytest.mark.parametrize("g,tp", ALL_PAIRS)
def test_group_counts_and_local_config(g, tp):
    c = make_config(g)
    gl = g // tp if g % tp == 0 else 1
    assert groups_per_shard(c, tp) == gl
    assert duplicated_groups(c, tp) == (g if g % tp == 0 else tp)
    assert duplicated_groups(c, tp) == g + (0 if g % tp == 0 else tp - g)   # vLLM's G_adj
    groups = shard_groups(c, tp)
    assert groups.shape == (tp, gl)
    for r in range(tp):
        assert groups[r].tolist() == explicit_groups(c, tp, r)
        # every head of shard r reads one of the shard's groups (contiguous map j // (h/g))
        heads = range(r * c.num_heads // tp, (r + 1) * c.num_heads // tp)
        assert {j // c.heads_per_group for j in heads} == set(groups[r].tolist())

    loc = local_config(c, tp)
    assert isinstance(loc, LocalSizes)
    i, n, h = c.intermediate_size, c.state_size, c.num_heads
    assert loc == LocalSizes(tp=tp, heads=h // tp, head_dim=c.head_dim, intermediate=i // tp,
                             groups_local=gl, state_size=n, conv_dim_local=i // tp + 2 * gl * n,
                             in_proj_local=2 * i // tp + 2 * gl * n + h // tp)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loc.heads = 3
    assert in_proj_shard_rows(c, tp).shape == (tp, loc.in_proj_local)
    assert conv_shard_rows(c, tp).shape == (tp, loc.conv_dim_local)
    assert loc.heads * loc.head_dim == loc.intermediate


@pytest.mark.parametrize("g,tp", ALL_PAIRS)
def test_row_maps(g, tp):
    c = make_config(g)
    i = c.intermediate_size
    rows, conv = in_proj_shard_rows(c, tp), conv_shard_rows(c, tp)
    loc = local_config(c, tp)
    # conv channels are the in_proj [x | B | C] rows, shifted past z
    np.testing.assert_array_equal(conv, rows[:, loc.intermediate:loc.intermediate + loc.conv_dim_local] - i)
    # every full row appears; without duplication, exactly once
    assert set(rows.ravel().tolist()) == set(range(c.in_proj_size))
    assert set(conv.ravel().tolist()) == set(range(c.conv_dim))
    if g % tp == 0:
        assert rows.size == c.in_proj_size and conv.size == c.conv_dim


# -- comparison with vLLM's loader -------------------------------------------------------------------


@pytest.mark.parametrize("g,tp", VLLM_PAIRS)
def test_matches_vllm_loader(g, tp):
    rng = np.random.default_rng(100 * g + tp)
    c = make_config(g)
    in_spec, conv_spec = vllm_specs(c, tp)
    w = rand(rng, (c.in_proj_size, c.hidden_size))
    b = rand(rng, (c.in_proj_size,))
    cw = rand(rng, (c.conv_dim, 1, c.conv_kernel))
    cb = rand(rng, (c.conv_dim,))
    sw, sb = shard_in_proj(w, c, tp), shard_in_proj(b, c, tp)
    scw, scw2, scb = shard_conv(cw, c, tp), shard_conv(cw[:, 0], c, tp), shard_conv(cb, c, tp)
    for r in range(tp):
        np.testing.assert_array_equal(sw[r], vllm_sharded_loader(w, in_spec, tp, r))
        np.testing.assert_array_equal(sb[r], vllm_sharded_loader(b, in_spec, tp, r))
        np.testing.assert_array_equal(scw[r], vllm_sharded_loader(cw, conv_spec, tp, r))
        np.testing.assert_array_equal(scw2[r], vllm_sharded_loader(cw[:, 0], conv_spec, tp, r))
        np.testing.assert_array_equal(scb[r], vllm_sharded_loader(cb, conv_spec, tp, r))


@pytest.mark.parametrize("g,tp", ALL_PAIRS)
def test_matches_explicit_statement(g, tp):
    """Every pair, including tp % g == 0 with 1 < g < tp (beyond vLLM): B_r = group r // (tp/g)."""
    rng = np.random.default_rng(7 + 100 * g + tp)
    c = make_config(g)
    w = rand(rng, (c.in_proj_size, c.hidden_size))
    cw = rand(rng, (c.conv_dim, c.conv_kernel))
    sw, scw = shard_in_proj(w, c, tp), shard_conv(cw, c, tp)
    assert sw.dtype == w.dtype and scw.dtype == cw.dtype
    for r in range(tp):
        np.testing.assert_array_equal(sw[r], explicit_in_proj_shard(w, c, tp, r))
        np.testing.assert_array_equal(scw[r], explicit_conv_shard(cw, c, tp, r))


@pytest.mark.parametrize("g,tp", BEYOND_VLLM)
def test_beyond_vllm_group_assignment(g, tp):
    c = make_config(g)
    n, i = c.state_size, c.intermediate_size
    rows = in_proj_shard_rows(c, tp)
    loc = local_config(c, tp)
    b_start = 2 * loc.intermediate
    for r in range(tp):
        q = r // (tp // g)
        assert rows[r, b_start:b_start + n].tolist() == list(range(2 * i + q * n, 2 * i + (q + 1) * n))
    # the loader's g == 1 rule (group 0 on every rank) would be wrong here: shards differ
    assert not np.array_equal(rows[0], rows[-1])


# -- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("g,tp", ALL_PAIRS)
def test_round_trip_bit_exact(g, tp):
    rng = np.random.default_rng(1000 + 10 * g + tp)
    c = make_config(g)
    tensors_in = [rand(rng, (c.in_proj_size, c.hidden_size)), rand(rng, (c.in_proj_size,))]
    tensors_conv = [rand(rng, (c.conv_dim, c.conv_kernel)), rand(rng, (c.conv_dim, 1, c.conv_kernel)),
                    rand(rng, (c.conv_dim,))]
    for t in tensors_in:
        s = shard_in_proj(t, c, tp)
        assert s.shape == (tp, local_config(c, tp).in_proj_local) + t.shape[1:]
        back = unshard_in_proj(s, c, tp)
        assert back.dtype == t.dtype and back.shape == t.shape
        assert back.tobytes() == t.tobytes()
        assert unshard_in_proj(list(s), c, tp).tobytes() == t.tobytes()   # sequence of shards
    for t in tensors_conv:
        s = shard_conv(t, c, tp)
        assert s.shape == (tp, local_config(c, tp).conv_dim_local) + t.shape[1:]
        back = unshard_conv(s, c, tp)
        assert back.dtype == t.dtype and back.shape == t.shape
        assert back.tobytes() == t.tobytes()
        assert unshard_conv(tuple(s), c, tp).tobytes() == t.tobytes()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64, np.int32])
def test_round_trip_dtypes_and_special_values(dtype):
    rng = np.random.default_rng(5)
    c, tp = make_config(1), 4
    w = (rng.standard_normal((c.in_proj_size, c.hidden_size)) * 100).astype(dtype)
    if np.issubdtype(np.dtype(dtype), np.floating) or dtype is ml_dtypes.bfloat16:
        w[0, 0], w[1, 1], w[2, 2] = np.nan, -0.0, np.inf
        w[2 * c.intermediate_size, 3] = np.nan          # a NaN inside the duplicated B group
    back = unshard_in_proj(shard_in_proj(w, c, tp), c, tp)
    assert back.dtype == w.dtype and back.tobytes() == w.tobytes()
    cw = rng.standard_normal((c.conv_dim, 1, c.conv_kernel)).astype(dtype)
    assert unshard_conv(shard_conv(cw, c, tp), c, tp).tobytes() == cw.tobytes()


@pytest.mark.parametrize("g,tp", [(1, 1), (1, 4), (4, 2), (2, 8)])
def test_per_head_and_norm_weight(g, tp):
    rng = np.random.default_rng(3)
    c = make_config(g)
    h, p, i = c.num_heads, c.head_dim, c.intermediate_size
    a_log = rand(rng, (h,))
    d_chan = rand(rng, (h * p,))
    norm_w = rand(rng, (i,))
    sa, sd, sn = shard_per_head(a_log, c, tp), shard_per_head(d_chan, c, tp), shard_norm_weight(norm_w, c, tp)
    assert sa.shape == (tp, h // tp) and sd.shape == (tp, h * p // tp) and sn.shape == (tp, i // tp)
    for r in range(tp):
        heads = slice(r * h // tp, (r + 1) * h // tp)
        np.testing.assert_array_equal(sa[r], a_log[heads])
        np.testing.assert_array_equal(sd[r].reshape(-1, p), d_chan.reshape(h, p)[heads])
        np.testing.assert_array_equal(sn[r].reshape(-1, p), norm_w.reshape(h, p)[heads])
    assert sa.reshape(-1).tobytes() == a_log.tobytes()
    assert sn.reshape(-1).tobytes() == norm_w.tobytes()


# -- semantics: one GEMM per shard gives the right z / x / B / C / dt -------------------------------------


def causal_depthwise_conv(xbc, w, b):
    """[T, c] with weight [c, k], bias [c]: out[t, ch] = b[ch] + sum_j w[ch, j] * x[t - (k-1) + j, ch]."""
    k = w.shape[1]
    pad = np.concatenate([np.zeros((k - 1, xbc.shape[1])), xbc])
    return b + sum(w[:, j] * pad[j:j + xbc.shape[0]] for j in range(k))


@pytest.mark.parametrize("h", [8, 16])
@pytest.mark.parametrize("g,tp", ALL_PAIRS)
def test_sharded_projection_semantics(g, tp, h):
    rng = np.random.default_rng(2000 + 10 * g + tp + h)
    c = make_config(g, h)
    i, n, gn, p = c.intermediate_size, c.state_size, c.n_groups * c.state_size, c.head_dim
    T = 5
    u = rand_int_valued(rng, (T, c.hidden_size))
    w, b = rand_int_valued(rng, (c.in_proj_size, c.hidden_size)), rand_int_valued(rng, (c.in_proj_size,))
    cw, cb = rand_int_valued(rng, (c.conv_dim, c.conv_kernel)), rand_int_valued(rng, (c.conv_dim,))

    full = u @ w.T + b
    z, x = full[:, :i].reshape(T, h, p), full[:, i:2 * i].reshape(T, h, p)
    B, C = full[:, 2 * i:2 * i + gn].reshape(T, g, n), full[:, 2 * i + gn:2 * i + 2 * gn].reshape(T, g, n)
    dt = full[:, 2 * i + 2 * gn:]
    conv_full = causal_depthwise_conv(full[:, i:2 * i + 2 * gn], cw, cb)
    cx = conv_full[:, :i].reshape(T, h, p)
    cB, cC = conv_full[:, i:i + gn].reshape(T, g, n), conv_full[:, i + gn:].reshape(T, g, n)

    loc = local_config(c, tp)
    hl, il, gl = loc.heads, loc.intermediate, loc.groups_local
    sw, sb = shard_in_proj(w, c, tp), shard_in_proj(b, c, tp)
    scw, scb = shard_conv(cw, c, tp), shard_conv(cb, c, tp)
    for r in range(tp):
        out = u @ sw[r].T + sb[r]                                   # one GEMM per shard
        assert out.shape == (T, loc.in_proj_local)
        z_r, x_r, B_r, C_r, dt_r = np.split(out, np.cumsum([il, il, gl * n, gl * n]), axis=1)
        heads = np.arange(r * hl, (r + 1) * hl)
        np.testing.assert_array_equal(z_r.reshape(T, hl, p), z[:, heads])
        np.testing.assert_array_equal(x_r.reshape(T, hl, p), x[:, heads])
        np.testing.assert_array_equal(dt_r, dt[:, heads])
        # local head jl reads local group jl // (hl / gl); it must be the group global head j reads
        B_r, C_r = B_r.reshape(T, gl, n), C_r.reshape(T, gl, n)
        for jl, j in enumerate(heads):
            np.testing.assert_array_equal(B_r[:, jl // (hl // gl)], B[:, j // c.heads_per_group])
            np.testing.assert_array_equal(C_r[:, jl // (hl // gl)], C[:, j // c.heads_per_group])

        # the depthwise conv on the shard's [x_r | B_r | C_r] with the shard's conv weights
        conv_r = causal_depthwise_conv(out[:, il:il + loc.conv_dim_local], scw[r], scb[r])
        cx_r, cB_r, cC_r = np.split(conv_r, [il, il + gl * n], axis=1)
        np.testing.assert_array_equal(cx_r.reshape(T, hl, p), cx[:, heads])
        cB_r, cC_r = cB_r.reshape(T, gl, n), cC_r.reshape(T, gl, n)
        for jl, j in enumerate(heads):
            np.testing.assert_array_equal(cB_r[:, jl // (hl // gl)], cB[:, j // c.heads_per_group])
            np.testing.assert_array_equal(cC_r[:, jl // (hl // gl)], cC[:, j // c.heads_per_group])


# -- error paths -----------------------------------------------------------------------------------------


ALL_FUNCS = {
    "groups_per_shard": lambda c, tp: groups_per_shard(c, tp),
    "duplicated_groups": lambda c, tp: duplicated_groups(c, tp),
    "shard_groups": lambda c, tp: shard_groups(c, tp),
    "local_config": lambda c, tp: local_config(c, tp),
    "in_proj_shard_rows": lambda c, tp: in_proj_shard_rows(c, tp),
    "conv_shard_rows": lambda c, tp: conv_shard_rows(c, tp),
    "shard_in_proj": lambda c, tp: shard_in_proj(np.zeros((c.in_proj_size, c.hidden_size)), c, tp),
    "shard_conv": lambda c, tp: shard_conv(np.zeros((c.conv_dim, c.conv_kernel)), c, tp),
    "shard_per_head": lambda c, tp: shard_per_head(np.zeros(c.num_heads), c, tp),
    "shard_norm_weight": lambda c, tp: shard_norm_weight(np.zeros(c.intermediate_size), c, tp),
    "unshard_in_proj": lambda c, tp: unshard_in_proj(np.zeros((tp, 1, 1)), c, tp),
    "unshard_conv": lambda c, tp: unshard_conv(np.zeros((tp, 1, 1)), c, tp),
}


def test_check_tp_accepts_valid_pairs():
    for g, tp in ALL_PAIRS:
        assert check_tp(make_config(g), tp) is None
    assert check_tp(make_config(3, h=6), 3) is None        # g == tp
    assert check_tp(make_config(6, h=12), 3) is None       # tp | g
    assert check_tp(make_config(3, h=12), 6) is None       # g | tp
    assert check_tp(make_config(1), np.int64(4)) is None   # numpy integers are fine


@pytest.mark.parametrize("name", sorted(ALL_FUNCS))
def test_heads_not_divisible(name):
    c = make_config(1, h=12)                       # 12 heads, tp 8: g == 1 is fine
    with pytest.raises(ValueError, match=r"num_heads \(12\) must be a multiple of tp \(8\)") as e:
        ALL_FUNCS[name](c, 8)
    assert "n_groups" not in str(e.value)


@pytest.mark.parametrize("name", sorted(ALL_FUNCS))
@pytest.mark.parametrize("g,h,tp", [(2, 6, 3), (3, 6, 2), (4, 12, 6), (6, 12, 4)])
def test_groups_and_tp_incompatible(name, g, h, tp):
    c = make_config(g, h=h)
    with pytest.raises(ValueError, match=rf"n_groups \({g}\) and tp \({tp}\) must divide one another") as e:
        ALL_FUNCS[name](c, tp)
    assert "num_heads" not in str(e.value)


def test_both_problems_reported():
    c = make_config(2, h=6)                         # tp 5: 6 % 5 != 0, and 2, 5 do not divide
    with pytest.raises(ValueError) as e:
        check_tp(c, 5)
    assert "num_heads (6)" in str(e.value) and "n_groups (2)" in str(e.value)


@pytest.mark.parametrize("tp", [0, -2, 2.0, "2", None, True])
def test_bad_tp_value(tp):
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        check_tp(make_config(1), tp)
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        shard_in_proj(np.zeros((make_config(1).in_proj_size, 32)), make_config(1), tp)


@pytest.mark.parametrize("g,tp", [(1, 2), (1, 8), (2, 4), (2, 8), (4, 8)])
@pytest.mark.parametrize("segment", ["B", "C"])
def test_unshard_inconsistent_duplicates(g, tp, segment):
    rng = np.random.default_rng(11)
    c = make_config(g)
    loc = local_config(c, tp)
    n = c.state_size
    w = rand(rng, (c.in_proj_size, c.hidden_size))
    cw = rand(rng, (c.conv_dim, 1, c.conv_kernel))
    s, sc = shard_in_proj(w, c, tp), shard_conv(cw, c, tp)
    bad_shard = tp - 1                            # the last copy of the last group
    owner = bad_shard - (bad_shard % (tp // g))   # first shard holding that group
    group = bad_shard // (tp // g)
    off_in = 2 * loc.intermediate + (0 if segment == "B" else n) + 2
    off_conv = loc.intermediate + (0 if segment == "B" else n) + 2
    s[bad_shard, off_in, 5] += 1.0
    sc[bad_shard, off_conv, 0, 1] = np.nextafter(sc[bad_shard, off_conv, 0, 1], np.inf)   # 1 ulp
    msg = (rf"shard {bad_shard} \(local row (\d+)\) holds a copy of {segment} group {group} \(row 2 of it\) "
           rf"that differs from shard {owner}'s copy")
    with pytest.raises(ValueError, match=msg):
        unshard_in_proj(s, c, tp)
    with pytest.raises(ValueError, match=msg):
        unshard_conv(sc, c, tp)
    # bias too, and a sign flip of zero counts as a difference (copies must be bit-identical)
    sb = shard_conv(np.zeros(c.conv_dim, np.float32), c, tp)
    sb[bad_shard, off_conv] = -0.0
    with pytest.raises(ValueError, match=msg):
        unshard_conv(sb, c, tp)


def test_unshard_non_duplicated_changes_are_kept():
    """Without duplication every local row is the only copy: edits round-trip, nothing to check."""
    c, tp = make_config(4), 2
    s = shard_in_proj(np.zeros((c.in_proj_size, c.hidden_size)), c, tp)
    s[1, 2 * local_config(c, tp).intermediate] = 7.0   # B row of shard 1 = first row of group 2
    full = unshard_in_proj(s, c, tp)
    assert (full[2 * c.intermediate_size + 2 * c.state_size] == 7.0).all()
    assert np.count_nonzero(full) == c.hidden_size


@pytest.mark.parametrize("shape_fn", [
    lambda c: (c.in_proj_size - 1, c.hidden_size),     # wrong row count
    lambda c: (c.in_proj_size, c.hidden_size + 1),     # wrong hidden size
    lambda c: (c.hidden_size, c.in_proj_size),         # Flax [in, out] orientation
    lambda c: (c.in_proj_size, 1, c.hidden_size),      # 3-D
    lambda c: (),                                      # scalar
    lambda c: (c.in_proj_size + 1,),                   # bias of the wrong size
])
def test_shard_in_proj_bad_shapes(shape_fn):
    c = make_config(2)
    with pytest.raises(ValueError, match=r"shard_in_proj: expected an in_proj weight \[288, 32\].*got"):
        shard_in_proj(np.zeros(shape_fn(c)), c, 2)


@pytest.mark.parametrize("shape_fn", [
    lambda c: (c.conv_dim + 1, c.conv_kernel),
    lambda c: (c.conv_dim, c.conv_kernel + 1),
    lambda c: (c.conv_dim, 2, c.conv_kernel),
    lambda c: (c.conv_dim, c.conv_kernel, 1),
    lambda c: (c.conv_kernel, c.conv_dim),
    lambda c: (c.conv_dim - 1,),
    lambda c: (),
])
def test_shard_conv_bad_shapes(shape_fn):
    c = make_config(2)
    with pytest.raises(ValueError, match=r"shard_conv: expected a conv1d weight \[144, 4\].*got"):
        shard_conv(np.zeros(shape_fn(c)), c, 2)


def test_shard_per_head_and_norm_bad_shapes():
    c = make_config(2)
    for shape in [(c.num_heads + 1,), (c.num_heads, 1), (1, c.num_heads), (), (c.intermediate_size + 8,)]:
        with pytest.raises(ValueError, match=r"shard_per_head: expected a per-head vector \[16\]"):
            shard_per_head(np.zeros(shape), c, 2)
    for shape in [(c.intermediate_size - 1,), (c.num_heads,), (c.num_heads, c.head_dim), ()]:
        with pytest.raises(ValueError, match=r"shard_norm_weight: expected the norm weight \[128\]"):
            shard_norm_weight(np.zeros(shape), c, 2)


@pytest.mark.parametrize("which", ["in_proj", "conv"])
def test_unshard_bad_shapes(which):
    c, tp = make_config(1), 4
    loc = local_config(c, tp)
    if which == "in_proj":
        fn, local, trailing = unshard_in_proj, loc.in_proj_local, (c.hidden_size,)
        bad_trailing = [(c.hidden_size + 1,), (1, c.hidden_size)]
    else:
        fn, local, trailing = unshard_conv, loc.conv_dim_local, (c.conv_kernel,)
        bad_trailing = [(c.conv_kernel + 1,), (2, c.conv_kernel), (c.conv_kernel, 1)]
    good = np.zeros((tp, local) + trailing)
    fn(good, c, tp)
    bad_shapes = [(tp - 1, local) + trailing, (tp + 1, local) + trailing, (tp, local + 1) + trailing,
                  (tp, local - 1) + trailing, (tp * local,) + trailing, (tp,), ()]
    bad_shapes += [(tp, local) + t for t in bad_trailing]
    for shape in bad_shapes:
        with pytest.raises(ValueError, match=rf"unshard_{which}: expected shards \[tp, local rows, ...\]"
                                             rf".*\(tp = {tp}, {local} local rows\), got"):
            fn(np.zeros(shape), c, tp)
    # sequences: wrong count, mismatched shapes
    with pytest.raises(ValueError, match=rf"unshard_{which}: expected {tp} shards \(tp\), got {tp - 1}"):
        fn(list(good[:-1]), c, tp)
    with pytest.raises(ValueError, match=rf"unshard_{which}: the shards have different shapes"):
        fn(list(good[:-1]) + [good[-1, :-1]], c, tp)
    # shards sharded for another tp
    with pytest.raises(ValueError, match=rf"unshard_{which}: expected shards"):
        fn(good, c, 2)
