"""The one table type: a header and rows of cells, rendered as markdown, HTML or CSV, with one
number format (`cell`) for every table jaxvae writes (results, reports, benchmarks,
experiment pages)."""

import csv
import html
import io
import math
from dataclasses import dataclass

MISSING = "n/a"  # how a missing or undefined number (None, NaN) reads in every table


def cell(value, ci=None, spec=".3f") -> str:
    """A number as a table cell: `spec` digits, "n/a" when None or NaN, and with a 95 %
    interval `ci` = (low, high) as "0.712 [0.650, 0.770]" (left out when undefined).
    Strings and integers are shown as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    out = format(value, spec)
    if ci is not None and all(c is not None and not math.isnan(c) for c in ci):
        out += f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"
    return out


@dataclass(frozen=True)
class Table:
    """Rows of cells under a header; cells are strings (see `cell`) or anything `str` shows.

    Attributes:
      header: the column names.
      rows: one sequence of cells per row, as long as the header.
      marked: indices of rows set apart in HTML (e.g. the baseline), class "baseline".
    """

    header: tuple
    rows: tuple
    marked: frozenset = frozenset()

    def __post_init__(self):
        object.__setattr__(self, "header", tuple(self.header))
        object.__setattr__(self, "rows", tuple(tuple(r) for r in self.rows))
        object.__setattr__(self, "marked", frozenset(self.marked))
        bad = [i for i, r in enumerate(self.rows) if len(r) != len(self.header)]
        if bad:
            raise ValueError(f"table row {bad[0]} has {len(self.rows[bad[0]])} cells, the "
                             f"header {len(self.header)}")

    def markdown(self, align=None) -> str:
        """GitHub-flavoured markdown; `align`: one of "l" / "r" per column (default: all
        left)."""
        rule = "".join("|---:" if a == "r" else "|---" for a in (align or "l" * len(self.header)))
        lines = ["| " + " | ".join(map(str, self.header)) + " |", rule + "|"]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def html(self, *, sortable=False) -> str:
        """An HTML table, every cell escaped; the `marked` rows have class "baseline"."""
        e = lambda text: html.escape(str(text), quote=True)
        head = "".join(f"<th>{e(h)}</th>" for h in self.header)
        body = "".join(
            ('<tr class="baseline">' if i in self.marked else "<tr>")
            + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>\n"
            for i, r in enumerate(self.rows))
        cls = ' class="sortable"' if sortable else ""
        return f"<table{cls}><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>\n"

    def csv(self) -> str:
        """Comma-separated values, a header line first."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(self.header)
        w.writerows(self.rows)
        return out.getvalue()
