"""Reliability: bad inputs through the CLI, crash safety of `score`, determinism (no code
execution from data: ruff's bandit rules, tests/integration/test_lint.py).

Every bad input (generated here into tmp_path, nothing binary is committed) must give a
non-zero exit code, exactly one line `jaxvae <verb>: error: ...` on stderr naming the file and
the problem, no traceback, and no partial output. tqdm progress bars (redrawn with \\r on
stderr) are not messages and are ignored when counting lines.

SIGKILL / Ctrl-C during *training* (then an exact resume) are proven in
tests/training/test_trainer.py:
test_sigkill_then_resume_is_bit_identical,
test_ctrl_c_mid_epoch_saves_and_resume_is_bit_identical and (slow)
test_sigint_saves_a_checkpoint_and_exits_then_resumes_exactly; not repeated here.

Tests run as root, and chmod does not stop root from writing: an unwritable output is made
with a path whose parent is a regular file, and with /proc (where even root cannot mkdir).
"""

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxvae.base.errors import OutputError
from jaxvae.base.io import confined
from jaxvae.cli import main
from jaxvae.data.datasets import Case, load_slices
from jaxvae.report.results import write_results

REPO = Path(__file__).resolve().parents[2]
SHAPE = (48, 48, 32)
# LPS-like, 4 mm, with an offset: the maps must come back on this grid
AFFINE = np.array([[-4.0, 0, 0, 90], [0, -4.0, 0, 100], [0, 0, 4.0, -60], [0, 0, 0, 1]])
PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar frame


# ------------------------------------------------------------------------------ fixtures

def brain(seed=0, lesion=False) -> np.ndarray:
    """A skull-stripped toy volume: a centred ellipsoid of positive values, background 0."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    inside = (x / 0.8) ** 2 + (y / 0.75) ** 2 + (z / 0.8) ** 2 < 1
    noise = np.random.default_rng(seed).standard_normal(SHAPE)
    img = np.where(inside, 100 + 20 * x + 5 * noise, 0)
    if lesion:
        img = np.where(blob(), 1.6 * img, img)
    return img.astype(np.float32)


def blob() -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    return (x - 0.3) ** 2 + (y - 0.2) ** 2 + z**2 < 0.25**2


def save(path, data, affine=AFFINE, cls=nib.Nifti1Image) -> Path:
    nib.save(cls(np.asarray(data), affine), path)
    return path


def snapshot(folder: Path):
    """Every file under `folder` with its bytes (None when the folder does not exist)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def error_lines(err: str) -> list[str]:
    """stderr without tqdm progress bar frames (a message glued to a bar is dropped too)."""
    return [ln for ln in err.splitlines() if ln.strip() and not PROGRESS.search(ln)]


def assert_refused(rc, err, verb, *needles):
    """Exit 2, exactly one `jaxvae <verb>: error:` line that contains every needle."""
    lines = error_lines(err)
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"jaxvae {verb}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _private_cache(cache_dir, monkeypatch):
    """Slice caches go to a temporary folder, never to ~/.cache."""
    monkeypatch.setenv("JAXVAE_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("good") / "good.nii.gz", brain())


def write_brats(root: Path, mutate=None) -> Path:
    """BraTS layout: healthy case c0, lesion cases c1, c2 (t2 + seg); `mutate` breaks c1."""
    for seed, (cid, sick) in enumerate((("c0", False), ("c1", True), ("c2", True))):
        (root / cid).mkdir(parents=True)
        save(root / cid / f"{cid}_t2.nii.gz", brain(seed=seed, lesion=sick))
        save(root / cid / f"{cid}_seg.nii.gz", (blob() if sick else np.zeros(SHAPE)).astype(
            np.uint8))
    c1 = root / "c1"
    if mutate == "missing_modality":
        (c1 / "c1_t2.nii.gz").rename(c1 / "c1_flair.nii.gz")
    elif mutate == "two_images":
        save(c1 / "c1_t2.nii", brain(seed=3))
    elif mutate == "seg_shape":
        save(c1 / "c1_seg.nii.gz", np.zeros((48, 48, 31), np.uint8))
    elif mutate == "seg_affine":
        save(c1 / "c1_seg.nii.gz", blob().astype(np.uint8), AFFINE + np.diag([0, 0, 1.0, 0]))
    elif mutate == "seg_fraction":
        save(c1 / "c1_seg.nii.gz", blob() * np.float32(0.5))
    elif mutate == "seg_negative":
        save(c1 / "c1_seg.nii.gz", -blob().astype(np.int16))
    return root


@pytest.fixture(scope="module")
def brats(tmp_path_factory) -> Path:
    return write_brats(tmp_path_factory.mktemp("brats") / "data")


# ------------------------------------------------------------------ 1. bad-input corpus

def singular_affine(path: Path) -> None:
    """An uncompressed NIfTI whose sform is all zeros (nibabel refuses to write one)."""
    save(path, brain())
    raw = bytearray(path.read_bytes())
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1
    raw[280:328] = np.zeros(12, "<f4").tobytes()  # srow_x, srow_y, srow_z
    path.write_bytes(raw)


def four_volumes() -> np.ndarray:
    """A 4D image of two volumes whose contents differ even z-scored (noise, a lesion)."""
    return np.stack([brain(), brain(seed=1, lesion=True)], axis=-1)


def make_volume(kind: str, path: Path) -> None:
    """Write one kind of bad volume at `path` (nothing for 'missing')."""
    good = brain()
    if kind == "missing":
        return
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":  # a CSV renamed .nii.gz
        path.write_text("subject,age\n1,42\n")
    elif kind == "truncated_gzip":
        save(path, good)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "gzip_garbage":
        path.write_bytes(gzip.compress(np.random.default_rng(0).bytes(4000)))
    elif kind == "2d":
        save(path, good[:, :, 16])
    elif kind == "5d":
        save(path, np.broadcast_to(good[..., None, None], (*SHAPE, 2, 2)))
    elif kind == "4d_many":
        save(path, four_volumes())
    elif kind in ("nan", "inf"):
        good[24, 24, 16] = np.nan if kind == "nan" else np.inf
        save(path, good)
    elif kind == "zeros":
        save(path, np.zeros(SHAPE, np.int16))
    elif kind == "constant":
        save(path, np.full(SHAPE, 7.0, np.float32))
    elif kind == "complex":
        save(path, good.astype(np.complex64))
    elif kind == "absurd_shape":  # NIfTI-2: NIfTI-1 cannot even store a 100000 dimension
        save(path, np.arange(100000, dtype=np.float32).reshape(1, 1, 100000), cls=nib.Nifti2Image)
    elif kind == "thin":
        save(path, np.ones((8, 200, 200), np.float32) * np.arange(200))
    elif kind == "no_background":  # a head that was never skull-stripped: noise everywhere
        save(path, 100 + np.random.default_rng(0).random(SHAPE).astype(np.float32))
    elif kind == "singular_affine":
        singular_affine(path)
    else:
        raise AssertionError(kind)


VOLUME_KINDS = {  # kind -> what the error line must say
    "missing": "no such file", "empty": "empty file", "text": "not a readable NIfTI",
    "truncated_gzip": "truncated", "gzip_garbage": "not a readable NIfTI", "2d": "2D image",
    "5d": "5D image", "4d_many": "--volume-index", "nan": "NaN or Inf", "inf": "NaN or Inf",
    "zeros": "constant image", "constant": "constant image", "complex": "not real-valued",
    "absurd_shape": "implausible shape", "thin": "implausible shape",
    "no_background": "skull-stripped", "singular_affine": "invalid affine",
}


def verb_args(verb, data, out, run):
    """CLI arguments feeding the input `data` to `verb` (a tiny, fast configuration)."""
    if verb == "score":
        return ["score", "--run", str(run), "--input", str(data), "--out", str(out),
                "--predictors", "rec_error,rec_grad"]
    if verb == "evaluate":
        return ["evaluate", "--run", str(run), "--data", str(data), "--out", str(out),
                "--predictors", "rec_error"]
    return ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--latent-dim",
            "8", "--batch-size", "16"]


@pytest.mark.parametrize("verb", ["score", "evaluate", "train"])
@pytest.mark.parametrize("kind", sorted(VOLUME_KINDS))
def test_bad_volume_refused_with_one_line(tiny_run, tmp_path, capsys, verb, kind):
    name = "bad.nii" if kind == "singular_affine" else "bad.nii.gz"
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / name
    make_volume(kind, path)
    before = snapshot(tmp_path / "in")
    rc = main(verb_args(verb, path, tmp_path / "out", tiny_run))
    assert_refused(rc, capsys.readouterr().err, verb, name, VOLUME_KINDS[kind])
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path / "in") == before  # inputs untouched, nothing written beside


def test_4d_volume_index_selects_one_volume(tiny_run, tmp_path, capsys):
    path = tmp_path / "four.nii.gz"
    make_volume("4d_many", path)
    save(tmp_path / "one.nii.gz", four_volumes()[..., 1])  # volume 1 alone, as a 3D file
    maps = {}
    runs = {"four0": (path, ["--volume-index", "0"]), "four1": (path, ["--volume-index", "1"]),
            "one": (tmp_path / "one.nii.gz", [])}
    for name, (src, extra) in runs.items():
        out = tmp_path / name
        rc = main(verb_args("score", src, out, tiny_run) + extra)
        assert rc == 0, capsys.readouterr().err
        img = nib.load(next(out.glob("*_rec_error.nii.gz")))
        assert img.shape == SHAPE
        np.testing.assert_allclose(img.affine, AFFINE)
        maps[name] = img.get_fdata()
    # index 1 is volume 1: the same input values through the same program as the 3D file
    ref = maps["one"]
    np.testing.assert_allclose(maps["four1"], ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # ... and not volume 0, whose map differs well beyond any rounding
    assert np.abs(maps["four0"] - ref).max() > 0.1 * np.abs(ref).max()
    rc = main(verb_args("score", path, tmp_path / "o2", tiny_run) + ["--volume-index", "2"])
    assert_refused(rc, capsys.readouterr().err, "score", "four.nii.gz", "out of range")
    assert not (tmp_path / "o2").exists()


DATASET_KINDS = {  # a broken BraTS case c1 -> (file named in the error, what it must say)
    "missing_modality": ("c1", "no t2 image"), "two_images": ("c1", "several t2 files"),
    "seg_shape": ("c1_seg.nii.gz", "shape"), "seg_affine": ("c1_seg.nii.gz", "affines differ"),
    "seg_fraction": ("c1_seg.nii.gz", "not integers"),
    "seg_negative": ("c1_seg.nii.gz", "negative labels"),
}


@pytest.mark.parametrize("verb", ["evaluate", "train"])
@pytest.mark.parametrize("kind", sorted(DATASET_KINDS))
def test_bad_brats_dataset_refused(tiny_run, tmp_path, capsys, verb, kind):
    data = write_brats(tmp_path / "data", kind)
    rc = main(verb_args(verb, data, tmp_path / "out", tiny_run))
    assert_refused(rc, capsys.readouterr().err, verb, *DATASET_KINDS[kind])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["seg_shape", "seg_affine", "seg_fraction", "seg_negative"])
def test_bad_mask_refused_by_score(tiny_run, good, tmp_path, capsys, kind):
    mask = write_brats(tmp_path / "data", kind) / "c1" / "c1_seg.nii.gz"
    rc = main(verb_args("score", good, tmp_path / "out", tiny_run) + ["--mask", str(mask)])
    assert_refused(rc, capsys.readouterr().err, "score", "c1_seg.nii.gz", "good.nii.gz",
                   DATASET_KINDS[kind][1])
    assert not (tmp_path / "out").exists()


def make_run(kind: str, tiny_run: Path, run: Path) -> None:
    if kind == "missing":
        return
    if kind == "no_config":
        run.mkdir()
        return
    shutil.copytree(tiny_run, run)
    cfg = run / "config.json"
    if kind == "bad_config":
        cfg.write_text(cfg.read_text()[:40])
    elif kind == "no_checkpoint":
        shutil.rmtree(run / "checkpoints")
    elif kind == "other_model":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "latent_dim": 16}))


RUN_KINDS = {"missing": "run directory not found", "no_config": "config.json: missing",
             "bad_config": "config.json: not a valid", "no_checkpoint": "no checkpoint",
             "other_model": "different model"}


@pytest.mark.parametrize("verb", ["score", "evaluate"])
@pytest.mark.parametrize("kind", sorted(RUN_KINDS))
def test_bad_run_dir_refused(tiny_run, good, tmp_path, capsys, verb, kind):
    run = tmp_path / "myrun"
    make_run(kind, tiny_run, run)
    rc = main(verb_args(verb, good, tmp_path / "out", run))
    assert_refused(rc, capsys.readouterr().err, verb, "myrun", RUN_KINDS[kind])
    assert not (tmp_path / "out").exists()


ARGPARSE_FLAGS = [  # rejected by argparse: exit 2 with the usage line
    ("evaluate", ["--folds", "0"]), ("score", ["--volume-index", "one"]),
    ("train", ["--latent-dim", "abc"]), ("score", ["--smooth-sigma", "x"]),
]


@pytest.mark.parametrize("verb,flags", ARGPARSE_FLAGS, ids=lambda v: "_".join(v)
                         if isinstance(v, list) else v)
def test_invalid_flag_values_rejected_by_argparse(tiny_run, good, tmp_path, capsys, verb, flags):
    with pytest.raises(SystemExit) as exc:
        main(verb_args(verb, good, tmp_path / "out", tiny_run) + flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and flags[0] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


CONFIG_FLAGS = [  # valid syntax, invalid value: one error line
    ("score", ["--predictors", "rec_grad,bogus"], "bogus"),
    ("evaluate", ["--predictors", "bogus"], "bogus"),
    ("score", ["--predictors", "../../evil"], "../../evil"),  # a name that would escape
    ("score", ["--proj-steps", "-1"], "--proj-steps"),
    ("evaluate", ["--n-samples", "-2"], "--n-samples"),
    # out of range: refused by the settings dataclass, naming the flag (before any work)
    ("train", ["--beta", "-1"], "--beta"), ("train", ["--latent-dim", "0"], "--latent-dim"),
    ("train", ["--epochs", "-1"], "--epochs"), ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--lr", "0"], "--lr"), ("score", ["--batch-size", "0"], "--batch-size"),
    ("score", ["--smooth-sigma", "-1"], "--smooth-sigma"),
    ("train", ["--augmentation.mirror_prob", "2"], "--augmentation.mirror_prob"),
    ("train", ["--fold", "1"], "fold 1"),
    ("train", ["--folds", "5"], "5 folds"),
]


@pytest.mark.parametrize("verb,flags,needle", CONFIG_FLAGS,
                         ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_invalid_option_values_give_one_line(tiny_run, good, tmp_path, capsys, verb, flags,
                                             needle):
    rc = main(verb_args(verb, good, tmp_path / "out", tiny_run) + flags)
    assert_refused(rc, capsys.readouterr().err, verb, needle)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.parent.glob("evil*")) and not list(tmp_path.glob("**/evil*"))


# ------------------------------------------------------------------------ output folder

def out_args(verb, out, run, good, brats):
    return verb_args(verb, brats if verb == "evaluate" else good, out, run)


@pytest.mark.parametrize("verb", ["score", "evaluate", "train"])
def test_output_under_a_regular_file_refused(tiny_run, good, brats, tmp_path, capsys, verb):
    # root ignores chmod, so "not writable" is a regular file where a folder must be
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    rc = main(out_args(verb, blocker / "out", tiny_run, good, brats))
    assert_refused(rc, capsys.readouterr().err, verb, "blocker", "is a file")
    rc = main(out_args(verb, blocker, tiny_run, good, brats))  # the output folder is a file
    assert_refused(rc, capsys.readouterr().err, verb, "blocker", "is a file")
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.parametrize("verb", ["score", "evaluate"])
def test_output_in_proc_refused(tiny_run, good, brats, capsys, verb):
    # /proc is a folder, but even root cannot create anything in it
    out = Path("/proc") / f"jaxvae-test-{os.getpid()}" / "out"
    rc = main(out_args(verb, out, tiny_run, good, brats))
    assert_refused(rc, capsys.readouterr().err, verb, str(out.parent), "cannot write")
    assert not out.parent.exists()


@pytest.mark.parametrize("verb", ["score", "evaluate", "train"])
def test_existing_output_kept_without_overwrite(tiny_run, good, brats, tmp_path, capsys, verb):
    out = tmp_path / "out"
    out.mkdir()
    name = {"score": "good_rec_grad.nii.gz", "evaluate": "results.json", "train": "notes.txt"}
    (out / name[verb]).write_bytes(b"precious")
    before = snapshot(out)
    rc = main(out_args(verb, out, tiny_run, good, brats))
    assert_refused(rc, capsys.readouterr().err, verb, str(out),
                   "not empty" if verb == "train" else "already exists")
    assert snapshot(out) == before


def test_existing_png_refused_before_any_map_is_written(tiny_run, good, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "good_maps.png").write_bytes(b"precious")
    rc = main(verb_args("score", good, out, tiny_run) + ["--png"])
    assert_refused(rc, capsys.readouterr().err, "score", "good_maps.png", "already exists")
    assert snapshot(out) == {"good_maps.png": b"precious"}


@pytest.mark.parametrize("failure", ["disk_full", "ctrl_c"])
def test_failed_write_removes_the_maps_already_written(tiny_run, good, tmp_path, capsys,
                                                      monkeypatch, failure):
    """A volume's maps are all written or none: a full disk / Ctrl-C on the second map."""
    real, calls = nib.save, []

    def flaky_save(img, path):
        calls.append(path)
        if len(calls) == 2:
            if failure == "ctrl_c":
                raise KeyboardInterrupt
            raise OSError(28, "No space left on device", str(path))
        real(img, path)

    monkeypatch.setattr(nib, "save", flaky_save)
    out = tmp_path / "out"
    rc = main(verb_args("score", good, out, tiny_run))
    err = capsys.readouterr().err
    if failure == "ctrl_c":
        assert rc == 130 and error_lines(err) == ["jaxvae score: interrupted"], err
    else:
        assert_refused(rc, err, "score", "No space left")
    assert len(calls) == 2 and snapshot(out) == {}  # first map removed, no temporary left


def test_results_written_both_or_neither(tmp_path, monkeypatch):
    import jaxvae.report.results as ev

    results = {"n_cases": 1, "n_slices": 1, "predictors": {"rec_error": {"auroc": 0.5}}}
    real = ev.write_text

    def flaky(path, text, **kw):
        if Path(path).name == "results.md":
            raise OutputError(f"{path}: disk full")
        real(path, text, **kw)

    monkeypatch.setattr(ev, "write_text", flaky)
    with pytest.raises(OutputError, match="disk full"):
        write_results(results, tmp_path / "res")
    assert snapshot(tmp_path / "res") == {}


# ---------------------------------------------------------------- names leaving the folder

@pytest.mark.parametrize("name", ["../x.nii.gz", "/etc/x.nii.gz", "a/../../x", "..", ".", ""])
def test_confined_refuses_names_leaving_the_folder(tmp_path, name):
    with pytest.raises(OutputError, match="output"):
        confined(tmp_path / "out", name)
    assert confined(tmp_path / "out", "v_rec_error.nii.gz") == tmp_path / "out" / \
        "v_rec_error.nii.gz"


def test_confined_refuses_a_symlink_leading_out(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "v_rec_error.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(OutputError, match="outside the output folder"):
        confined(tmp_path / "out", "v_rec_error.nii.gz")


def test_case_id_cannot_write_the_cache_outside_its_folder(good, tmp_path):
    # Case objects come from folder names on disk, but also from user code and experiments
    cache = tmp_path / "cache"
    case = Case(case_id="../../escaped", image_path=good)
    with pytest.raises(OutputError, match="escaped"):
        load_slices([case], cache_dir=cache)
    assert not list(tmp_path.parent.glob("**/escaped*"))


# ------------------------------------------------------------------------ many volumes

@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """a_good, b_bad (singular affine: a multi-line message), c_good."""
    folder = tmp_path / "vols"
    folder.mkdir()
    save(folder / "a_good.nii.gz", brain(seed=1))
    singular_affine(folder / "b_bad.nii")
    save(folder / "c_good.nii.gz", brain(seed=2))
    return folder


def test_folder_with_one_bad_volume_skips_it_and_exits_1(tiny_run, mixed_folder, tmp_path,
                                                         capsys):
    out = tmp_path / "out"
    rc = main(verb_args("score", mixed_folder, out, tiny_run))
    cap = capsys.readouterr()
    lines = error_lines(cap.err)
    assert rc == 1, cap.err
    assert "Traceback" not in cap.err
    assert len(lines) == 1 and lines[0].startswith("jaxvae score: skipped: "), cap.err
    assert "b_bad.nii" in lines[0] and "invalid affine" in lines[0]
    assert "1 skipped" in cap.out
    assert sorted(snapshot(out)) == ["a_good_rec_error.nii.gz", "a_good_rec_grad.nii.gz",
                                     "c_good_rec_error.nii.gz", "c_good_rec_grad.nii.gz"]
    for p in out.iterdir():
        assert nib.load(p).get_fdata().shape == SHAPE


def test_folder_strict_stops_at_the_bad_volume(tiny_run, mixed_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(verb_args("score", mixed_folder, out, tiny_run) + ["--strict"])
    assert_refused(rc, capsys.readouterr().err, "score", "b_bad.nii", "invalid affine")
    assert sorted(snapshot(out)) == ["a_good_rec_error.nii.gz", "a_good_rec_grad.nii.gz"]


# ------------------------------------------------------- end to end in a real subprocess

def child_env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               JAXVAE_CACHE=str(cache))
    return env


def run_cli(args, cache, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxvae.cli", *map(str, args)],
                          capture_output=True, text=True, env=child_env(cache), timeout=timeout)


def test_subprocess_truncated_checkpoint_one_line_no_traceback(tiny_run, good, tmp_path):
    # in a child: orbax's failed reads report to a closed event loop at exit (see test_train)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data_files = [f for f in (run / "checkpoints").rglob("*") if f.is_file()
                  and f.parent.name == "d" and "params" in f.parts]
    assert data_files
    for f in data_files:
        f.write_bytes(f.read_bytes()[:5])
    out = tmp_path / "out"
    proc = run_cli(["score", "--run", run, "--input", good, "--out", out], tmp_path / "cache")
    assert_refused(proc.returncode, proc.stderr, "score", str(run / "checkpoints"),
                   "cannot read checkpoint")
    assert "Exception ignored" not in proc.stderr
    assert not out.exists()


def test_subprocess_bad_data_one_line_and_debug_shows_traceback(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    make_volume("truncated_gzip", bad)
    args = ["train", "--data", bad, "--out", tmp_path / "run", "--epochs", "1"]
    proc = run_cli(args, tmp_path / "cache")
    assert_refused(proc.returncode, proc.stderr, "train", "bad.nii.gz", "truncated")
    assert proc.stdout == ""
    proc = run_cli(["--debug", *args], tmp_path / "cache")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "DataError" in proc.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 2. SIGKILL during score

def test_sigkill_during_score_leaves_no_half_written_nifti(tiny_run, tmp_path, capsys):
    """Kill -9 while `score` writes a folder of volumes, ideally while a file is being written.

    Every visible output is then a complete NIfTI. Hidden `.<name>.<random>.tmp.nii.gz` files
    of atomic_path may remain: accepted, because they are hidden, never match an output name
    or a folder scan (dot-files are skipped), and deleting them automatically could break
    another process writing to the same folder. A rerun with --overwrite completes.
    """
    vols = tmp_path / "vols"
    vols.mkdir()
    for i in range(10):
        save(vols / f"v{i}.nii.gz", brain(seed=i))
    out = tmp_path / "out"
    preds = "rec_error,rec_grad,kl_grad,elbo_grad,combi"
    args = ["score", "--run", tiny_run, "--input", vols, "--out", out, "--predictors", preds]
    proc = subprocess.Popen([sys.executable, "-m", "jaxvae.cli", *map(str, args)],
                            env=child_env(tmp_path / "cache"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0, first = time.monotonic(), None
    try:
        while True:  # wait for one finished map, then kill while a temporary file exists
            names = [e.name for e in os.scandir(out)] if out.is_dir() else []
            if first is None and any(not n.startswith(".") for n in names):
                first = time.monotonic()
            caught_tmp = any(n.startswith(".") for n in names)
            if first is not None and (caught_tmp or time.monotonic() - first > 0.5):
                break
            if proc.poll() is not None:
                pytest.fail(f"score finished before it was killed: {proc.stderr.read()[-2000:]}")
            if time.monotonic() - t0 > 240:
                pytest.fail("no output appeared")
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    print("killed while a temporary file existed:", caught_tmp)
    visible = sorted(p for p in out.iterdir() if not p.name.startswith("."))
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert visible
    for p in visible:
        assert re.fullmatch(r"v\d_(rec_error|rec_grad|kl_grad|elbo_grad|combi)\.nii\.gz", p.name)
        img = nib.load(p)
        assert img.shape == SHAPE and np.isfinite(img.get_fdata()).all()  # reads to the end
    assert all(re.fullmatch(r"\.v\d_\w+\.nii\.gz\..+\.tmp\.nii\.gz", n) for n in hidden), hidden
    # the next run is not confused by the leftovers and completes every volume
    assert main(["score", "--run", str(tiny_run), "--input", str(vols), "--out", str(out),
                 "--predictors", preds, "--overwrite"]) == 0, capsys.readouterr().err
    assert len([p for p in out.iterdir() if not p.name.startswith(".")]) == 10 * 5
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == hidden


# ---------------------------------------------------------------------- 3. determinism

DETERMINISM_CHILD = textwrap.dedent("""
    import sys
    from jaxvae.cli import main
    run, vols, brats, out = sys.argv[1:5]
    assert main(["score", "--run", run, "--input", vols, "--out", out + "/maps",
                 "--predictors", "rec_error,kl_grad,combi", "--n-samples", "2"]) == 0
    assert main(["evaluate", "--run", run, "--data", brats, "--out", out + "/eval",
                 "--predictors", "rec_error,rec_grad,kl_grad,proj_rec_error",
                 "--proj-steps", "3", "--n-samples", "2"]) == 0
""")


def test_same_inputs_give_bit_identical_maps_and_metrics(tiny_run, brats, tmp_path):
    vols = tmp_path / "vols"
    vols.mkdir()
    for i in range(2):
        save(vols / f"v{i}.nii.gz", brain(seed=i, lesion=bool(i)))
    script = tmp_path / "child.py"
    script.write_text(DETERMINISM_CHILD)
    outs = []
    for k in range(2):  # separate processes and slice caches: everything computed twice
        out = tmp_path / f"out{k}"
        proc = subprocess.run([sys.executable, str(script), str(tiny_run), str(vols), str(brats),
                               str(out)], capture_output=True, text=True,
                              env=child_env(tmp_path / f"cache{k}"), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(snapshot(out))
    a, b = outs
    assert sorted(a) == sorted(b) and len([n for n in a if n.startswith("maps/")]) == 6
    for name in a:
        assert a[name] == b[name], name  # gzip without timestamps: same maps, same bytes
    res = json.loads(a["eval/results.json"])
    assert {"rec_error", "rec_grad", "kl_grad", "proj_rec_error"} <= set(res["predictors"])
    assert res["calibration"]["method"] == "none"  # the run records no validation cases
