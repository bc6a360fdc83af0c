"""The one-way import rule of docs/ARCHITECTURE.md, checked on the source (every import statement)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: package folder -> import prefixes it must never use
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "service/engine": (
        "service.api",
        "service.db",
        "service.domain",
        "service.serving",
        "service.launch",
        "service.settings",
        "service.queue",
        "workers",
        "fastapi",
        "starlette",
        "celery",
        "sqlalchemy",
        "redis",
        "pydantic_settings",
    ),
    "service/serving": (
        "service.api",
        "service.launch",
        "service.db",
        "service.domain",
        "workers",
        "fastapi",
        "sqlalchemy",
        "celery",
    ),
    "service/db": (
        "service.api",
        "service.launch",
        "service.serving",
        "service.domain",
        "workers",
        "fastapi",
        "torch",
        "celery",
    ),
    "service/domain": (
        "service.api",
        "service.serving",
        "service.launch",
        "workers",
        "fastapi",
        "starlette",
    ),
    "service/launch": ("service.api", "workers", "fastapi", "starlette", "celery"),
    "service/api": ("workers", "celery"),
    "workers": ("service.api", "service.launch", "fastapi", "starlette"),
}


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in _imports(path)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package])
    ]
    assert not violations, "\n".join(violations)
