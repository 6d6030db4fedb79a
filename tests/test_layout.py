"""The dependency direction of the package, read from the source (lazy imports inside functions
count too): no import cycle, each layer imports only the layers below it, the edge runtime
imports neither edgessl nor torch, and no script reaches for a private name."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "edgessl"

# Upper layers first; a module may import modules of its own layer or below, never above.
LAYERS = [
    {"edgessl", "edgessl.__main__"},  # the package facade (lazy edgessl.pretrain & co.) and `python -m edgessl`
    {"edgessl.cli"},
    {"edgessl.api"},
    {"edgessl.train", "edgessl.finetuning", "edgessl.export", "edgessl.probe", "edgessl.report", "edgessl.embed"},
    {"edgessl.runs"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports(path: Path, known: set[str]) -> set[str]:
    """edgessl modules that `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from edgessl import data`: the submodule; else the module itself
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_layers_import_only_downward():
    g = graph()
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    bottom = len(LAYERS)  # everything not listed: data, augment, backbones, methods, losses, ...
    upward = [f"{a} imports {b}" for a, deps in g.items() for b in deps
              if level.get(b, bottom) < level.get(a, bottom)]
    assert not upward, upward


def test_the_checker_counts_lazy_imports(tmp_path):
    """The checks above can fail: a lazy import inside a function is an edge."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from edgessl.train import pretrain\n")
    assert imports(src, {"edgessl.train", "edgessl"}) == {"edgessl.train"}


def test_edge_runtime_imports_neither_edgessl_nor_torch():
    for path in (REPO / "export" / "edgessl_edge").rglob("*.py"):
        top = {n.split(".")[0] for n in imports(path, {"edgessl", "torch", "torchvision", "timm"})}
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert not (names | top) & {"edgessl", "torch", "torchvision", "timm"}, path


def test_scripts_import_no_private_name():
    private = []
    for path in (REPO / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgessl"):
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private
