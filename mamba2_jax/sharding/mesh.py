"""The device mesh: axes ("data", "tensor", "context").

``data`` splits sequences (batch), ``tensor`` splits SSM heads (and the vocabulary),
``context`` splits the tokens of long sequences. Axes are ``Auto``: XLA derives the collectives
of ordinary code from PartitionSpecs; Pallas kernels run per shard inside ``jax.shard_map``.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "tensor", "context")


def make_mesh(*, data: int = 1, tensor: int = 1, context: int = 1, devices=None) -> Mesh:
    """A ``data x tensor x context`` mesh over ``devices`` (default: all of ``jax.devices()``).

    The product of the sizes must equal the number of devices; pass ``devices=jax.devices()[:n]``
    to use fewer.
    """
    sizes = dict(data=data, tensor=tensor, context=context)
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"make_mesh: axis sizes must be positive integers, got {bad}")
    devices = list(jax.devices() if devices is None else devices)
    n = math.prod(sizes.values())
    if n != len(devices):
        raise ValueError(f"make_mesh: data * tensor * context = {data} * {tensor} * {context} = {n} "
                         f"devices, but {len(devices)} were given (pass devices=jax.devices()[:{n}])")
    return jax.make_mesh((data, tensor, context), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Size of ``axis`` on ``mesh``; 1 without a mesh or without that axis."""
    return 1 if mesh is None else mesh.shape.get(axis, 1)
