"""The Mamba-2 causal LM: embeddings -> pre-norm blocks -> norm_f -> lm_head.

Module tree (mirrors HF transformers' key names): ``backbone.embeddings``,
``backbone.layers[i].{norm, mixer}``, ``backbone.norm_f``, ``lm_head`` (None when tied: the
logits then use the embedding matrix).

Dtype policy (as HF): each block's norm input is cast to the parameter dtype; the residual
stream is float32 when ``residual_in_fp32``; logits are float32.

Sharding: ``Mamba2ForCausalLM(config, mesh=mesh)`` builds every mixer for the mesh (see
:mod:`mamba2_jax.nn.mixer`) and places each parameter with the NamedSharding of its logical
names; the residual stream is laid out ``(data, context, -)``; logits ``(data, context, tensor)``
(the vocabulary over ``"tensor"`` when it divides). Without a mesh everything is one-device code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_embed_init, default_kernel_init
from jax.sharding import NamedSharding, PartitionSpec as P

from mamba2_jax.config import Mamba2Config
from mamba2_jax.kernels.common import op_kwargs
from mamba2_jax.kernels.gemv import gemv
from mamba2_jax.kernels.gemv.api import decode_takes_kernel
from mamba2_jax.kernels.gemv.reference import add_scaled_delta
from mamba2_jax.kernels.rms_norm import rms_norm
from mamba2_jax.nn.mixer import MambaMixer2, MixerState, init_mixer_state
from mamba2_jax.nn.norm import RMSNorm
from mamba2_jax.sharding.params import logical_init, place_params

ModelState = tuple[MixerState, ...]  # one MixerState per layer


class Mamba2Block(nnx.Module):
    """``out = residual + mixer(norm(x))`` with the residual in float32 when configured."""

    def __init__(self, config: Mamba2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 mesh=None):
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, param_dtype=param_dtype)
        self.mixer = MambaMixer2(config, param_dtype=param_dtype, rngs=rngs, mesh=mesh)

    def _residual(self, h):
        return h.astype(jnp.float32) if self.residual_in_fp32 else h

    def __call__(self, h, *, state=None, return_state=False, cu_seqlens=None, impl="auto"):
        x = self.norm(h.astype(self.norm.weight[...].dtype))
        out = self.mixer(x, state=state, return_state=return_state, cu_seqlens=cu_seqlens, impl=impl)
        if return_state:
            out, state = out
            return self._residual(h) + out, state
        return self._residual(h) + out

    def step(self, h, state, *, impl="auto"):
        out, state = self.mixer.step(self.norm(h.astype(self.norm.weight[...].dtype)), state, impl=impl)
        return self._residual(h) + out, state


class Mamba2Model(nnx.Module):
    def __init__(self, config: Mamba2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 mesh=None):
        self.embeddings = nnx.Embed(
            config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs,
            embedding_init=logical_init(default_embed_init, ("vocab", "embed")))
        self.layers = nnx.List([Mamba2Block(config, param_dtype=param_dtype, rngs=rngs, mesh=mesh)
                                for _ in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon, param_dtype=param_dtype)


class Mamba2ForCausalLM(nnx.Module):
    """Mamba-2 language model.

    ``model(ids [b, l]) -> logits [b, l, v]``; ``model.prefill(ids, state=None) -> (logits,
    state)``; ``model.decode_step(ids [b], state) -> (logits [b, v], state)``; the state is a
    tuple of per-layer :class:`MixerState`.
    """

    def __init__(self, config: Mamba2Config, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, mesh=None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.config = config
        self.mesh = mesh
        self.backbone = Mamba2Model(config, param_dtype=param_dtype, rngs=rngs, mesh=mesh)
        self.lm_head = (None if config.tie_word_embeddings else nnx.Linear(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=param_dtype,
            param_dtype=param_dtype, rngs=rngs,
            kernel_init=logical_init(default_kernel_init, ("embed", "vocab"))))
        if mesh is not None:
            place_params(self, mesh)

    @property
    def param_dtype(self):
        return self.backbone.embeddings.embedding[...].dtype

    @property
    def plan(self):
        return self.backbone.layers[0].mixer.plan

    def _embed(self, input_ids):
        h = self.backbone.embeddings(input_ids)
        plan = self.plan
        seq = (plan.seq_axis(input_ids.shape[1]),) if input_ids.ndim == 2 else ()
        return plan.constrain(h, plan.batch_axis(input_ids.shape[0]), *seq, None)

    def _logits(self, h, *, head_impl=None):
        """float32 logits of the final hidden states. ``head_impl`` "pallas" / "interpret" (the
        decode step's explicit kernel choice, rows <= gemv's MAX_AUTO_ROWS, no mesh): the head
        through the Pallas GEMV (the tied embedding read as w [vocab, d]); otherwise XLA."""
        h = self.backbone.norm_f(h)
        tied = self.lm_head is None
        w = self.backbone.embeddings.embedding[...] if tied else self.lm_head.kernel[...]
        rows = math.prod(h.shape[:-1])
        if decode_takes_kernel(head_impl, rows, mesh=self.mesh):  # XLA's head under "auto"
            return gemv(h.astype(w.dtype), w, w_layout="out_in" if tied else "in_out",
                        out_dtype=jnp.float32, **op_kwargs(head_impl))
        if tied:
            return jnp.einsum("...d,vd->...v", h.astype(w.dtype), w,
                              preferred_element_type=jnp.float32).astype(jnp.float32)
        return self.lm_head(h.astype(w.dtype)).astype(jnp.float32)

    def init_state(self, batch_size: int) -> ModelState:
        """The zero state of every layer (before any token), sharded like the mixers on a mesh.

        Every layer gets its own buffers (so the state can be donated).
        """
        plan = self.plan

        def zeros():
            state = init_mixer_state(self.config, batch_size, self.param_dtype, tp=plan.tp)
            if self.mesh is None:
                return state
            bx = plan.batch_axis(batch_size)
            return MixerState(
                jax.device_put(state.conv, NamedSharding(self.mesh, P(bx, "tensor", None))),
                jax.device_put(state.ssm, NamedSharding(self.mesh, P(bx, "tensor", None, None))))

        return tuple(zeros() for _ in self.backbone.layers)

    def prefill(self, input_ids, state: ModelState | None = None, *, cu_seqlens=None,
                impl: str = "auto"):
        """Run ``input_ids [b, l]`` (continuing from ``state``); returns (logits [b, l, v], state).

        ``cu_seqlens [nseq + 1]``: ``input_ids`` is ``[1, t]`` holding packed sequences; the
        state then has one row per sequence.
        """
        h = self._embed(input_ids)
        new_state = []
        for i, layer in enumerate(self.backbone.layers):
            h, s = layer(h, state=None if state is None else state[i], return_state=True,
                         cu_seqlens=cu_seqlens, impl=impl)
            new_state.append(s)
        return self._logits(h), tuple(new_state)

    def __call__(self, input_ids, *, cu_seqlens=None, impl: str = "auto"):
        h = self._embed(input_ids)
        for layer in self.backbone.layers:
            h = layer(h, cu_seqlens=cu_seqlens, impl=impl)
        return self._logits(h)

    def decode_step(self, token_ids, state: ModelState, *, impl: str = "auto"):
        """One token per sequence: ``token_ids [b]`` -> (logits [b, v], new state).

        ``impl="pallas"`` / ``"interpret"`` runs the projections and the LM head through the
        Pallas GEMV (up to 16 rows, without a mesh); ``"auto"`` on a GPU only a bf16 in_proj
        (H200: XLA was faster for out_proj and the LM head; see ``MambaMixer2._linear``)."""
        h = self._embed(token_ids)
        layers = self.backbone.layers
        if layers and all(layer.mixer.folds_norms(impl, h.shape[0]) for layer in layers):
            return self._folded_decode_step(h, state, impl)
        if layers and layers[0].mixer._fused_step(impl, h.shape[0]):
            return self._fused_decode_step(h, state, impl)
        new_state = []
        for layer, s in zip(layers, state):
            h, s = layer.step(h, s, impl=impl)
            new_state.append(s)
        return self._logits(h, head_impl=impl), tuple(new_state)

    def _folded_decode_step(self, h, state, impl):
        """``decode_step`` with every norm folded into the launches around the projections
        (``MambaMixer2.folded_step``); the last block's output is added (its gated norm's
        1 / RMS applied) by XLA before the final norm."""
        layers = self.backbone.layers
        h, delta, dss, new_state = layers[0]._residual(h), None, None, []
        for layer, s in zip(layers, state):
            h, delta, dss, s = layer.mixer.folded_step(h, delta, dss, layer.norm, s, impl=impl)
            new_state.append(s)
        h = add_scaled_delta(h, delta, dss, delta_count=self.config.intermediate_size,
                             delta_eps=layers[-1].mixer.norm.eps)
        return self._logits(h, head_impl=impl), tuple(new_state)

    def _fused_decode_step(self, h, state, impl):
        """``decode_step`` with the fused mixer step (``MambaMixer2._fused_step``): each
        block's residual add runs in the same launch as the next block's norm
        (kernels/rms_norm); the math is ``Mamba2Block.step``'s, block after block."""
        new_state, delta = [], None
        for layer, s in zip(self.backbone.layers, state):
            norm = layer.norm
            kw = dict(eps=norm.eps, in_dtype=norm.weight[...].dtype, **op_kwargs(impl))
            if delta is None:
                x = rms_norm(h, norm.weight[...], **kw)
                h = layer._residual(h)
            else:  # h + delta (the previous block's output), then this block's norm
                x, h = rms_norm(h, norm.weight[...], delta=delta, **kw)
            delta, s = layer.mixer.step(x, s, impl=impl)
            new_state.append(s)
        return self._logits(h + delta, head_impl=impl), tuple(new_state)
