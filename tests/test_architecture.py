"""The shape of the house, checked: one-way layers (import-linter contracts in pyproject.toml), no import circle,
no sys.path edits, one name table for the backends, and the same pins in requirements.txt and pyproject.toml."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO


def test_layer_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_import_circle_anywhere():
    import grimp

    graph = grimp.build_graph("retrieval")
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith("retrieval") and graph.chain_exists(importer=imported, imported=module):
                circles.append(f"{module} <-> {imported}")
    assert not circles, circles


def test_no_sys_path_edits():
    offenders = []
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "site-packages" in path.parts:
            continue
        text = path.read_text("utf-8")
        if re.search(r"sys\.path\.(insert|append)|sys\.path\s*=", text) and path.name != "test_architecture.py":
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders


def test_backends_have_one_name_table_and_one_interface():
    from retrieval.search.backends import BACKENDS
    from retrieval.search.backends.base import Backend

    assert set(BACKENDS) == {"memory", "faiss", "milvus"}
    for name, cls in BACKENDS.items():
        assert issubclass(cls, Backend) and cls.name == name
        assert not getattr(cls, "__abstractmethods__", None), f"{name} leaves {cls.__abstractmethods__} abstract"
    # nothing outside the table dispatches on backend names
    pattern = re.compile(r"""==\s*["'](memory|faiss|milvus)["']""")
    hits = [
        str(path.relative_to(REPO)) for path in (REPO / "retrieval").rglob("*.py")
        if pattern.search(path.read_text("utf-8"))
    ]
    assert not hits, hits


def _pins(lines):
    return {re.split(r"[=\[]", line, maxsplit=1)[0].lower(): line for line in lines}


def test_requirements_and_pyproject_pin_the_same_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["ray"] + project["optional-dependencies"]["milvus"])
    listed = _pins(
        line.strip() for line in (REPO / "requirements.txt").read_text("utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert declared == listed
    assert all("==" in line for line in declared.values())


@pytest.mark.parametrize("script", ["index.py", "query_online.py", "server.py", "evaluate.py"])
def test_top_level_scripts_are_thin(script):
    text = (REPO / script).read_text("utf-8")
    code = [line for line in text.split('"""')[-1].splitlines() if line.strip()]
    assert len(code) <= 4 and "from retrieval.cli." in text
