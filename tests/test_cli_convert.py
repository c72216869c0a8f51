"""mamba2-convert on real checkpoints: tp layouts load with the same logits, round trips are
bit-exact, dtype casts follow the loader's policy, every failure is one line and leaves no DST."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from hf_oracle import make_hf_model, max_rel, write_mamba_ssm_dir
from mamba2_jax import load_pretrained
from mamba2_jax.cli.convert import main
from mamba2_jax.config import Mamba2Config
from mamba2_jax.convert import orbax_format
from mamba2_jax.convert.hf_layout import canonical_key
from mamba2_jax.sharding import make_mesh
from mamba2_jax.sharding.layout import local_config

IDS = np.random.default_rng(0).integers(0, 96, (2, 13))
_forward = nnx.jit(lambda model, ids: model(ids))  # eager calls under a mesh are slow on CPU


def logits(model):
    return np.asarray(_forward(model, IDS))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Real checkpoints, written once: HF dirs with g = 1, 2 (tied, sharded), 4; a mamba_ssm dir."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for name, seed, kwargs, shard in [("g1", 0, dict(n_groups=1), None),
                                      ("g2", 1, dict(n_groups=2, tie_word_embeddings=True), "60KB"),
                                      ("g4", 2, dict(n_groups=4), None)]:
        model = make_hf_model(seed, **{"tie_word_embeddings": False, **kwargs})
        model.save_pretrained(root / name, **({} if shard is None else {"max_shard_size": shard}))
        out[name] = root / name
    assert (out["g2"] / "model.safetensors.index.json").is_file()
    out["ssm"] = write_mamba_ssm_dir(make_hf_model(3, n_groups=1, tie_word_embeddings=True),
                                     root / "ssm")
    return out


@pytest.fixture(scope="module")
def reference_logits(sources):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = logits(load_pretrained(sources[name]))
        return cache[name]

    return get


def hf_tensors(path):
    """A checkpoint's tensors as our reader sees them, keys in HF spelling."""
    from mamba2_jax.convert.readers import read_tensors

    return {canonical_key(k): v for k, v in read_tensors(path).items()}


def assert_no_leftovers(parent: Path, name: str):
    left = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert left == [], left


def convert_ok(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    _, err = capsys.readouterr()
    assert "error" not in err and "Traceback" not in err, err
    dst = Path(argv[1])
    assert_no_leftovers(dst.parent, dst.name)
    return dst


def convert_fails(capsys, argv, *needles, progress_before=False):
    """main(argv) exits 1 with one error line naming ``needles`` (and only that, unless a
    progress bar ran before the failure)."""
    assert main([str(a) for a in argv]) == 1
    _, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mamba2-convert: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if not progress_before:
        assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


def stored_shape(dst, key):
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().metadata((dst / "params").absolute()).item_metadata.tree
    for part in key.split("."):
        tree = tree[part]
    return tuple(tree.shape)


# -- HF -> orbax for tp shards, loaded on meshes -------------------------------------------------


@pytest.mark.parametrize("name,tp,other", [("g1", 2, 4), ("g2", 4, 2), ("g4", 2, 4)])
def test_orbax_for_tp_loads_with_same_logits(sources, reference_logits, tmp_path, capsys,
                                             name, tp, other):
    dst = convert_ok(capsys, sources[name], tmp_path / "out" / "ckpt", "--tp", tp)
    layout = json.loads((dst / "mamba2_jax.json").read_text())
    assert layout["tensor_parallel"] == tp and layout["dtype"] == "float32"
    config = Mamba2Config.from_pretrained(dst)
    assert config == Mamba2Config.from_pretrained(sources[name])
    # the stored in_proj is laid out for tp: g=1 over 2 and g=2 over 4 duplicate B/C groups
    d = config.hidden_size
    width = tp * local_config(config, tp).in_proj_local
    assert stored_shape(dst, "backbone.layers.1.mixer.in_proj.kernel") == (d, width)
    assert (width > config.in_proj_size) == (config.n_groups < tp)

    want = reference_logits(name)
    model = load_pretrained(dst, mesh=make_mesh(tensor=tp, devices=jax.devices()[:tp]))
    kernel = model.backbone.layers[0].mixer.in_proj.kernel[...]
    assert "tensor" in tuple(kernel.sharding.spec) and kernel.shape == (d, width)
    assert max_rel(logits(model), want) < 1e-5
    relaid = load_pretrained(dst, mesh=make_mesh(tensor=other, devices=jax.devices()[:other]))
    assert "tensor" in tuple(relaid.backbone.layers[0].mixer.in_proj.kernel[...].sharding.spec)
    assert max_rel(logits(relaid), want) < 1e-5
    assert max_rel(logits(load_pretrained(dst)), want) < 1e-5


# -- round trips back to HF ------------------------------------------------------------------------


@pytest.mark.parametrize("name,tp", [("g2", 4), ("g4", 2), ("ssm", 2)])
def test_orbax_to_hf_is_bit_exact(sources, tmp_path, capsys, name, tp):
    orbax = convert_ok(capsys, sources[name], tmp_path / "orbax", "--tp", tp)
    hf = convert_ok(capsys, orbax, tmp_path / "hf", "--format", "hf")
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]
    got = load_file(str(hf / "model.safetensors"))
    want = hf_tensors(sources[name])
    config = Mamba2Config.from_pretrained(sources[name])
    if config.tie_word_embeddings:  # mamba_ssm's copy of the tied head is not written
        want.pop("lm_head.weight", None)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert Mamba2Config.from_pretrained(hf) == config
    if name == "ssm":  # the raw bin, keys renamed
        bin_sd = torch.load(sources[name] / "pytorch_model.bin", weights_only=True)
        assert "backbone.embedding.weight" in bin_sd and "lm_head.weight" in bin_sd
        np.testing.assert_array_equal(got["backbone.embeddings.weight"],
                                      bin_sd["backbone.embedding.weight"].numpy())


def test_mamba_ssm_to_hf_directly(sources, tmp_path, capsys):
    hf = convert_ok(capsys, sources["ssm"], tmp_path / "hf", "--format", "hf")
    got, want = load_file(str(hf / "model.safetensors")), hf_tensors(sources["ssm"])
    want.pop("lm_head.weight")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert np.array_equal(logits(load_pretrained(hf)), logits(load_pretrained(sources["ssm"])))


def test_dtype_bfloat16(sources, tmp_path, capsys):
    want = hf_tensors(sources["g1"])
    orbax = convert_ok(capsys, sources["g1"], tmp_path / "orbax", "--tp", 2, "--dtype", "bfloat16")
    assert json.loads((orbax / "mamba2_jax.json").read_text())["dtype"] == "bfloat16"
    model = load_pretrained(orbax)
    assert model.backbone.embeddings.embedding[...].dtype == jax.numpy.bfloat16
    assert model.backbone.layers[0].mixer.A_log[...].dtype == jax.numpy.float32
    via_orbax = convert_ok(capsys, orbax, tmp_path / "hf", "--format", "hf")
    direct = convert_ok(capsys, sources["g1"], tmp_path / "hf_direct", "--format", "hf",
                        "--dtype", "bfloat16")
    for out in (via_orbax, direct):
        got = load_file(str(out / "model.safetensors"))
        assert got.keys() == want.keys()
        for k, v in want.items():
            f32 = k.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")
            assert got[k].dtype == (np.float32 if f32 else ml_dtypes.bfloat16), k
            assert np.array_equal(got[k], v if f32 else v.astype(ml_dtypes.bfloat16)), k
    # float16 into orbax, back to HF keeps float16
    half = convert_ok(capsys, sources["g1"], tmp_path / "half", "--dtype", "float16")
    back = load_file(str(convert_ok(capsys, half, tmp_path / "half_hf", "--format", "hf")
                         / "model.safetensors"))
    assert back["lm_head.weight"].dtype == np.float16
    assert np.array_equal(back["lm_head.weight"], want["lm_head.weight"].astype(np.float16))


# -- DST handling --------------------------------------------------------------------------------------


def test_existing_dst_is_refused_then_replaced_with_force(sources, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    convert_fails(capsys, [sources["g1"], dst], dst, "already exists", "--force")
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert (dst / "keep.txt").read_text() == "precious"
    convert_ok(capsys, sources["g1"], dst, "--format", "hf", "--force")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    convert_ok(capsys, dst, tmp_path / "same_again", "--format", "hf")  # a valid checkpoint
    convert_fails(capsys, [dst, dst, "--force"], dst, "is the source")
    convert_fails(capsys, [dst / "..", tmp_path / "dst" / "..", "--force"], "is the source")
    convert_fails(capsys, [dst, tmp_path, "--force"], "contains the source")
    assert (dst / "model.safetensors").is_file()


def test_failure_mid_write_leaves_nothing(sources, tmp_path, capsys, monkeypatch):
    def broken_write(directory, *args, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "config.json").write_text("{}")
        (Path(directory) / "params").mkdir()
        raise OSError(28, "No space left on device", str(Path(directory) / "params"))

    monkeypatch.setattr(orbax_format, "write", broken_write)
    dst = tmp_path / "dst"
    convert_fails(capsys, [sources["g1"], dst, "--tp", 2], dst, "cannot write",
                  "No space left on device")
    assert not dst.exists()
    assert_no_leftovers(tmp_path, "dst")
    # with --force, the old DST survives a failed write untouched
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    convert_fails(capsys, [sources["g1"], dst, "--force"], "No space left on device")
    assert [p.name for p in dst.iterdir()] == ["old.txt"]
    assert_no_leftovers(tmp_path, "dst")
    monkeypatch.undo()

    import safetensors.numpy

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("I/O error while writing")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_save)
    convert_fails(capsys, [sources["g1"], tmp_path / "hf", "--format", "hf"],
                  tmp_path / "hf", "cannot write", "RuntimeError", "I/O error",
                  progress_before=True)
    assert not (tmp_path / "hf").exists()
    assert_no_leftovers(tmp_path, "hf")


# -- every error path: one line, exit 1 ------------------------------------------------------------------


@pytest.fixture
def hf_copy(sources, tmp_path):
    """A writable copy of the untied g=4 HF checkpoint."""
    return Path(shutil.copytree(sources["g4"], tmp_path / "src"))


def rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_non_checkpoint_sources(tmp_path, capsys):
    convert_fails(capsys, [tmp_path / "nope", tmp_path / "dst"], tmp_path / "nope",
                  "no such file or directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    convert_fails(capsys, [tmp_path / "empty", tmp_path / "dst"], "not a checkpoint directory",
                  "config.json", "notes.txt")
    (tmp_path / "file").write_text("x")
    convert_fails(capsys, [tmp_path / "file", tmp_path / "dst"], "not a directory")
    (tmp_path / "noweights").mkdir()
    shutil.copy(tmp_path / "empty" / "notes.txt", tmp_path / "noweights" / "config.json")
    convert_fails(capsys, [tmp_path / "noweights", tmp_path / "dst"],
                  tmp_path / "noweights" / "config.json", "invalid JSON")
    assert not (tmp_path / "dst").exists()


def test_truncated_safetensors(hf_copy, tmp_path, capsys):
    f = hf_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    convert_fails(capsys, [hf_copy, tmp_path / "dst"], f, "truncated or corrupt")


def test_truncated_mamba_ssm_bin(sources, tmp_path, capsys):
    src = Path(shutil.copytree(sources["ssm"], tmp_path / "ssm"))
    f = src / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    convert_fails(capsys, [src, tmp_path / "dst", "--format", "hf"], f, "weights_only=True")


def test_missing_key(hf_copy, tmp_path, capsys):
    rewrite(hf_copy, lambda t: t.pop("backbone.layers.1.mixer.dt_bias"))
    convert_fails(capsys, [hf_copy, tmp_path / "dst"], hf_copy / "model.safetensors",
                  "missing key 'backbone.layers.1.mixer.dt_bias'")


def test_unexpected_key(hf_copy, tmp_path, capsys):
    rewrite(hf_copy, lambda t: t.update({"backbone.layers.2.norm.weight": np.ones(64, np.float32)}))
    convert_fails(capsys, [hf_copy, tmp_path / "dst", "--format", "hf"],
                  hf_copy / "model.safetensors", "unexpected key(s)",
                  "'backbone.layers.2.norm.weight'")


def test_shape_mismatch_against_config(hf_copy, tmp_path, capsys):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["state_size"] = 8
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    line = convert_fails(capsys, [hf_copy, tmp_path / "dst"], hf_copy / "model.safetensors",
                         "has shape", "config implies")
    assert "backbone.layers.0.mixer." in line


def test_embedding_under_both_spellings(sources, tmp_path, capsys):
    src = Path(shutil.copytree(sources["ssm"], tmp_path / "ssm"))
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    sd["backbone.embeddings.weight"] = sd["backbone.embedding.weight"].clone()
    torch.save(sd, src / "pytorch_model.bin")
    convert_fails(capsys, [src, tmp_path / "dst"], src / "pytorch_model.bin",
                  "'backbone.embedding.weight'", "'backbone.embeddings.weight'")


def test_tp_that_does_not_fit(sources, tmp_path, capsys):
    convert_fails(capsys, [sources["g4"], tmp_path / "dst", "--tp", 3],
                  sources["g4"] / "config.json", "num_heads (8) must be a multiple of tp (3)")
    # 6 heads in 3 groups: tp = 2 divides the heads but not the groups (nor they it)
    model = make_hf_model(5, hidden_size=48, num_heads=6, n_groups=3)
    model.save_pretrained(tmp_path / "g3")
    capsys.readouterr()  # transformers' own progress bar
    convert_fails(capsys, [tmp_path / "g3", tmp_path / "dst", "--tp", 2],
                  tmp_path / "g3" / "config.json", "n_groups (3) and tp (2) must divide one another")
    convert_fails(capsys, [sources["g4"], tmp_path / "dst", "--tp", 0], "--tp", "found 0")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("argv", [["--tp", "two"], ["--dtype", "int8"], ["--format", "hf", "--tp", "2"],
                                  []])
def test_usage_errors_exit_2(sources, tmp_path, capsys, argv):
    args = [str(sources["g1"])] + ([str(tmp_path / "dst")] if argv else []) + argv
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "usage: mamba2-convert" in capsys.readouterr().err


@pytest.fixture(scope="module")
def orbax_ckpt(sources, tmp_path_factory):
    dst = tmp_path_factory.mktemp("orbax") / "ckpt"
    assert main([str(sources["g1"]), str(dst), "--tp", "2"]) == 0
    return dst


@pytest.mark.parametrize("text,needle", [
    ("{not json", "cannot read the layout file"),
    ('{"format": "something-else"}', "not a mamba2-jax/orbax layout file"),
    ('{"format": "mamba2-jax/orbax", "version": 1, "tensor_parallel": 0, "dtype": "float32"}',
     "tensor_parallel must be a positive integer"),
])
def test_corrupt_layout_file(orbax_ckpt, tmp_path, capsys, text, needle):
    src = Path(shutil.copytree(orbax_ckpt, tmp_path / "src"))
    (src / "mamba2_jax.json").write_text(text)
    convert_fails(capsys, [src, tmp_path / "dst", "--format", "hf"], src / "mamba2_jax.json", needle)
    assert not (tmp_path / "dst").exists()


def test_orbax_source_errors(orbax_ckpt, tmp_path, capsys):
    src = Path(shutil.copytree(orbax_ckpt, tmp_path / "src"))
    layout = json.loads((src / "mamba2_jax.json").read_text())
    layout["tensor_parallel"] = 4  # arrays laid out for 2
    (src / "mamba2_jax.json").write_text(json.dumps(layout))
    convert_fails(capsys, [src, tmp_path / "dst"], src / "params", "backbone.layers.0.mixer.conv1d",
                  "tp = 4", progress_before=True)
    layout["tensor_parallel"] = 2
    (src / "mamba2_jax.json").write_text(json.dumps(layout))
    convert_fails(capsys, [src, tmp_path / "dst", "--tp", 3], src / "config.json",
                  "must be a multiple of tp (3)")
    (src / "params" / "manifest.ocdbt").unlink()
    convert_fails(capsys, [src, tmp_path / "dst"], src / "params", "cannot read the orbax checkpoint")
    shutil.rmtree(src / "params")
    convert_fails(capsys, [src, tmp_path / "dst"], src / "params", "cannot read the orbax checkpoint")
    assert not (tmp_path / "dst").exists()
    assert_no_leftovers(tmp_path, "dst")


def resave_params(src, edit):
    """Rewrite ``src/params`` (an orbax PyTree of numpy arrays) after ``edit(tree)``."""
    import orbax.checkpoint as ocp

    params = (src / "params").absolute()
    tree = ocp.StandardCheckpointer().restore(params)
    edit(tree)
    shutil.rmtree(params)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params, tree)
    checkpointer.wait_until_finished()


def test_orbax_source_with_tampered_arrays(orbax_ckpt, tmp_path, capsys):
    """g = 1 over tp = 2: both shards hold group 0's B/C rows; the copies must agree."""
    src = Path(shutil.copytree(orbax_ckpt, tmp_path / "src"))
    config = Mamba2Config.from_pretrained(src)
    i, local = config.intermediate_size, local_config(config, 2)

    def edit_copy(tree):
        kernel = tree["backbone"]["layers"]["1"]["mixer"]["in_proj"]["kernel"]
        kernel[3, local.in_proj_local + i + 5] += 1.0  # shard 1's copy of B row 5 of group 0

    resave_params(src, edit_copy)
    convert_fails(capsys, [src, tmp_path / "dst", "--format", "hf"], src / "params",
                  "backbone.layers.1.mixer.in_proj.kernel", "B group 0", "differs",
                  progress_before=True)
    resave_params(src, lambda tree: tree["backbone"].update(extra={"w": np.zeros(3, np.float32)}))
    convert_fails(capsys, [src, tmp_path / "dst"], src / "params", "unexpected array",
                  "'backbone.extra.w'")
    assert not (tmp_path / "dst").exists()


# -- the entry points, in a fresh process --------------------------------------------------------------


def test_entry_points(orbax_ckpt, sources, tmp_path):
    script = shutil.which("mamba2-convert")
    cmd = [script] if script else [sys.executable, "-m", "mamba2_jax.cli.convert"]
    ok = subprocess.run([*cmd, str(orbax_ckpt), str(tmp_path / "hf"), "--format", "hf"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "Traceback" not in ok.stderr and f"wrote {tmp_path / 'hf'}" in ok.stdout
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # a corrupt orbax checkpoint: orbax fails inside tensorstore; still one line, no traceback
    src = Path(shutil.copytree(orbax_ckpt, tmp_path / "src"))
    (src / "params" / "manifest.ocdbt").unlink()
    bad = subprocess.run([sys.executable, "-m", "mamba2_jax.cli.convert", str(src),
                          str(tmp_path / "dst")], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().count("\n") == 0, bad.stderr
    assert bad.stderr.startswith(f"mamba2-convert: error: {src / 'params'}: cannot read")
    assert not (tmp_path / "dst").exists()
