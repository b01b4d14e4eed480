"""Everything `jaxvae evaluate` writes, all or nothing.

results.json / results.md / per_case.csv (jaxvae.report.results), curves.png (ROC and
precision-recall of every row, from the histogram counts in results["curves"]), overlays/
(the test slices of `overlay_slices`: each map over the image on one
threshold-relative colour scale, truth and validation-threshold contours) and report.html
(jaxvae.report.html: all of it on one self-contained page). An error part-way removes the files
this call created; existing files are only replaced with `overwrite`.
"""

import re
from pathlib import Path

import numpy as np

from jaxvae.base.errors import ConfigError
from jaxvae.base.io import all_or_nothing, confined, refuse_existing
from jaxvae.report.figures import curves_figure, overlay_figure
from jaxvae.report.html import write_report
from jaxvae.report.results import row_order, write_results

OUTPUT_NAMES = ("results.json", "results.md", "per_case.csv", "curves.png", "report.html")
# rows drawn in the overlays: every map but the post-processed ones and the paper's plain
# ensemble (the same features as "ensemble", for the table)
HIDDEN_ROWS = ("ensemble_plain",)


def overlay_slices(slices, n: int = 3) -> list[tuple[int, str]]:
    """Slices worth drawing: the largest, median and smallest lesion among the test cases.

    The cases with a lesion are ranked by their total lesion volume (lesion pixels over all
    their slices); n distinct cases evenly spread over that ranking are taken (n = 3: the
    largest, the median, the smallest; fewer when fewer cases have a lesion), and of each
    the slice with the most lesion pixels (the first of ties). Pass the indices as `keep=`
    to `score_dataset` to get every row's maps of these slices.

    Args:
      slices: a SliceSet (test slices).
      n: how many slices (cases) at most.

    Returns:
      [(index into slices, label)], largest lesion first, a label reading e.g.
      "largest lesion (BraTS_x, 1234 px)" (px: the case's total lesion pixels).
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be an int >= 1, got {n!r}")
    per_slice = np.asarray(slices.lesion).reshape(len(slices), -1).sum(1)
    ids = np.asarray(slices.case_ids).astype(str)
    cases, inv = np.unique(ids, return_inverse=True)
    volume = np.bincount(inv, weights=per_slice, minlength=len(cases)).astype(np.int64)
    ranked = sorted((c for c in range(len(cases)) if volume[c]),
                    key=lambda c: (-volume[c], cases[c]))
    k = len(ranked)
    picks = np.unique(np.round(np.linspace(0, k - 1, min(n, k))).astype(int)) if k else []
    out = []
    for i, p in enumerate(picks):
        c = ranked[p]
        where = np.flatnonzero(inv == c)
        label = ("largest lesion" if i == 0 else "smallest lesion" if i == len(picks) - 1
                 else "median lesion" if len(picks) % 2 and i == len(picks) // 2
                 else f"lesion {p + 1} of {k} by size")
        out.append((int(where[np.argmax(per_slice[where])]),
                    f"{label} ({cases[c]}, {volume[c]} px)"))
    return out


def _shown_rows(kept) -> list[str]:
    return sorted((k for k in kept if not k.endswith("+pp") and k not in HIDDEN_ROWS),
                  key=row_order)


def overlay_paths(out_dir, test, shown) -> list[Path]:
    """overlays/<n>_<case>.png of each shown (slice index, label)."""
    ids = test.case_ids
    return [confined(Path(out_dir) / "overlays",
                     f"{n}_{re.sub(r'[^A-Za-z0-9_.-]', '_', str(ids[i]))}.png")
            for n, (i, _) in enumerate(shown, 1)]


def check_outputs(out_dir, test, shown, *, overwrite=False) -> None:
    """Refuse before any work when an output exists and overwrite is off."""
    paths = [Path(out_dir) / n for n in OUTPUT_NAMES] + overlay_paths(out_dir, test, shown)
    refuse_existing(paths, overwrite=overwrite)


def write_evaluation(out_dir, results, test, kept, shown, *, run_dir=None,
                     title="jaxvae evaluate", overwrite=False) -> str:
    """Write every evaluation output to out_dir; returns the markdown of results.md.

    Args:
      results: the results dict of `evaluate.score_dataset` (with "curves").
      test: the test SliceSet; kept: {row: (K, H, W)} maps of the K slices `shown`, in
        order (score_dataset's `keep=[i for i, _ in shown]`); shown: `overlay_slices(test)`.
      run_dir: the run directory (its config.json, split.json and loss.png go in the report).
    """
    out_dir = Path(out_dir)
    overlays = overlay_paths(out_dir, test, shown)
    paths = [out_dir / n for n in OUTPUT_NAMES] + overlays
    thresholds = results.get("calibration", {}).get("thresholds", {})
    rows = _shown_rows(kept)
    with all_or_nothing(paths):
        md = write_results(results, out_dir, overwrite=overwrite, title=title)
        images = {}
        curves = {k: v for k, v in results.get("curves", {}).items()  # empty: no lesion
                  if v.get("fpr") and not k.endswith("+pp") and k not in HIDDEN_ROWS}
        if curves:
            curves_figure(out_dir / "curves.png", curves, overwrite=overwrite,
                          title=f"{results['n_cases']} test cases, pooled pixels")
            images["ROC and precision-recall curves (pooled test pixels)"] = \
                out_dir / "curves.png"
        for k, ((i, label), path) in enumerate(zip(shown, overlays, strict=True)):
            overlay_figure(path, test.images[i], test.lesion[i], test.brain[i],
                           {r: kept[r][k] for r in rows},
                           thresholds={r: t for r, t in thresholds.items() if r in rows},
                           title=label, overwrite=overwrite)
            images[f"overlay: {label}"] = path
        write_report(out_dir, results, images=images, run_dir=run_dir, title=title,
                     overwrite=overwrite)
    return md
