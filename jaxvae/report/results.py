"""Results of an evaluation as files a person reads: results.json, results.md, per_case.csv.

The results dict comes from jaxvae.inference.evaluate (`score_dataset`, `score_maps`,
`score_folds`);
here it is ordered (`row_order`), rendered as a markdown table with its intervals, one CSV
row per case and predictor, and written all or none.
"""

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from jaxvae.base.io import all_or_nothing, write_text
from jaxvae.base.table import MISSING, Table, cell

# table order: the paper's predictors, the one-signed maps, the baseline and the ensembles
ROW_ORDER = ("rec_error", "elbo_grad", "elbo_grad_sum", "kl_grad", "rec_grad", "combi",
             "proj_rec_error", "rec_pos", "rec_grad_pos", "rec_neg", "rec_grad_neg",
             *[f"{m}_tuned" for m in ("rec_error", "rec_pos", "rec_neg", "rec_grad",
                                      "rec_grad_pos", "rec_grad_neg", "kl_grad", "elbo_grad",
                                      "elbo_grad_sum")],
             "intensity",
             # with several sequences as channels: each one's intensity (calibration.py)
             "intensity_flair", "intensity_t2", "intensity_t1", "intensity_t1ce",
             "intensity_unclipped",
             "intensity_histeq", "rec_error_smooth", "null_intensity", "null_lr",
             "ensemble_plain", "ensemble", "ensemble+intensity", "ensemble_signed+intensity",
             "ensemble+null", "ensemble_dark+null",
             "best_null", "best_map")
METRIC_COLUMNS = (("auroc", "AUROC"), ("auroc_brain", "AUROC brain"), ("auprc", "AUPRC"),
                  ("dice_val", "Dice (val. threshold)"), ("dice_best", "best Dice (oracle)"))


def row_order(name):
    """Sort key of a result row: ROW_ORDER, each map before its post-processed '+pp' row."""
    base = name.removesuffix("+pp")
    return (ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER),
            name.endswith("+pp"), name)


def results_rows(results, paper=None) -> Table:
    """The table of a results dict, 95 % case-bootstrap intervals in brackets (the baseline
    row marked).

    Args:
      results: from `score_dataset` / `score_maps`.
      paper: optional {predictor: the paper's AUROC}.
    """
    cols = list(METRIC_COLUMNS)
    if not results.get("n_lesion_pixels"):  # healthy data: what can be measured there
        cols = [("frac_above", "brain pixels >= val threshold")]
    header = ["predictor", *(label for _, label in cols), *(["paper AUROC"] if paper else [])]
    lines = []
    for name, r in sorted(results["predictors"].items(), key=lambda kv: row_order(kv[0])):
        label = f"{name} (baseline)" if name == "intensity" else name
        ci = r.get("ci", {})
        vals = [cell(r.get(k), ci.get(k) if k != "dice_best" else None) for k, _ in cols]
        lines.append([label, *vals, *([cell(paper.get(name))] if paper else [])])
    return Table(header, lines, marked={i for i, r in enumerate(lines)
                                        if r[0].endswith("(baseline)")})


def results_table(results, paper=None) -> str:
    """`results_rows` as markdown."""
    return results_rows(results, paper).markdown()


def detection_table(results) -> str:
    """Markdown of the sample-wise detection metrics (`results["detection"]`, if any).

    A line per level saying how a sample is scored, its positives / negatives (or why
    it is undefined), then one row per map: slice AUROC / AP, volume AUROC / AP.
    """
    det = results.get("detection")
    if not det:
        return ""
    levels = (("slice", "slice"), ("volume", "volume (case)"))
    lines = []
    for key, name in levels:
        d = det[key]
        excl = f", {d['n_excluded']} without brain left out" if d.get("n_excluded") else ""
        lines.append(f"- {name}: score = {d['score']}; {d['n_pos']} with lesion, "
                     f"{d['n_neg']} without{excl}" + (f" ({d['note']})" if "note" in d else ""))
    names = sorted({n for key, _ in levels for n in det[key]["rows"]}, key=row_order)
    rows = [[f"{n} (baseline)" if n == "intensity" else n,
             *(cell(det[key]["rows"].get(n, {}).get(m)) for key, _ in levels
               for m in ("auroc", "ap"))] for n in names]
    table = Table(["predictor", "slice AUROC", "slice AP", "volume AUROC", "volume AP"],
                  rows).markdown() if rows else ""
    return ("Detection (is there a lesion in the slice / the case?), AUROC and average "
            "precision:\n\n" + "\n".join(lines) + "\n\n" + table)


DIFF_COLUMNS = (("auprc", "AUPRC"), ("dice_val", "Dice (val. threshold)"),
                ("auroc_brain", "AUROC brain"))


def difference_tables(results) -> list[tuple[str, Table]]:
    """(intro, table) of each map minus the best fair null ("vs_null") and minus the raw intensity
    baseline ("vs_baseline" of `MapsAccumulator.result`), paired over the same bootstrap
    resamples of the cases: the difference, its 95 % interval and the fraction of resamples
    where the map is above; none when there is none, or no lesion to score (healthy data)."""
    if not results.get("n_lesion_pixels"):
        return []
    tables = []
    for key in ("vs_null", "vs_baseline"):
        rows, base = [], None
        for name, r in sorted(results["predictors"].items(), key=lambda kv: row_order(kv[0])):
            vs = r.get(key)
            if not vs:
                continue
            base = vs["baseline"]
            ref = results["predictors"][base]
            cells = []
            for k, _ in DIFF_COLUMNS:
                if k not in vs or r.get(k) is None or ref.get(k) is None:
                    cells.append(MISSING)
                    continue
                lo, hi = vs[k]["ci"]
                cells.append(f"{r[k] - ref[k]:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"({100 * vs[k]['frac_above']:.0f} %)"
                             if not (math.isnan(lo) or math.isnan(hi)) else
                             f"{r[k] - ref[k]:+.3f}")
            rows.append([name, *cells])
        if not rows:
            continue
        what = ("the best fair null (best_null: the null of best AUPRC on the calibration "
                "cases)" if key == "vs_null" else f"the raw {base} baseline")
        tables.append((f"Difference to {what}, paired bootstrap over the test cases (the "
                       "same resamples for both maps): difference [95 % interval] (share of "
                       "resamples where the map is above):",
                       Table(["predictor", *(label for _, label in DIFF_COLUMNS)], rows)))
    return tables


def difference_table(results) -> str:
    """`difference_tables` as markdown ("" when there is none)."""
    return "\n\n".join(f"{intro}\n\n{table.markdown()}"
                        for intro, table in difference_tables(results))


PER_CASE_COLUMNS = ("auroc", "auroc_brain", "auprc", "dice_val", "dice_best", "lesion_pixels",
                    "frac_above")


def per_case_csv(results) -> str:
    """One row per case and predictor: the per-case metrics of `results["per_case"]`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "predictor", *PER_CASE_COLUMNS])
    for name in sorted(results.get("per_case", {}), key=row_order):
        for case, m in results["per_case"][name].items():
            w.writerow([case, name, *("" if m.get(k) is None else m[k]
                                      for k in PER_CASE_COLUMNS)])
    return buf.getvalue()


def describe(results) -> str:
    """The lines above the table: test set, calibration, intervals."""
    cal, settings = results.get("calibration", {}), results.get("settings", {})
    n_val = sum(len(c.get("val_cases", [])) for c in cal.get("folds", [cal]))
    how = {"val_best_dice": "the best-Dice threshold and the ensemble fitted on the "
                            f"{n_val} validation case(s)" + (" of each fold" if "folds" in cal
                                                             else ""),
           "val_quantile": f"the {settings.get('val_quantile')} quantile of the healthy "
                           "validation cases' brain pixels (no ensemble: no validation lesion)",
           }.get(cal.get("method"), "no validation cases (no threshold, no ensemble)")
    plan = results.get("calibration_plan")
    if plan and cal.get("method") == "val_best_dice":
        folds = plan["folds"]
        how = (f"the best-Dice threshold, the ensembles and the nulls fitted on "
               f"{len(folds[0]['calibration'])} calibration case(s) of the "
               f"{plan['source']}" + (f" in each of {len(folds)} folds (every case tested "
                                      "once, never in its own fold's calibration)"
                                      if len(folds) > 1 else ""))
    chosen = [c for c in cal.get("folds", [cal]) if c.get("best_map")]
    if chosen:
        how += ("; chosen on the calibration cases: " + ", ".join(
            f"best_map = {c['best_map']}, best_null = {c['best_null']} (intensity "
            f"{'bright' if c['null_intensity']['polarity'] > 0 else 'dark'}, sigma "
            f"{c['null_intensity']['sigma']:g})" for c in chosen))
        if any(c.get("tuned_sigmas") for c in chosen):
            how += ("; the <map>_tuned rows' sigmas chosen on them too (results.json: "
                    "calibration tuned_sigmas)")
    n_boot = settings.get("n_boot", 0)
    return (f"{results['n_cases']} test cases, {results['n_slices']} slices, pixel metrics "
            "pooled over all test slices, every map restricted to the brain (the lowest "
            f"score outside it); Dice at {how}; best Dice is the oracle (threshold chosen on "
            "the test labels). " + (f"95 % intervals: {n_boot} bootstrap resamples "
                                               "of the test cases." if n_boot else ""))


def write_results(results, out_dir, *, overwrite=False, paper=None, title="jaxvae results"):
    """Write results.json, results.md and per_case.csv (atomically, all or none) to out_dir."""
    out_dir = Path(out_dir)
    md = f"# {title}\n\n{describe(results)}\n\n" + results_table(results, paper)
    if difference_table(results):
        md += "\n" + difference_table(results)
    if results.get("detection"):
        md += "\n" + detection_table(results)
    files = {"results.json": json.dumps(results, indent=1, default=_json_default),
             "results.md": md, "per_case.csv": per_case_csv(results)}
    with all_or_nothing([out_dir / f for f in files]):
        for name, text in files.items():
            write_text(out_dir / name, text, overwrite=overwrite)
    return md


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o)}")
