"""Compact markdown of experiment results: one row per predictor, one column per setting.

    python experiments/summary.py results/table1/table1.json results/table2/table2.json

Each cell: AUROC (the paper's AUROC) / AUPRC [95 % case-bootstrap interval] / Dice at the
validation threshold, pooled over the folds' test cases; with several seeds the means, and
AUPRC's mean ± sd over seeds.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxvae.base.table import MISSING, Table, cell  # noqa: E402
from jaxvae.report.results import ROW_ORDER  # noqa: E402


def _f(x):
    return cell(x)


def _auprc(res, p):
    """AUPRC: the value [95 % case-bootstrap interval] of one seed, or mean ± sd of several."""
    s = res["summary"][p]["auprc"]
    if s["n"] > 1:
        return f"{_f(s['mean'])} ± {_f(s['sd'])}"
    r = next(iter(res["seeds"].values()))["predictors"][p]
    lo, hi = r.get("ci", {}).get("auprc", (None, None))
    return f"{_f(r['auprc'])} [{_f(lo)}, {_f(hi)}]"


def compact(payload) -> str:
    res, paper = payload["results"], payload.get("paper") or {}
    cols = list(res)
    lines = []
    for p in ROW_ORDER:
        cells = []
        for s in cols:
            m = res[s]["summary"].get(p)
            cells.append(MISSING if m is None else f"**{_f(m['auroc']['mean'])}** "
                         f"({_f((paper.get(s) or {}).get(p))}) / {_auprc(res[s], p)} / "
                         f"{_f(m['dice_val']['mean'])}")
        if set(cells) != {MISSING}:
            name = "intensity (baseline)" if p == "intensity" else p
            lines.append([name, *cells])
    return Table(["predictor", *(f"{s}: AUROC (paper) / AUPRC / Dice (val. thr.)"
                                          for s in cols)], lines).markdown()


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(compact(json.loads(Path(path).read_text())))
