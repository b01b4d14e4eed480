"""The linter's bandit rules (pyproject.toml) refuse loaders that execute code from data."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("source,rule", [("import pickle\npickle.loads(b'')\n", "S301"),
                                         ("import marshal\nmarshal.loads(b'')\n", "S302"),
                                         ("eval('1')\n", "S307"), ("exec('x = 1')\n", "S102"),
                                         ("import yaml\nyaml.load('a', Loader=yaml.Loader)\n",
                                          "S506")])
def test_the_project_lint_config_refuses_code_execution_from_data(tmp_path, source, rule):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    proc = subprocess.run([ruff, "check", "--no-cache", "--config", str(REPO / "pyproject.toml"),
                           str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and rule in proc.stdout, proc.stdout + proc.stderr
