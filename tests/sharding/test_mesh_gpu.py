"""On a GPU: the mesh path (kernels inside shard_map) equals the one-device XLA path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax.config import Mamba2Config
from mamba2_jax.convert.pretrained import hf_state_dict, model_from_tensors
from mamba2_jax.nn.model import Mamba2ForCausalLM
from mamba2_jax.sharding import make_mesh

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("g", [1, 4])
def test_mesh_with_pallas_kernels_matches_xla(g):
    n = jax.device_count()
    config = Mamba2Config(hidden_size=256, num_heads=8, head_dim=64, expand=2, n_groups=g,
                          state_size=64, chunk_size=64, num_hidden_layers=2, vocab_size=512)
    tensors = hf_state_dict(Mamba2ForCausalLM(config, rngs=nnx.Rngs(3)))
    ref = model_from_tensors(config, tensors, dtype=jnp.float32)
    mesh = make_mesh(tensor=n, devices=jax.devices())
    model = model_from_tensors(config, tensors, dtype=jnp.float32, mesh=mesh)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 200)), jnp.int32)
    want, want_state = ref.prefill(ids, impl="xla")
    got, state = nnx.jit(lambda m, i: m.prefill(i, impl="auto"))(model, ids)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-3 * scale, rtol=0)
    tok = jnp.asarray([1, 2], jnp.int32)
    want_step, _ = ref.decode_step(tok, want_state, impl="xla")
    got_step, _ = nnx.jit(lambda m, t, s: m.decode_step(t, s, impl="auto"))(model, tok, state)
    np.testing.assert_allclose(np.asarray(got_step), np.asarray(want_step), atol=1e-3 * scale, rtol=0)
