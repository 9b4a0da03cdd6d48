"""The shape of the package (issue 17): no import cycle, module- and function-level imports
included; no module-level mutable state outside the run model; only the seam touches
certbot's and acme's internals; no test compares elapsed time to a number."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, Optional

import certbot_batch

ROOT = Path(__file__).resolve().parents[1]
#: the package as it is imported (the source tree, or a distribution's build directory)
PACKAGE = Path(certbot_batch.__file__).resolve().parent
#: the run model: the one module that may hold process-wide state
RUN_MODEL = "certbot_batch.run"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST) -> Iterator[ast.AST]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``
    (never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def _targets(node: ast.AST, module: str, known: dict[str, Path]) -> set[str]:
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in known:
                found.add(alias.name)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if not known[module].name == "__init__.py":
                package = package[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            if full in known:
                found.add(full)
            elif base in known:
                found.add(base)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for node in _imports(tree):
            edges |= _targets(node, name, known)
        edges.discard(name)
        graph[name] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    graph = _graph()
    assert len(graph) > 30
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_run_model_is_the_bottom_and_the_seam_imports_nothing_above_it() -> None:
    graph = _graph()
    assert graph[RUN_MODEL] == set()
    allowed = {"certbot_batch", "certbot_batch.catalog", "certbot_batch.paths", RUN_MODEL}
    assert graph["certbot_batch._certbot"] <= allowed, graph["certbot_batch._certbot"]


def test_only_the_seam_touches_certbot_internals() -> None:
    """``certbot._internal`` and private attributes of certbot's and acme's objects are
    reached through ``_certbot.py`` (its BOUNDARY table) only."""
    offenders = []
    for name, path in _modules().items():
        if name == "certbot_batch._certbot":
            continue
        text = path.read_text()
        for match in re.finditer(r"certbot\._internal|certbot_apache\._internal", text):
            line = text[:match.start()].count("\n") + 1
            offenders.append(f"{path.name}:{line}")
    assert offenders == []
_STATE_FACTORIES = re.compile(
    r"^(threading\.(local|Lock|RLock|Condition|Event)|weakref\.\w+|set|dict|list|"
    r"collections\.\w+)\(")


def _mutable_module_state(path: Path) -> list[str]:
    """Module-level names bound to an empty container or a synchronisation object: state,
    not a constant table."""
    found = []
    for node in ast.parse(path.read_text()).body:
        targets: list[ast.expr] = []
        value: Optional[ast.expr] = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if value is None:
            continue
        text = ast.unparse(value)
        empty = isinstance(value, (ast.Dict, ast.List, ast.Set)) and not (
            getattr(value, "keys", None) or getattr(value, "elts", None))
        if empty or _STATE_FACTORIES.match(text):
            found += [f"{path.name}: {ast.unparse(t)} = {text}" for t in targets]
    return found


def test_no_module_level_mutable_state_outside_the_run_model() -> None:
    offenders = []
    for name, path in _modules().items():
        if name != RUN_MODEL:
            offenders += _mutable_module_state(path)
    assert offenders == []


def test_no_test_compares_elapsed_time_to_a_number() -> None:
    pattern = re.compile(
        r"(elapsed|duration|took|monotonic\(\)\s*-\s*\w+|time\(\)\s*-\s*\w+)\s*[<>]=?\s*\d")
    offenders = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name == "test_structure.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "assert" in line:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
