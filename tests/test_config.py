"""Mamba2Config: HF transformers parity, the mamba_ssm format, JSON round trips, every error."""

import dataclasses
import json
import math

import numpy as np
import pytest
import transformers

from mamba2_jax.config import ConfigError, Mamba2Config

OUR_EXTRAS = {"d_has_hdim", "ssm_state_dtype", "use_rms_norm"}
MAYBE_NOT_HF = set()

NON_DEFAULT_HF = dict(hidden_size=96, num_heads=12, head_dim=16, expand=2, n_groups=3, state_size=24,
                      conv_kernel=3, chunk_size=32, num_hidden_layers=5, vocab_size=1000,
                      layer_norm_epsilon=1e-6, use_bias=True, use_conv_bias=False,
                      residual_in_fp32=False, time_step_limit=(0.01, 5.0), tie_word_embeddings=True,
                      pad_token_id=7, bos_token_id=5, eos_token_id=6)

STATE_SPACES_2P7B = {"d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277,
                     "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {},
                     "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                     "pad_vocab_size_multiple": 16, "tie_embeddings": True}

# Codestral Mamba's HF config.json (transformers 4.44 era): extra keys, norm_before_gate: true.
CODESTRAL_HF = {"_name_or_path": "/raid/codestral-hf", "architectures": ["Mamba2ForCausalLM"],
                "bos_token_id": 0, "chunk_size": 256, "conv_kernel": 4, "eos_token_id": 0,
                "expand": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 4096,
                "initializer_range": 0.1, "intermediate_size": 8192, "layer_norm_epsilon": 1e-05,
                "model_type": "mamba2", "n_groups": 8, "norm_before_gate": True, "num_heads": 128,
                "num_hidden_layers": 64, "pad_token_id": 0, "rescale_prenorm_residual": False,
                "residual_in_fp32": True, "rms_norm": True, "state_size": 128,
                "tie_word_embeddings": False, "time_step_floor": 0.0001,
                "time_step_init_scheme": "random", "time_step_limit": [0.0, math.inf],
                "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 256,
                "time_step_scale": 1.0, "torch_dtype": "bfloat16",
                "transformers_version": "4.44.0.dev0", "use_bias": False, "use_cache": True,
                "use_conv_bias": True, "vocab_size": 32768}

SMALL = dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=8, chunk_size=8,
             num_hidden_layers=2, vocab_size=64)


def field_names():
    return [f.name for f in dataclasses.fields(Mamba2Config)]


def hf_value(hf_config, name):
    v = getattr(hf_config, name)
    return tuple(v) if isinstance(v, list) else v


# -- HF transformers -------------------------------------------------------------------------------


def test_defaults_equal_hf_transformers_defaults():
    ours, hf = Mamba2Config(), transformers.Mamba2Config()
    not_in_hf = {n for n in field_names() if not hasattr(hf, n)}
    assert OUR_EXTRAS <= not_in_hf <= OUR_EXTRAS | MAYBE_NOT_HF
    for name in field_names():
        if name not in not_in_hf:
            assert getattr(ours, name) == hf_value(hf, name), name
    assert ours.intermediate_size == hf.expand * hf.hidden_size == 8192
    assert (ours.use_rms_norm, ours.d_has_hdim, ours.ssm_state_dtype) == (True, False, "float32")


@pytest.mark.parametrize("through_json", [False, True])
def test_from_hf_dict_reads_non_default_transformers_config(through_json):
    hf = transformers.Mamba2Config(**NON_DEFAULT_HF)
    d = json.loads(hf.to_json_string()) if through_json else hf.to_dict()
    ours = Mamba2Config.from_hf_dict(d)
    for name in field_names():
        if hasattr(hf, name):
            assert getattr(ours, name) == hf_value(hf, name), name
    for name, value in NON_DEFAULT_HF.items():
        assert getattr(ours, name) == value, name
    assert isinstance(ours.time_step_limit, tuple)
    assert Mamba2Config.from_dict(d) == ours


def test_config_json_written_by_transformers(tmp_path):
    """transformers 5 writes inf as {"__float__": "Infinity"}; 4.x wrote a bare Infinity."""
    hf = transformers.Mamba2Config(**{**NON_DEFAULT_HF, "time_step_limit": (0.001, math.inf)})
    hf.save_pretrained(tmp_path)
    ours = Mamba2Config.from_pretrained(tmp_path)
    assert ours.time_step_limit == (0.001, math.inf)
    assert ours == Mamba2Config.from_hf_dict({**hf.to_dict(), "time_step_limit": [0.001, math.inf]})
    tagged = {**hf.to_dict(), "time_step_limit": [0.0, {"__float__": "NaN"}]}
    with pytest.raises(ConfigError, match=r"time_step_limit must satisfy.*nan"):
        Mamba2Config.from_hf_dict(tagged)


def test_codestral_hf_config_loads_and_ignores_norm_before_gate():
    ours = Mamba2Config.from_dict(CODESTRAL_HF)
    assert ours == Mamba2Config(pad_token_id=0, eos_token_id=0)
    with pytest.raises(ConfigError, match=r"intermediate_size \(4096\).*expand \* hidden_size"):
        Mamba2Config.from_hf_dict({**CODESTRAL_HF, "intermediate_size": 4096})


def test_hf_model_type_must_be_mamba2():
    with pytest.raises(ConfigError, match=r"model_type is 'mamba'.*'mamba2'"):
        Mamba2Config.from_hf_dict({"model_type": "mamba", "hidden_size": 64})
    with pytest.raises(ConfigError, match="model_type is 'nemotron_h'"):
        Mamba2Config.from_dict({"model_type": "nemotron_h"})


def test_to_hf_dict_round_trips_through_json_and_transformers():
    config = Mamba2Config(**SMALL, time_step_limit=[0.001, math.inf], eos_token_id=[3, 4],
                          d_has_hdim=True, ssm_state_dtype="bfloat16", use_rms_norm=False,
                          tie_word_embeddings=True)
    text = json.dumps(config.to_hf_dict())
    assert "Infinity" in text
    d = json.loads(text)
    assert d["model_type"] == "mamba2" and d["time_step_limit"] == [0.001, math.inf]
    assert Mamba2Config.from_hf_dict(d) == config
    assert Mamba2Config.from_dict(d) == config
    hf = transformers.Mamba2Config(**d)  # transformers reads what save_pretrained writes
    assert (hf.hidden_size, hf.num_heads, hf.n_groups, hf.state_size) == (32, 4, 2, 8)
    assert Mamba2Config.from_hf_dict(hf.to_dict()) == config


# -- mamba_ssm -------------------------------------------------------------------------------------


def test_state_spaces_mamba2_2p7b_config():
    c = Mamba2Config.from_dict(STATE_SPACES_2P7B)
    assert c.vocab_size == 50288 and c.num_heads == 80 and c.head_dim == 64
    assert c.n_groups == 1 and c.state_size == 128 and c.tie_word_embeddings
    assert (c.hidden_size, c.num_hidden_layers, c.expand, c.conv_kernel, c.chunk_size) == (2560, 64, 2, 4, 256)
    assert c.time_step_limit == (0.0, math.inf) and c.use_rms_norm and c.residual_in_fp32
    assert (c.use_bias, c.use_conv_bias, c.d_has_hdim, c.layer_norm_epsilon) == (False, True, False, 1e-5)
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (0, 0, 0)
    assert c.in_proj_size == 2 * 5120 + 2 * 128 + 80 and c.conv_dim == 5120 + 256


@pytest.mark.parametrize("d_model,n_layer,heads", [(768, 24, 24), (1024, 48, 32), (1536, 48, 48),
                                                   (2048, 48, 64)])
def test_state_spaces_sizes(d_model, n_layer, heads):
    c = Mamba2Config.from_mamba_ssm_dict({**STATE_SPACES_2P7B, "d_model": d_model, "n_layer": n_layer})
    assert (c.num_heads, c.num_hidden_layers, c.intermediate_size) == (heads, n_layer, 2 * d_model)
    if d_model == 768:  # the 130m worked example: in_proj [3352, 768], conv1d [1792, 1, 4]
        assert (c.in_proj_size, c.conv_dim) == (3352, 1792)


def test_mamba_ssm_every_ssm_cfg_field_and_top_level_defaults():
    d = {"d_model": 48, "n_layer": 3, "vocab_size": 100,
         "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "d_conv": 3, "expand": 2, "headdim": 8,
                     "ngroups": 4, "rmsnorm": False, "dt_limit": [0.001, 0.5], "bias": True,
                     "conv_bias": False, "chunk_size": 64, "D_has_hdim": True, "d_ssm": 96,
                     "norm_before_gate": False, "dt_min": 0.01, "dt_max": 0.2,
                     "dt_init_floor": 1e-3, "A_init_range": [1, 8], "conv_init": None,
                     "use_mem_eff_path": False}}
    c = Mamba2Config.from_mamba_ssm_dict(d)
    assert (c.state_size, c.conv_kernel, c.head_dim, c.num_heads, c.n_groups) == (16, 3, 8, 12, 4)
    assert (c.use_rms_norm, c.use_bias, c.use_conv_bias, c.chunk_size, c.d_has_hdim) == (False, True, False, 64, True)
    assert c.time_step_limit == (0.001, 0.5)
    # MambaConfig defaults: pad_vocab_size_multiple=8, tie_embeddings=True, residual_in_fp32=True
    assert c.vocab_size == 104 and c.tie_word_embeddings and c.residual_in_fp32
    untied = Mamba2Config.from_mamba_ssm_dict({**d, "tie_embeddings": False, "residual_in_fp32": False,
                                               "pad_vocab_size_multiple": 1})
    assert not untied.tie_word_embeddings and not untied.residual_in_fp32 and untied.vocab_size == 100


@pytest.mark.parametrize("change,pattern", [
    ({"ssm_cfg": {}}, r"ssm_cfg.layer is None.*Mamba2.*Mamba1"),
    ({"ssm_cfg": None}, r"ssm_cfg.layer is None"),
    ({"ssm_cfg": {"layer": "Mamba1"}}, r"ssm_cfg.layer is 'Mamba1'"),
    ({"ssm_cfg": "Mamba2"}, r"ssm_cfg must be a JSON object"),
    ({"d_intermediate": 2048}, r"d_intermediate is 2048.*MLP"),
    ({"attn_layer_idx": [3, 7]}, r"attn_layer_idx is \[3, 7\].*attention"),
    ({"rms_norm": False}, r"rms_norm is False.*LayerNorm"),
    ({"ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}, r"ssm_cfg.norm_before_gate is True"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_ssm": 2560}}, r"ssm_cfg.d_ssm \(2560\).*expand \* d_model"),
    ({"ssm_cfg": {"layer": "Mamba2", "headdim": 48}}, r"expand \* d_model.*multiple of ssm_cfg.headdim \(48\)"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_sate": 64}}, r"unknown Mamba2 argument.*d_sate"),
    ({"ssm_cfg": {"layer": "Mamba2", "ngroups": 3}}, r"num_heads \(80\).*n_groups \(3\).*ssm_cfg.ngroups"),
    ({"ssm_cfg": {"layer": "Mamba2", "chunk_size": 100}}, r"chunk_size.*power of two.*ssm_cfg.chunk_size"),
    ({"ssm_cfg": {"layer": "Mamba2", "expand": 1.5}}, r"ssm_cfg.expand must be a positive integer"),
    ({"d_model": 0}, r"d_model must be a positive integer"),
    ({"pad_vocab_size_multiple": 0}, r"pad_vocab_size_multiple must be a positive integer"),
    ({"vocab_size": "50277"}, r"vocab_size must be a positive integer"),
    ({"n_layer": 0}, r"num_hidden_layers.*n_layer"),
    ({"tie_embeddings": "yes"}, r"tie_word_embeddings.*tie_embeddings"),
])
def test_mamba_ssm_errors(change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Mamba2Config.from_mamba_ssm_dict({**STATE_SPACES_2P7B, **change})


def test_mamba_ssm_missing_sizes():
    d = dict(STATE_SPACES_2P7B)
    del d["vocab_size"]
    with pytest.raises(ConfigError, match="lacks vocab_size"):
        Mamba2Config.from_mamba_ssm_dict(d)


# -- format detection and files --------------------------------------------------------------------


def test_from_dict_detection_errors():
    with pytest.raises(ConfigError, match=r"ambiguous.*d_model.*hidden_size"):
        Mamba2Config.from_dict({"d_model": 64, "hidden_size": 64})
    with pytest.raises(ConfigError, match=r"unknown config format.*dim, n_layers"):
        Mamba2Config.from_dict({"dim": 4096, "n_layers": 64})  # mistral params.json
    with pytest.raises(ConfigError, match="JSON object"):
        Mamba2Config.from_dict([1, 2])


def test_from_pretrained_both_formats(tmp_path):
    (tmp_path / "ssm").mkdir()
    (tmp_path / "ssm" / "config.json").write_text(json.dumps(STATE_SPACES_2P7B))
    assert Mamba2Config.from_pretrained(tmp_path / "ssm") == Mamba2Config.from_dict(STATE_SPACES_2P7B)
    config = Mamba2Config(**{**SMALL, "n_groups": 4})
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    assert Mamba2Config.from_pretrained(str(tmp_path / "hf")) == config
    assert Mamba2Config.from_json_file(tmp_path / "hf" / "config.json") == config


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.*not a directory"):
        Mamba2Config.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"config\.json: no such file"):
        Mamba2Config.from_pretrained(tmp_path)
    f = tmp_path / "config.json"
    f.write_text('{"hidden_size": 64,')
    with pytest.raises(ConfigError, match=r"config\.json: invalid JSON"):
        Mamba2Config.from_pretrained(tmp_path)
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"config\.json: (cannot read|invalid JSON)"):
        Mamba2Config.from_json_file(f)
    f.write_text("[]")
    with pytest.raises(ConfigError, match=r"config\.json: a config must be a JSON object"):
        Mamba2Config.from_json_file(f)
    f.write_text(json.dumps({"model_type": "mamba2", "hidden_size": 64, "num_heads": 3}))
    with pytest.raises(ConfigError, match=r"config\.json: Mamba2Config: num_heads \* head_dim"):
        Mamba2Config.from_json_file(f)


# -- the dataclass itself ----------------------------------------------------------------------------


def test_derived_sizes_frozen_hashable():
    c = Mamba2Config(**SMALL)
    assert (c.intermediate_size, c.conv_dim, c.in_proj_size, c.heads_per_group) == (64, 64 + 32, 128 + 32 + 4, 2)
    assert c.use_rms_norm is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 8
    assert hash(c) == hash(Mamba2Config(**SMALL)) and c == Mamba2Config(**SMALL)
    with pytest.raises(ConfigError, match="n_groups"):
        dataclasses.replace(c, n_groups=3)
    with pytest.raises(TypeError):
        Mamba2Config(32)  # keyword-only


def test_normalisation():
    c = Mamba2Config(**SMALL, time_step_limit=[0, math.inf], ssm_state_dtype=np.float16, eos_token_id=[1, 2])
    assert c.time_step_limit == (0.0, math.inf) and all(isinstance(x, float) for x in c.time_step_limit)
    assert c.ssm_state_dtype == "float16" and c.eos_token_id == (1, 2)
    import ml_dtypes

    assert Mamba2Config(ssm_state_dtype=ml_dtypes.bfloat16).ssm_state_dtype == "bfloat16"
    assert Mamba2Config(num_heads=np.int64(128)).num_heads == 128
    assert Mamba2Config(pad_token_id=None, eos_token_id=None).pad_token_id is None


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_heads=64), r"num_heads \* head_dim \(64 \* 64 = 4096\) must equal expand \* hidden_size \(2 \* 4096 = 8192\)"),
    (dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=3), r"num_heads \(4\) must be a multiple of n_groups \(3\)"),
    (dict(hidden_size=0), r"hidden_size must be a positive integer, got 0"),
    (dict(num_heads=-128), r"num_heads must be a positive integer, got -128"),
    (dict(head_dim=64.0), r"head_dim must be a positive integer, got 64.0"),
    (dict(state_size=0), r"state_size must be a positive integer"),
    (dict(n_groups=0), r"n_groups must be a positive integer"),
    (dict(expand=0), r"expand must be a positive integer"),
    (dict(num_hidden_layers=0), r"num_hidden_layers must be a positive integer"),
    (dict(vocab_size=True), r"vocab_size must be a positive integer, got True"),
    (dict(conv_kernel=1), r"conv_kernel must be >= 2"),
    (dict(conv_kernel=0), r"conv_kernel must be a positive integer"),
    (dict(chunk_size=100), r"chunk_size must be a power of two, got 100"),
    (dict(chunk_size=0), r"chunk_size must be a positive integer"),
    (dict(hidden_act="gelu"), r"hidden_act must be 'silu'.*'gelu'"),
    (dict(time_step_limit=(0.0,)), r"time_step_limit must be a pair"),
    (dict(time_step_limit=(0.0, 1.0, 2.0)), r"time_step_limit must be a pair"),
    (dict(time_step_limit="0,inf"), r"time_step_limit must be a pair"),
    (dict(time_step_limit=(0.0, None)), r"time_step_limit must be a pair"),
    (dict(time_step_limit=(1.0, 0.5)), r"time_step_limit must satisfy 0 <= lo <= hi.*\(1.0, 0.5\)"),
    (dict(time_step_limit=(-0.1, 1.0)), r"time_step_limit must satisfy 0 <= lo <= hi"),
    (dict(time_step_limit=(math.nan, 1.0)), r"time_step_limit must satisfy"),
    (dict(time_step_limit=(math.inf, math.inf)), r"time_step_limit must satisfy.*lo finite"),
    (dict(ssm_state_dtype="float64"), r"ssm_state_dtype must be one of float32, bfloat16, float16, got 'float64'"),
    (dict(ssm_state_dtype=np.int8), r"ssm_state_dtype must be one of"),
    (dict(layer_norm_epsilon=0.0), r"layer_norm_epsilon must be a finite number > 0, got 0.0"),
    (dict(layer_norm_epsilon=-1e-5), r"layer_norm_epsilon must be a finite number > 0"),
    (dict(layer_norm_epsilon=math.inf), r"layer_norm_epsilon must be a finite number > 0"),
    (dict(layer_norm_epsilon="1e-5"), r"layer_norm_epsilon must be a finite number > 0"),
    (dict(use_rms_norm=1), r"use_rms_norm must be true or false, got 1"),
    (dict(tie_word_embeddings="false"), r"tie_word_embeddings must be true or false"),
    (dict(d_has_hdim=None), r"d_has_hdim must be true or false"),
    (dict(pad_token_id=-1), r"pad_token_id must be a non-negative integer or None, got -1"),
    (dict(bos_token_id=1.0), r"bos_token_id must be a non-negative integer or None"),
    (dict(eos_token_id=[]), r"eos_token_id must be .* got \(\)"),
    (dict(eos_token_id=[2, None]), r"eos_token_id must be"),
])
def test_validation_errors(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Mamba2Config(**kwargs)


def test_all_field_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        Mamba2Config(hidden_size=0, chunk_size=3, hidden_act="relu")
    message = str(info.value)
    assert "hidden_size" in message and "chunk_size" in message and "hidden_act" in message
    assert isinstance(info.value, ValueError)
