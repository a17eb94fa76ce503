"""The package layout keeps its one-way architecture (docs/architecture.md): every import between g3n's files,
module-level or inside a function, read from the source with `ast`, forms no cycle, crosses layers only downwards,
and a function-local import is only ever of an optional third-party package."""

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("g3n_compile", "passes", "targets", "runtime")
# Layer -> the layers its files may import. runtime (the ABI, preprocessing, execution) is the bottom: the
# compiler writes the format the runtime defines, and apps import the runtime alone.
ALLOWED = {
    "runtime": {"runtime"},
    "targets": {"targets"},
    "passes": {"passes", "runtime"},
    "model": {"model", "runtime"},
    "checkpoint": {"checkpoint", "model", "runtime"},
    "export": {"export", "model", "runtime"},
    "compile": {"compile", "version", "checkpoint", "export", "model", "passes", "targets", "runtime"},
    "cli": {"cli", "compile", "checkpoint", "model", "passes", "targets", "runtime"},
    "bench": {"bench", "version", "compile", "checkpoint", "export", "model", "passes", "targets", "runtime"},
    "version": set(),
}
OPTIONAL = {"transformers", "matplotlib", "sentencepiece"}  # extras: imported where used, so g3n runs without them


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "g3n_compile":
        return parts[0]
    if len(parts) == 1:
        return "version"
    if parts[1] in ("model", "checkpoint", "export", "bench", "cli"):
        return parts[1]
    return "compile"  # compile.py, archive.py


def source_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(module: str, path: Path, known: set[str]):
    """(imported g3n module or third-party top-level name, whether the import is inside a function)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            target = next((m for m in (name, name.rpartition(".")[0]) if m in known), None)
            yield (target or name.split(".")[0]), id(node) in local


def graph() -> tuple[nx.DiGraph, list[str]]:
    modules = source_modules()
    g, local_imports = nx.DiGraph(), []
    g.add_nodes_from(modules)
    for module, path in modules.items():
        for target, in_function in imports(module, path, set(modules)):
            if target in modules:
                if target != module:
                    g.add_edge(module, target)
                if in_function:
                    local_imports.append(f"{module} imports {target} inside a function")
            elif in_function and target not in OPTIONAL:
                local_imports.append(f"{module} imports {target} inside a function")
    return g, local_imports


def test_no_import_cycles():
    g, _ = graph()
    assert g.number_of_edges() > 50  # the walk found the imports
    assert nx.is_directed_acyclic_graph(g), f"import cycle: {nx.find_cycle(g)}"


def test_layers_import_only_downwards():
    g, _ = graph()
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, b in g.edges if layer(b) not in ALLOWED[layer(a)]]
    assert not wrong, "\n".join(wrong)


def test_function_local_imports_are_only_optional_extras():
    _, local_imports = graph()
    assert not local_imports, "\n".join(local_imports)
