"""Package layout rules: hf_ispasp modules import each other without a circle, and the library never runs pip.

Only imports that run when a module is imported count (module level, including ``try``/``if`` blocks and class
bodies); imports inside functions are deferred and do not form a circle at import time, and ``if TYPE_CHECKING:``
blocks never run. A parent package's ``__init__`` runs before its submodules anyway, so it is an edge only where a
module takes a *name* from it (``from . import __version__`` needs the parent's ``__init__`` to have got that far).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "hf_ispasp"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is_package) for every module of the installed package."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_nodes(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not inside functions or TYPE_CHECKING blocks)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_time_nodes(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):  # try/with/class/match bodies
                yield from _import_time_nodes(list(getattr(node, field, None) or []))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """hf_ispasp module -> the hf_ispasp modules its import-time statements need."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _import_time_nodes(tree.body):
            if isinstance(node, ast.Import):
                targets = {alias.name for alias in node.names}
            else:
                source = _resolve(name, is_package, node)
                targets = set()
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:  # a submodule: that module is what runs
                        targets.add(f"{source}.{alias.name}")
                    else:  # a name defined by `source` (its __init__ when it is a package)
                        targets.add(source)
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_graph_sees_package_imports():
    """The graph is not vacuous: the package's own imports and relative ``from . import x`` resolve."""
    graph = import_graph()
    assert {"hf_ispasp.pruner", "hf_ispasp.serialization", "hf_ispasp.adapters"} <= graph["hf_ispasp"]
    assert "hf_ispasp.adapters.encoders" in graph["hf_ispasp.adapters"]
    assert "hf_ispasp.surgery" in graph["hf_ispasp.adapters.groups"]  # a parent-relative import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle among hf_ispasp modules: " + " -> ".join(cycle)


_PROCESS_CALLS = {("os", "system"), ("os", "popen"), ("os", "execv"), ("os", "execvp"), ("os", "spawnv")}


def _process_uses(path: Path) -> list[str]:
    """Ways ``path`` could start a process or run pip: subprocess / pip imports, os.system & co, a "pip" argv."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        if any(n.split(".")[0] in ("subprocess", "pip", "pty") for n in names):
            found.append(f"line {node.lineno}: imports {names}")
        if isinstance(node, ast.Name) and node.id == "subprocess":
            found.append(f"line {node.lineno}: uses subprocess")
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and (node.value.id, node.attr) in _PROCESS_CALLS):
            found.append(f"line {node.lineno}: calls {node.value.id}.{node.attr}")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            words = node.value.split()
            if node.value.strip() in ("pip", "pip3") or words[:2] in (["pip", "install"], ["pip", "download"]):
                found.append(f"line {node.lineno}: a pip command {node.value!r}")
    return found


def test_library_never_runs_pip_or_subprocesses():
    """Set-up (pip install / pip download of demo assets) belongs to scripts/ and demo/, not the library.

    Error messages may still tell the user what to install (``...; pip install 'hf_ispasp[timm]'``).
    """
    offenders = {str(path.relative_to(ROOT.parent)): uses for path, _ in _modules().values()
                 if (uses := _process_uses(path))}
    assert not offenders, offenders


def test_process_check_catches_the_old_asset_fetch(tmp_path):
    source = tmp_path / "fetch.py"
    source.write_text("import subprocess, sys\n"
                      "def fetch():\n"
                      "    subprocess.run([sys.executable, '-m', 'pip', 'download', 'x'], check=True)\n")
    assert len(_process_uses(source)) >= 3


def test_serialization_registers_the_timm_format_itself():
    """save_pruned / load_pruned know timm checkpoints without the adapters (or anything else) importing them."""
    from hf_ispasp import serialization, timm_format

    assert "hf_ispasp.timm_format" in import_graph()["hf_ispasp.serialization"]
    assert (timm_format.is_timm_model, timm_format.save_timm_pruned) in serialization._SAVERS
    assert (timm_format.is_timm_folder, timm_format.load_timm_pruned) in serialization._LOADERS
