"""The repository layout: imports flow one way, no module imports itself back, and every shell
entry point runs a module that exists and is named after its script.

Imports are read from the source (ast), function-level ones included, so nothing is imported.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package -> the packages it may import (besides itself). The order is
#   common <- data <- retriever <- policy <- pairs <- dpo <- evaluation <- pipeline
# with toy/ beside it: toy may import data, retriever, policy and pairs, and only pipeline
# (the rehearsal builds a toy world and release), tests and benches import toy. Reading a world's
# manifest is data (data.manifest), so the lower layers' toy-world defaults need no toy import.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "data": {"common"},
    "retriever": {"common", "data"},
    "policy": {"common", "data", "retriever"},
    "pairs": {"common", "data", "retriever", "policy"},
    "dpo": {"common", "data", "retriever", "policy", "pairs"},
    "evaluation": {"common", "data", "retriever", "policy", "pairs", "dpo"},
    "pipeline": {"common", "data", "retriever", "policy", "pairs", "dpo", "evaluation", "toy"},
    "toy": {"common", "data", "retriever", "policy", "pairs"},
}
ANYTHING = {"tests", "benches"}  # may import every package

# stage script -> the module it runs must be named like it (<package>/<script name>.py)
STAGE_SCRIPTS = ("make_toy", "finetune_clip", "retrieve", "build_pairs", "train_dpo", "train_sft", "evaluate",
                 "infer", "demo", "rehearse", "faults", "release_sources", "effect", "bench", "plan", "serve")


def packages() -> list[str]:
    return sorted(p.parent.name for p in REPO.glob("*/__init__.py") if not p.parent.name.startswith("."))


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the repository's packages."""
    out = {}
    for pkg in packages():
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The repository modules ``name`` imports anywhere in its file (``from pkg import mod`` as pkg.mod)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # import a.b.c of a module a.b names a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_package_has_a_place_in_the_order():
    assert set(packages()) == set(ALLOWED) | ANYTHING, "add a new package to ALLOWED (or ANYTHING)"


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_packages_import_only_lower_ones(graph):
    bad = []
    for m, targets in sorted(graph.items()):
        pkg = m.split(".")[0]
        if pkg in ANYTHING:
            continue
        for t in sorted(targets):
            other = t.split(".")[0]
            if other != pkg and other not in ALLOWED[pkg]:
                bad.append(f"{m} imports {t} ({pkg} may import {sorted(ALLOWED[pkg])})")
    assert not bad, "\n".join(bad)


def module_exists(name: str, known: dict[str, Path]) -> bool:
    if name.split(".")[0] in packages():
        return name in known
    return importlib.util.find_spec(name.split(".")[0]) is not None


_RUN = re.compile(r"(?:python|torchrun|launch)\b[^\n#]*?\s-m\s+([A-Za-z_][\w.]*)")


def test_scripts_run_existing_modules_named_after_them():
    known = modules()
    problems = []
    for script in sorted((REPO / "scripts").glob("*.sh")):
        code = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
        for mod in _RUN.findall(code):
            if not module_exists(mod, known):
                problems.append(f"{script.name}: runs {mod}, which does not exist")
        if script.stem in STAGE_SCRIPTS:
            execs = re.findall(r"^\s*exec \.venv/bin/python -m ([\w.]+)", code, re.M)
            if len(execs) != 1:
                problems.append(f"{script.name}: expected one `exec .venv/bin/python -m MODULE`, found {execs}")
            for mod in execs + re.findall(r"(?:torchrun|launch)\b[^\n]*?\s-m\s+([\w.]+)", code):
                if mod.rpartition(".")[2] != script.stem:
                    problems.append(f"{script.name}: runs {mod}, expected a module named {script.stem}")
    assert set(STAGE_SCRIPTS) <= {s.stem for s in (REPO / "scripts").glob("*.sh")}
    assert not problems, "\n".join(problems)


def test_python_m_in_code_configs_and_docs_names_existing_modules():
    """`python -m X` in docstrings, messages, configs and docs, and ["-m", "X"] in commands."""
    known = modules()
    bad = []
    texts = [p for ext in ("py", "sh", "md", "yaml") for p in REPO.glob(f"**/*.{ext}") if ".venv" not in p.parts
             and ".git" not in p.parts]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        named = _RUN.findall(text)
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.List):
                    items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                    named += [items[i + 1] for i, v in enumerate(items[:-1]) if v == "-m" and isinstance(items[i + 1], str)]
        for mod in named:
            if mod.split(".")[0] in packages() and mod not in known:
                bad.append(f"{path.relative_to(REPO)}: python -m {mod}: no such module")
    assert not bad, "\n".join(bad)
