"""``Mamba2Config``: the model's hyper-parameters, read from either checkpoint format, validated.

Two ``config.json`` formats describe Mamba-2 checkpoints:

* **HF transformers** (``model_type: "mamba2"``; e.g. Codestral Mamba, our own
  ``save_pretrained``): flat keys ``hidden_size, num_heads, head_dim, expand, n_groups,
  state_size, conv_kernel, chunk_size, num_hidden_layers, vocab_size, time_step_limit, ...``.
  The field names of :class:`Mamba2Config` are these names, with HF's defaults (which are
  Codestral's values). Keys that only matter for initialisation or for PyTorch (``time_step_min``,
  ``initializer_range``, ``torch_dtype``, ``architectures``, ...) are ignored.
* **mamba_ssm** (state-spaces/mamba2-*): ``MambaConfig`` keys ``d_model, n_layer, vocab_size,
  ssm_cfg, rms_norm, residual_in_fp32, pad_vocab_size_multiple, tie_embeddings, ...`` where
  ``ssm_cfg`` holds the keyword arguments of the ``Mamba2`` layer (``d_state, d_conv, expand,
  headdim, ngroups, dt_limit, ...``). Unset keys take mamba_ssm's defaults (``ngroups=1``,
  ``tie_embeddings=True``, ...); ``vocab_size`` is padded up to ``pad_vocab_size_multiple``
  (the embedding's real row count); ``num_heads = expand * d_model // headdim``.

Configurations that these formats can express but this library cannot run (Mamba-1 layers, MLP
or attention blocks, LayerNorm blocks, norm-before-gate) raise :class:`ConfigError` naming the
offending keys; so does every inconsistent combination of sizes.

Mixer semantics of the fields: ``use_rms_norm`` (vLLM's name) switches the grouped gated RMSNorm
after the SSD (``False`` leaves ``y * silu(z)``; from mamba_ssm's ``ssm_cfg.rmsnorm``; HF's Mamba-2
always applies it, and a transformers 4.x ``rms_norm`` key, which HF's model ignored, is ignored); ``d_has_hdim`` gives ``D`` one value
per channel (``[h*p]``) instead of one per head (``[h]``); ``ssm_state_dtype`` is the dtype of the
recurrent SSM state (float32 by default, whatever the weights' dtype).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

SSM_STATE_DTYPES = ("float32", "bfloat16", "float16")

_POSITIVE_INTS = ("hidden_size", "num_heads", "head_dim", "expand", "n_groups", "state_size",
                  "conv_kernel", "chunk_size", "num_hidden_layers", "vocab_size")
_BOOLS = ("use_rms_norm", "use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings",
          "d_has_hdim")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")

# mamba_ssm ``Mamba2`` keyword arguments that only affect initialisation or the PyTorch runtime.
_SSM_CFG_IGNORED = ("conv_init", "A_init_range", "dt_min", "dt_max", "dt_init_floor",
                    "use_mem_eff_path", "sequence_parallel")
# mamba_ssm ssm_cfg key -> (our field, mamba_ssm ``Mamba2`` default)
_SSM_CFG_FIELDS = {
    "d_state": ("state_size", 128),
    "d_conv": ("conv_kernel", 4),
    "expand": ("expand", 2),
    "headdim": ("head_dim", 64),
    "ngroups": ("n_groups", 1),
    "rmsnorm": ("use_rms_norm", True),
    "dt_limit": ("time_step_limit", (0.0, math.inf)),
    "bias": ("use_bias", False),
    "conv_bias": ("use_conv_bias", True),
    "chunk_size": ("chunk_size", 256),
    "D_has_hdim": ("d_has_hdim", False),
}
_MAMBA_SSM_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layer",
                    "num_heads": "expand * d_model // ssm_cfg.headdim",
                    "tie_word_embeddings": "tie_embeddings", "residual_in_fp32": "residual_in_fp32",
                    **{ours: f"ssm_cfg.{key}" for key, (ours, _) in _SSM_CFG_FIELDS.items()}}
_SSM_CFG_CHECKED = ("layer", "d_ssm", "norm_before_gate")
# mamba_ssm ``MambaConfig`` defaults of the top-level keys we read (sizes are required).
_SSM_TOP_DEFAULTS = {"d_intermediate": 0, "rms_norm": True, "residual_in_fp32": True,
                     "pad_vocab_size_multiple": 8, "tie_embeddings": True,
                     "attn_layer_idx": (), "ssm_cfg": {}}


class ConfigError(ValueError):
    """An invalid or unsupported Mamba-2 configuration; the message names the fields involved."""


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


_HF_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _decode_hf_floats(v):
    """transformers >= 5 writes non-finite floats as ``{"__float__": "Infinity"}``; undo that."""
    if isinstance(v, Mapping):
        if set(v) == {"__float__"} and v["__float__"] in _HF_FLOAT_TAGS:
            return _HF_FLOAT_TAGS[v["__float__"]]
        return {k: _decode_hf_floats(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_decode_hf_floats(x) for x in v]
    return v


def _dtype_name(v) -> str | None:
    if isinstance(v, str):
        return v if v in SSM_STATE_DTYPES else None
    try:
        name = np.dtype(v).name
    except TypeError:
        return None
    return name if name in SSM_STATE_DTYPES else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Hyper-parameters of a Mamba-2 LM (HF transformers names and defaults, plus our extras).

    Frozen and hashable (usable as a static argument of ``jax.jit``). Lists given for
    ``time_step_limit`` / ``eos_token_id`` are stored as tuples; ``ssm_state_dtype`` accepts a
    dtype object and is stored as its name.
    """

    hidden_size: int = 4096               # d
    num_heads: int = 128                  # h
    head_dim: int = 64                    # p
    expand: int = 2                       # i = expand * d = h * p
    n_groups: int = 8                     # g
    state_size: int = 128                 # n
    conv_kernel: int = 4                  # k
    chunk_size: int = 256                 # q
    num_hidden_layers: int = 64
    vocab_size: int = 32768               # v (the embedding's row count, padding included)
    layer_norm_epsilon: float = 1e-5
    use_rms_norm: bool = True             # grouped gated RMSNorm in the mixer (vLLM name)
    use_bias: bool = False                # in_proj / out_proj bias
    use_conv_bias: bool = True
    residual_in_fp32: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    hidden_act: str = "silu"
    d_has_hdim: bool = False              # mamba_ssm D_has_hdim: D is [h*p] instead of [h]
    ssm_state_dtype: str = "float32"      # dtype of the recurrent SSM state [b, h, p, n]

    # -- derived sizes ---------------------------------------------------------------------------

    @property
    def intermediate_size(self) -> int:
        """``i = expand * hidden_size`` (== num_heads * head_dim)."""
        return int(self.expand * self.hidden_size)

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: ``i + 2 g n`` (x, B and C)."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """Output width of ``in_proj``: ``2 i + 2 g n + h`` (order ``[z | x | B | C | dt]``)."""
        return 2 * self.intermediate_size + 2 * self.n_groups * self.state_size + self.num_heads

    @property
    def heads_per_group(self) -> int:
        """``h / g``: head ``j`` reads B/C group ``j // heads_per_group``."""
        return self.num_heads // self.n_groups

    # -- validation ------------------------------------------------------------------------------

    def __post_init__(self):
        self._normalize()
        problems = self._field_problems()
        if not problems:
            problems = self._combination_problems()
        if problems:
            raise ConfigError("Mamba2Config: " + "; ".join(problems))

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def _normalize(self):
        for name in _POSITIVE_INTS + _TOKEN_IDS:
            v = getattr(self, name)
            if _is_int(v):
                self._set(name, int(v))
        for name in _BOOLS:
            if isinstance(getattr(self, name), np.bool_):
                self._set(name, bool(getattr(self, name)))
        if _is_real(self.layer_norm_epsilon):
            self._set("layer_norm_epsilon", float(self.layer_norm_epsilon))
        tsl = self.time_step_limit
        if isinstance(tsl, (list, tuple)) and len(tsl) == 2 and all(_is_real(x) for x in tsl):
            self._set("time_step_limit", (float(tsl[0]), float(tsl[1])))
        elif isinstance(tsl, list):
            self._set("time_step_limit", tuple(tsl))
        if isinstance(self.eos_token_id, (list, tuple)):
            self._set("eos_token_id", tuple(int(x) if _is_int(x) else x for x in self.eos_token_id))
        name = _dtype_name(self.ssm_state_dtype)
        if name is not None:
            self._set("ssm_state_dtype", name)

    def _field_problems(self) -> list[str]:
        out = []
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                out.append(f"{name} must be a positive integer, got {v!r}")
        if _is_int(self.conv_kernel) and self.conv_kernel == 1:
            out.append("conv_kernel must be >= 2 (the conv state keeps conv_kernel - 1 columns), got 1")
        q = self.chunk_size
        if _is_int(q) and q > 0 and q & (q - 1):
            out.append(f"chunk_size must be a power of two, got {q}")
        eps = self.layer_norm_epsilon
        if not _is_real(eps) or not (0.0 < eps < math.inf):
            out.append(f"layer_norm_epsilon must be a finite number > 0, got {eps!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        tsl = self.time_step_limit
        if not (isinstance(tsl, tuple) and len(tsl) == 2 and all(isinstance(x, float) for x in tsl)):
            out.append(f"time_step_limit must be a pair of numbers (lo, hi), got {tsl!r}")
        elif not (0.0 <= tsl[0] <= tsl[1]) or math.isinf(tsl[0]):
            out.append(f"time_step_limit must satisfy 0 <= lo <= hi with lo finite, got {tsl!r}")
        for name in _TOKEN_IDS:
            v = getattr(self, name)
            if name == "eos_token_id" and isinstance(v, tuple):
                ok = len(v) > 0 and all(_is_int(x) and x >= 0 for x in v)
            else:
                ok = v is None or (_is_int(v) and v >= 0)
            if not ok:
                kind = ("a non-negative integer, a non-empty list of them"
                        if name == "eos_token_id" else "a non-negative integer")
                out.append(f"{name} must be {kind} or None, got {v!r}")
        if self.hidden_act != "silu":
            out.append(f"hidden_act must be 'silu' (the mixer's conv activation), got {self.hidden_act!r}")
        if self.ssm_state_dtype not in SSM_STATE_DTYPES:
            out.append(f"ssm_state_dtype must be one of {', '.join(SSM_STATE_DTYPES)}, "
                       f"got {self.ssm_state_dtype!r}")
        return out

    def _combination_problems(self) -> list[str]:
        out = []
        h, p, e, d, g = self.num_heads, self.head_dim, self.expand, self.hidden_size, self.n_groups
        if h * p != e * d:
            out.append(f"num_heads * head_dim ({h} * {p} = {h * p}) must equal expand * hidden_size "
                       f"({e} * {d} = {e * d})")
        if h % g:
            out.append(f"num_heads ({h}) must be a multiple of n_groups ({g})")
        return out

    # -- constructors ------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> Mamba2Config:
        """From an HF transformers ``Mamba2Config`` dict (``config.json`` / ``to_dict()``).

        Missing keys take HF's defaults; keys that do not change the forward pass are ignored.
        So is ``norm_before_gate``: Codestral's HF config.json says ``true``, yet HF transformers
        and vLLM always gate before the norm (as mamba_ssm does by default). Non-finite floats
        may be plain (``Infinity``, transformers 4.x) or tagged (``{"__float__": "Infinity"}``,
        transformers 5.x). ``intermediate_size``, when present, must equal expand * hidden_size.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"an HF config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "mamba2")
        if model_type != "mamba2":
            raise ConfigError(f"model_type is {model_type!r}, expected 'mamba2' (a Mamba-2 LM)")
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: _decode_hf_floats(v) for k, v in d.items() if k in names})
        if "intermediate_size" in d and d["intermediate_size"] != config.intermediate_size:
            raise ConfigError(f"intermediate_size ({d['intermediate_size']!r}) must equal expand * "
                              f"hidden_size ({config.expand} * {config.hidden_size} = "
                              f"{config.intermediate_size})")
        return config

    @classmethod
    def from_mamba_ssm_dict(cls, d: Mapping[str, Any]) -> Mamba2Config:
        """From a mamba_ssm ``MambaConfig`` dict (state-spaces ``config.json``)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a mamba_ssm config must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in d]
        if missing:
            raise ConfigError(f"mamba_ssm config lacks {', '.join(missing)}")
        top = {**_SSM_TOP_DEFAULTS, **d}
        ssm = top["ssm_cfg"] if top["ssm_cfg"] is not None else {}
        if not isinstance(ssm, Mapping):
            raise ConfigError(f"ssm_cfg must be a JSON object, got {ssm!r}")
        if ssm.get("layer") != "Mamba2":
            raise ConfigError(f"ssm_cfg.layer is {ssm.get('layer')!r}: only 'Mamba2' layers are "
                              "supported (mamba_ssm's default layer, when unset, is Mamba1)")
        unknown = sorted(set(ssm) - set(_SSM_CFG_FIELDS) - set(_SSM_CFG_IGNORED) - set(_SSM_CFG_CHECKED))
        if unknown:
            raise ConfigError(f"ssm_cfg has unknown Mamba2 argument(s): {', '.join(unknown)}")
        if top["d_intermediate"] != 0:
            raise ConfigError(f"d_intermediate is {top['d_intermediate']!r}: blocks with an MLP "
                              "are not supported (only d_intermediate=0)")
        if top["attn_layer_idx"]:
            raise ConfigError(f"attn_layer_idx is {list(top['attn_layer_idx'])!r}: hybrid attention "
                              "layers are not supported")
        if top["rms_norm"] is not True:
            raise ConfigError(f"rms_norm is {top['rms_norm']!r}: blocks with LayerNorm are not "
                              "supported (only rms_norm=true)")
        if ssm.get("norm_before_gate", False) is not False:
            raise ConfigError(f"ssm_cfg.norm_before_gate is {ssm['norm_before_gate']!r}: only "
                              "gate-before-norm (norm_before_gate=false) is supported")

        fields = {ours: ssm.get(key, default) for key, (ours, default) in _SSM_CFG_FIELDS.items()}
        d_model, expand, headdim = top["d_model"], fields["expand"], fields["head_dim"]
        for name, v in (("d_model", d_model), ("ssm_cfg.expand", expand), ("ssm_cfg.headdim", headdim)):
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        d_inner = expand * d_model
        d_ssm = ssm.get("d_ssm")
        if d_ssm is not None and d_ssm != d_inner:
            raise ConfigError(f"ssm_cfg.d_ssm ({d_ssm!r}) differs from expand * d_model "
                              f"({expand} * {d_model} = {d_inner}): the gated-MLP part of in_proj "
                              "is not supported")
        if d_inner % headdim:
            raise ConfigError(f"expand * d_model ({expand} * {d_model} = {d_inner}) must be a "
                              f"multiple of ssm_cfg.headdim ({headdim})")
        vocab, multiple = top["vocab_size"], top["pad_vocab_size_multiple"]
        for name, v in (("vocab_size", vocab), ("pad_vocab_size_multiple", multiple)):
            if not _is_int(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        try:
            return cls(hidden_size=d_model, num_hidden_layers=top["n_layer"],
                       num_heads=d_inner // headdim, vocab_size=-(-vocab // multiple) * multiple,
                       residual_in_fp32=top["residual_in_fp32"],
                       tie_word_embeddings=top["tie_embeddings"], layer_norm_epsilon=1e-5,
                       pad_token_id=0, bos_token_id=0, eos_token_id=0, **fields)
        except ConfigError as e:
            named = [f"{ours} = {theirs}" for ours, theirs in _MAMBA_SSM_NAMES.items()
                     if re.search(rf"\b{ours}\b", str(e))]
            raise ConfigError(f"{e} (mamba_ssm names: {'; '.join(named)})" if named else str(e)) from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Mamba2Config:
        """From either format: mamba_ssm (``d_model``/``n_layer``) or HF (``hidden_size``/``model_type``)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(d).__name__}")
        ssm_keys = [k for k in ("d_model", "n_layer") if k in d]
        hf_keys = [k for k in ("hidden_size", "model_type") if k in d]
        if ssm_keys and hf_keys:
            raise ConfigError(f"ambiguous config: it has mamba_ssm key(s) {', '.join(ssm_keys)} and "
                              f"HF key(s) {', '.join(hf_keys)}")
        if ssm_keys:
            return cls.from_mamba_ssm_dict(d)
        if hf_keys:
            return cls.from_hf_dict(d)
        raise ConfigError("unknown config format: expected HF transformers keys (hidden_size, "
                          "model_type) or mamba_ssm keys (d_model, n_layer); "
                          f"got keys {', '.join(sorted(map(str, d))) or '(none)'}")

    @classmethod
    def from_json_file(cls, path) -> Mamba2Config:
        """From a ``config.json`` in either format; every error names the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read it ({e})") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def from_pretrained(cls, directory) -> Mamba2Config:
        """From ``directory/config.json`` (an HF or mamba_ssm checkpoint directory)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"{directory}: not a directory (expected a checkpoint directory "
                              "holding config.json)")
        return cls.from_json_file(directory / "config.json")

    def to_hf_dict(self) -> dict[str, Any]:
        """HF transformers-style dict (JSON-serialisable); ``from_hf_dict`` inverts it.

        ``inf`` stays a float (``json.dumps`` writes ``Infinity``, which Python's json and every
        transformers version read), not transformers 5's ``{"__float__": "Infinity"}`` tag, which
        transformers 4.x would not decode.
        """
        out = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"]}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["intermediate_size"] = self.intermediate_size
        return out
