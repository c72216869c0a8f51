"""mamba2-jax: Mamba-2 (vLLM ``MambaMixer2`` semantics) in JAX with Flax NNX.

Public API::

    load_pretrained(path, dtype=None, mesh=None)
                                             HF, mamba_ssm or our orbax directory -> model
                                             (laid out and placed for ``mesh`` when given)
    make_mesh(data=1, tensor=1, context=1)   the device mesh (mamba2_jax.sharding)
    save_pretrained(model, path)             HF-format directory (config.json + model.safetensors)
    generate(model, input_ids, max_new_tokens, temperature=0, top_k=None, top_p=None, ...)
    Mamba2Config, Mamba2ForCausalLM, MambaMixer2, GatedGroupRMSNorm, RMSNorm
    ssd_chunk_scan, causal_conv1d, causal_conv1d_update, selective_state_update
"""

from mamba2_jax.config import ConfigError, Mamba2Config
from mamba2_jax.convert.errors import CheckpointError
from mamba2_jax.convert.pretrained import load_pretrained, save_pretrained
from mamba2_jax.generate import generate, sample_logits
from mamba2_jax.kernels.conv1d import causal_conv1d, causal_conv1d_update
from mamba2_jax.kernels.ssd import ssd_chunk_scan
from mamba2_jax.kernels.state_update import selective_state_update
from mamba2_jax.nn.mixer import MambaMixer2, MixerState, init_mixer_state
from mamba2_jax.nn.model import Mamba2Block, Mamba2ForCausalLM, Mamba2Model
from mamba2_jax.nn.norm import GatedGroupRMSNorm, RMSNorm
from mamba2_jax.sharding import make_mesh

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "GatedGroupRMSNorm", "Mamba2Block", "Mamba2Config",
    "Mamba2ForCausalLM", "Mamba2Model", "MambaMixer2", "MixerState", "RMSNorm",
    "causal_conv1d", "causal_conv1d_update", "generate", "init_mixer_state", "load_pretrained",
    "make_mesh", "sample_logits", "save_pretrained", "selective_state_update", "ssd_chunk_scan",
]
