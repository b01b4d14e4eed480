"""`jaxvae evaluate` writes what a person reads: curves, overlays, report.html, detection rows."""

import base64
import json
import re

import pytest

from jaxvae.cli import main
from jaxvae.data import phantom

SMALL = dict(shape=(64, 64, 40), spacing=(3.5, 3.5, 3.5))


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """A briefly trained run on small phantoms: healthy cases train, lesion cases test."""
    root = tmp_path_factory.mktemp("outputs")
    phantom.write_brats(root / "d", n_healthy=8, n_lesion=4, seed=0, modalities=("t2",),
                        **SMALL)
    run = root / "run"
    assert main(["train", "--data", str(root / "d"), "--out", str(run), "--epochs", "2",
                 "--latent-dim", "8", "--batch-size", "16", "--val-fraction", "0.25"]) == 0
    return run


def _evaluate(run, out, *extra):
    return main(["evaluate", "--run", str(run), "--out", str(out), "--proj-steps", "2",
                 "--n-boot", "20", *extra])


def test_evaluate_writes_curves_overlays_report_and_detection_rows(phantom_run, tmp_path):
    out = tmp_path / "eval"
    assert _evaluate(phantom_run, out) == 0
    res = json.loads((out / "results.json").read_text())
    split = json.loads((phantom_run / "split.json").read_text())
    # curves of every row, from the histogram counts: ROC from (0, 0) to (1, 1)
    assert {"rec_error", "intensity", "ensemble+intensity"} <= set(res["curves"])
    roc = res["curves"]["rec_error"]
    assert roc["fpr"][0] == roc["tpr"][0] == 0 and roc["fpr"][-1] == roc["tpr"][-1] == 1
    # detection: slice level defined; volume level needs healthy test cases (the split has)
    det = res["detection"]
    assert det["slice"]["n_pos"] > 0 and det["slice"]["n_neg"] > 0
    assert 0 <= det["slice"]["rows"]["intensity"]["auroc"] <= 1
    lesion_cases = [c for c in split["test"] if "lesion" in c]
    assert det["volume"]["n_pos"] == len(lesion_cases)
    assert det["volume"]["n_neg"] == len(split["test"]) - len(lesion_cases) > 0
    assert set(det["volume"]["rows"]) == set(det["slice"]["rows"])
    # figures
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    overlays = sorted((out / "overlays").glob("*.png"))
    assert 1 <= len(overlays) <= 3 and all(p.stat().st_size > 5000 for p in overlays)
    # the report: every image embedded, one per figure plus the loss curve, no network
    html = (out / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)
    assert len(srcs) == 1 + len(overlays) + 1  # curves, overlays, loss.png
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1])[:4] == b"\x89PNG"
    assert "http://" not in html and "https://" not in html
    assert "split.json" in html and split["test"][0] in html


def test_evaluate_refuses_to_overwrite_and_leaves_outputs_alone(phantom_run, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.html").write_text("mine")
    assert _evaluate(phantom_run, out) == 2
    err = capsys.readouterr().err
    assert "report.html" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]
    assert (out / "report.html").read_text() == "mine"


def test_atomic_outputs_get_the_mode_of_a_plain_open(tmp_path):
    import os

    from jaxvae.base.io import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(old)
    mode = (tmp_path / "a.txt").stat().st_mode & 0o777
    assert mode == (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644


def test_trained_run_segments_new_scans_and_walks_a_brats_folder(phantom_run, tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    seg = json.loads((phantom_run / "segmenter.json").read_text())
    assert seg["name"] == "ensemble+intensity" and 0 < seg["threshold"] < 1
    data = phantom_run.parent / "d"
    case = sorted(p for p in data.iterdir() if "lesion" in p.name)[0]
    scan = case / f"{case.name}_t2.nii.gz"
    out = tmp_path / "maps"
    assert main(["score", "--run", str(phantom_run), "--input", str(scan), "--out", str(out),
                 "--predictors", "rec_error", "--proj-steps", "0"]) == 0
    assert "ensemble+intensity" in capsys.readouterr().out
    ref = nib.load(scan)
    prob = nib.load(out / f"{case.name}_t2_prob.nii.gz")
    mask = nib.load(out / f"{case.name}_t2_mask.nii.gz")
    assert prob.shape == mask.shape == ref.shape
    assert np.allclose(prob.affine, ref.affine) and np.allclose(mask.affine, ref.affine)
    p, m = prob.get_fdata(), np.asarray(mask.dataobj)
    assert 0 <= p.min() and p.max() <= 1 and set(np.unique(m)) <= {0, 1}
    assert np.array_equal(m == 1, p >= np.float32(seg["threshold"]))
    assert sorted(f.name for f in out.iterdir()) == sorted(
        f"{case.name}_t2_{k}.nii.gz" for k in ("rec_error", "prob", "mask"))
    # a BraTS-layout folder: one scan per case (the run's sequence), no seg file scored
    out = tmp_path / "all"
    assert main(["score", "--run", str(phantom_run), "--input", str(data), "--out", str(out),
                 "--predictors", "rec_error", "--segment", "false"]) == 0
    written = sorted(f.name for f in out.iterdir())
    cases = sorted(p.name for p in data.iterdir() if p.is_dir())
    assert written == sorted(f"{c}_t2_rec_error.nii.gz" for c in cases)
    # another sequence than the run's is refused unless asked for
    flair = tmp_path / f"{case.name}_flair.nii.gz"
    flair.write_bytes(scan.read_bytes())
    assert main(["score", "--run", str(phantom_run), "--input", str(flair), "--out",
                 str(tmp_path / "f"), "--predictors", "rec_error"]) == 2
    assert "flair" in capsys.readouterr().err and not (tmp_path / "f").exists()
    # maps asked with other settings than the segmenter was fitted on: refused before work
    assert main(["score", "--run", str(phantom_run), "--input", str(scan), "--out",
                 str(tmp_path / "s"), "--predictors", "rec_error", "--smooth-sigma", "1"]) == 2
    assert "smooth_sigma" in capsys.readouterr().err and not (tmp_path / "s").exists()
