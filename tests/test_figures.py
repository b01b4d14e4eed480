import numpy as np
import pytest

from jaxvae.errors import OutputError
from jaxvae.figures import map_figure, pick_slices


def test_pick_slices_prefers_large_lesions_of_different_cases():
    lesion = np.zeros((6, 8, 8), bool)
    for s, area in enumerate([0, 5, 9, 7, 2, 0]):
        lesion[s].flat[:area] = True
    assert pick_slices(lesion, n=2) == [2, 3]
    ids = np.array(["a", "a", "a", "a", "b", "b"])
    assert pick_slices(lesion, n=2, case_ids=ids) == [2, 4]
    assert pick_slices(np.zeros((3, 8, 8)), n=2) == [0, 1]  # no lesion: first slices


def test_map_figure_writes_png_and_refuses_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 16, 16))
    lesion = images > 1
    path = tmp_path / "f.png"
    map_figure(path, images, lesion, {"m": rng.random((3, 16, 16))}, recon=images)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputError):
        map_figure(path, images, lesion, {"m": images})


def test_map_figure_without_truth_column(tmp_path):
    images = np.random.default_rng(1).normal(size=(2, 16, 16))
    map_figure(tmp_path / "g.png", images, None, {"m": images}, index=[1])
    assert (tmp_path / "g.png").stat().st_size > 100
