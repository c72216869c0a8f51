"""How one mixer's work is split over a mesh (the plan the mixer follows; no collectives here).

* ``"tensor"`` (size ``tp``) splits the heads. Parameters are stored in the ``tp`` layout
  (:mod:`mamba2_jax.sharding.params`), so the in_proj output ``[b, l, tp * in_proj_local]``
  viewed as ``[b, l, tp, in_proj_local]`` holds shard ``r``'s ``[z_r | x_r | B_r | C_r | dt_r]``
  on device ``r``.
* ``"context"`` (size ``cp``) splits the tokens of the block's input and output; for conv + SSD
  each tensor shard's channels are split further over ``cp`` by head
  (:func:`~mamba2_jax.sharding.layout.context_split_rows`), which moves the tokens to a
  head-sharded layout (XLA derives the all-to-all from the PartitionSpecs), and back.
* ``"data"`` (size ``dp``) splits sequences (the batch) when it divides them.

Conv + SSD (and the decode-time conv update + state update) run per device inside
``jax.shard_map`` on ``[.., tp, cp, local]`` views; without a mesh the same function runs on
the whole arrays (``tp = cp = 1``).
"""

from __future__ import annotations

from functools import cached_property

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mamba2_jax.config import Mamba2Config
from mamba2_jax.sharding.layout import (
    check_cp,
    check_tp,
    in_proj_shard_rows,
    local_config,
)
from mamba2_jax.sharding.mesh import axis_size


class MixerPlan:
    """The split of one ``config`` mixer over ``mesh`` (None: one device, natural layout)."""

    def __init__(self, config: Mamba2Config, mesh: Mesh | None = None):
        self.config, self.mesh = config, mesh
        self.tp, self.cp, self.dp = (axis_size(mesh, a) for a in ("tensor", "context", "data"))
        check_tp(config, self.tp)
        if self.cp > 1:
            check_cp(config, self.tp, self.cp)
        self.local = local_config(config, self.tp)
        gl = self.local.groups_local
        self.heads_cp = self.local.heads // self.cp            # heads per (tensor, context) device
        self.groups_cp = gl // self.cp if gl % self.cp == 0 else 1

    def _key(self):
        return (self.config, self.mesh)

    def __eq__(self, other):
        return isinstance(other, MixerPlan) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return f"MixerPlan(tp={self.tp}, cp={self.cp}, dp={self.dp})"

    # -- index tables (numpy constants) ---------------------------------------------------------

    @cached_property
    def in_proj_rows(self) -> np.ndarray:
        """``[tp * in_proj_local]``: natural in_proj row of each column of the ``tp`` layout."""
        return in_proj_shard_rows(self.config, self.tp).reshape(-1)

    def to_context(self, a, axis: int):
        """Split a tensor-shard-local channel axis ``[.., conv_dim_local, ..]`` -> ``[.., cp, c_cp, ..]``.

        Equal to ``take(a, layout.context_split_rows(config, tp, cp), axis)``, written with reshapes and broadcasts (which
        XLA partitions without gathering indices).
        """
        jnp = jax.numpy
        if self.cp == 1:
            return jnp.expand_dims(a, axis)
        cp, local, n = self.cp, self.local, self.config.state_size
        il, gl = local.intermediate, local.groups_local
        a = jnp.moveaxis(a, axis, -1)
        lead = a.shape[:-1]
        parts = [a[..., :il].reshape(*lead, cp, il // cp)]
        for start in (il, il + gl * n):                                   # B, then C
            groups = a[..., start:start + gl * n].reshape(*lead, gl, 1, n)
            if gl % cp == 0:
                parts.append(groups.reshape(*lead, cp, (gl // cp) * n))
            else:                                                         # repeat each group
                parts.append(jnp.broadcast_to(groups, (*lead, gl, cp // gl, n)).reshape(*lead, cp, n))
        return jnp.moveaxis(jnp.concatenate(parts, axis=-1), (-2, -1), (axis, axis + 1))

    def from_context(self, a, axis: int):
        """Inverse of :meth:`to_context` (keeps the first copy of repeated B/C channels)."""
        jnp = jax.numpy
        if self.cp == 1:
            return jnp.squeeze(a, axis)
        cp, local, n = self.cp, self.local, self.config.state_size
        il, gl = local.intermediate, local.groups_local
        hc, gc = il // cp, self.groups_cp * n
        a = jnp.moveaxis(a, (axis, axis + 1), (-2, -1))
        lead = a.shape[:-2]
        parts = [a[..., :hc].reshape(*lead, il)]
        for start in (hc, hc + gc):
            groups = a[..., start:start + gc]
            if gl % cp:                                                   # first copy of each group
                groups = groups.reshape(*lead, gl, cp // gl, n)[..., 0, :]
            parts.append(groups.reshape(*lead, gl * n))
        return jnp.moveaxis(jnp.concatenate(parts, axis=-1), -1, axis)

    # -- mesh axes ------------------------------------------------------------------------------

    def batch_axis(self, b: int) -> str | None:
        return "data" if self.mesh is not None and self.dp > 1 and b % self.dp == 0 else None

    def seq_axis(self, l: int) -> str | None:
        return "context" if self.mesh is not None and self.cp > 1 and l % self.cp == 0 else None

    def constrain(self, x, *spec):
        """``with_sharding_constraint(x, P(*spec))`` on the mesh; a no-op without one."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

    def per_device(self, f, args: dict, in_specs: dict, out_specs):
        """``f(args)`` on each device's block (``jax.shard_map``), or on everything without a mesh."""
        if self.mesh is None:
            return f(args)
        in_specs = {k: in_specs[k] for k in args}
        return jax.shard_map(f, mesh=self.mesh, in_specs=(in_specs,), out_specs=out_specs,
                             check_vma=False)(args)
