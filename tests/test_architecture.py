"""The layers of docs/architecture.md, read from the source: every import in src/vistra
(those inside functions too) points to the importer's own layer or one below, and no
modules, nor packages, import each other in a circle."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "vistra"

# Top to bottom, as in docs/architecture.md: a module may import its own layer and those
# below. `vistra` is the package's public face; the names it defines itself (__version__)
# may be imported from anywhere.
LAYERS = [
    ("command line", {"cli", "__main__", "vistra"}),
    ("applications", {"serve", "explain", "train", "evaluate", "predict", "analysis"}),
    ("runtime", {"runtime", "factory"}),
    ("onnx", {"onnx"}),
    ("data", {"data", "weights"}),
    ("acceleration", {"accel"}),
    ("models", {"models"}),
    ("utilities", {"fileio", "output"}),
]
RANK = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def own_names(tree: ast.Module) -> set[str]:
    """Names a module assigns at its top level (not those it imports)."""
    return {target.id for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def imports() -> list[tuple[str, int, str]]:
    """(importer, line, imported module) for every import of a vistra module."""
    modules = module_files()
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    defined_by_root = own_names(trees["vistra"])

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = []
    for name, tree in trees.items():
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [a.name for a in node.names]
                if base == "vistra" and set(names) <= defined_by_root:
                    continue  # `from vistra import __version__`: metadata, not a layer
                targets = [f"{base}.{n}" if f"{base}.{n}" in modules else base for n in names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "vistra" and (resolved := resolve(target)):
                    if resolved != name:
                        found.append((name, node.lineno, resolved))
    return found


def part_of(module: str) -> str:
    """The top-level package or module a module belongs to ("vistra" for the package)."""
    return module.split(".")[1] if "." in module else module


def circles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_every_part_of_the_package_has_a_layer():
    parts = {part_of(m) for m in module_files()}
    assert parts - RANK.keys() == set(), (
        "give these a layer in docs/architecture.md and in LAYERS here")
    assert RANK.keys() - parts == set(), "LAYERS names parts the package no longer has"


def test_imports_point_down_the_layers():
    upward = [f"{importer} (line {line}) imports {target}: {LAYERS[RANK[part_of(importer)]][0]}"
              f" may not import {LAYERS[RANK[part_of(target)]][0]}"
              for importer, line, target in imports()
              if RANK[part_of(target)] < RANK[part_of(importer)]]
    assert upward == [], ("imports up the layers (move the shared code down a layer; see "
                          "docs/architecture.md):\n" + "\n".join(upward))


def test_no_modules_or_packages_import_each_other_in_a_circle():
    found = imports()
    # A submodule importing its own package is not a circle: the package is loaded first.
    modules = {(a, b) for a, _, b in found if not a.startswith(b + ".")}
    parts = {(part_of(a), part_of(b)) for a, _, b in found if part_of(a) != part_of(b)}
    assert circles(modules) == [], "modules that import each other"
    assert circles(parts) == [], "packages that import each other"


def test_the_layers_are_the_ones_documented():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Layers", 1)[1].split("\n\n", 2)[1]
    documented = [(cells[0], set(re.findall(r"`([\w.]+)`", cells[1])))
                  for row in table.splitlines()[2:]
                  for cells in [[c.strip() for c in row.strip("|").split("|")]]]
    assert documented == LAYERS
