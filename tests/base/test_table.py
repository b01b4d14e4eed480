"""The one table type and number format (jaxvae.base.table)."""

import math

import pytest

from jaxvae.base.table import MISSING, Table, cell


def test_cell_formats_numbers_intervals_and_missing_values_one_way():
    assert cell(0.71234) == "0.712"
    assert cell(0.71234, (0.6, 0.8)) == "0.712 [0.600, 0.800]"
    assert cell(0.5, (math.nan, 0.8)) == "0.500"  # an undefined interval is left out
    assert cell(None) == cell(math.nan) == MISSING == "n/a"
    assert cell(12) == "12" and cell("x") == "x"
    assert cell(1234.5, spec=".0f") == "1234"


def test_one_table_renders_markdown_html_and_csv_alike():
    t = Table(["map", "AUPRC"], [["rec_error", "0.500"], ["a<b", "n/a"]], marked={1})
    assert t.markdown() == "| map | AUPRC |\n|---|---|\n| rec_error | 0.500 |\n| a<b | n/a |\n"
    assert "|---|---:|" in t.markdown(align="lr")
    h = t.html()
    assert "<td>a&lt;b</td>" in h and h.count('<tr class="baseline">') == 1
    assert t.csv() == "map,AUPRC\nrec_error,0.500\na<b,n/a\n"


def test_a_row_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        Table(["a", "b"], [["x"]])
