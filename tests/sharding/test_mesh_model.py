"""The model under meshes of 8 fake CPU devices equals the single-device model.

Oracle: the same weights on one device (itself checked against HF transformers in
test_hf_parity). Every mesh run is jit-compiled with sharded parameters, inputs and states.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_layout import (  # tests/sharding is on sys.path
    explicit_conv_shard,
    explicit_in_proj_shard,
    vllm_sharded_loader,
    vllm_specs,
)

from mamba2_jax.config import Mamba2Config
from mamba2_jax.convert.errors import CheckpointError
from mamba2_jax.convert.pretrained import hf_state_dict, model_from_tensors
from mamba2_jax.generate import generate
from mamba2_jax.nn.mixer import MambaMixer2
from mamba2_jax.nn.model import Mamba2ForCausalLM
from mamba2_jax.nn.norm import GatedGroupRMSNorm
from mamba2_jax.sharding import in_proj_shard_rows, make_mesh
from mamba2_jax.sharding.layout import context_split_rows
from mamba2_jax.sharding.params import place_params
from mamba2_jax.sharding.plan import MixerPlan

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")

B, L, NEW = 8, 16, 5


def make_config(g, **kw):
    base = dict(hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=g, state_size=8,
                chunk_size=8, num_hidden_layers=2, vocab_size=64, use_bias=True,
                tie_word_embeddings=False, time_step_limit=(0.0, 10.0))
    return Mamba2Config(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def weights(g, **kw):
    """HF-layout tensors of a random model (every parameter moved off its init value)."""
    config = make_config(g, **kw)
    tensors = hf_state_dict(Mamba2ForCausalLM(config, rngs=nnx.Rngs(g)))
    rng = np.random.default_rng(g)
    out = {}
    for key, value in tensors.items():
        noise = rng.standard_normal(value.shape).astype(np.float32)
        if key.endswith("A_log"):
            out[key] = np.log(rng.uniform(1, 16, value.shape)).astype(np.float32)
        elif key.endswith("dt_bias"):
            out[key] = (noise * 0.5 - 1.0).astype(np.float32)
        elif key.endswith("norm.weight") or key.endswith("norm_f.weight"):
            out[key] = (1 + 0.3 * noise).astype(np.float32)
        else:
            out[key] = (value + 0.2 * noise * max(float(value.std()), 0.05)).astype(np.float32)
    return config, out


def token_ids(seed=0, shape=(B, L)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 64, shape), jnp.int32)


@functools.lru_cache(maxsize=None)
def single_device(g):
    config, tensors = weights(g)
    model = model_from_tensors(config, tensors, dtype=jnp.float32)
    ids = token_ids()
    return np.asarray(model(ids)), np.asarray(generate(model, ids, NEW))


def on_mesh(g, data=1, tensor=1, context=1):
    config, tensors = weights(g)
    mesh = make_mesh(data=data, tensor=tensor, context=context,
                     devices=jax.devices()[:data * tensor * context])
    return model_from_tensors(config, tensors, dtype=jnp.float32, mesh=mesh), mesh


def assert_close(a, b, rel=2e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * np.abs(b).max())


def check_against_single_device(g, **axes):
    model, mesh = on_mesh(g, **axes)
    ref_logits, ref_tokens = single_device(g)
    ids = jax.device_put(token_ids(), NamedSharding(mesh, P("data" if axes.get("data", 1) > 1
                                                           else None, None)))
    logits = nnx.jit(lambda m, i: m(i))(model, ids)
    assert_close(logits, ref_logits)
    np.testing.assert_array_equal(np.asarray(generate(model, ids, NEW)), ref_tokens)
    return model, mesh, logits


TP_MATRIX = [(g, tp) for tp in (1, 2, 4, 8) for g in (1, 2, 4, 8)]  # h = 8: every pair is valid


@pytest.mark.parametrize("g,tp", TP_MATRIX)
def test_tensor_parallel(g, tp):
    model, mesh, logits = check_against_single_device(g, tensor=tp)
    kernel = model.backbone.layers[0].mixer.in_proj.kernel[...]
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tensor")), 2)
    if tp > 1:
        assert logits.sharding.spec[-1] == "tensor"       # vocab 64 divides every tp


@pytest.mark.parametrize("g,tensor,context", [(1, 1, 2), (1, 1, 4), (8, 1, 4), (2, 2, 2),
                                              (1, 2, 4), (8, 2, 4), (4, 2, 2)])
def test_context_parallel(g, tensor, context):
    check_against_single_device(g, tensor=tensor, context=context)


@pytest.mark.parametrize("g,data,tensor,context", [(2, 2, 4, 1), (1, 4, 2, 1), (8, 8, 1, 1),
                                                   (2, 2, 2, 2)])
def test_data_parallel(g, data, tensor, context):
    model, mesh, logits = check_against_single_device(g, data=data, tensor=tensor, context=context)
    assert logits.sharding.spec[0] == "data"


def test_state_is_sharded_and_decode_matches():
    """prefill -> decode_step under (data 2, tensor 2, context 2) == one device, state sharded."""
    config, tensors = weights(2)
    ref = model_from_tensors(config, tensors, dtype=jnp.float32)
    model, mesh = on_mesh(2, data=2, tensor=2, context=2)
    ids = token_ids(3)
    logits, state = nnx.jit(lambda m, i: m.prefill(i))(model, ids)
    ref_logits, ref_state = ref.prefill(ids)
    assert_close(logits, ref_logits)
    spec = state[0].ssm.sharding.spec           # heads over tensor (and context, XLA's choice)
    assert spec[0] == "data" and "tensor" in np.atleast_1d(spec[1])
    step = nnx.jit(lambda m, t, s: m.decode_step(t, s))
    tok = jnp.arange(B, dtype=jnp.int32) * 7
    for _ in range(3):
        logits, state = step(model, tok, state)
        ref_logits, ref_state = ref.decode_step(tok, ref_state)
        assert_close(logits, ref_logits)
        tok = jnp.argmax(ref_logits, -1).astype(jnp.int32)
    assert_close(state[1].ssm, ref_state[1].ssm)


# -- every device holds what vLLM's loader gives its rank ----------------------------------------


def _by_rank(array, local):
    """{tensor rank: that device's block} of a parameter split along its last axis."""
    out = {}
    for shard in array.addressable_shards:
        start = shard.index[-1].start or 0
        out[start // local] = np.asarray(shard.data)
    return out


@pytest.mark.parametrize("g,tp", [(1, 2), (1, 8), (2, 4), (2, 8), (4, 2), (8, 8)])
def test_device_shards_are_the_shard_major_layout(g, tp):
    config, tensors = weights(g)
    model, _ = on_mesh(g, tensor=tp)
    mixer = model.backbone.layers[1].mixer
    w = tensors["backbone.layers.1.mixer.in_proj.weight"]
    conv_w = tensors["backbone.layers.1.mixer.conv1d.weight"][:, 0, :]
    in_spec, conv_spec = vllm_specs(config, tp)
    if g == 1 or g % tp == 0:       # what vLLM's mamba_v2_sharded_weight_loader gives rank r
        want_in = [vllm_sharded_loader(w, in_spec, tp, r) for r in range(tp)]
        want_conv = [vllm_sharded_loader(conv_w, conv_spec, tp, r) for r in range(tp)]
    else:                           # 1 < g < tp: the explicit statement of group duplication
        want_in = [explicit_in_proj_shard(w, config, tp, r) for r in range(tp)]
        want_conv = [explicit_conv_shard(conv_w, config, tp, r) for r in range(tp)]
    blocks = _by_rank(mixer.in_proj.kernel[...], want_in[0].shape[0])
    assert sorted(blocks) == list(range(tp))
    for r in range(tp):
        np.testing.assert_array_equal(blocks[r].T, want_in[r])
    for shard in mixer.conv1d.weight[...].addressable_shards:
        r = (shard.index[0].start or 0) // want_conv[0].shape[0]
        np.testing.assert_array_equal(np.asarray(shard.data), want_conv[r])
    rows = in_proj_shard_rows(config, tp)
    bias = tensors["backbone.layers.1.mixer.in_proj.bias"]
    for r, block in _by_rank(mixer.in_proj.bias[...], rows.shape[1]).items():
        np.testing.assert_array_equal(block, bias[rows[r]])


# -- collectives come from PartitionSpecs, and only the ones the design implies -----------------


def collectives(compiled_text):
    return Counter(re.findall(r"\b(all-reduce|all-gather|all-to-all|collective-permute|"
                              r"reduce-scatter)(?:-start)?\(", compiled_text))


def mixer_collectives(g, tp, cp=1):
    config = make_config(g)
    mesh = make_mesh(tensor=tp, context=cp, devices=jax.devices()[:tp * cp])
    mixer = place_params(MambaMixer2(config, rngs=nnx.Rngs(0), mesh=mesh), mesh)
    u = jax.device_put(jnp.ones((B, L, config.hidden_size)),
                       NamedSharding(mesh, P(None, "context" if cp > 1 else None, None)))
    return collectives(nnx.jit(lambda m, u: m(u)).lower(mixer, u).compile().as_text())


@pytest.mark.parametrize("g,tp,expected", [
    (4, 4, {"all-reduce": 1}),      # tp | g: local norm; the out_proj reduction only
    (8, 2, {"all-reduce": 1}),
    (1, 4, {"all-reduce": 2}),      # g == 1: + one norm reduction across shards
    (2, 4, {"all-reduce": 2}),      # duplicated groups: the norm group spans 2 shards
])
def test_mixer_collectives_tensor_parallel(g, tp, expected):
    assert mixer_collectives(g, tp) == Counter(expected)


@pytest.mark.parametrize("g,tp,cp,expected", [
    (1, 1, 2, {"all-to-all": 3}),   # xBC and dt to head-sharded, y back
    (8, 1, 4, {"all-to-all": 3}),
    (2, 2, 2, {"all-to-all": 3, "all-reduce": 1}),
])
def test_mixer_collectives_context_parallel(g, tp, cp, expected):
    assert mixer_collectives(g, tp, cp) == Counter(expected)


@pytest.mark.parametrize("g,tp", [(4, 4), (8, 2), (2, 2)])
def test_gated_norm_is_local_when_tp_divides_groups(g, tp):
    mesh = make_mesh(tensor=tp, devices=jax.devices()[:tp])
    norm = GatedGroupRMSNorm(64, g)
    place_params(norm, mesh)
    assert norm.weight[...].sharding.spec == P("tensor")
    x = jax.device_put(jnp.ones((2, 4, 64)), NamedSharding(mesh, P(None, None, "tensor")))
    text = nnx.jit(lambda n, x: n(x, x)).lower(norm, x).compile().as_text()
    assert collectives(text) == Counter()


# -- gradients and packed sequences ----------------------------------------------------------------


@pytest.mark.parametrize("g,data,tensor,context,impl", [
    (1, 1, 1, 4, "auto"), (2, 1, 2, 2, "auto"), (8, 2, 2, 2, "auto"),
    (2, 1, 2, 2, "interpret"),  # the Pallas SSD backward per shard inside shard_map
])
def test_gradients_match(g, data, tensor, context, impl):
    config, tensors = weights(g)
    ref = model_from_tensors(config, tensors, dtype=jnp.float32)
    model, _ = on_mesh(g, data=data, tensor=tensor, context=context)
    ids, targets = token_ids(5), token_ids(6)

    def loss(m, impl="auto"):
        logp = jax.nn.log_softmax(m(ids, impl=impl), -1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

    want = hf_state_dict_grads(ref, nnx.grad(loss)(ref))
    got = hf_state_dict_grads(model, nnx.jit(nnx.grad(lambda m: loss(m, impl)))(model))
    assert want.keys() == got.keys()
    for key in want:
        assert_close(got[key], want[key], rel=1e-4)


def hf_state_dict_grads(model, grads):
    """Gradients in HF names and natural layout (duplicated-group gradients summed)."""
    from mamba2_jax.convert.hf_layout import hf_key, to_hf
    from mamba2_jax.sharding.params import _kind

    plan = model.plan
    out = {}
    for path, var in nnx.to_flat_state(grads):
        key = ".".join(map(str, path))
        value = np.asarray(var.get_value())
        kind = _kind(key)
        if kind is not None and plan.tp > 1:
            rows = (plan.in_proj_rows if kind.startswith("in_proj")
                    else _conv_rows(model.config, plan.tp))
            full = np.zeros(value.shape[:-1] + (int(rows.max()) + 1,) if kind == "in_proj.kernel"
                            else (int(rows.max()) + 1,) + value.shape[1:], value.dtype)
            if kind == "in_proj.kernel":
                np.add.at(full.T, rows, value.T)
            else:
                np.add.at(full, rows, value)
            value = full
        out[hf_key(path)] = to_hf(path, value)
    return out


def _conv_rows(config, tp):
    from mamba2_jax.sharding import conv_shard_rows
    return conv_shard_rows(config, tp).reshape(-1)


@pytest.mark.parametrize("g,tensor,context", [(1, 1, 1), (2, 2, 2), (8, 1, 4)])
def test_packed_sequences(g, tensor, context):
    """Packed varlen input (cu_seqlens) == each sequence on its own, on one device or a mesh."""
    config, tensors = weights(g)
    ref = model_from_tensors(config, tensors, dtype=jnp.float32)
    model, _ = (ref, None) if tensor * context == 1 else on_mesh(g, tensor=tensor, context=context)
    lengths = [5, 0, 19, 8]                         # 32 tokens, divisible by context
    ids = token_ids(7, (1, sum(lengths)))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
    logits, state = nnx.jit(lambda m, i, c: m.prefill(i, cu_seqlens=c))(model, ids, cu)
    for s, (start, n) in enumerate(zip(np.asarray(cu[:-1]), lengths)):
        if n == 0:
            continue
        want, want_state = ref.prefill(ids[:, start:start + n])
        assert_close(logits[:, start:start + n], want)
        assert_close(state[0].ssm[s], want_state[0].ssm[0])
        rows = _conv_rows(config, tensor)                 # the conv state is in the tp layout
        assert_close(state[1].conv[s], want_state[1].conv[0][rows])


# -- plan details and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("g,tp,cp", [(1, 1, 2), (2, 1, 4), (8, 2, 2), (4, 1, 2), (2, 2, 4)])
def test_context_split_matches_row_table(g, tp, cp):
    mesh = make_mesh(tensor=tp, context=cp, devices=jax.devices()[:tp * cp])
    plan = MixerPlan(make_config(g), mesh)
    a = jnp.asarray(np.random.default_rng(0).standard_normal((3, plan.local.conv_dim_local, 2)))
    split = plan.to_context(a, 1)
    rows = context_split_rows(make_config(g), tp, cp)
    np.testing.assert_array_equal(split, np.take(np.asarray(a), rows, axis=1))
    np.testing.assert_array_equal(plan.from_context(split, 1), a)


def test_mesh_errors_are_clear():
    config, tensors = weights(1)
    bad = make_config(1, num_heads=6, head_dim=8, hidden_size=24)   # 6 heads over 4 shards
    mesh4 = make_mesh(tensor=4, devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of tp \(4\)"):
        Mamba2ForCausalLM(bad, mesh=mesh4)
    with pytest.raises(CheckpointError, match=r"num_heads \(6\) must be a multiple of tp \(4\)"):
        model_from_tensors(bad, tensors, dtype=jnp.float32, mesh=mesh4)
    mesh = make_mesh(tensor=2, context=4, devices=jax.devices()[:8])
    with pytest.raises(ValueError, match=r"num_heads / tp .* must be a multiple of context"):
        Mamba2ForCausalLM(make_config(1, num_heads=4, head_dim=16), mesh=mesh)


@pytest.mark.parametrize("g,data,tensor,context", [(2, 1, 2, 2), (1, 2, 4, 1)])
def test_mesh_with_pallas_kernels_in_interpret_mode(g, data, tensor, context):
    """The Pallas SSD and state-update kernels run per shard inside shard_map (interpret mode)."""
    model, mesh = on_mesh(g, data=data, tensor=tensor, context=context)
    ref_logits, _ = single_device(g)
    ids = token_ids()
    logits, state = nnx.jit(lambda m, i: m.prefill(i, impl="interpret"))(model, ids)
    assert_close(logits, ref_logits, rel=1e-4)
    config, tensors = weights(g)
    ref = model_from_tensors(config, tensors, dtype=jnp.float32)
    _, ref_state = ref.prefill(ids)
    tok = jnp.arange(B, dtype=jnp.int32)
    got, _ = nnx.jit(lambda m, t, s: m.decode_step(t, s, impl="interpret"))(model, tok, state)
    want, _ = ref.decode_step(tok, ref_state)
    assert_close(got, want, rel=1e-4)
