"""Tensor-parallel layout of the fused Mamba-2 projections (pure numpy, no JAX).

The mixer's ``in_proj`` produces ``[z (i) | x (i) | B (g n) | C (g n) | dt (h)]`` and its conv
runs over ``[x (i) | B (g n) | C (g n)]``. With heads split over ``tp`` shards, one GEMM per shard
only works if the output rows are re-ordered *shard-major*: shard ``r`` holds

    in_proj rows  [z_r | x_r | B_r | C_r | dt_r]        conv channels  [x_r | B_r | C_r]

where ``z_r`` / ``x_r`` are rows ``r i/tp .. (r+1) i/tp`` of the z / x segments, ``dt_r`` the
shard's ``h/tp`` heads, and ``B_r`` / ``C_r`` the state rows of the group(s) the shard's heads
read (head ``j`` reads group ``j // (h/g)``):

* ``g % tp == 0``: the shard's own ``g/tp`` groups, ``r g/tp .. (r+1) g/tp`` (no duplication);
* ``tp % g == 0`` (``g < tp``): all ``h/tp`` heads of shard ``r`` read the single group
  ``r // (tp/g)``, which is copied onto each of its ``tp/g`` shards (adjusted total: ``tp``
  groups). vLLM only supports ``g == 1`` here (group 0 on every rank); other ``g`` follow the
  semantics of vLLM PR #55091.

Other ``(g, tp)`` combinations, and ``h % tp != 0``, are rejected by :func:`check_tp`.

Everything here works on HF-layout tensors, rows first: ``in_proj.weight [2i+2gn+h, d]`` /
``in_proj.bias [2i+2gn+h]``, ``conv1d.weight [conv_dim, k]`` or HF's ``[conv_dim, 1, k]``,
``conv1d.bias [conv_dim]``. Sharded tensors are stacked shard-major: ``[tp, local_rows, ...]``.
Flax kernels (``[in, out]``) are the transpose of the HF weight; the row indices from
:func:`in_proj_shard_rows` / :func:`conv_shard_rows` apply to their last axis.
All functions copy values by indexing only, so every round trip is bit-exact for any dtype.
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np

from mamba2_jax.config import Mamba2Config

__all__ = [
    "LocalSizes",
    "check_tp",
    "groups_per_shard",
    "duplicated_groups",
    "shard_groups",
    "in_proj_shard_rows",
    "conv_shard_rows",
    "shard_in_proj",
    "shard_conv",
    "shard_per_head",
    "shard_norm_weight",
    "unshard_in_proj",
    "unshard_conv",
    "local_config",
    "check_cp",
    "context_split_rows",
]


# -- validation and group bookkeeping --------------------------------------------------------------


def _tp_int(tp) -> int:
    if isinstance(tp, (bool, np.bool_)):
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    try:
        value = operator.index(tp)
    except TypeError:
        raise ValueError(f"tp must be a positive integer, got {tp!r}") from None
    if value <= 0:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    return value


def check_tp(config: Mamba2Config, tp: int) -> None:
    """Raise ``ValueError`` unless ``config`` can be split over ``tp`` tensor-parallel shards.

    Requires ``num_heads % tp == 0`` and either ``n_groups % tp == 0`` or ``tp % n_groups == 0``.
    """
    tp = _tp_int(tp)
    h, g = config.num_heads, config.n_groups
    problems = []
    if h % tp:
        problems.append(f"num_heads ({h}) must be a multiple of tp ({tp})")
    if g % tp and tp % g:
        problems.append(f"n_groups ({g}) and tp ({tp}) must divide one another "
                        f"(n_groups % tp == 0, or tp % n_groups == 0 to duplicate groups)")
    if problems:
        raise ValueError("cannot shard the Mamba-2 mixer over tp=%d: %s" % (tp, "; ".join(problems)))


def groups_per_shard(config: Mamba2Config, tp: int) -> int:
    """B/C groups held by each shard: ``g / tp`` if ``tp | g``, else 1 (a duplicated group)."""
    check_tp(config, tp)
    g = config.n_groups
    return g // tp if g % tp == 0 else 1


def duplicated_groups(config: Mamba2Config, tp: int) -> int:
    """Adjusted group count over all shards (vLLM's ``G_adj``): ``g`` if ``tp | g``, else ``tp``."""
    return groups_per_shard(config, tp) * _tp_int(tp)


def shard_groups(config: Mamba2Config, tp: int) -> np.ndarray:
    """``[tp, groups_per_shard]`` int array: the original group index of each shard's local groups."""
    check_tp(config, tp)
    g = config.n_groups
    if g % tp == 0:
        return np.arange(g, dtype=np.int64).reshape(tp, g // tp)
    return (np.arange(tp, dtype=np.int64) // (tp // g))[:, None]


@dataclasses.dataclass(frozen=True)
class LocalSizes:
    """Per-shard sizes of one mixer under ``tp``-way tensor parallelism."""

    tp: int
    heads: int              # h / tp
    head_dim: int           # p
    intermediate: int       # i / tp
    groups_local: int       # B/C groups held per shard (g / tp, or 1 when duplicated)
    state_size: int         # n
    conv_dim_local: int     # i/tp + 2 groups_local n
    in_proj_local: int      # 2 i/tp + 2 groups_local n + h/tp


def local_config(config: Mamba2Config, tp: int) -> LocalSizes:
    """Per-shard sizes (for building per-device modules)."""
    gl = groups_per_shard(config, tp)
    tp = _tp_int(tp)
    il, hl, n = config.intermediate_size // tp, config.num_heads // tp, config.state_size
    return LocalSizes(tp=tp, heads=hl, head_dim=config.head_dim, intermediate=il, groups_local=gl,
                      state_size=n, conv_dim_local=il + 2 * gl * n,
                      in_proj_local=2 * il + 2 * gl * n + hl)


# -- row permutations ---------------------------------------------------------------------------------


def _group_rows(config: Mamba2Config, tp: int, offset: int) -> np.ndarray:
    """``[tp, groups_local * n]`` rows of a B or C segment starting at ``offset``."""
    n = config.state_size
    groups = shard_groups(config, tp)                                   # [tp, gl]
    rows = offset + groups[:, :, None] * n + np.arange(n)[None, None, :]
    return rows.reshape(tp, -1)


def _contiguous_rows(size: int, tp: int, offset: int) -> np.ndarray:
    return offset + np.arange(size, dtype=np.int64).reshape(tp, size // tp)


def in_proj_shard_rows(config: Mamba2Config, tp: int) -> np.ndarray:
    """``[tp, in_proj_local]`` int64: full ``in_proj`` output row of each local row of each shard.

    ``shard_in_proj(w)[r] == w[in_proj_shard_rows(config, tp)[r]]``.
    """
    check_tp(config, tp)
    i, gn, h = config.intermediate_size, config.n_groups * config.state_size, config.num_heads
    return np.concatenate([
        _contiguous_rows(i, tp, 0),                 # z
        _contiguous_rows(i, tp, i),                 # x
        _group_rows(config, tp, 2 * i),             # B
        _group_rows(config, tp, 2 * i + gn),        # C
        _contiguous_rows(h, tp, 2 * i + 2 * gn),    # dt
    ], axis=1)


def conv_shard_rows(config: Mamba2Config, tp: int) -> np.ndarray:
    """``[tp, conv_dim_local]`` int64: full conv channel of each local channel of each shard."""
    check_tp(config, tp)
    i, gn = config.intermediate_size, config.n_groups * config.state_size
    return np.concatenate([
        _contiguous_rows(i, tp, 0),                 # x
        _group_rows(config, tp, i),                 # B
        _group_rows(config, tp, i + gn),            # C
    ], axis=1)


def _in_proj_segments(config: Mamba2Config):
    i, gn, h = config.intermediate_size, config.n_groups * config.state_size, config.num_heads
    return (("z", 0, i), ("x", i, i), ("B", 2 * i, gn), ("C", 2 * i + gn, gn),
            ("dt", 2 * i + 2 * gn, h))


def _conv_segments(config: Mamba2Config):
    i, gn = config.intermediate_size, config.n_groups * config.state_size
    return (("x", 0, i), ("B", i, gn), ("C", i + gn, gn))


def _describe_row(row: int, segments, n: int) -> str:
    for name, start, size in segments:
        if start <= row < start + size:
            local = row - start
            if name in ("B", "C"):
                return f"{name} group {local // n} (row {local % n} of it)"
            return f"{name} row {local}"
    return f"row {row}"  # pragma: no cover - rows always fall in a segment


# -- shape checks ---------------------------------------------------------------------------------------


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _in_proj_trailing(config: Mamba2Config):
    """Allowed trailing shapes (after the row axis) of in_proj tensors, and their description."""
    d = config.hidden_size
    return ((), (d,)), f"an in_proj weight [%R, {d}] (HF layout, hidden_size last) or bias [%R]"


def _conv_trailing(config: Mamba2Config):
    k = config.conv_kernel
    return (((), (k,), (1, k)),
            f"a conv1d weight [%R, {k}] or HF's [%R, 1, {k}] (conv_kernel last), or bias [%R]")


def _check_full(name: str, shape, rows: int, row_name: str, trailing) -> None:
    allowed, what = trailing
    if len(shape) == 0 or shape[0] != rows or tuple(shape[1:]) not in allowed:
        raise ValueError(f"{name}: expected {what.replace('%R', str(rows))} ({row_name} = {rows} "
                         f"rows), got {_shape_str(shape)}")


# -- sharding -------------------------------------------------------------------------------------------


def shard_in_proj(w, config: Mamba2Config, tp: int) -> np.ndarray:
    """HF ``in_proj.weight [2i+2gn+h, d]`` (or bias ``[2i+2gn+h]``) -> ``[tp, in_proj_local, ...]``.

    Shard ``r``'s rows are ``[z_r | x_r | B_r | C_r | dt_r]`` (see the module docstring).
    """
    w = np.asarray(w)
    rows = in_proj_shard_rows(config, tp)
    _check_full("shard_in_proj", w.shape, config.in_proj_size, "2i + 2gn + h",
                _in_proj_trailing(config))
    return w[rows]


def shard_conv(w, config: Mamba2Config, tp: int) -> np.ndarray:
    """conv1d weight ``[c, k]`` / HF ``[c, 1, k]`` (or bias ``[c]``) -> ``[tp, conv_dim_local, ...]``.

    Shard ``r``'s channels are ``[x_r | B_r | C_r]``; trailing axes are kept as given.
    """
    w = np.asarray(w)
    rows = conv_shard_rows(config, tp)
    _check_full("shard_conv", w.shape, config.conv_dim, "conv_dim = i + 2gn", _conv_trailing(config))
    return w[rows]


def shard_per_head(v, config: Mamba2Config, tp: int) -> np.ndarray:
    """Per-head vector (``A_log``, ``dt_bias``, ``D`` of ``[h]``, or ``D`` of ``[h*p]``) -> ``[tp, len/tp]``.

    A contiguous split: shard ``r`` gets heads ``r h/tp .. (r+1) h/tp`` (``D [h*p]`` is head-major).
    """
    check_tp(config, tp)
    v = np.asarray(v)
    h, p = config.num_heads, config.num_heads * config.head_dim
    if v.ndim != 1 or v.shape[0] not in (h, p):
        raise ValueError(f"shard_per_head: expected a per-head vector [{h}] (num_heads) or a "
                         f"per-channel D [{p}] (num_heads * head_dim), got {_shape_str(v.shape)}")
    return v.reshape(tp, v.shape[0] // tp)


def shard_norm_weight(w, config: Mamba2Config, tp: int) -> np.ndarray:
    """Gated-norm weight ``[i]`` -> ``[tp, i/tp]`` (contiguous split, follows the heads)."""
    check_tp(config, tp)
    w = np.asarray(w)
    i = config.intermediate_size
    if w.shape != (i,):
        raise ValueError(f"shard_norm_weight: expected the norm weight [{i}] (intermediate_size), "
                         f"got {_shape_str(w.shape)}")
    return w.reshape(tp, i // tp)


# -- unsharding -----------------------------------------------------------------------------------------


def _bits(a: np.ndarray) -> np.ndarray:
    """A byte view of ``a`` with the leading axis kept (so NaNs / -0.0 compare by bit pattern)."""
    a = np.ascontiguousarray(a)
    return a.reshape(a.shape[0], -1).view(np.uint8)


def _unshard(name: str, shards, rows: np.ndarray, full_rows: int, trailing, segments,
             config: Mamba2Config) -> np.ndarray:
    if isinstance(shards, (list, tuple)):
        if len(shards) != rows.shape[0]:
            raise ValueError(f"{name}: expected {rows.shape[0]} shards (tp), got {len(shards)}")
        shapes = {np.shape(s) for s in shards}
        if len(shapes) != 1:
            raise ValueError(f"{name}: the shards have different shapes: "
                             + ", ".join(_shape_str(np.shape(s)) for s in shards))
        shards = np.stack([np.asarray(s) for s in shards])
    else:
        shards = np.asarray(shards)
    tp, local = rows.shape
    allowed, what = trailing
    if shards.ndim < 2 or shards.shape[:2] != (tp, local) or shards.shape[2:] not in allowed:
        what = what.replace("%R", f"{tp}, {local}")
        raise ValueError(f"{name}: expected shards [tp, local rows, ...] holding {what} "
                         f"(tp = {tp}, {local} local rows), got {_shape_str(shards.shape)}")
    flat = shards.reshape(tp * local, *shards.shape[2:])
    flat_rows = rows.reshape(-1)
    _, first = np.unique(flat_rows, return_index=True)   # first copy of every full row, in row order
    assert first.shape[0] == full_rows
    full = flat[first]
    copies = full[flat_rows]
    same = np.all(_bits(copies) == _bits(flat), axis=1)
    if not same.all():
        bad = int(np.flatnonzero(~same)[0])
        shard, local_row = divmod(bad, local)
        owner = int(first[flat_rows[bad]]) // local   # full rows are 0..full_rows-1, so first[row]
        what = _describe_row(int(flat_rows[bad]), segments, config.state_size)
        raise ValueError(f"{name}: shard {shard} (local row {local_row}) holds a copy of {what} "
                         f"that differs from shard {owner}'s copy; duplicated groups must be "
                         "identical on every shard")
    return full


def unshard_in_proj(shards, config: Mamba2Config, tp: int) -> np.ndarray:
    """Inverse of :func:`shard_in_proj`: ``[tp, in_proj_local, ...]`` -> the full HF tensor.

    ``shards`` is a stacked array or a sequence of ``tp`` per-shard arrays. Duplicated B/C groups
    are dropped after checking (bit for bit) that all copies agree; ``ValueError`` otherwise.
    """
    rows = in_proj_shard_rows(config, tp)
    return _unshard("unshard_in_proj", shards, rows, config.in_proj_size,
                    _in_proj_trailing(config), _in_proj_segments(config), config)


def unshard_conv(shards, config: Mamba2Config, tp: int) -> np.ndarray:
    """Inverse of :func:`shard_conv`: ``[tp, conv_dim_local, ...]`` -> the full conv tensor.

    Trailing axes are kept (``[c, k]``, ``[c, 1, k]`` or bias ``[c]``); duplicates as in
    :func:`unshard_in_proj`.
    """
    rows = conv_shard_rows(config, tp)
    return _unshard("unshard_conv", shards, rows, config.conv_dim, _conv_trailing(config),
                    _conv_segments(config), config)


# -- context parallel: splitting one tensor shard's conv channels further over ``cp`` ----------------


def check_cp(config: Mamba2Config, tp: int, cp: int) -> None:
    """Raise ``ValueError`` unless each tensor shard's heads and groups split over ``cp`` ranks.

    Context parallelism moves each tensor shard's conv + SSD work to a head-sharded layout over
    ``cp`` ranks (NeMo ``mamba_cp``): ``(num_heads / tp) % cp == 0``, and the shard's groups
    ``gl`` satisfy ``gl % cp == 0`` or ``cp % gl == 0`` (then B/C are repeated ``cp / gl`` times).
    """
    local = local_config(config, tp)
    cp = _tp_int(cp)
    problems = []
    if local.heads % cp:
        problems.append(f"num_heads / tp ({config.num_heads} / {local.tp} = {local.heads}) must "
                        f"be a multiple of context ({cp})")
    if local.groups_local % cp and cp % local.groups_local:
        problems.append(f"the groups per tensor shard ({local.groups_local}) and context ({cp}) "
                        "must divide one another")
    if problems:
        raise ValueError("cannot split the Mamba-2 mixer over context=%d: %s"
                         % (cp, "; ".join(problems)))


def context_split_rows(config: Mamba2Config, tp: int, cp: int) -> np.ndarray:
    """``[cp, c_cp]`` int64: local conv channel (of one tensor shard) held by each context rank.

    A tensor shard's channels ``[x_r | B_r | C_r]`` (``conv_dim_local``) are split like a tensor
    split of a mixer with ``h/tp`` heads and ``groups_local`` groups: context rank ``c`` holds
    ``[x_rc | B_rc | C_rc]``, its ``h/(tp cp)`` heads and the group(s) they read (repeated when
    ``groups_local < cp``). The same table serves every tensor shard.
    """
    check_cp(config, tp, cp)
    local = local_config(config, tp)
    n, gl, il = local.state_size, local.groups_local, local.intermediate
    groups = (np.arange(gl, dtype=np.int64).reshape(cp, gl // cp) if gl % cp == 0
              else (np.arange(cp, dtype=np.int64) // (cp // gl))[:, None])
    def group_rows(offset):
        rows = offset + groups[:, :, None] * n + np.arange(n)[None, None, :]
        return rows.reshape(cp, -1)
    return np.concatenate([_contiguous_rows(il, cp, 0), group_rows(il), group_rows(il + gl * n)],
                          axis=1)
