"""Text generation: one jit-compiled prefill, then a compiled decode loop over the recurrent state.

The decode loop is a ``lax.while_loop`` that feeds each sampled token through
``Mamba2ForCausalLM.decode_step`` (one pass over each layer's weights and state per token; the
prompt is never re-run). Sequences that emit ``eos_token_id`` are padded with ``pad_token_id``
afterwards, and the loop stops early once every sequence is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P


def sample_logits(logits, key, *, temperature=0.0, top_k: int | None = None,
                  top_p: float | None = None):
    """Pick one token per row of ``logits [b, v]`` (float32).

    Greedy (argmax) when ``temperature == 0``; otherwise sample from ``softmax(logits / T)``
    restricted to the ``top_k`` largest logits and to the smallest set of tokens whose
    probability mass reaches ``top_p`` (HF transformers' rules; at least one token is kept).
    """
    if isinstance(temperature, (int, float)) and temperature == 0.0:  # static: greedy
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, ordered, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "impl"))
def _prefill(graphdef, params, input_ids, impl):
    model = nnx.merge(graphdef, params)
    logits, state = model.prefill(input_ids, impl=impl)
    return logits[:, -1], state


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k", "impl"))
def _decode_loop(graphdef, params, state, logits, key, temperature, top_p, eos, pad, *,
                 max_new_tokens, greedy, top_k, impl):
    model = nnx.merge(graphdef, params)
    b = logits.shape[0]
    sample = partial(sample_logits, temperature=0.0 if greedy else temperature, top_k=top_k,
                     top_p=top_p)

    def emit(step, tokens, done, logits, key):
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad, sample(logits, sub))
        return tokens.at[:, step].set(tok), done | jnp.isin(tok, eos), tok, key

    tokens = jnp.full((b, max_new_tokens), pad, jnp.int32)
    tokens, done, tok, key = emit(0, tokens, jnp.zeros((b,), bool), logits, key)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, tokens, done, tok, state, key = carry
        logits, state = model.decode_step(tok, state, impl=impl)
        tokens, done, tok, key = emit(step, tokens, done, logits, key)
        return step + 1, tokens, done, tok, state, key

    carry = (jnp.int32(1), tokens, done, tok, state, key)
    return jax.lax.while_loop(cond, body, carry)[1]


def generate(model, input_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             seed: int = 0, impl: str = "auto"):
    """Generate ``max_new_tokens`` after equal-length prompts ``input_ids [b, l]``.

    Returns ``[b, l + max_new_tokens]`` int32: the prompt followed by the new tokens; after a
    sequence emits ``eos_token_id`` (one id or several) its remaining positions hold
    ``pad_token_id`` (default: the config's pad id, else the first eos id, else 0). Greedy when
    ``temperature == 0``.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be [batch, length] with length >= 1, got "
                         f"shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"generate: top_k must be in [1, vocab_size], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    eos = [] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id])
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0

    mesh = getattr(model, "mesh", None)
    if mesh is not None:  # prompts (and so the states) split over "data" when it divides them
        batch = model.plan.batch_axis(input_ids.shape[0])
        input_ids = jax.device_put(input_ids, NamedSharding(mesh, P(batch, None)))
    graphdef, params = nnx.split(model)
    logits, state = _prefill(graphdef, params, input_ids, impl)
    new = _decode_loop(
        graphdef, params, state, logits, jax.random.key(seed), jnp.float32(temperature),
        None if top_p is None else jnp.float32(top_p), jnp.asarray(eos or [-1], jnp.int32),
        jnp.int32(pad_token_id),
        max_new_tokens=max_new_tokens, greedy=temperature == 0.0, top_k=top_k, impl=impl)
    return jnp.concatenate([input_ids, new], axis=1)
