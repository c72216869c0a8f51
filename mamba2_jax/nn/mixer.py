"""``MambaMixer2``: the Mamba-2 token mixer with vLLM's semantics (HF transformers >= 5 agrees).

    zxbcdt = in_proj(u) [* mup_vector]       # [.., 2i + 2gn + h], order [z | x | B | C | dt]
    xBC    = silu(causal_conv1d(xBC) + bias)  # depthwise over i + 2gn channels, width k
    dt     = clip(softplus(dt + dt_bias), time_step_limit)          # float32
    A      = -exp(A_log)                                             # float32, per head
    y      = SSD(x, dt, A, B, C) + D * x      # head j reads group j // (h / g)
    y      = GatedGroupRMSNorm(y, gate=z)     # gate before the norm, per original group
    out    = out_proj(y)

Recurrent state per layer (:class:`MixerState`): ``conv [b, i + 2gn, k - 1]`` (the last k-1
conv inputs, oldest first, model dtype) and ``ssm [b, h, p, n]`` (``config.ssm_state_dtype``,
float32 by default). ``__call__`` runs a prefill (optionally continuing from a state, optionally
over packed sequences) and ``step`` decodes one token.

Sharding: built with a ``mesh``, the mixer follows :class:`~mamba2_jax.sharding.plan.MixerPlan`:
parameters (and the conv state's channels) are in the ``tp`` layout (shard-major with duplicated
groups, ``tp * conv_dim_local`` conv channels), conv + SSD run per device in ``jax.shard_map``,
and every collective (the out_proj reduction, the gated norm's cross-shard statistics, the
context-parallel all-to-alls) is derived by XLA from PartitionSpecs.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mamba2_jax.config import Mamba2Config
from mamba2_jax.kernels.common import op_kwargs
from mamba2_jax.kernels.conv1d import causal_conv1d, causal_conv1d_update
from mamba2_jax.kernels.gemv import gemv, residual_gemv
from mamba2_jax.kernels.gemv.api import MAX_AUTO_ROWS, decode_takes_kernel
from mamba2_jax.kernels.mixer_step import mixer_step, mixer_step_unsupported
from mamba2_jax.kernels.ssd import ssd_chunk_scan
from mamba2_jax.kernels.state_update import selective_state_update
from mamba2_jax.nn.norm import GatedGroupRMSNorm
from mamba2_jax.sharding.layout import conv_shard_rows, local_config
from mamba2_jax.sharding.params import logical_init, logical_param
from mamba2_jax.sharding.plan import MixerPlan

# The decode step (no mesh) under impl="auto" on a GPU runs conv update + state update + gate
# as one fused kernel (kernels/mixer_step) up to FUSED_STEP_MAX_ROWS rows; False: the separate
# ops (a benchmark knob). H200, 2.7B shape, scripts/bench_generate.py: b = 1 fused 2.306 /
# 2.448 ms a token against 2.506 / 2.703 unfused (two runs); b = 64 10.63 / 11.26 against
# 9.20 / 9.25, so larger batches keep the separate ops (XLA's).
FUSED_STEP_AUTO = True
FUSED_STEP_MAX_ROWS = 16
# ... and with it, the block norm and the gated norm folded into the launches around the
# projections (``MambaMixer2.folded_step``: four launches a layer, six before); False: the
# norms as their own launches (a benchmark knob: scripts/bench_generate.py's ``unfolded``).
# H200, 2.7B, b = 1, folded against unfolded in the same run (three pairs, separate
# processes): 2.237 / 2.340 / 2.701 against 2.558 / 2.550 / 2.983 ms a token; under the
# profiler (8-step loop) the folded step's kernels sum to 2.3 % more (BENCHMARKS.md).
FOLD_NORMS_AUTO = True
# ... and kernels/mixer_step with every load issued before any compute (``loads_first``);
# off: the order BENCHMARKS.md measured. A benchmark knob (scripts/bench_generate.py's
# ``loads_first``), not yet timed on a GPU; in offline sm_90 SASS (scripts/sass_phases.py, a
# static model) a warp of the b = 1 step waits through 2 global round trips instead of 7.
STEP_LOADS_FIRST = False


class MixerState(NamedTuple):
    """One layer's recurrent state: ``conv [b, conv channels, k - 1]`` and ``ssm [b, h, p, n]``.

    The conv channels are ``i + 2gn`` in HF order without a mesh, or the ``tp`` layout's
    ``tp * conv_dim_local`` (shard-major, duplicated groups) for a mixer built on a mesh.
    """

    conv: jax.Array
    ssm: jax.Array


def init_mixer_state(config: Mamba2Config, batch_size: int, dtype=jnp.float32, *,
                     tp: int = 1) -> MixerState:
    """All-zero state (the state before any token) for ``batch_size`` sequences."""
    c = config
    channels = tp * local_config(c, tp).conv_dim_local  # == i + 2gn when tp == 1
    return MixerState(
        conv=jnp.zeros((batch_size, channels, c.conv_kernel - 1), dtype),
        ssm=jnp.zeros((batch_size, c.num_heads, c.head_dim, c.state_size), c.ssm_state_dtype),
    )


def _picked(init, rows, axis: int, full: int):
    """An initializer drawing the natural-layout tensor (``full`` along ``axis``), then ``rows``."""
    def draw(key, shape, dtype=jnp.float32):
        natural = list(shape)
        natural[axis] = full
        return jnp.take(init(key, tuple(natural), dtype), rows, axis=axis)
    return draw


class DepthwiseConv1d(nnx.Module):
    """Parameters of the causal depthwise conv: ``weight [c, k]`` (HF's [c, 1, k] squeezed), ``bias [c]``.

    ``rows`` picks (and orders) the channels of the natural ``channels``-channel conv: the ``tp``
    layout (``sharding.conv_shard_rows``; all channels in order when tp = 1).
    """

    def __init__(self, channels: int, kernel: int, *, use_bias: bool, param_dtype, rngs: nnx.Rngs,
                 rows):
        bound = 1.0 / math.sqrt(kernel)
        uniform = jax.nn.initializers.uniform(2 * bound)
        rows = jnp.asarray(rows)
        weight = uniform(rngs.params(), (channels, kernel), param_dtype) - bound
        self.weight = logical_param(weight[rows], ("ssm_heads", None))
        bias = (uniform(rngs.params(), (channels,), param_dtype) - bound) if use_bias else None
        self.bias = None if bias is None else logical_param(bias[rows], ("ssm_heads",))


class MambaMixer2(nnx.Module):
    """The Mamba-2 mixer of one layer (module names follow HF: in_proj, conv1d, A_log, D, dt_bias, norm, out_proj).

    Params are created in ``param_dtype``; ``A_log``, ``D`` and ``dt_bias`` are always float32.
    ``mesh``: build for (and run on) this mesh (see the module docstring); None: one device.
    """

    def __init__(self, config: Mamba2Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 mesh=None, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        c = self.config = config
        plan = self.plan = MixerPlan(config, mesh)
        d, i, h = c.hidden_size, c.intermediate_size, c.num_heads
        linear = dict(use_bias=c.use_bias, dtype=param_dtype, param_dtype=param_dtype, rngs=rngs)
        rows = plan.in_proj_rows
        self.in_proj = nnx.Linear(
            d, rows.shape[0], **linear,
            kernel_init=logical_init(_picked(nnx.initializers.lecun_normal(), rows, 1,
                                             c.in_proj_size), ("embed", "ssm_heads")),
            bias_init=logical_init(nnx.initializers.zeros_init(), ("ssm_heads",)))
        self.conv1d = DepthwiseConv1d(c.conv_dim, c.conv_kernel, use_bias=c.use_conv_bias,
                                      param_dtype=param_dtype, rngs=rngs,
                                      rows=conv_shard_rows(c, plan.tp).reshape(-1))
        # mamba_ssm's init: A = -U(1, 16); dt = logU(dt_min, dt_max) stored as softplus^-1(dt).
        key_a, key_dt = jax.random.split(rngs.params())
        heads = ("ssm_heads",)
        self.A_log = logical_param(
            jnp.log(jax.random.uniform(key_a, (h,), jnp.float32, 1.0, 16.0)), heads)
        dt = jnp.exp(jax.random.uniform(key_dt, (h,), jnp.float32, math.log(dt_min), math.log(dt_max)))
        dt = jnp.maximum(dt, dt_floor)
        self.dt_bias = logical_param(dt + jnp.log(-jnp.expm1(-dt)), heads)
        self.D = logical_param(jnp.ones((i,) if c.d_has_hdim else (h,), jnp.float32), heads)
        self.norm = GatedGroupRMSNorm(i, c.n_groups, eps=c.layer_norm_epsilon,
                                      use_rms_norm=c.use_rms_norm, param_dtype=param_dtype,
                                      axis_name="ssm_heads")
        self.out_proj = nnx.Linear(
            i, d, **linear,
            kernel_init=logical_init(nnx.initializers.lecun_normal(), ("ssm_heads", "embed")),
            bias_init=logical_init(nnx.initializers.zeros_init(), ("embed",)))

    # -- pieces shared by prefill and decode -------------------------------------------------

    def _linear(self, lin, x, impl, *, auto_kernel, partials=False):
        """``lin(x)``; in a decode step (``impl`` given, at most gemv's MAX_AUTO_ROWS rows, no
        mesh) through the Pallas GEMV when ``impl`` asks for the kernels, or when it is "auto" on
        a GPU, ``auto_kernel`` and the weights bf16: where the kernel was measured faster than
        XLA (H200, bf16, m = 1 and 4, the 2.7B shapes: in_proj 20.0-22.1 us against 39.7-42.0;
        out_proj a toss-up, 10.9-12.8 against 8.6-11.1, so XLA keeps it)."""
        w = lin.kernel[...]
        if not decode_takes_kernel(impl, math.prod(x.shape[:-1]), mesh=self.plan.mesh,
                                   auto=auto_kernel and w.dtype == jnp.bfloat16):
            return lin(x)
        if partials and lin.bias is None:  # unsummed split-K partials [S, m, N] float32
            return gemv(x.astype(w.dtype), w, partials=True, **op_kwargs(impl))
        bias = None if lin.bias is None else lin.bias[...]
        return gemv(x.astype(w.dtype), w, bias, **op_kwargs(impl))

    def _in_proj(self, u, mup_vector, impl=None):
        """``in_proj(u) [* mup_vector]`` (``impl``: a decode step's, see ``_linear``)."""
        zxbcdt = self._linear(self.in_proj, u, impl, auto_kernel=True)
        if mup_vector is not None:
            mup = jnp.asarray(mup_vector)
            zxbcdt = zxbcdt * (mup if self.plan.tp == 1 else jnp.take(mup, self.plan.in_proj_rows))
        return zxbcdt

    def _project(self, u, mup_vector, impl=None):
        """``u [.., d]`` -> z ``[.., tp, i_l]``, xBC ``[.., tp, conv_dim_local]``, dt ``[.., tp, h_l]``
        (``impl``: a decode step's, see ``_linear``)."""
        local = self.plan.local
        zxbcdt = self._in_proj(u, mup_vector, impl)
        zxbcdt = zxbcdt.reshape(*zxbcdt.shape[:-1], local.tp, local.in_proj_local)
        il, cl = local.intermediate, local.conv_dim_local
        return zxbcdt[..., :il], zxbcdt[..., il:il + cl], zxbcdt[..., il + cl:]

    def _head_params(self, heads_shape):
        """A, D, dt_bias reshaped to ``heads_shape`` (+ ``[p]`` for a per-channel D)."""
        c = self.config
        A = -jnp.exp(self.A_log[...].astype(jnp.float32)).reshape(heads_shape)
        D = self.D[...].reshape(heads_shape + ((c.head_dim,) if c.d_has_hdim else ()))
        return dict(A=A, D=D, dt_bias=self.dt_bias[...].reshape(heads_shape))

    def _conv_params(self, split):
        """Conv weight ``[tp, .., k]`` / bias ``[tp, ..]`` with the channel axis ``split``."""
        local = self.plan.local
        out = dict(weight=split(self.conv1d.weight[...].reshape(local.tp, local.conv_dim_local, -1)))
        if self.conv1d.bias is not None:
            out["bias"] = split(self.conv1d.bias[...].reshape(local.tp, local.conv_dim_local))
        return out

    def _split_xbc(self, xbc, heads, groups):
        c = self.config
        hp, gn = heads * c.head_dim, groups * c.state_size
        lead = xbc.shape[:-1]
        x = xbc[..., :hp].reshape(*lead, heads, c.head_dim)
        B = xbc[..., hp:hp + gn].reshape(*lead, groups, c.state_size)
        C = xbc[..., hp + gn:].reshape(*lead, groups, c.state_size)
        return x, B, C

    def _finish(self, y, z, *batch_seq, impl=None):
        """Gated norm + out_proj on ``y``, ``z [.., i]`` laid out (batch_seq.., "tensor")
        (``impl``: a decode step's, see ``_linear``)."""
        y = self.plan.constrain(y, *batch_seq, "tensor")
        z = self.plan.constrain(z, *batch_seq, "tensor")
        out = self._linear(self.out_proj, self.norm(y, z), impl, auto_kernel=False)
        return self.plan.constrain(out, *batch_seq, None)

    # -- per-device work (inside shard_map) --------------------------------------------------------

    def _prefill_local(self, a, *, return_state, impl):
        """Conv + SSD on one device's ``[.., 1, 1, ..]`` (tensor, context) block."""
        c, plan = self.config, self.plan
        cu = a.get("cu_seqlens")
        xbc = a["xbc"][:, :, 0, 0]
        bias = a["bias"][0, 0] if "bias" in a else None
        conv = causal_conv1d(
            xbc[0] if cu is not None else xbc, a["weight"][0, 0], bias,
            initial_states=a["conv_state"][:, 0, 0] if "conv_state" in a else None,
            cu_seqlens=cu, activation="silu", return_final_states=return_state,
            **op_kwargs(impl))
        xbc, conv_state = conv if return_state else (conv, None)
        x, B, C = self._split_xbc(xbc[None] if cu is not None else xbc, plan.heads_cp,
                                  plan.groups_cp)
        scan = ssd_chunk_scan(
            x, a["dt"][:, :, 0, 0], a["A"][0, 0], B, C, chunk_size=c.chunk_size, D=a["D"][0, 0],
            dt_bias=a["dt_bias"][0, 0], dt_softplus=True, dt_limit=c.time_step_limit,
            initial_states=a["ssm_state"][:, 0, 0] if "ssm_state" in a else None,
            cu_seqlens=cu, return_final_states=return_state, **op_kwargs(impl))
        if not return_state:  # the final states are only computed when asked for
            return dict(y=scan[:, :, None, None])
        y, ssm_state = scan
        return dict(y=y[:, :, None, None], conv=conv_state[:, None, None],
                    ssm=ssm_state[:, None, None])

    def _step_local(self, a, *, impl):
        """Conv update + state update on one device's ``[b, 1, ..]`` tensor block (a dense
        batch: ``impl="auto"`` runs both through XLA, see the ops' dispatch)."""
        c, local = self.config, self.plan.local
        xbc, conv_state = causal_conv1d_update(
            a["xbc"][:, 0], a["conv_state"][:, 0], a["weight"][0],
            a["bias"][0] if "bias" in a else None, activation="silu",
            **op_kwargs(impl))
        x, B, C = self._split_xbc(xbc, local.heads, local.groups_local)
        y, ssm_state = selective_state_update(
            a["ssm_state"][:, 0], x, a["dt"][:, 0], a["A"][0], B, C, D=a["D"][0],
            dt_bias=a["dt_bias"][0], dt_softplus=True, dt_limit=c.time_step_limit,
            **op_kwargs(impl))
        return dict(y=y[:, None], conv=conv_state[:, None], ssm=ssm_state[:, None])

    # -- prefill / decode -------------------------------------------------------------------------

    def __call__(self, u, *, state: MixerState | None = None, return_state: bool = False,
                 cu_seqlens=None, mup_vector=None, impl: str = "auto"):
        """Prefill ``u [b, l, d]`` (from ``state`` when given) -> ``out [b, l, d]`` [, new state].

        ``cu_seqlens [nseq + 1]``: ``u`` is ``[1, t, d]`` holding packed sequences, each started
        from its own state (``state`` and the returned state then have ``nseq`` rows).
        ``impl``: "auto" | "xla" | "pallas" (the Pallas kernels) | "interpret"
        (the same in Pallas interpret mode, on the CPU); see ``kernels.common.op_kwargs``.
        """
        c, plan, local = self.config, self.plan, self.plan.local
        b, l = u.shape[:2]
        if cu_seqlens is not None and b != 1:
            raise ValueError(f"MambaMixer2: packed sequences (cu_seqlens) need u [1, t, d], "
                             f"got {tuple(u.shape)}")
        nseq = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
        z, xbc, dt = self._project(u, mup_vector)
        tp, cp, hc, k = plan.tp, plan.cp, plan.heads_cp, c.conv_kernel
        def to_context(a):  # parameters stay replicated over "context" (each rank slices its part)
            a = plan.to_context(a, 1)
            return plan.constrain(a, "tensor", *(None,) * (a.ndim - 1))
        bx, bs, sx = plan.batch_axis(b), plan.batch_axis(nseq), plan.seq_axis(l)
        # Split each tensor shard's channels over context while the tokens are still
        # sequence-sharded (local work); shard_map's in_specs then move the tokens to the
        # head-sharded layout (an all-to-all over "context").
        xbc = plan.constrain(plan.to_context(xbc, 3), bx, sx, "tensor", None, None)
        dt = plan.constrain(dt.reshape(b, l, tp, cp, hc), bx, sx, "tensor", None, None)
        args = dict(xbc=xbc, dt=dt, **self._conv_params(to_context),
                    **self._head_params((tp, cp, hc)))
        seq_block, heads = P(bx, None, "tensor", "context", None), P("tensor", "context", None)
        specs = dict(xbc=seq_block, dt=seq_block, weight=P("tensor", "context", None, None),
                     bias=heads, A=heads, dt_bias=heads, D=P("tensor", "context", None, None)
                     if c.d_has_hdim else heads, cu_seqlens=P(),
                     conv_state=P(bs, "tensor", "context", None, None),
                     ssm_state=P(bs, "tensor", "context", None, None, None))
        if state is not None:
            args["conv_state"] = plan.to_context(
                state.conv.reshape(nseq, tp, local.conv_dim_local, k - 1), 2)
            args["ssm_state"] = state.ssm.reshape(nseq, tp, cp, hc, c.head_dim, c.state_size)
        if cu_seqlens is not None:
            args["cu_seqlens"] = jnp.asarray(cu_seqlens)
        out_specs = dict(y=P(bx, None, "tensor", "context", None, None))
        if return_state:
            out_specs.update(conv=specs["conv_state"], ssm=specs["ssm_state"])
        out = plan.per_device(partial(self._prefill_local, return_state=return_state, impl=impl),
                              args, specs, out_specs)
        i = c.intermediate_size
        y = plan.constrain(out["y"], bx, sx, "tensor", None, None, None)  # back to sequence-sharded
        result = self._finish(y.reshape(b, l, i), z.reshape(b, l, i), bx, sx)
        if not return_state:
            return result
        conv = plan.from_context(out["conv"], 2).reshape(nseq, -1, k - 1)
        ssm = out["ssm"].reshape(nseq, c.num_heads, c.head_dim, c.state_size)
        return result, MixerState(conv.astype(xbc.dtype), ssm.astype(c.ssm_state_dtype))

    def _fused_step(self, impl: str, rows: int) -> bool:
        """Whether ``step`` runs the fused kernel (kernels/mixer_step, then the gated norm as
        one kernels/rms_norm launch): without a mesh, when the shape fits it, for impl
        "pallas" / "interpret", or "auto" on a GPU (FUSED_STEP_AUTO) for at most
        FUSED_STEP_MAX_ROWS rows."""
        c = self.config
        if self.plan.mesh is not None or mixer_step_unsupported(
                heads=c.num_heads, head_dim=c.head_dim, groups=c.n_groups,
                state_size=c.state_size, conv_kernel=c.conv_kernel):
            return False
        return impl in ("pallas", "interpret") or (
            impl == "auto" and FUSED_STEP_AUTO and rows <= FUSED_STEP_MAX_ROWS
            and jax.default_backend() == "gpu")

    def _mixer_step(self, zxbcdt, state, dtype, impl, **kwargs):
        """kernels/mixer_step on the in_proj output (or its partials; ``dtype`` the product's):
        (gated y, conv, ssm[, the gated norm's sums of squares]); ``kwargs`` go to it. A goes
        in as A_log: the kernel takes -exp, not an XLA launch."""
        c, D = self.config, self.D[...]
        return mixer_step(
            zxbcdt, state.conv, self.conv1d.weight[...].reshape(c.conv_dim, -1),
            None if self.conv1d.bias is None else self.conv1d.bias[...], state.ssm,
            self.A_log[...], D.reshape(c.num_heads, c.head_dim) if c.d_has_hdim else D,
            self.dt_bias[...], heads=c.num_heads, head_dim=c.head_dim, groups=c.n_groups,
            state_size=c.state_size, dt_limit=c.time_step_limit, a_is_log=True,
            zx_dtype=dtype, loads_first=STEP_LOADS_FIRST, **kwargs, **op_kwargs(impl))

    def folds_norms(self, impl: str, rows: int) -> bool:
        """Whether ``folded_step`` can run: the fused step (``_fused_step``) at most gemv's
        MAX_AUTO_ROWS rows, projections without bias, the gated norm an RMS norm over one
        group (its 1 / RMS a row scale after out_proj), and under "auto" bf16 weights and
        FOLD_NORMS_AUTO."""
        if (not self._fused_step(impl, rows) or rows > MAX_AUTO_ROWS or self.norm.n_groups != 1
                or self.in_proj.bias is not None or self.out_proj.bias is not None
                or not self.norm.use_rms_norm):
            return False
        return impl != "auto" or (FOLD_NORMS_AUTO
                                  and self.in_proj.kernel[...].dtype == jnp.bfloat16)

    def folded_step(self, h, delta, delta_ss, norm, state: MixerState, *, impl: str):
        """A block's decode step with both norms folded into the launches around the
        projections, each norm's 1 / RMS a row scale applied after the product:
        ``h [b, d]`` the residual stream before the previous block's output ``delta`` (its
        out_proj product of the gated norm's input times the norm weight, unscaled) with
        ``delta_ss`` (that norm's sums of squares; both None in the first block) ->
        ``(h + previous block's output, this block's delta, delta_ss, new state)``. Three
        launches and XLA's out_proj: ``gemv.residual_gemv`` (the residual add, the block norm
        ``norm``'s weight and its sums of squares, in_proj), ``kernels/mixer_step`` (the
        in_proj scale 1 / RMS, the gated norm's weight and squares) and out_proj. The math is
        ``Mamba2Block.step``'s up to where the 1 / RMS scales enter (products of the unscaled
        input, then scaled in float32: the roundings between differ)."""
        c = self.config
        w_in, nw = self.in_proj.kernel[...], norm.weight[...]
        zxbcdt, h, ss = residual_gemv(h, nw, w_in, delta, delta_ss,
                                      delta_count=c.intermediate_size, delta_eps=self.norm.eps,
                                      in_dtype=nw.dtype, **op_kwargs(impl))
        y, conv, ssm, gss = self._mixer_step(
            zxbcdt, state, w_in.dtype, impl, sum_squares=True, in_ss=ss,
            in_count=c.hidden_size, in_eps=norm.eps, norm_weight=self.norm.weight[...])
        delta = self._linear(self.out_proj, y, impl, auto_kernel=False)
        return h, delta, gss, MixerState(conv, ssm)

    def step(self, u, state: MixerState, *, mup_vector=None, impl: str = "auto"):
        """Decode one token per sequence: ``u [b, d]`` -> ``(out [b, d], new state)``."""
        c, plan, local = self.config, self.plan, self.plan.local
        b, tp = u.shape[0], plan.tp
        if self._fused_step(impl, b):
            if mup_vector is None:  # the product, or the GEMV's split-K partials (summed by
                # mixer_step: one launch fewer) of a product in w's dtype
                zxbcdt = self._linear(self.in_proj, u, impl, auto_kernel=True, partials=True)
                dtype = self.in_proj.kernel[...].dtype
            else:  # (a float32 mup_vector promotes the product: that dtype throughout)
                zxbcdt = self._in_proj(u, mup_vector, impl)
                dtype = zxbcdt.dtype
            y, conv, ssm = self._mixer_step(zxbcdt, state, dtype, impl)
            out = self._linear(self.out_proj, self.norm.normalize(y, dtype, impl=impl), impl,
                               auto_kernel=False)
            return out, MixerState(conv, ssm)
        z, xbc, dt = self._project(u, mup_vector, impl)
        args = dict(xbc=xbc, dt=dt, **self._conv_params(lambda a: a),
                    **self._head_params((tp, local.heads)),
                    conv_state=state.conv.reshape(b, tp, local.conv_dim_local, -1),
                    ssm_state=state.ssm.reshape(b, tp, local.heads, c.head_dim, c.state_size))
        bx = plan.batch_axis(b)
        heads = P("tensor", None)
        specs = dict(xbc=P(bx, "tensor", None), dt=P(bx, "tensor", None),
                     weight=P("tensor", None, None), bias=heads, A=heads, dt_bias=heads,
                     D=P("tensor", None, None) if c.d_has_hdim else heads,
                     conv_state=P(bx, "tensor", None, None),
                     ssm_state=P(bx, "tensor", None, None, None))
        out = plan.per_device(partial(self._step_local, impl=impl), args, specs,
                              dict(y=P(bx, "tensor", None, None), conv=specs["conv_state"],
                                   ssm=specs["ssm_state"]))
        i = c.intermediate_size
        result = self._finish(out["y"].reshape(b, i), z.reshape(b, i), bx, impl=impl)
        return result, MixerState(out["conv"].reshape(state.conv.shape),
                                  out["ssm"].reshape(state.ssm.shape))
