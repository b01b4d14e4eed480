"""The experiment scripts run end to end on tiny phantom settings (their numbers: README)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxvae.data import phantom

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(shape=(64, 64, 40), spacing=(3.5, 3.5, 3.5), modalities=("flair",))


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_cross_dataset_two_seeds(tmp_path):
    phantom.write_brats(tmp_path / "a", n_healthy=0, n_lesion=5, seed=0, **SMALL)
    phantom.write_brats(tmp_path / "b", n_healthy=0, n_lesion=2, seed=1, **SMALL)
    out = _run("cross_dataset.py", "--train-data", tmp_path / "a", "--test-data", tmp_path / "b",
               "--seeds", 0, 1, "--latent-dim", 8, "--batch-size", 8, "--max-steps", 2,
               "--proj-steps", 2, "--runs", tmp_path / "runs", "--out", tmp_path / "out")
    res = json.loads((tmp_path / "out" / "cross_dataset.json").read_text())
    assert [s["seed"] for s in res["seeds"]] == [0, 1]
    for s in res["seeds"]:
        assert s["training"]["steps"] == 2 and s["results"]["n_cases"] == 2
        assert len(s["training"]["val_cases"]) == 1  # one of the five training cases
        rows = s["results"]["predictors"]
        assert {"rec_pos", "intensity_unclipped", "intensity_histeq"} <= set(rows)
    assert "| rec_grad_pos |" in out and " ± " in out  # mean ± sd over the two seeds
    _run("cross_dataset.py", "--train-data", tmp_path / "a", "--test-data", tmp_path / "b",
         "--seeds", 0, "--latent-dim", 8, "--batch-size", 8, "--proj-steps", 2, "--untrained",
         "--runs", tmp_path / "runs", "--out", tmp_path / "untrained")
    ctl = json.loads((tmp_path / "untrained" / "cross_dataset.json").read_text())["seeds"][0]
    assert ctl["training"]["steps"] == 0 and ctl["training"]["val_cases"] == res["seeds"][0][
        "training"]["val_cases"]  # the same validation case as the trained run of that seed
    assert ctl["results"]["predictors"]["rec_error"] != res["seeds"][0]["results"][
        "predictors"]["rec_error"]


@pytest.mark.slow
def test_table_script_with_folds_per_fold_and_pooled(tmp_path):
    phantom.write_brats(tmp_path / "d", n_healthy=0, n_lesion=6, seed=0, **SMALL)
    out = _run("table2.py", "--data", tmp_path / "d", "--folds", 2, "--betas", 1,
               "--max-steps", 2, "--batch-size", 8, "--proj-steps", 2, "--n-boot", 20,
               "--runs", tmp_path / "runs", "--out", tmp_path / "out")
    res = json.loads((tmp_path / "out" / "table2.json").read_text())["results"]["beta=1"]
    pooled = res["seeds"]["0"]
    assert pooled["n_cases"] == 6 and len(pooled["per_fold"]) == 2
    assert [f["n_cases"] for f in pooled["per_fold"]] == [3, 3]
    assert pooled["predictors"]["rec_error"]["ci"]["auroc"][0] <= pooled["predictors"][
        "rec_error"]["auroc"]
    assert "fold 0: 2 steps" in out and "Dice (val. thr.)" in out
