"""make_mesh and the logical-axis rules on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mamba2_jax.sharding import MESH_AXES, logical_to_spec, make_mesh, named_sharding

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


@needs8
@pytest.mark.parametrize("data,tensor,context", [(8, 1, 1), (1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)])
def test_mesh_shapes(data, tensor, context):
    mesh = make_mesh(data=data, tensor=tensor, context=context)
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == dict(data=data, tensor=tensor, context=context)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_mesh_errors():
    n = jax.device_count()
    with pytest.raises(ValueError, match=r"= 3 devices, but"):
        make_mesh(data=3, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="positive integers"):
        make_mesh(tensor=0)
    with pytest.raises(ValueError, match="positive integers"):
        make_mesh(data=True)
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    assert mesh.size == 1 and n >= 1


def test_logical_to_spec():
    assert logical_to_spec(("batch", "seq", "embed")) == P("data", "context", None)
    assert logical_to_spec(("embed", "vocab")) == P(None, "tensor")
    assert logical_to_spec((None, "ssm_heads", "head_dim", "state")) == P(None, "tensor", None, None)
    with pytest.raises(ValueError, match="not in the rules table"):
        logical_to_spec(("batch", "heads"))
    with pytest.raises(ValueError, match="two dimensions to one mesh axis"):
        logical_to_spec(("ssm_heads", "vocab"))


@needs8
def test_named_sharding_places_shards():
    mesh = make_mesh(data=2, tensor=4)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 8, 16)), jnp.float32)
    placed = jax.device_put(x, named_sharding(mesh, ("batch", "seq", "ssm_heads", "head_dim")))
    shapes = {s.data.shape for s in placed.addressable_shards}
    assert shapes == {(2, 6, 2, 16)}
    np.testing.assert_array_equal(np.asarray(placed), np.asarray(x))
    doubled = jax.jit(lambda a: a * 2)(placed)  # ordinary code keeps the sharding (GSPMD)
    assert doubled.sharding.spec == P("data", "context", "tensor", None)
    np.testing.assert_array_equal(np.asarray(doubled), 2 * np.asarray(x))
