"""report.html: one self-contained page of an evaluation, for a person to read in a browser.

Every image is embedded as a data: URI and the styles and the few lines of script are inline,
so the file can be mailed, archived or opened offline; a Content-Security-Policy forbids any
network load. Tables come from the results dict (jaxvae.inference.evaluate), images from PNG
files the
caller wrote (jaxvae.report.figures: curves, overlays) and, optionally, the run directory.
"""

import base64
import html
import json
from pathlib import Path

from jaxvae.base.errors import OutputError
from jaxvae.base.io import refuse_existing, write_text
from jaxvae.base.table import Table, cell
from jaxvae.report.results import (
    PER_CASE_COLUMNS,
    describe,
    difference_tables,
    results_rows,
    row_order,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; background: #fff; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td.name { text-align: left; }
th { background: #eef; }
table.sortable th { cursor: pointer; }
tr.baseline td { font-style: italic; background: #f6f6f6; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
p.note { font-size: 0.9em; color: #555; }
"""

# on load: how many images decoded ("loaded/total"), read by tests in a real browser; a click
# on a sortable table's header sorts its rows by that column (numbers numerically)
SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = ok + "/" + imgs.length;
});
document.addEventListener("click", function (e) {
  var th = e.target.closest("table.sortable th");
  if (!th) return;
  var col = th.cellIndex, body = th.closest("table").tBodies[0];
  var asc = th.dataset.dir !== "asc";
  th.dataset.dir = asc ? "asc" : "desc";
  var key = function (r) {
    var t = r.cells[col].textContent, v = parseFloat(t);
    return isNaN(v) ? t : v;
  };
  Array.prototype.slice.call(body.rows).sort(function (a, b) {
    var x = key(a), y = key(b);
    var c = typeof x !== typeof y ? (typeof x === "number" ? -1 : 1)
          : (x < y ? -1 : x > y ? 1 : 0);
    return asc ? c : -c;
  }).forEach(function (r) { body.appendChild(r); });
});
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def results_html(results) -> str:
    """The results table of `results.results_rows` (same columns, rows, intervals) as HTML."""
    return results_rows(results).html()


def difference_html(results) -> str:
    """`results.difference_tables` (paired differences to the best null and to the
    baseline) as HTML, or ""."""
    return "\n".join(f"<p>{_e(intro)}</p>\n" + table.html()
                     for intro, table in difference_tables(results))


def detection_html(detection) -> str:
    """Slice- and volume-level detection (is there a lesion here?): one table per level."""
    out = []
    for level in ("slice", "volume"):
        d = detection.get(level)
        if not d:
            continue
        out.append(f"<h3>{_e(level)} level</h3>\n<p>score: {_e(d.get('score', '?'))}; "
                   f"{_e(d.get('n_pos', '?'))} with a lesion, {_e(d.get('n_neg', '?'))} "
                   "without" + (f", {_e(d['n_excluded'])} without brain left out"
                                if d.get("n_excluded") else "") + "</p>\n")
        rows = sorted(d.get("rows", {}).items(), key=lambda kv: row_order(kv[0]))
        if rows:
            out.append(Table(
                ["predictor", "AUROC", "AP"],
                [[f"{name} (baseline)" if name == "intensity" else name, cell(m.get("auroc")),
                  cell(m.get("ap"))] for name, m in rows],
                marked={i for i, (name, _) in enumerate(rows) if name == "intensity"}).html())
        if d.get("note"):
            out.append(f'<p class="note">{_e(d["note"])}</p>\n')
    return "".join(out)


def per_case_html(per_case) -> str:
    """One row per case and predictor, the metrics as columns; click a header to sort."""
    keys = {k for cases in per_case.values() for m in cases.values() for k, v in m.items()
            if v is None or isinstance(v, (int, float))}
    cols = [k for k in PER_CASE_COLUMNS if k in keys] + sorted(keys - set(PER_CASE_COLUMNS))
    rows = [[case, name, *(cell(m.get(k)) for k in cols)]
            for name in sorted(per_case, key=row_order) for case, m in per_case[name].items()]
    return Table(["case", "predictor", *cols], rows).html(sortable=True)


def _png_uri(path) -> str:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OutputError(f"{path}: cannot read this image for the report ({e.strerror})") from e
    if not data.startswith(PNG_SIGNATURE):
        raise OutputError(f"{path}: not a PNG file; the report embeds PNG images only")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(path, caption) -> str:
    return (f'<figure><img src="{_png_uri(path)}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>\n")


def _json_pre(path) -> str:
    text = Path(path).read_text(errors="replace")
    try:
        text = json.dumps(json.loads(text), indent=1)
    except ValueError:
        pass  # shown as it is
    return f"<pre>{_e(text)}</pre>\n"


def run_html(run_dir) -> str:
    """config.json, split.json and loss.png of a run directory, those that exist."""
    run_dir = Path(run_dir)
    out = []
    for name, what in (("config.json", "configuration"), ("split.json", "data split")):
        if (run_dir / name).is_file():
            out.append(f"<details><summary>{_e(what)} ({_e(name)})</summary>\n"
                       f"{_json_pre(run_dir / name)}</details>\n")
    if (run_dir / "loss.png").is_file():
        out.append(_figure(run_dir / "loss.png", "training and validation loss"))
    if not out:
        return ""
    return f"<h2>Run</h2>\n<p>{_e(run_dir)}</p>\n" + "".join(out)


def render_report(results, *, images=None, run_dir=None, title="jaxvae evaluation") -> str:
    """The report page as one HTML string (see `write_report`)."""
    parts = [f"<h1>{_e(title)}</h1>\n<p>{_e(describe(results))}</p>\n",
             "<h2>Pixel-level results</h2>\n", results_html(results),
             difference_html(results)]
    if results.get("detection"):
        parts += ["<h2>Detection</h2>\n", detection_html(results["detection"])]
    if images:
        parts += ["<h2>Figures</h2>\n", *(_figure(p, c) for c, p in images.items())]
    if results.get("per_case"):
        parts += ["<h2>Per case</h2>\n<p class=\"note\">Click a column header to sort.</p>\n",
                  per_case_html(results["per_case"])]
    if run_dir is not None and Path(run_dir).is_dir():
        parts.append(run_html(run_dir))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f"<title>{_e(title)}</title>\n<style>{STYLE}</style>\n"
            f"<script>{SCRIPT}</script>\n</head>\n<body>\n{''.join(parts)}</body>\n</html>\n")


def write_report(out_dir, results, *, images=None, run_dir=None, title="jaxvae evaluation",
                 overwrite=False) -> Path:
    """Write out_dir/report.html: the evaluation as one self-contained page.

    Contents: title and description (test cases, slices, calibration), the results table with
    95 % intervals, the detection tables (if results["detection"]), the images in the order
    given, the per-case table (sortable), and the run's config.json, split.json and loss.png
    (if run_dir is given and holds them). All text is HTML-escaped; images are embedded.

    Args:
      out_dir: output folder.
      results: the results dict (results.json).
      images: {caption: PNG path}, e.g. the curves and overlay figures, shown in this order.
      run_dir: the training run directory, or None.
      overwrite: replace an existing report.html.

    Returns:
      The path of report.html.

    Raises:
      OutputError: report.html exists and overwrite is False, or an image is not a PNG.
    """
    path = Path(out_dir) / "report.html"
    refuse_existing([path], overwrite=overwrite)  # before reading and encoding the images
    write_text(path, render_report(results, images=images, run_dir=run_dir, title=title),
               overwrite=overwrite)
    return path
