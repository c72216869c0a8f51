"""Our sharded checkpoint format: an orbax PyTree of parameters laid out for ``tp`` tensor shards.

A directory holding

    config.json        the model config (HF keys)
    mamba2_jax.json    {"format": "mamba2-jax/orbax", "version": 1, "tensor_parallel": tp,
                        "dtype": ..., "layout": ...}
    params/            orbax checkpoint: nested dict (our module paths) of arrays in the ``tp``
                       layout (Flax orientation; in_proj columns / conv channels shard-major,
                       groups duplicated as :mod:`mamba2_jax.sharding.layout` states)

:func:`load` with a mesh whose ``"tensor"`` size is ``tp`` restores every array straight into its
NamedSharding (orbax reads only the chunks each device needs); a different size is re-laid out
through the natural layout (duplicated groups checked bit for bit).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding
from tqdm.auto import tqdm

from mamba2_jax.config import ConfigError, Mamba2Config
from mamba2_jax.convert.errors import CheckpointError
from mamba2_jax.convert.hf_layout import (
    from_hf,
    hf_key,
    param_dtype,
    path_to_str,
    to_hf,
)
from mamba2_jax.convert.pretrained import (
    abstract_model,
    model_from_tensors,
    natural_param_paths,
)
from mamba2_jax.sharding.layout import check_tp
from mamba2_jax.sharding.mesh import axis_size
from mamba2_jax.sharding.params import layout_param, param_sharding, unlayout_param

log = logging.getLogger(__name__)

FORMAT = "mamba2-jax/orbax"
VERSION = 1
LAYOUT_FILE = "mamba2_jax.json"
PARAMS_DIR = "params"
LAYOUT_NOTE = ("in_proj.kernel columns and conv1d channels shard-major [z_r|x_r|B_r|C_r|dt_r] / "
               "[x_r|B_r|C_r] per tensor rank r, B/C groups duplicated when tp % n_groups == 0")


def is_orbax_checkpoint(directory) -> bool:
    return (Path(directory) / LAYOUT_FILE).is_file()


def read_layout(directory) -> dict:
    """The checked contents of ``mamba2_jax.json``."""
    path = Path(directory) / LAYOUT_FILE
    try:
        layout = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the layout file ({e})") from None
    if not isinstance(layout, dict) or layout.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} layout file")
    if layout.get("version") != VERSION:
        raise CheckpointError(f"{path}: version {layout.get('version')!r} is not supported "
                              f"(this mamba2-jax reads version {VERSION})")
    tp = layout.get("tensor_parallel")
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"{path}: tensor_parallel must be a positive integer, got {tp!r}")
    try:
        jnp.dtype(layout.get("dtype"))
    except TypeError:
        raise CheckpointError(f"{path}: unknown dtype {layout.get('dtype')!r}") from None
    return layout


def _nested(flat: dict) -> dict:
    """``{(a, b, 0, c): v}`` -> ``{"a": {"b": {"0": {"c": v}}}}`` (string keys for orbax)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return out


def _lookup(tree: dict, path):
    node = tree
    for part in path:
        node = node[str(part)]
    return node


def write(directory, config: Mamba2Config, hf_tensors: dict, *, tp: int, dtype,
          progress: bool = False) -> None:
    """Write ``hf_tensors`` (HF names and layouts) as an orbax checkpoint for ``tp`` shards.

    ``directory`` must not exist yet (the caller makes the write atomic).
    """
    import orbax.checkpoint as ocp

    check_tp(config, tp)
    directory = Path(directory)
    flat = {}
    for path, _ in tqdm(natural_param_paths(config), desc=f"laying out for tp={tp}",
                        unit="tensor", disable=not progress):
        value = from_hf(path, hf_tensors[hf_key(path)]).astype(param_dtype(path, dtype))
        flat[path] = np.ascontiguousarray(layout_param(path_to_str(path), value, config, tp))
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    (directory / LAYOUT_FILE).write_text(json.dumps(dict(
        format=FORMAT, version=VERSION, tensor_parallel=tp, dtype=np.dtype(dtype).name,
        layout=LAYOUT_NOTE), indent=2))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((directory / PARAMS_DIR).absolute(), _nested(flat))
    checkpointer.wait_until_finished()


def _orbax_reason(e: Exception) -> str:
    """A one-line reason from an orbax / tensorstore error (without tensorstore's spec dump)."""
    text = " ".join(str(e).split("[tensorstore_spec=")[0].split()) or type(e).__name__
    return text if len(text) <= 400 else text[:400] + " ..."


def _stored_tree(params: Path, checkpointer) -> dict:
    """The nested dict of array metadata of the orbax checkpoint at ``params`` (checked)."""
    if not params.is_dir():
        raise CheckpointError(f"{params}: cannot read the orbax checkpoint (no such directory)")
    try:
        meta = checkpointer.metadata(params)
    except MemoryError:
        raise
    except Exception as e:  # OSError, ValueError, tensorstore / orbax errors
        raise CheckpointError(f"{params}: cannot read the orbax checkpoint "
                              f"({_orbax_reason(e)})") from None
    item = getattr(meta, "item_metadata", None)
    tree = getattr(item, "tree", None)
    if not isinstance(tree, dict):
        # orbax logs the reason and returns no item metadata for a missing or corrupt
        # _METADATA / manifest.ocdbt / data file
        raise CheckpointError(f"{params}: cannot read the orbax checkpoint (its metadata is "
                              "missing or corrupt: truncated or incomplete checkpoint?)")
    return tree


def _leaf_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaf_paths(v, prefix + (str(k),))
    else:
        yield prefix


def _restore_numpy(directory: Path, config: Mamba2Config):
    import orbax.checkpoint as ocp

    params = (directory / PARAMS_DIR).absolute()
    meta = _stored_tree(params, ocp.StandardCheckpointer())
    expected = {tuple(str(p) for p in path) for path, _ in natural_param_paths(config)}
    unexpected = sorted(".".join(p) for p in set(_leaf_paths(meta)) - expected)
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(f"{params}: {len(unexpected)} unexpected array(s) for the model "
                              f"config.json describes: {shown}")
    try:
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ocp.PyTreeCheckpointer().restore(params, restore_args=args)
    except MemoryError:
        raise
    except Exception as e:  # OSError, ValueError, tensorstore / orbax errors
        raise CheckpointError(f"{params}: cannot read the orbax checkpoint "
                              f"({_orbax_reason(e)})") from None


def read_hf_tensors(directory, *, progress: bool = False):
    """(config, dtype, HF-named HF-layout numpy tensors) of our orbax checkpoint (layout undone)."""
    directory = Path(directory)
    layout = read_layout(directory)
    config = Mamba2Config.from_pretrained(directory)
    tp = layout["tensor_parallel"]
    try:
        check_tp(config, tp)
    except ValueError as e:
        raise CheckpointError(f"{directory / LAYOUT_FILE}: {e}") from None
    tree = _restore_numpy(directory, config)
    out = {}
    for path, shape in tqdm(natural_param_paths(config), desc=f"undoing tp={tp}",
                            unit="tensor", disable=not progress):
        try:
            value = _lookup(tree, path)
        except KeyError:
            raise CheckpointError(f"{directory / PARAMS_DIR}: missing array "
                                  f"{path_to_str(path)!r}") from None
        try:
            value = unlayout_param(path_to_str(path), value, config, tp)
        except ValueError as e:
            raise CheckpointError(f"{directory / PARAMS_DIR}: {path_to_str(path)}: {e}") from None
        if tuple(value.shape) != shape:
            raise CheckpointError(f"{directory / PARAMS_DIR}: {path_to_str(path)!r} has shape "
                                  f"{tuple(value.shape)} after undoing tp={tp}, but the config "
                                  f"implies {shape}")
        out[hf_key(path)] = to_hf(path, value)
    return config, jnp.dtype(layout["dtype"]), out


def load(directory, *, dtype=None, mesh=None, progress: bool = False):
    """Load our orbax checkpoint onto ``mesh`` (see the module docstring)."""
    import orbax.checkpoint as ocp
    directory = Path(directory)
    layout = read_layout(directory)
    try:
        config = Mamba2Config.from_pretrained(directory)
    except ConfigError as e:  # its message already names config.json
        raise CheckpointError(str(e)) from None
    dtype = jnp.dtype(layout["dtype"] if dtype is None else dtype)
    tp_ckpt = layout["tensor_parallel"]
    tp = axis_size(mesh, "tensor")
    if tp != tp_ckpt:
        log.warning("%s is laid out for tensor_parallel=%d; re-laying it out for tensor=%d",
                    directory, tp_ckpt, tp)
        config, _, tensors = read_hf_tensors(directory, progress=progress)
        return model_from_tensors(config, tensors, dtype=dtype, mesh=mesh, where=str(directory),
                                  progress=progress)
    graphdef, state = nnx.split(abstract_model(config, dtype, mesh))
    flat = nnx.to_flat_state(state)
    device = SingleDeviceSharding(jax.devices()[0])
    abstract = {}
    for path, var in flat:
        if isinstance(var, nnx.Param):
            value = var.get_value()
            sharding = device if mesh is None else param_sharding(var, mesh)
            abstract[path] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    params = (directory / PARAMS_DIR).absolute()
    checkpointer = ocp.StandardCheckpointer()
    stored = _stored_tree(params, checkpointer)
    for path, want in abstract.items():
        try:
            have = _lookup(stored, path)
        except KeyError:
            raise CheckpointError(f"{params}: missing array {path_to_str(path)!r}") from None
        if tuple(have.shape) != tuple(want.shape):
            raise CheckpointError(f"{params}: {path_to_str(path)!r} has shape "
                                  f"{tuple(have.shape)}, but the config at tp={tp} implies "
                                  f"{tuple(want.shape)}")
    with tqdm(total=1, desc="restoring", disable=not progress) as bar:
        try:
            restored = checkpointer.restore(params, _nested(abstract))
        except MemoryError:
            raise
        except Exception as e:  # OSError, ValueError, tensorstore / orbax errors
            raise CheckpointError(f"{params}: cannot read the orbax checkpoint "
                                  f"({_orbax_reason(e)})") from None
        bar.update()
    for path, var in flat:
        if isinstance(var, nnx.Param):
            var.set_value(_lookup(restored, path))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
