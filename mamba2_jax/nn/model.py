"""The Mamba-2 causal LM: embeddings -> pre-norm blocks -> norm_f -> lm_head.

Module tree (mirrors HF transformers' key names): ``backbone.embeddings``,
``backbone.layers[i].{norm, mixer}``, ``backbone.norm_f``, ``lm_head`` (None when tied: the
logits then use the embedding matrix).

Dtype policy (as HF): each block's norm input is cast to the parameter dtype; the residual
stream is float32 when ``residual_in_fp32``; logits are float32.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mamba2_jax.config import Mamba2Config
from mamba2_jax.nn.mixer import MambaMixer2, MixerState, init_mixer_state
from mamba2_jax.nn.norm import RMSNorm

ModelState = tuple[MixerState, ...]  # one MixerState per layer


class Mamba2Block(nnx.Module):
    """``out = residual + mixer(norm(x))`` with the residual in float32 when configured."""

    def __init__(self, config: Mamba2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, param_dtype=param_dtype)
        self.mixer = MambaMixer2(config, param_dtype=param_dtype, rngs=rngs)

    def _residual(self, h):
        return h.astype(jnp.float32) if self.residual_in_fp32 else h

    def __call__(self, h, *, state=None, return_state=False, impl="auto"):
        x = self.norm(h.astype(self.norm.weight[...].dtype))
        out = self.mixer(x, state=state, return_state=return_state, impl=impl)
        if return_state:
            out, state = out
            return self._residual(h) + out, state
        return self._residual(h) + out

    def step(self, h, state, *, impl="auto"):
        out, state = self.mixer.step(self.norm(h.astype(self.norm.weight[...].dtype)), state, impl=impl)
        return self._residual(h) + out, state


class Mamba2Model(nnx.Module):
    def __init__(self, config: Mamba2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embeddings = nnx.Embed(config.vocab_size, config.hidden_size, param_dtype=param_dtype,
                                    rngs=rngs)
        self.layers = nnx.List([Mamba2Block(config, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, param_dtype=param_dtype)


class Mamba2ForCausalLM(nnx.Module):
    """Mamba-2 language model.

    ``model(ids [b, l]) -> logits [b, l, v]``; ``model.prefill(ids, state=None) -> (logits,
    state)``; ``model.decode_step(ids [b], state) -> (logits [b, v], state)``; the state is a
    tuple of per-layer :class:`MixerState`.
    """

    def __init__(self, config: Mamba2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.backbone = Mamba2Model(config, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings else
                        nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False,
                                   dtype=param_dtype, param_dtype=param_dtype, rngs=rngs))

    @property
    def param_dtype(self):
        return self.backbone.embeddings.embedding[...].dtype

    def _logits(self, h):
        h = self.backbone.norm_f(h)
        if self.lm_head is None:
            emb = self.backbone.embeddings.embedding[...]
            return jnp.einsum("...d,vd->...v", h.astype(emb.dtype), emb,
                              preferred_element_type=jnp.float32).astype(jnp.float32)
        return self.lm_head(h.astype(self.lm_head.kernel[...].dtype)).astype(jnp.float32)

    def init_state(self, batch_size: int) -> ModelState:
        """The zero state of every layer (before any token)."""
        return tuple(init_mixer_state(self.config, batch_size, self.param_dtype)
                     for _ in self.backbone.layers)

    def prefill(self, input_ids, state: ModelState | None = None, *, impl: str = "auto"):
        """Run ``input_ids [b, l]`` (continuing from ``state``); returns (logits [b, l, v], state)."""
        h = self.backbone.embeddings(input_ids)
        new_state = []
        for i, layer in enumerate(self.backbone.layers):
            h, s = layer(h, state=None if state is None else state[i], return_state=True, impl=impl)
            new_state.append(s)
        return self._logits(h), tuple(new_state)

    def __call__(self, input_ids, *, impl: str = "auto"):
        h = self.backbone.embeddings(input_ids)
        for layer in self.backbone.layers:
            h = layer(h, impl=impl)
        return self._logits(h)

    def decode_step(self, token_ids, state: ModelState, *, impl: str = "auto"):
        """One token per sequence: ``token_ids [b]`` -> (logits [b, v], new state)."""
        h = self.backbone.embeddings(token_ids)
        new_state = []
        for layer, s in zip(self.backbone.layers, state):
            h, s = layer.step(h, s, impl=impl)
            new_state.append(s)
        return self._logits(h), tuple(new_state)
