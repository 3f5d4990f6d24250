"""The import graph of jaxkit and pallas_kernels, read from the source with
ast (nothing is imported): every import of a package module resolves, there
are no cycles, library packages never import the application layer
(jaxkit.run), and jaxkit.config needs only the standard library and yaml."""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("jaxkit", "pallas_kernels")
# The application layer and the console entry point that starts it.
APPLICATION = ("jaxkit.run", "jaxkit.cli")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported name, line) of every import statement in the module,
    function-level ones included; relative imports made absolute. For
    `from X import Y` the name is X.Y when that is a module, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for target, line in _imports(name, path):
            if not _within(target, PACKAGES):
                continue
            assert target in MODULES, f"{path.relative_to(ROOT)}:{line} imports {target}, " \
                                      "which is no module of the repository"
            edges.add(target)
        graph[name] = edges
    return graph


GRAPH = _graph()


def test_the_walk_sees_every_package():
    assert {"jaxkit.config", "jaxkit.run.cli", "jaxkit.layers.moe.layer",
            "pallas_kernels.quant_matmul"} <= MODULES.keys()
    assert "jaxkit.sharding" in GRAPH["jaxkit.layers.moe.layer"]
    assert "jaxkit.layers.moe.dispatch" in GRAPH["jaxkit.layers.moe.layer"]  # from X import module


def test_no_import_cycles():
    """Depth-first search for a back edge; reports the cycle it closes."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_library_packages_never_import_the_application_layer():
    offenders = sorted(f"{name} imports {target}" for name, targets in GRAPH.items()
                       if not _within(name, APPLICATION)
                       for target in targets if _within(target, ("jaxkit.run",)))
    assert not offenders, offenders


def test_config_is_a_leaf():
    """jaxkit.config imports the standard library, yaml and its own modules
    only, so loading a config never starts jax."""
    package = [name for name in MODULES if _within(name, ("jaxkit.config",))]
    assert len(package) > 1  # the package and its modules
    imported = {target for name in package for target, _ in _imports(name, MODULES[name])}
    outside = {t.split(".")[0] for t in imported if not _within(t, ("jaxkit.config",))}
    assert outside - set(sys.stdlib_module_names) - {"__future__"} == {"yaml"}
