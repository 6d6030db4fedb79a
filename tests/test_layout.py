"""The dependency direction of the package, read from the source (lazy imports inside functions
count too): no import cycle, each layer imports only the layers below it, the edge runtime
imports neither edgessl nor torch, and no script reaches for a private name."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "edgessl"

# Upper layers first; a module may import modules of its own layer or below, never above. Every module has a layer.
LAYERS = [
    {"edgessl", "edgessl.__main__"},  # the package facade (lazy edgessl.pretrain & co.) and `python -m edgessl`
    {"edgessl.cli"},
    {"edgessl.api"},
    {"edgessl.train", "edgessl.benchmark", "edgessl.check"},
    {"edgessl.finetuning", "edgessl.exporter"},
    {"edgessl.report", "edgessl.embed", "edgessl.selection"},
    {"edgessl.probe", "edgessl.student", "edgessl.recipe"},
    {"edgessl.rebuild"},
    {"edgessl.methods", "edgessl.methods.memdistill", "edgessl.methods.simclr", "edgessl.methods.byol",
     "edgessl.methods.supervised"},
    {"edgessl.methods.heads", "edgessl.losses", "edgessl.losses.instance", "edgessl.losses.sqrtkl",
     "edgessl.losses.ntxent", "edgessl.losses.byol"},
    {"edgessl.features", "edgessl.loop"},
    {"edgessl.optim", "edgessl.capture", "edgessl.device", "edgessl.schedule", "edgessl.checkpoint", "edgessl.onnxrt", "edgessl.formats", "edgessl.knn",
     "edgessl.depthwise", "edgessl.augment", "edgessl.backbones", "edgessl.data", "edgessl.semi", "edgessl.labelpage"},
    {"edgessl.distributed", "edgessl.cache", "edgessl.config"},
    {"edgessl.runfiles", "edgessl.version", "edgessl.errors", "edgessl.isolate"},
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
    assert set(g) == set(level), f"modules without a layer: {sorted(set(g) - set(level))}; " \
        f"layers naming no module: {sorted(set(level) - set(g))}"
    upward = [f"{a} imports {b}" for a, deps in g.items() for b in deps if level[b] < level[a]]
    assert not upward, upward


def readme_layout(text: str) -> list[str]:
    """The module names of README.md's Layout section, in its order (a folder stands for its package)."""
    block = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in block.splitlines():
        path = line.strip().split(" ", 1)[0]
        if path.startswith("edgessl/"):
            names.append(module_name(REPO / path.rstrip("/") / "__init__.py") if path.endswith("/")
                         else module_name(REPO / path))
    return names


def layout_errors(listed: list[str], g: dict[str, set[str]]) -> list[str]:
    """What is wrong with a listing: modules it does not cover, modules importing one listed below them."""
    covered = {m for m in g if m in listed or any(m.startswith(p + ".") for p in listed if p != "edgessl")}
    errors = [f"not listed: {m}" for m in sorted(set(g) - covered - {"edgessl.__main__"})]  # (the facade's line)
    seen: set[str] = set()
    for name in listed:
        group = {m for m in g if m == name or name != "edgessl" and m.startswith(name + ".")}
        outside = {d for m in group for d in g[m]} - group - seen
        errors += [f"{name} imports {sorted(outside)}, listed below it"] if outside else []
        seen |= group
    return errors


def test_readme_layout_is_in_import_order_and_complete():
    """Each module the README lists imports only modules listed above it; a package's folder line
    covers its files; every module of edgessl/ is covered. A reversed or shortened list fails."""
    g = graph()
    listed = readme_layout((REPO / "README.md").read_text())
    assert layout_errors(listed, g) == []
    assert any("listed below it" in e for e in layout_errors(listed[::-1], g))
    assert layout_errors([m for m in listed if m != "edgessl.knn"], g)[0] == "not listed: edgessl.knn"


def test_the_checker_counts_lazy_imports(tmp_path):
    """The checks above can fail: a lazy import inside a function is an edge."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from edgessl.train import pretrain\n")
    assert imports(src, {"edgessl.train", "edgessl"}) == {"edgessl.train"}


def test_edge_runtime_imports_neither_edgessl_nor_torch():
    """Only ExecuTorch's backend may import torch: its Python runtime takes torch tensors."""
    for path in (REPO / "export" / "edgessl_edge").rglob("*.py"):
        tree = ast.parse(path.read_text())
        executorch = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ExecuTorchBackend"]
        allowed = {id(n) for c in executorch for n in ast.walk(c)}
        top = {n.split(".")[0] for n in imports(path, {"edgessl", "torchvision", "timm"})}
        names = set()
        for node in ast.walk(tree):
            if id(node) in allowed:
                continue
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        assert not (names | top) & {"edgessl", "torch", "torchvision", "timm"}, path


def test_scripts_use_the_public_api_only():
    """The benchmarks are users of the package: they import `edgessl`, its exported names and
    edgessl.api, nothing else of it (no module's internals, no private name), and scripts/
    stays within 1,100 lines."""
    import edgessl

    inside = []
    for path in (REPO / "scripts").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                inside += [f"{path.name}: import {a.name}" for a in node.names
                           if a.name.startswith("edgessl") and a.name != "edgessl"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgessl"):
                public = set(edgessl.__all__) if node.module == "edgessl" else None
                if node.module == "edgessl.api":
                    public = {a.name for a in node.names if not a.name.startswith("_")}
                inside += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                           if public is None or a.name not in public]
    assert not inside, inside
    lines = sum(len(p.read_text().splitlines()) for p in (REPO / "scripts").iterdir() if p.is_file())
    assert lines <= 1100, lines


def test_no_function_over_50_lines():
    """Short functions (one screen, as nanoGPT's loop): none in edgessl/ or export/ longer than 50 lines, docstring included."""
    long = []
    for path in [*PKG.rglob("*.py"), *(REPO / "export").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


def test_edgessl_depends_on_the_device_package_and_ships_none_of_it():
    """export/ is the device runtime's own package (edgessl-edge); edgessl depends on it and
    ships none of its files or commands, so installing both overwrites nothing."""
    import tomllib

    main = tomllib.loads((REPO / "pyproject.toml").read_text())
    edge = tomllib.loads((REPO / "export" / "pyproject.toml").read_text())
    packages = main["tool"]["setuptools"]["packages"]
    assert not [p for p in packages if p.split(".")[0] in edge["tool"]["setuptools"]["packages"]], packages
    assert "package-dir" not in main["tool"]["setuptools"]
    assert any(d.split(">")[0].split("=")[0].strip() == edge["project"]["name"] for d in main["project"]["dependencies"])
    assert not set(main["project"]["scripts"]) & set(edge["project"]["scripts"])


def test_every_test_the_docs_name_exists():
    """docs/ cite tests as the proof of a claim (guarantees.md above all): each one named exists."""
    import re

    missing = []
    for doc in (REPO / "docs").glob("*.md"):
        for file, name in re.findall(r"tests/(test_\w+\.py)::(\w+)", doc.read_text()):
            path = REPO / "tests" / file
            if not path.exists() or f"def {name}(" not in path.read_text():
                missing.append(f"{doc.name}: {file}::{name}")
    assert not missing, missing
