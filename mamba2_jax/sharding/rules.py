"""One table from logical axis names (carried by parameters and activations) to mesh axes.

Logical names: ``batch`` (sequences), ``seq`` (tokens), ``embed`` (d), ``vocab`` (v),
``ssm_heads`` (h, and everything laid out per head: the shard-major in_proj/conv channels,
A_log, D, dt_bias, the gated norm's weight), ``state`` (n) and ``head_dim`` (p).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

RULES: Mapping[str, str | None] = {
    "batch": "data",
    "seq": "context",
    "embed": None,
    "vocab": "tensor",
    "ssm_heads": "tensor",
    "head_dim": None,
    "state": None,
}


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, str | None] = RULES) -> PartitionSpec:
    """``("batch", "seq", "embed") -> PartitionSpec("data", "context", None)``; None stays None."""
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise ValueError(f"logical axis name(s) {unknown} are not in the rules table "
                         f"({', '.join(sorted(rules))})")
    mesh_axes = [None if n is None else rules[n] for n in names]
    used = [a for a in mesh_axes if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {tuple(names)} map two dimensions to one mesh axis: {mesh_axes}")
    return PartitionSpec(*mesh_axes)


def named_sharding(mesh: Mesh, names: Sequence[str | None],
                   rules: Mapping[str, str | None] = RULES) -> NamedSharding:
    """The NamedSharding of an array whose dimensions carry the logical ``names``."""
    return NamedSharding(mesh, logical_to_spec(names, rules))
