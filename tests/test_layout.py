"""The package's import rule (docs/architecture.md): a stage imports only from itself and the stages below it,
and no two modules import each other, directly or through others. Function-level (lazy) imports count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlhflab"

# lowest first; the base modules (errors, files, config) sit below every stage
STAGES = ["base", "data", "runs", "models", "distributed", "preferences", "rewards", "ppo", "evaluation", "export", "pipelines", "cli"]
BASE = {"errors", "files", "config", "__init__"}
ENTRY = "__main__"  # `python -m rlhflab`: the command, so it sits with cli


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == ENTRY:
        return "cli"
    return "base" if len(parts) == 1 or parts[1] in BASE else parts[1]


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhflab"):
            for alias in node.names:  # `from rlhflab.models import forward` names a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("rlhflab")}
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_folder_is_a_known_stage():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(STAGES) - {"base"}
    top_files = {p.stem for p in PACKAGE.glob("*.py")}
    assert top_files <= BASE | {ENTRY}


def test_imports_only_go_down_the_stages():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if STAGES.index(stage_of(target)) > STAGES.index(stage_of(module)):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a lower stage up to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if nxt == node or nxt not in g:
                continue
            if state.get(nxt) == 1:
                cycle.extend(stack[stack.index(nxt):] + [nxt])
                return True
            if state.get(nxt) is None and visit(nxt, stack + [nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(g):
        if state.get(start) is None and visit(start, [start]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhflab"):
                offenders += [f"{module_name(path)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


def test_no_file_is_much_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 620}
    assert not long, long
