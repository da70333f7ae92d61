"""The interior's structure: no import cycle between project modules (lazy imports included), no
module parses another's source, few long functions, no private names imported across modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each folder of the repository and the name it is installed under (pyproject.toml's package-dir)
PACKAGES = {"moue_core": "moue", "studies": "moue.studies", "search_spaces": "moue.search_spaces",
            "analysis": "moue.analysis"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, installed in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((installed, *parts))] = path
    return out


def test_the_project_installs_as_one_moue_package() -> None:
    """From outside the repository: ``moue`` and its subpackages import, the generic names do not
    (a user's own ``analysis`` or ``studies`` module is not shadowed), and no module imports them."""
    code = ("import importlib.util as u, moue, moue.analysis, moue.studies.cli, moue.search_spaces; "
            "print([n for n in ('analysis', 'studies', 'search_spaces', 'moue_core') if u.find_spec(n)]); "
            "print(moue.load_runs.__module__, moue.fit.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["[]", "moue.analysis.loading moue.analysis.fitting"], proc.stdout
    bare = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            bare += [f"{name}: {m}" for m in mods if m.split(".")[0] in PACKAGES]
    assert not bare, bare


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its body (top level, functions, TYPE_CHECKING aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []  # annotations only; never executed
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
                found.add(t)
    return found


def test_no_import_cycle_between_project_modules() -> None:
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # a package importing its own submodules (lazy registries in __init__) is how packages work
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_parses_another_module_s_source() -> None:
    for path in _modules().values():
        text = path.read_text(encoding="utf-8")
        assert "ast.parse(" not in text and "ast.literal_eval(" not in text, path


def test_at_most_three_functions_over_80_lines() -> None:
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert len(long) <= 3, long


def test_no_private_name_imported_across_modules() -> None:
    bad = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moue":
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_trial_configs_search_spaces_and_specs_import_without_torch() -> None:
    code = ("import sys; import moue.trial_config, moue.fields, moue.search_spaces, moue.studies.spec, moue.studies.plan; "
            "from moue.studies.spec import load_study; s = load_study('studies/vw_grid.toml'); "
            "assert s.plans and s.plans[0].config.train.tokens == s.budget_tokens; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
