"""The package's imports point one way: every import, function-level ones included, goes to a
lower layer or within the same subpackage, so there is no cycle and no upward import."""

import ast
from pathlib import Path

import pytest

import jaxvae

ROOT = Path(jaxvae.__file__).parent

# lowest first; a module may import its own subpackage and any lower layer
LAYERS = [
    {"base"},
    {"core", "data", "metrics"},
    {"runtime"},
    {"training"},
    {"inference"},
    {"report"},
    {"bench"},
    {"cli"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
# function-level imports allowed: optional or heavy dependencies, each imported on use
LAZY_OK = {"torch", "matplotlib", "jaxvae.bench.torch_reference"}


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] in RANK)


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path, here=None):
    """(line, imported module, at module level?) of every import in a file; `here`: the
    module's dotted name as parts (default: from its place in the package)."""
    here = here or path.relative_to(ROOT.parent).with_suffix("").parts
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(here[:len(here) - node.level])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            # `from pkg import module` imports pkg.module
            names = [f"{mod}.{a.name}" if _is_module(f"{mod}.{a.name}") else mod
                     for a in node.names]
        else:
            continue
        for name in names:
            yield node.lineno, name, id(node) in top


def _layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "jaxvae" else None


def _violations(path: Path, own: str, here=None) -> list[str]:
    """What is wrong with the imports of a module of subpackage `own`."""
    bad = []
    for line, name, at_top in _imports(path, here):
        if not at_top and not any(name == ok or name.startswith(ok + ".") for ok in LAZY_OK):
            bad.append(f"{path.name}:{line}: function-level import of {name}")
        if name == "jaxvae":
            bad.append(f"{path.name}:{line}: imports the package's public API ({name})")
        layer = _layer(name)
        if layer is None or layer == own:
            continue
        if layer not in RANK:
            bad.append(f"{path.name}:{line}: {name} belongs to no layer")
        elif RANK[layer] >= RANK[own]:
            bad.append(f"{path.name}:{line}: {own} imports {name} (layer {layer} is not "
                       f"below {own})")
    return bad


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    bad = _violations(path, path.relative_to(ROOT).parts[0])
    assert not bad, "\n".join(bad)


def test_the_checker_finds_upward_lazy_and_public_api_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom jaxvae.cli import app\nfrom jaxvae import ConvVAE\n\n\n"
                   "def f():\n    from jaxvae.inference import compute\n"
                   "    import torch\n    return compute, torch\n")
    found = _violations(bad, "core", here=("jaxvae", "core", "bad"))
    assert any("core imports jaxvae.cli.app" in v for v in found), found
    assert any("public API" in v for v in found), found
    assert any("function-level import of jaxvae.inference.compute" in v for v in found), found
    assert not any("torch" in v or "numpy" in v for v in found), found  # allowed
    assert len(found) == 4, found  # compute is also an upward import


def test_every_module_is_in_a_layer():
    loose = [p.name for p in ROOT.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside every subpackage: {loose}"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_cycle_within_a_subpackage():
    graph = {}
    for path in _modules():
        mod = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        graph[mod] = {name for _, name, _ in _imports(path)
                      if _layer(name) == _layer(mod) and name != mod}
    state = {}

    def visit(m, stack):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*stack, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if n in graph:
                visit(n, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxvae"):
                found += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                          for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
