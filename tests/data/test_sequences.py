"""Two sequences at 128x128 from the command line: train, score a case folder, evaluate; bad
combinations refused in one line."""

import json

import nibabel as nib
import numpy as np
import pytest

from jaxvae.cli import main
from jaxvae.data import phantom

SMALL = dict(shape=(64, 64, 40), spacing=(3.5, 3.5, 3.5))


@pytest.fixture(scope="module")
def two_sequence_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    phantom.write_brats(root / "d", n_healthy=5, n_lesion=3, seed=0, modalities=("t2", "flair"),
                        **SMALL)
    run = root / "run"
    assert main(["train", "--data", str(root / "d"), "--modality", "flair,t2", "--image-size",
                 "128", "--epochs", "1", "--latent-dim", "8", "--batch-size", "16",
                 "--out", str(run), "--val-fraction", "0.3"]) == 0
    return run


def test_flair_t2_at_128_trains_scores_and_evaluates(two_sequence_run, tmp_path, capsys):
    run = two_sequence_run
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["image_size"], cfg["in_channels"], cfg["data"]["modality"]) == (128, 2,
                                                                                 "flair,t2")
    case = sorted(p for p in (run.parent / "d").iterdir() if "lesion" in p.name)[0]
    out = tmp_path / "maps"
    assert main(["score", "--run", str(run), "--input", str(case), "--out", str(out),
                 "--predictors", "rec_error,kl_grad", "--segment", "false"]) == 0
    ref = nib.load(case / f"{case.name}_flair.nii.gz")
    for name in ("rec_error", "kl_grad"):
        img = nib.load(out / f"{case.name}_{name}.nii.gz")
        assert img.shape == ref.shape and np.allclose(img.affine, ref.affine)
        assert np.isfinite(img.get_fdata()).all() and img.get_fdata().max() > 0
    ev = tmp_path / "eval"
    assert main(["evaluate", "--run", str(run), "--out", str(ev), "--proj-steps", "1",
                 "--n-boot", "0"]) == 0
    rows = json.loads((ev / "results.json").read_text())["predictors"]
    assert {"intensity", "intensity_flair", "intensity_t2", "rec_error"} <= set(rows)
    capsys.readouterr()


BAD = [  # (arguments after the run, what the single error line names)
    (["score", "--input", "{flair}", "--out", "{tmp}/o"], "case folder"),
    (["score", "--input", "{case}", "--modality", "t2,flair", "--out", "{tmp}/o"], "flair,t2"),
    (["evaluate", "--modality", "flair", "--out", "{tmp}/o"], "flair,t2"),
]


@pytest.mark.parametrize("args,named", BAD, ids=["one-file", "swapped", "other-sequences"])
def test_bad_combinations_are_refused(two_sequence_run, tmp_path, capsys, args, named):
    case = sorted(p for p in (two_sequence_run.parent / "d").iterdir() if "lesion" in p.name)[0]
    fill = {"flair": str(case / f"{case.name}_flair.nii.gz"), "case": str(case),
            "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    assert main([argv[0], "--run", str(two_sequence_run), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,named", [(["--modality", "flair,pd"], "pd"),
                                         (["--image-size", "96"], "64, 128"),
                                         (["--modality", "flair,flair"], "flair")])
def test_train_refuses_unknown_sequences_and_sizes(tmp_path, capsys, flags, named):
    assert main(["train", "--data", "phantom", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "r").exists()
