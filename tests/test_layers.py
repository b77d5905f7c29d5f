"""The layering of docs/architecture.md, checked on the source itself.

protocol (frames, codec, errors, close codes) is the bottom; sessions (the
conversation domain) stands on it; server and clients stand on those; the
``rapport`` command sits on top. Arrows point down only, so a client an app
copies carries nothing of the server, and the module graph has no cycles.
Every import counts, including those inside functions and under
``TYPE_CHECKING``: a cycle hidden from the interpreter is still one for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package -> the first-party packages it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "sessions": {"protocol"},
    "server": {"protocol", "sessions"},
    "clients": {"protocol"},
    "rapport": {"protocol", "sessions", "server", "clients"},
    # The toolkit of the tests and bench scripts: above everything shipped, imported by none of it.
    "testkit": {"protocol", "sessions", "server", "clients"},
}
PACKAGES = set(ALLOWED)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_imports(path: Path) -> set[str]:
    """Every first-party module ``path`` imports, resolved to a module name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from pkg import mod" imports a module when pkg/mod.py exists.
            names = [f"{prefix}.{alias.name}" if resolve(f"{prefix}.{alias.name}") else prefix
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name)
            if target is not None:
                found.add(target)
    found.discard(me)
    return found


def resolve(name: str) -> str | None:
    """The first-party module a dotted name refers to, or None."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    while parts:
        candidate = ROOT.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def graph() -> dict[str, set[str]]:
    return {module_name(p): first_party_imports(p) for p in source_files()}


def test_packages_import_only_layers_below_them() -> None:
    upward = [f"{mod} -> {dep}" for mod, deps in graph().items() for dep in sorted(deps)
              if dep.split(".")[0] != mod.split(".")[0]
              and dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]]
    assert upward == []


def test_module_graph_has_no_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("bad, expected", [
    ("import server.gateway\n", {"server.gateway"}),
    ("from server import gateway\n", {"server.gateway"}),
    ("def f():\n    from server.runtime import Runtime\n", {"server.runtime"}),
])
def test_the_checker_sees_every_kind_of_import(tmp_path: Path, bad: str, expected: set[str]) -> None:
    """The two tests above are only as good as this parser."""
    probe = ROOT / "clients" / "_layering_probe.py"
    probe.write_text(bad, encoding="utf-8")
    try:
        assert first_party_imports(probe) == expected
    finally:
        probe.unlink()
