"""Tests of jaxvae.training.loss_curve: loss.png."""

from run_helpers import (
    images,
    tiny,
)

from jaxvae.training.loss_curve import write_loss_curve
from jaxvae.training.trainer import train

VAL = images(5, seed=7)  # fewer than a batch


def test_loss_curve_is_a_png_written_atomically(tmp_path):
    import matplotlib.image

    run = tmp_path / "run"
    train(tiny(epochs=2), images(32), run, progress=False, val_images=VAL)
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0  # something is drawn
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    # also without validation, and in-memory runs write nothing
    train(tiny(epochs=1), images(32), tmp_path / "plain", progress=False)
    assert (tmp_path / "plain" / "loss.png").is_file()
    assert write_loss_curve(tmp_path / "none.png", []) is None
    assert not (tmp_path / "none.png").exists()
