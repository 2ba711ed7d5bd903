"""pyproject.toml declares Python >= 3.10: nothing may call an API that only 3.11+ has."""

import ast
import hashlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What exists only from Python 3.11 on: module -> attributes (and names imported from it).
NEWER_THAN_310 = {"hashlib": {"file_digest"}, "datetime": {"UTC"}, "enum": {"StrEnum", "verify", "ReprEnum"},
                  "typing": {"Self", "LiteralString", "Never", "TypeVarTuple", "Unpack", "NotRequired", "Required",
                             "assert_type", "reveal_type", "dataclass_transform"},
                  "contextlib": {"chdir"}, "sys": {"exception"}, "asyncio": {"TaskGroup", "timeout", "Runner"}}
NEW_MODULES = {"tomllib", "wsgiref.types"}
NEW_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _uses_311_api(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each use, read from the syntax tree (so comments and docstrings naming them are fine)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.attr in NEWER_THAN_310.get(node.value.id, ()):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module in NEW_MODULES:
                found.append((node.lineno, f"from {node.module}"))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if a.name in NEWER_THAN_310.get(node.module, ())]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name in NEW_MODULES]
        elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS:
            found.append((node.lineno, node.id))
        elif type(node).__name__ == "TryStar":  # except* (parses only on 3.11+)
            found.append((node.lineno, "except*"))
    return found


def test_floor_is_310():
    # A regex, not tomllib: these tests run on 3.10 too.
    floor = re.search(r'^requires-python\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert floor and floor.group(1) == ">=3.10", floor  # if the floor moves, NEWER_THAN_310 should move with it


def test_the_scan_sees_a_311_call():
    planted = "import hashlib\nfrom typing import Self\nwith open(p, 'rb') as f:\n    hashlib.file_digest(f, 'sha256')\n"
    assert [w for _, w in _uses_311_api(ast.parse(planted))] == ["typing.Self", "hashlib.file_digest"]


def test_package_source_uses_no_311_only_api():
    found = [f"{path.relative_to(ROOT)}:{line}: {what}"
             for path in sorted((ROOT / "rerank_dist").rglob("*.py"))
             for line, what in _uses_311_api(ast.parse(path.read_text(), str(path)))]
    assert not found, "\n".join(found)


@pytest.fixture
def no_file_digest(monkeypatch):
    """Python 3.10's hashlib: no file_digest."""
    assert hasattr(hashlib, "file_digest")  # precondition: this interpreter has it, so removing it means something
    monkeypatch.delattr(hashlib, "file_digest")


def test_raw_file_hash_without_file_digest(tmp_path, no_file_digest):
    from rerank_dist.data.tables import RawFile

    data = b"user_id:token\titem_id:token\n1\t2\n" * 1000
    (tmp_path / "x.inter").write_bytes(data)
    assert RawFile(str(tmp_path / "x.inter"), path=tmp_path / "x.inter").sha256() == hashlib.sha256(data).hexdigest()


def test_download_hash_without_file_digest(tmp_path, no_file_digest):
    from rerank_dist.data import download

    data = bytes(range(256)) * 5000
    (tmp_path / "f.zip").write_bytes(data)
    assert download.sha256_file(tmp_path / "f.zip") == hashlib.sha256(data).hexdigest()
