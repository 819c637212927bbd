"""The package's layout holds: imports run only downward, from the command line to
the wings (`chatzeo.server`, `chatzeo.terminal`) to the core (`chatzeo/*.py`).

Read from the source with `ast` (every import, lazy ones inside functions too), so a
new module that imports upward fails here before anyone draws the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import chatzeo

PACKAGE = Path(chatzeo.__file__).parent
WINGS = ("server", "terminal")
# What sits above the wings and may use them.
TOP = {"cli", "__main__"}


ALLOWED = {
    "core": {"core"},
    "server": {"core", "server"},
    "terminal": {"core", "terminal"},
    "top": {"core", "server", "terminal", "top"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("chatzeo", *parts)).removesuffix(".__init__")


def _imports(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every chatzeo module the module ``name`` imports, as absolute dotted names."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("chatzeo"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if not target.startswith("chatzeo"):
                continue
            found.add(target)
            # ``from . import x`` / ``from .server import serve`` name modules too.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in WINGS:
        return parts[1]
    if len(parts) > 1 and parts[1] in TOP:
        return "top"
    return "core"


def _upward(source: str, name: str, is_package: bool = False) -> list[str]:
    here = _layer(name)
    return sorted(
        f"{name} ({here}) imports {target} ({_layer(target)})"
        for target in _imports(source, name, is_package)
        if target != "chatzeo" and _layer(target) not in ALLOWED[here]
    )


def test_imports_run_only_downward() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30, "the package was not found where the test looks"
    wrong = [
        line
        for path in modules
        for line in _upward(path.read_text(), _module_name(path), path.name == "__init__.py")
    ]
    assert wrong == []


def test_the_check_sees_upward_imports() -> None:
    """The control: lazy, relative and absolute upward imports are all caught."""
    core = "def later():\n    from .server.rules import check_commit\n"
    assert _upward(core, "chatzeo.records") == [
        "chatzeo.records (core) imports chatzeo.server.rules (server)",
        "chatzeo.records (core) imports chatzeo.server.rules.check_commit (server)",
    ]
    assert _upward("from ..terminal import app\n", "chatzeo.server.guard") == [
        "chatzeo.server.guard (server) imports chatzeo.terminal (terminal)",
        "chatzeo.server.guard (server) imports chatzeo.terminal.app (terminal)",
    ]
    assert _upward("import chatzeo.cli\n", "chatzeo.session") == [
        "chatzeo.session (core) imports chatzeo.cli (top)"]
    assert _upward("from ..records import KINDS\n", "chatzeo.terminal.display") == []
