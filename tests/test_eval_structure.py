"""The evaluation is a straight pipeline and the toy world one room: stages import only earlier stages, the core
never imports the toy world, no private name crosses a package, no import cycle, no long file."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# evaluation's stages in order (a module's stage is its first path part under evaluation/).
STAGES = ("config", "concepts", "recipe", "plan", "tuning", "generate", "metrics", "store", "report")
ENTRIES = ("harness", "sample_concept")  # wire the stages; nothing imports them but the CLI
CORE = ("evaluation", "datamodules", "models", "lightning_modules", "losses")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in the file, lazy ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _files(*packages: str) -> list[Path]:
    return [p for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py"))]


def _stage(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return STAGES.index(part) if part in STAGES else len(STAGES)


def test_evaluation_stages_import_only_earlier_stages():
    wrong = []
    for path in _files("evaluation"):
        me = _module(path)
        for target, _ in _imports(path):
            later = target.startswith("evaluation.") and (
                target.split(".")[1] in ENTRIES or _stage(target) > _stage(me)
            )
            if later:
                wrong.append(f"{me} -> {target}")
    assert not wrong, wrong


def test_core_never_imports_the_toy_world():
    wrong = [
        f"{_module(p)} -> {t}"
        for p in _files(*CORE)
        for t, _ in _imports(p)
        if t == "toyworld" or t.startswith("toyworld.")
    ]
    assert not wrong, wrong


def test_no_private_name_crosses_a_package():
    wrong = []
    for path in _files("evaluation", "toyworld", "tests") + [ROOT / "evaluate.py"]:
        mine = _module(path).split(".")[0]
        for target, names in _imports(path):
            if target.split(".")[0] in ("evaluation", "toyworld") and target.split(".")[0] != mine:
                wrong += [f"{_module(path)}: {target}.{n}" for n in names if n.startswith("_")]
    assert not wrong, wrong


def test_no_import_cycle():
    """Over the core and the toy world, lazy imports included (``models.tiny`` <-> ``models.tiny_sdxl`` was one)."""
    graph: dict[str, set[str]] = {}
    for path in _files(*CORE, "toyworld"):
        graph[_module(path)] = set()
    for path in _files(*CORE, "toyworld"):
        for target, names in _imports(path):
            for candidate in (target, *(f"{target}.{n}" for n in names)):
                if candidate in graph and candidate != _module(path):
                    graph[_module(path)].add(candidate)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_files_are_short():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _files("evaluation", "toyworld")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long
    assert len((ROOT / "evaluation" / "harness.py").read_text().splitlines()) <= 300
