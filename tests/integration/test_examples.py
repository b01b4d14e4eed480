"""The runnable examples run, end to end, as a user runs them."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# trains a VAE for 2 epochs: ~30 s on two cores, so not marked slow
def test_train_and_score_example(tmp_path):
    out = tmp_path / "example"
    done = subprocess.run([sys.executable, str(EXAMPLES / "train_and_score.py"), "--out",
                           str(out), "--epochs", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    shapes = dict(re.findall(r"^\s+(\w+)\s+shape (\(\d+, \d+, \d+\))", done.stdout, re.M))
    assert shapes == {k: "(96, 96, 64)" for k in ("rec_error", "kl_grad", "prob", "mask")}, \
        done.stdout
    assert re.search(r"mask Dice with the phantom's lesion: [01]\.\d{3}", done.stdout)
    assert (out / "run" / "segmenter.json").is_file()
