import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from jaxvae.cli import main


def test_bad_flags_give_one_line_and_exit_code(tiny_run, tmp_path, capsys):
    rc = main(["score", "--run", str(tiny_run), "--input", str(tmp_path / "missing.nii.gz"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.nii.gz" in err[0] and "Traceback" not in err[0]
    rc = main(["score", "--run", str(tiny_run), "--input", str(tmp_path), "--out",
               str(tmp_path / "o"), "--predictors", "rec_grad,bogus"])
    err = capsys.readouterr().err
    assert rc == 2 and "bogus" in err
    rc = main(["evaluate", "--run", str(tmp_path / "norun"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "norun" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    rc = main(["train", "--data", "phantom", "--out", str(tmp_path / "r"), "--beta", "-1"])
    assert rc == 2 and "--beta" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_train_refuses_a_used_run_dir_before_loading_data(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    # the data folder does not exist: only a check made before loading names the run dir
    rc = main(["train", "--data", str(tmp_path / "nodata"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "not empty" in err and str(out) in err and "nodata" not in err
    assert (out / "notes.txt").read_text() == "precious"


def test_score_real_brats_case_keeps_grid_and_affine(shared_data, tiny_run, tmp_path, capsys):
    src = shared_data / "brats2021_t2" / "BraTS2021_00006" / "BraTS2021_00006_t2.nii.gz"
    out = tmp_path / "maps"
    rc = main(["score", "--run", str(tiny_run), "--input", str(src), "--out", str(out),
               "--predictors", "rec_error,rec_grad", "--png"])
    assert rc == 0, capsys.readouterr().err
    ref = nib.load(src)
    for name in ("rec_error", "rec_grad"):
        img = nib.load(out / f"BraTS2021_00006_t2_{name}.nii.gz")
        assert img.shape == ref.shape
        np.testing.assert_allclose(img.affine, ref.affine)
        assert np.count_nonzero(img.get_fdata()) > 1000
    assert (out / "BraTS2021_00006_t2_maps.png").stat().st_size > 1000
    # a second run must not overwrite silently
    assert main(["score", "--run", str(tiny_run), "--input", str(src), "--out", str(out),
                 "--predictors", "rec_error"]) == 2


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "jaxvae.cli", "demo", "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    for f in ("results.md", "figures/maps.png", "run/config.json", "run/metrics.jsonl",
              "report.html", "curves.png", "run/segmenter.json"):
        assert (out / f).is_file(), f
    assert len(list((out / "overlays").glob("*.png"))) >= 1
    maps = sorted(p.name.split("_")[-1] for p in (out / "maps").glob("*.nii.gz"))
    assert len(maps) == 8 and "prob.nii.gz" in maps and "mask.nii.gz" in maps
    assert res["detection"]["volume"]["n_neg"] > 0  # a healthy test case: defined
    rows = res["predictors"]
    assert set(rows) >= {"rec_error", "rec_grad", "kl_grad", "elbo_grad", "combi",
                         "proj_rec_error", "intensity"}
    assert "ensemble" in rows and res["calibration"]["method"] == "val_best_dice"
    assert (out / "per_case.csv").is_file() and (out / "run" / "split.json").is_file()
    best = max(rows[p]["auroc"] for p in ("rec_grad", "elbo_grad", "kl_grad"))
    assert best > 0.8, rows  # chance is 0.5
    assert "| rec_grad |" in proc.stdout
