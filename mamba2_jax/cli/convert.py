"""``mamba2-convert``: convert a Mamba-2 checkpoint directory to our sharded orbax format or to HF.

    mamba2-convert SRC DST [--tp N] [--dtype float32|bfloat16|float16] [--format orbax|hf] [--force]

SRC is an HF transformers directory (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``), a mamba_ssm directory (``config.json`` with ``d_model`` /
``n_layer`` / ``ssm_cfg`` + ``pytorch_model.bin``, read with ``weights_only=True``) or one of our
orbax checkpoints (a directory holding ``mamba2_jax.json``).

``--format orbax`` (the default) writes our orbax checkpoint laid out for ``--tp`` tensor shards
(B/C groups duplicated where the layout needs it), with ``config.json`` and ``mamba2_jax.json``;
``load_pretrained(DST, mesh=...)`` reads it (re-laying it out for another tensor size).
``--format hf`` writes ``config.json`` + ``model.safetensors`` as ``save_pretrained`` does: the
layout undone, duplicates checked, bit-exact to the source tensors unless ``--dtype`` casts them.

``--dtype`` casts the floating tensors, except ``A_log``, ``D`` and ``dt_bias``, which are stored
as float32 (the loader keeps them in float32 anyway). Without it the source dtypes are kept (an
orbax checkpoint records one dtype: that of the embedding).

The output is written into a temporary sibling directory and renamed into place at the end: a
failure leaves no DST behind. An existing DST is refused unless ``--force`` (it is then replaced
only once the new checkpoint is complete). Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

PROG = "mamba2-convert"
DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("orbax", "hf")


class ConvertError(Exception):
    """A failure to report as one line (the message names the file involved)."""


# -- arguments ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("src", metavar="SRC", help="HF, mamba_ssm or mamba2-jax orbax checkpoint directory")
    ap.add_argument("dst", metavar="DST", help="output directory (must not exist unless --force)")
    ap.add_argument("--tp", type=int, default=None,
                    help="tensor-parallel size the orbax output is laid out for (default 1)")
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="cast the floating tensors (A_log, D, dt_bias stay float32); "
                         "default: keep the source dtype")
    ap.add_argument("--format", choices=FORMATS, default="orbax",
                    help="orbax: our sharded checkpoint (default); hf: config.json + model.safetensors")
    ap.add_argument("--force", action="store_true", help="replace an existing DST")
    return ap


def _one_line(text) -> str:
    return " ".join(str(text).split())


# -- reading the source --------------------------------------------------------------------------


def _check_src(src: Path) -> None:
    from mamba2_jax.convert import orbax_format
    from mamba2_jax.convert.readers import WEIGHT_FILES

    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory (expected a checkpoint directory)")
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory (expected a checkpoint directory holding "
                           "config.json and weights, or mamba2_jax.json)")
    if orbax_format.is_orbax_checkpoint(src) or (src / "config.json").is_file():
        return
    found = sorted(p.name for p in src.iterdir())
    shown = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "") if found else "nothing"
    raise ConvertError(f"{src}: not a checkpoint directory (expected config.json + one of "
                       f"{', '.join(WEIGHT_FILES)}, or {orbax_format.LAYOUT_FILE}; found {shown})")


def _check_tp(config, tp: int, where) -> None:
    from mamba2_jax.sharding.layout import check_tp

    try:
        check_tp(config, tp)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None


def read_source(src: Path, *, tp: int | None = None):
    """``(config, source dtype, HF-named HF-layout tensors, keys in model order)`` of ``src``.

    The tensors are exactly the model's parameters (a tied model's ``lm_head.weight`` copy is
    dropped); ``tp``, when given, is checked against the config before the weights are read.
    """
    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.convert import orbax_format
    from mamba2_jax.convert.hf_layout import canonical_key, hf_key
    from mamba2_jax.convert.pretrained import check_tensors, natural_param_paths
    from mamba2_jax.convert.readers import find_weights, read_tensors

    _check_src(src)
    if orbax_format.is_orbax_checkpoint(src):
        orbax_format.read_layout(src)
        config = Mamba2Config.from_pretrained(src)
        if tp is not None:
            _check_tp(config, tp, src / "config.json")
        config, dtype, tensors = orbax_format.read_hf_tensors(src, progress=True)
        keys = [hf_key(path) for path, _ in natural_param_paths(config)]
        return config, np.dtype(dtype), tensors, keys

    config = Mamba2Config.from_pretrained(src)
    if tp is not None:
        _check_tp(config, tp, src / "config.json")
    weights = find_weights(src)
    tensors, original = {}, {}
    for key, value in read_tensors(src).items():
        name = canonical_key(key)
        if name in tensors:
            raise ConvertError(f"{weights}: keys {original[name]!r} and {key!r} both name "
                               f"{name!r}")
        tensors[name], original[name] = value, key
    keys = check_tensors(config, tensors, where=str(weights))
    return config, np.dtype(tensors["backbone.embeddings.weight"].dtype), \
        {k: tensors[k] for k in keys}, keys


# -- writing -------------------------------------------------------------------------------------


def _np_dtype(name: str) -> np.dtype:
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(name))


def cast_tensor(key: str, array: np.ndarray, dtype) -> np.ndarray:
    """``array`` cast to ``dtype`` if floating (``A_log``, ``D``, ``dt_bias``: to float32)."""
    import jax.numpy as jnp
    from mamba2_jax.convert.hf_layout import param_dtype

    if not jnp.issubdtype(array.dtype, jnp.floating):
        return array
    target = param_dtype(key.split("."), dtype)
    return array if array.dtype == target else array.astype(target)


def write_hf(directory: Path, config, tensors: dict, keys, dtype=None) -> None:
    """``config.json`` + ``model.safetensors`` (``save_pretrained``'s format) into a new ``directory``."""
    import json

    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    out = {}
    for key in tqdm(keys, desc="preparing" if dtype is None else f"casting to {np.dtype(dtype).name}",
                    unit="tensor"):
        value = tensors[key] if dtype is None else cast_tensor(key, tensors[key], dtype)
        out[key] = np.ascontiguousarray(value)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    with tqdm(total=1, desc="writing model.safetensors", unit="file") as bar:
        save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
        bar.update()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_directory(dst: Path, *, force: bool):
    """Yield a temporary sibling path to write into; move it to ``dst`` when the block succeeds.

    The temporary path does not exist yet (the writer makes it). Any failure removes it and
    leaves ``dst`` as it was. With ``force`` an existing ``dst`` is moved aside, the new one
    renamed in, and the old one deleted.
    """
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if not tmp.is_dir():
            raise ConvertError(f"{tmp}: the writer left no output directory")
        if os.path.lexists(dst):
            if not force:  # appeared while we were writing
                raise ConvertError(f"{dst}: already exists (pass --force to replace it)")
            _remove(old)
            os.replace(dst, old)
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old, dst)
                raise
            _remove(old)
        else:
            os.replace(tmp, dst)
    finally:
        _remove(tmp)


# -- main ----------------------------------------------------------------------------------------


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _check_dst(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise ConvertError(f"{dst}: DST is the source checkpoint (expected a different directory)")
    if force and _is_within(s, d):
        raise ConvertError(f"{dst}: DST contains the source checkpoint {src}; --force would "
                           "delete it (expected a directory outside SRC)")
    if os.path.lexists(dst) and not force:
        raise ConvertError(f"{dst}: already exists (expected a new path; pass --force to "
                           "replace it)")
    if not d.parent.is_dir() and d.parent.exists():
        raise ConvertError(f"{dst.parent}: not a directory (expected DST's parent directory)")


def _closed_loop_filter(previous):
    """An ``unraisablehook`` that drops tensorstore's late callbacks onto a closed asyncio loop.

    After orbax fails to read a corrupt checkpoint, tensorstore futures that were still pending
    complete later (often at interpreter exit) and report ``RuntimeError('Event loop is
    closed')`` as unraisable: noise after our one-line error. Everything else goes to
    ``previous``.
    """
    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._mamba2_convert = True
    return hook


@contextlib.contextmanager
def _quiet_orbax_logs():
    """orbax logs (absl, WARNING) the reason it cannot read metadata; our error line says it."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def convert(src: Path, dst: Path, *, tp: int | None, dtype: str | None, fmt: str,
            force: bool) -> None:
    """Read ``src`` and write ``dst`` (see the module docstring); raises on any failure."""
    from mamba2_jax.convert import orbax_format

    _check_dst(src, dst, force)
    config, src_dtype, tensors, keys = read_source(
        src, tp=(1 if tp is None else tp) if fmt == "orbax" else None)
    dtype = None if dtype is None else _np_dtype(dtype)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(dst, force=force) as tmp:
            if fmt == "orbax":
                orbax_format.write(tmp, config, tensors, tp=1 if tp is None else tp,
                                   dtype=src_dtype if dtype is None else dtype, progress=True)
            else:
                write_hf(tmp, config, tensors, keys, dtype)
    except (ConvertError, MemoryError):
        raise
    except OSError as e:
        what = e.strerror or str(e)
        where = f"; {e.filename}" if e.filename is not None else ""
        raise ConvertError(f"{dst}: cannot write the checkpoint ({_one_line(what)}{where})") from e
    except Exception as e:  # orbax / safetensors errors
        raise ConvertError(f"{dst}: cannot write the checkpoint ({type(e).__name__}: "
                           f"{_one_line(e)})") from e


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.format == "hf" and args.tp is not None:
        ap.error("--tp applies to --format orbax only (HF checkpoints are not laid out for tp)")
    if not getattr(sys.unraisablehook, "_mamba2_convert", False):
        sys.unraisablehook = _closed_loop_filter(sys.unraisablehook)

    from mamba2_jax.config import ConfigError
    from mamba2_jax.convert.errors import CheckpointError

    src, dst = Path(args.src), Path(args.dst)
    try:
        if args.tp is not None and args.tp < 1:
            raise ConvertError(f"--tp: must be a positive integer (expected >= 1, found {args.tp})")
        with _quiet_orbax_logs():
            convert(src, dst, tp=args.tp, dtype=args.dtype, fmt=args.format, force=args.force)
    except (ConvertError, CheckpointError, ConfigError) as e:
        message = _one_line(e)
    except ValueError as e:  # e.g. the layout's checks; name the source
        message = f"{src}: {_one_line(e)}"
    except OSError as e:
        where = e.filename if e.filename is not None else dst
        message = f"{where}: {_one_line(e.strerror or e)}"
    except KeyboardInterrupt:
        print(f"{PROG}: error: {dst}: interrupted (nothing written)", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback: report the unexpected one in one line
        message = f"{src}: unexpected {type(e).__name__} while converting: {_one_line(e)}"
    else:
        print(f"wrote {dst} ({args.format}"
              + (f", tp={args.tp or 1}" if args.format == "orbax" else "")
              + (f", {args.dtype}" if args.dtype else "") + ")")
        return 0
    sys.stderr.flush()
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
