"""The cross-dataset protocol from the command line: train on one dataset, evaluate on another."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxvae.cli import main
from jaxvae.data import phantom

SMALL = dict(shape=(64, 64, 40), spacing=(3.5, 3.5, 3.5))


def _cli(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "jaxvae.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_train_on_lesion_free_slices_of_brats2018_then_evaluate_on_brats2021(shared_data,
                                                                             tmp_path):
    run, out = tmp_path / "R", tmp_path / "E"
    stdout = _cli("train", "--data", shared_data / "brats2018_flair", "--modality", "flair",
                  "--epochs", "1", "--latent-dim", "16", "--out", run)
    assert "the lesion-free slices of" in stdout and "optimiser steps" in stdout
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 9 and split["test"] == []
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(lines[-1]["val_loss"])
    assert (run / "loss.png").stat().st_size > 1000
    stdout = _cli("evaluate", "--run", run, "--data", shared_data / "brats2021_t2",
                  "--modality", "flair", "--out", out, "--proj-steps", "2", "--n-boot", "50")
    res = json.loads((out / "results.json").read_text())
    assert res["n_cases"] == 1 and res["n_lesion_pixels"] > 0
    assert res["calibration"]["val_cases"] == split["val"]  # fitted on BraTS2018's val case
    assert res["calibration"]["method"] == "val_best_dice"
    rows = res["predictors"]
    assert {"rec_error", "kl_grad", "intensity", "ensemble+intensity"} <= set(rows)
    assert 0.5 < rows["intensity"]["auroc"] <= 1 and 0 <= rows["intensity"]["dice_val"] <= 1
    with open(out / "per_case.csv") as f:
        cases = {r["case"] for r in csv.DictReader(f)}
    assert cases == {"BraTS2021_00006"}
    assert "Dice (val. threshold)" in stdout


def test_healthy_phantom_cohort_then_lesion_phantoms_of_another_seed(tmp_path, capsys):
    phantom.write_brats(tmp_path / "healthy", n_healthy=6, n_lesion=0, seed=0,
                        modalities=("t2",), **SMALL)
    phantom.write_brats(tmp_path / "sick", n_healthy=1, n_lesion=3, seed=1, modalities=("t2",),
                        **SMALL)
    run, out = tmp_path / "run", tmp_path / "eval"
    assert main(["train", "--data", str(tmp_path / "healthy"), "--out", str(run), "--epochs",
                 "2", "--latent-dim", "8", "--batch-size", "16", "--val-fraction", "0.2"]) == 0
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 5 and not split["test"]
    assert "5 cases" in capsys.readouterr().out
    # the run's own data holds no test case: refused with the way out
    assert main(["evaluate", "--run", str(run), "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run), "--data", str(tmp_path / "sick"), "--out",
                 str(out), "--predictors", "rec_error,rec_grad,kl_grad", "--n-boot",
                 "30"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["n_cases"] == 4  # every case of the other dataset
    assert res["calibration"]["method"] == "val_quantile"  # healthy validation case
    assert "ensemble" not in res["predictors"]
    for name, r in res["predictors"].items():
        assert 0 <= r["dice_val"] <= 1 and r["ci"]["auroc"][0] <= r["auroc"], name
    # and on healthy data: what can be measured there
    assert main(["evaluate", "--run", str(run), "--data", str(tmp_path / "sick" /
                                                              "phantom_healthy_000"),
                 "--out", str(tmp_path / "h"), "--predictors", "rec_error"]) == 0
    res = json.loads((tmp_path / "h" / "results.json").read_text())
    assert res["n_lesion_pixels"] == 0
    assert 0 <= res["predictors"]["rec_error"]["frac_above"] < 0.2


def test_a_run_scores_another_sequence_only_when_told(tmp_path, capsys):
    phantom.write_brats(tmp_path / "d", n_healthy=3, n_lesion=1, seed=0,
                        modalities=("t2", "flair"), **SMALL)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d"), "--modality", "flair", "--out",
                 str(run), "--epochs", "1", "--latent-dim", "8", "--batch-size", "16"]) == 0
    t2 = tmp_path / "d" / "phantom_lesion_000" / "phantom_lesion_000_t2.nii.gz"
    args = ["score", "--run", str(run), "--input", str(t2), "--predictors", "rec_error"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "t2" in err and "flair" in err and "--modality t2" in err and str(t2) in err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--out", str(tmp_path / "o"), "--modality", "t2"]) == 0
    # evaluate on a folder of plain volumes named as another sequence: the same rule
    (tmp_path / "vols").mkdir()
    (tmp_path / "vols" / "x_t2.nii.gz").write_bytes(t2.read_bytes())
    ev = ["evaluate", "--run", str(run), "--data", str(tmp_path / "vols"), "--predictors",
          "rec_error"]
    assert main([*ev, "--out", str(tmp_path / "e")]) == 2
    assert "x_t2.nii.gz" in capsys.readouterr().err
    assert main([*ev, "--out", str(tmp_path / "e"), "--modality", "t2"]) == 0
    flair = t2.with_name("phantom_lesion_000_flair.nii.gz")
    assert main(["score", "--run", str(run), "--input", str(flair), "--predictors",
                 "rec_error", "--out", str(tmp_path / "o2")]) == 0


def test_a_cropped_run_is_evaluated_and_scores_with_its_own_preprocessing(tmp_path,
                                                                          monkeypatch):
    import nibabel as nib

    from jaxvae.data import preprocess

    phantom.write_brats(tmp_path / "d", n_healthy=3, n_lesion=2, seed=0, modalities=("t2",),
                        **SMALL)
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d"), "--out", str(run), "--epochs", "1",
                 "--latent-dim", "8", "--batch-size", "16", "--crop-to-brain"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["preprocess"]["crop"] is True
    real = preprocess.preprocess_volume
    seen = {"evaluate": [], "score": []}

    def spy(verb):
        def f(volume, params=None, *a, **kw):
            seen[verb].append((params or preprocess.PreprocessParams()).crop)
            return real(volume, params, *a, **kw)
        return f

    import jaxvae.data.datasets as ds

    # evaluate reads slices through datasets, score a volume through volumes (its module
    # attribute `pre.preprocess_volume`): each path is watched on its own
    monkeypatch.setattr(ds, "preprocess_volume", spy("evaluate"))
    monkeypatch.setattr(preprocess, "preprocess_volume", spy("score"))
    monkeypatch.setenv("JAXVAE_CACHE", str(tmp_path / "cache"))  # no cached slices
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "e"), "--predictors",
                 "rec_error", "--n-boot", "0"]) == 0
    assert seen["evaluate"] and all(seen["evaluate"]) and not seen["score"]
    vol = tmp_path / "d" / "phantom_lesion_000" / "phantom_lesion_000_t2.nii.gz"
    assert main(["score", "--run", str(run), "--input", str(vol), "--out", str(tmp_path / "m"),
                 "--predictors", "rec_error"]) == 0
    assert seen["score"] == [True]  # the scored volume went through the run's cropping
    out = nib.load(tmp_path / "m" / "phantom_lesion_000_t2_rec_error.nii.gz")
    assert out.shape == nib.load(vol).shape and np.count_nonzero(out.get_fdata()) > 100
