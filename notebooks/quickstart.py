# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # mamba2-jax quickstart
#
# Build a small random Mamba-2, save it as an HF checkpoint, load it back, look at the recurrent
# state, and generate. With a real checkpoint directory (HF or state-spaces/mamba_ssm format),
# replace the first cell by `model = m2.load_pretrained("path/to/checkpoint")`.

# %%
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import mamba2_jax as m2

config = m2.Mamba2Config(hidden_size=64, num_heads=8, head_dim=16, n_groups=2, state_size=16,
                         chunk_size=16, num_hidden_layers=2, vocab_size=128)
path = m2.save_pretrained(m2.Mamba2ForCausalLM(config), tempfile.mkdtemp())
model = m2.load_pretrained(path)
print(model.config.num_heads, "heads,", model.config.n_groups, "groups, backend", jax.default_backend())

# %% [markdown]
# A forward pass gives float32 logits; a prefill also returns each layer's state
# (`conv [b, i + 2gn, k - 1]`, `ssm [b, h, p, n]`), which a decode step consumes.

# %%
ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 10)))
logits = model(ids)
prefix_logits, state = model.prefill(ids[:, :9])
step_logits, state = model.decode_step(ids[:, 9], state)
print(logits.shape, state[0].conv.shape, state[0].ssm.shape)
print("decode step == full forward:", bool(jnp.allclose(step_logits, logits[:, -1], atol=1e-4)))

# %% [markdown]
# Generation: one compiled prefill, then a compiled decode loop over the state.

# %%
greedy = m2.generate(model, ids, 8)
sampled = m2.generate(model, ids, 8, temperature=0.8, top_p=0.9, seed=1)
print(np.asarray(greedy[:, 10:]))
print(np.asarray(sampled[:, 10:]))

# %% [markdown]
# On a mesh: `make_mesh(data=, tensor=, context=)` over the devices present (here all of them;
# on a CPU that is one device unless `jax_num_cpu_devices` is set). The parameters are laid out
# for the `tensor` size and placed with their NamedShardings; the numbers do not change.
# `mamba2-convert path ckpt --tp N` writes a checkpoint already laid out for N tensor shards.

# %%
from mamba2_jax.sharding import make_mesh

mesh = make_mesh(tensor=jax.device_count())
sharded = m2.load_pretrained(path, mesh=mesh)
kernel = sharded.backbone.layers[0].mixer.in_proj.kernel[...]
print(mesh.shape, kernel.sharding.spec)
print("same logits on the mesh:", bool(jnp.allclose(sharded(ids), logits, atol=1e-4)))
