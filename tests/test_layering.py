"""The module import graph of `src/modelpress`: no cycle, and no import from a lower layer into a higher one.

Every import counts: top-level and function-local ones, `import modelpress.x`, `from modelpress.x import y`,
relative imports and `importlib.import_module("modelpress.x")` with a literal name. A function-local import
is still a dependency: moving an import into a function hides a cycle from Python, not from this test.
Importing `a.b.c` also runs the `__init__` of the packages `a.b` and `a` that the importer is not already
inside, so the module cycle check follows those edges too.

Imports under `if TYPE_CHECKING:` obey the layers like any other (a type a module names in its API is a
dependency on the layer that defines it) and count in the cycle check between components, but not in the
cycle check between modules: they never run, so they close no import cycle (`core.report_html` names the
`Report` that renders it). The layers and the rule are described in docs/DESIGN.md ("Layers").
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "modelpress"
ROOT = "modelpress"

# Lowest first: (name, independent, components). A component is a top-level subpackage or module of
# modelpress ("" is the package's own `__init__`: the lazy public facade). A module may import its own
# component and any component of a lower layer. Components of an independent layer may not import each
# other either; those of the other layers may, but never in a cycle (not even between components).
LAYERS: tuple[tuple[str, bool, tuple[str, ...]], ...] = (
    # configs, registry, context, report, errors, outputs, runtimes (ORT / AOTI), the trust policy, the version
    ("base", False, ("core", "trust", "_version")),
    # pure tensor math
    ("primitives", False, ("primitives",)),
    # the passes: each usable without the others
    ("passes", True, ("quant", "prune", "distill")),
    # models, data and recipes the passes run on: the zoo, model specs, calibration files, recipes
    ("providers", False, ("zoo", "loading", "calibration", "recipes")),
    # what comes out of a compressed model, and how it is measured
    ("artifacts", True, ("export", "measure")),
    # composition: the pipeline, and auto mode built on it
    ("composition", False, ("pipeline", "artifacts", "auto")),
    # the command line and the public facade
    ("interface", False, ("cli", "cli_options", "signals", "demo", "")),
)

# (importer, imported module) -> why it is allowed. Keep this list short: each entry is a known debt.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    implied: bool = False  # the __init__ of a package the import runs first
    type_only: bool = False  # under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        via = " (its package __init__ runs first)" if self.implied else ""
        return f"{self.source}:{self.line} -> {self.target}{via}{' (TYPE_CHECKING)' if self.type_only else ''}"


def _known(name: str) -> str:
    """The module `name` is, or the module holding the attribute `name`."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _ours(name: str) -> bool:
    return name == ROOT or name.startswith(ROOT + ".")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside the body of an `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        if (
            isinstance(test, ast.Name | ast.Attribute)
            and getattr(test, "id", getattr(test, "attr", "")) == "TYPE_CHECKING"
        ):
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def _imports(module: str, tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(imported module, line, type-only) of every import in `tree`, wherever it stands."""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    type_only = _type_checking_nodes(tree)
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        typing_only = id(node) in type_only
        if isinstance(node, ast.Import):
            found += [(_known(a.name), node.lineno, typing_only) for a in node.names if _ours(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if _ours(base):
                for a in node.names:
                    full = f"{base}.{a.name}"
                    found.append((full if full in MODULES else _known(base), node.lineno, typing_only))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0].value
            if name == "import_module" and isinstance(arg, str) and _ours(arg):
                found.append((_known(arg), node.lineno, typing_only))
    return found


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph() -> list[Edge]:
    edges: set[Edge] = set()
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        inside = {module, *_ancestors(module)}
        for target, line, type_only in _imports(module, tree):
            if target == module:
                continue
            edges.add(Edge(module, target, line, type_only=type_only))
            # The root's __init__ runs before any submodule and imports nothing at import time.
            for package in _ancestors(target)[1:]:
                if package not in inside:
                    edges.add(Edge(module, package, line, implied=True, type_only=type_only))
    return sorted(edges, key=lambda e: (e.source, e.target, e.line))


EDGES = _graph()


def component(module: str) -> str:
    return "" if module == ROOT else module.split(".")[1]


LAYER_OF = {c: i for i, (_, _, comps) in enumerate(LAYERS) for c in comps}


def _layer_name(module: str) -> str:
    return LAYERS[LAYER_OF[component(module)]][0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles of `graph`: in each strongly connected component of several nodes (Tarjan), the shortest cycle
    through each member, each cycle once, at most 12 per component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth: the longest import chain, a few dozen at most
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(scc)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:
        seen: set[frozenset[str]] = set()
        for start in sorted(scc):
            cycle = _shortest_cycle(graph, scc, start)
            if frozenset(cycle) not in seen and len(seen) < 12:
                seen.add(frozenset(cycle))
                cycles.append(cycle)
    return cycles


def _shortest_cycle(graph: dict[str, set[str]], scc: set[str], start: str) -> list[str]:
    """Breadth-first from `start` back to it, inside its strongly connected component."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & scc):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle")  # cannot happen inside a component


def _chain(cycle: list[str], edges: dict[tuple[str, str], Edge]) -> str:
    """`a:12 -> b:40 -> a`: each step names the line of its importer that imports the next module."""
    pairs = zip(cycle, cycle[1:], strict=False)
    steps = [f"{a}:{edges[a, b].line}{'*' if edges[a, b].implied else ''}" for a, b in pairs]
    return " -> ".join([*steps, cycle[-1]])


def test_every_module_has_a_layer() -> None:
    listed = [c for _, _, comps in LAYERS for c in comps]
    assert len(listed) == len(set(listed)), f"a component is in two layers: {sorted(listed)}"
    missing = sorted({component(m) for m in MODULES} - set(listed))
    assert not missing, f"give these top-level modules/packages a layer in LAYERS (and docs/DESIGN.md): {missing}"
    assert len(MODULES) > 50 and len(EDGES) > 200, "the source tree or its imports were not found"


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    by_pair: dict[tuple[str, str], Edge] = {}
    for e in EDGES:
        if not e.type_only:  # never runs: closes no import cycle
            graph[e.source].add(e.target)
            by_pair.setdefault((e.source, e.target), e)
    found = _cycles(graph)
    report = "\n".join(f"  {_chain(c, by_pair)}" for c in found)
    assert not found, f"import cycles among modules (module:line of each import; * its package __init__):\n{report}"


def test_no_cycle_between_components() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    by_pair: dict[tuple[str, str], Edge] = {}
    for e in EDGES:
        a, b = component(e.source), component(e.target)
        if a != b and not e.implied:
            graph[a].add(b)
            by_pair.setdefault((a, b), e)
    found = _cycles(graph)
    report = "\n".join(
        f"  {' -> '.join(c or ROOT for c in cyc)}: "
        + ", ".join(str(by_pair[a, b]) for a, b in zip(cyc, cyc[1:], strict=False))
        for cyc in found
    )
    assert not found, f"import cycles between top-level packages/modules (one import of each step):\n{report}"


def _violations() -> list[tuple[Edge, str]]:
    out = []
    for e in EDGES:
        a, b = component(e.source), component(e.target)
        if a == b or e.implied:
            continue
        la, lb = LAYER_OF[a], LAYER_OF[b]
        if lb > la:
            why = f"upward: {_layer_name(e.source)} -> {_layer_name(e.target)}"
        elif lb == la and LAYERS[la][1]:
            why = f"sideways between independent {LAYERS[la][0]}: {a} -> {b}"
        else:
            continue
        out.append((e, why))
    return out


def test_no_import_from_a_lower_layer_into_a_higher_one() -> None:
    bad = [(e, why) for e, why in _violations() if (e.source, e.target) not in KNOWN_EXCEPTIONS]
    lines = "\n".join(f"  {e}   [{why}]" for e, why in bad)
    assert not bad, f"imports against the layers (lowest first: {' < '.join(n for n, _, _ in LAYERS)}):\n{lines}"


def test_known_exceptions_are_still_needed() -> None:
    used = {(e.source, e.target) for e, _ in _violations()}
    stale = sorted(set(KNOWN_EXCEPTIONS) - used)
    assert not stale, f"these imports follow the layers now (or are gone): remove them from KNOWN_EXCEPTIONS: {stale}"


def test_no_private_name_is_imported_from_another_module() -> None:
    """A name with a leading underscore belongs to its module: what others use is public (and documented)."""
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(ROOT):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                bad += [f"{name}:{node.lineno} imports {node.module}.{p}" for p in private]
    assert not bad, "private names imported across modules:\n  " + "\n  ".join(bad)


def test_composition_functions_take_a_handful_of_parameters() -> None:
    """The pipeline and auto mode take the run's settings as one `RunOptions`, not one parameter each."""
    wide = []
    composition = [
        n for n in MODULES if n in ("modelpress.pipeline", "modelpress.auto") or n.startswith("modelpress.auto.")
    ]
    for name in composition:
        for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                if count > 7:
                    wide.append(f"{name}.{node.name}: {count} parameters")
    assert not wide, "more than 7 parameters (group them, e.g. in RunOptions):\n  " + "\n  ".join(wide)
