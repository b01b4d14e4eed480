import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from jaxvae.base.errors import OutputError
from jaxvae.report.figures import curves_figure, overlay_figure
from jaxvae.report.html import write_report
from jaxvae.report.results import results_table

PNG = b"\x89PNG\r\n\x1a\n"
EVIL = "<b>x</b>&y"  # a case ID that must stay text


def _metrics(rng):
    m = {k: float(rng.random()) for k in ("auroc", "auroc_brain", "auprc", "dice_best",
                                          "dice_val", "frac_above")}
    return {**m, "lesion_pixels": int(rng.integers(100, 999))}


def _results():
    rng = np.random.default_rng(0)
    rows = ["rec_error", "kl_grad", "intensity", "ensemble", "ensemble+intensity"]
    preds = {}
    for r in rows:
        m = _metrics(rng)
        preds[r] = {**m, "ci": {k: [v - 0.05, v + 0.05] for k, v in m.items()
                                if k != "lesion_pixels"}}
    x = np.linspace(0, 1, 20).tolist()
    return {
        "n_cases": 2, "n_slices": 120, "n_lesion_pixels": 5000,
        "settings": {"n_boot": 100, "val_quantile": 0.99},
        "calibration": {"method": "val_best_dice", "val_cases": ["v1"],
                        "thresholds": {r: 1.0 for r in rows}},
        "predictors": preds,
        "per_case": {r: {c: _metrics(rng) for c in ("case_1", EVIL)} for r in rows},
        "curves": {r: {"fpr": x, "tpr": x, "recall": x[::-1], "precision": x} for r in rows},
        "detection": {
            "slice": {"score": "p99 in brain", "n_pos": 40, "n_neg": 80,
                      "rows": {r: {"auroc": 0.8, "ap": 0.6} for r in rows},
                      "note": "slices <b>with</b> any lesion pixel are positive"},
            "volume": {"score": "max", "n_pos": 2, "n_neg": 0, "n_excluded": 3, "rows": {}},
        },
    }


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A report with the curves, one overlay and a run directory; returns (path, results)."""
    tmp = tmp_path_factory.mktemp("report")
    results = _results()
    curves_figure(tmp / "curves.png", results["curves"])
    yy, xx = np.mgrid[:64, :64]
    brain = (yy - 32) ** 2 + (xx - 32) ** 2 < 26 ** 2
    lesion = (yy - 40) ** 2 + (xx - 25) ** 2 < 25
    image = brain + 0.5 * lesion
    overlay_figure(tmp / "overlay.png", image, lesion, brain, {"rec_error": image * 2},
                   thresholds={"rec_error": 2.5})
    run = tmp / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"beta": 1.0, "note": "<script>x</script>"}))
    (run / "split.json").write_text(json.dumps({"test": ["case_1", EVIL]}))
    shutil.copy(tmp / "overlay.png", run / "loss.png")
    images = {"ROC and precision-recall": tmp / "curves.png", f"overlay of {EVIL}": tmp /
              "overlay.png"}
    path = write_report(tmp / "out", results, images=images, run_dir=run, title="t <i>")
    return path, results


def test_report_is_self_contained_and_escaped(report):
    path, results = report
    text = path.read_text()
    parser = _Tags()
    parser.feed(text)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == 3  # curves, overlay, loss
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(a["src"].split(",", 1)[1])[:8] == PNG
    for _, a in parser.tags:
        for k in ("src", "href"):
            assert not re.match(r"\s*(https?:)?//", a.get(k) or ""), (k, a[k])
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*https?://""", text)
    tags = {t for t, _ in parser.tags}
    assert "b" not in tags and "i" not in tags  # case ID, note and title stayed text
    assert sum(t == "script" for t, _ in parser.tags) == 1  # ours; config's is escaped
    assert "&lt;b&gt;x&lt;/b&gt;&amp;y" in text
    assert "&lt;script&gt;x&lt;/script&gt;" in text  # config.json in <pre>
    assert "slices &lt;b&gt;with&lt;/b&gt; any lesion" in text  # detection note
    assert "3 without brain left out" in text


def test_report_results_table_matches_the_markdown_table(report):
    path, results = report
    text = path.read_text()
    md = results_table(results).strip().splitlines()
    first = re.search(r"<table>.*?</table>", text, re.S).group(0)
    html_rows = [re.findall(r"<t[hd]>(.*?)</t[hd]>", r) for r in re.findall(r"<tr[^>]*>.*?</tr>",
                                                                            first, re.S)]
    md_rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in md[:1] + md[2:]]
    assert html_rows == md_rows  # same columns, row order and intervals
    assert "[" in html_rows[1][1]  # with its interval
    assert "ensemble+intensity" in text and "AP</th>" in text  # detection table
    per_case_rows = len(re.findall(r"<tr><td>(?:case_1|&lt;b&gt;)", text))
    assert per_case_rows == 2 * len(results["per_case"])


def test_report_refuses_overwrite_and_leaves_out_missing_parts(report, tmp_path):
    path, results = report
    before = path.read_bytes()
    with pytest.raises(OutputError, match="report.html"):
        write_report(path.parent, results)
    assert path.read_bytes() == before
    bare = {k: v for k, v in results.items() if k not in ("detection", "per_case")}
    out = write_report(tmp_path, bare, run_dir=tmp_path / "no_such_run")
    text = out.read_text()
    assert "<img" not in text and "Detection" not in text and "Per case" not in text
    write_report(tmp_path, results, overwrite=True)
    assert "Per case" in out.read_text()
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(OutputError, match="fake.png"):
        write_report(tmp_path / "o2", results, images={"x": tmp_path / "fake.png"})
    assert not (tmp_path / "o2" / "report.html").exists()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if exe := shutil.which(name):
            return exe
    pytest.skip("no chromium on PATH (apt-get install chromium)")


def _browser(exe, tmp_path, *args):
    cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_report_in_a_real_browser(report, tmp_path):
    """Headless Chromium loads every embedded image and draws a page that is not blank."""
    exe = _chromium()
    path, _ = report
    n_img = path.read_text().count("<img ")
    assert n_img >= 2
    dom = _browser(exe, tmp_path, "--dump-dom", path.as_uri())
    assert f'data-images-loaded="{n_img}/{n_img}"' in dom.stdout, (dom.returncode,
                                                                   dom.stderr[-2000:])
    shot = tmp_path / "shot.png"
    run = _browser(exe, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600",
                   "--hide-scrollbars", path.as_uri())
    assert shot.exists(), (run.returncode, run.stderr[-2000:])
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
