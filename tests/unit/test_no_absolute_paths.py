"""Tests find data relative to the repository (../shared beside it), never by one machine's absolute path:
on another machine such a test would be skipped, or write, where nobody looks."""

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parents[1]
# kernel interfaces are the same on every Linux machine; everything else absolute is one machine's layout
ALLOWED = ("/proc/", "/dev/", "/sys/")
ABSOLUTE = re.compile(r"^/[\w.-]+/[\w./-]*$")
# files with an absolute path that another change must remove; listed here so the test names them, and
# fails once one of them is fixed so that its entry is removed too
KNOWN: set[str] = set()


def _absolute_paths(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            value = node.value.strip()
            if ABSOLUTE.match(value) and not value.startswith(ALLOWED):
                found.append(f"{path.relative_to(TESTS)}:{node.lineno}: {value!r}")
    return found


def test_no_test_names_an_absolute_path():
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        found = _absolute_paths(path)
        if found:
            offenders[path.relative_to(TESTS).as_posix()] = found
    unexpected = {f: v for f, v in offenders.items() if f not in KNOWN}
    assert not unexpected, f"absolute paths in tests (find data relative to the repository): {unexpected}"
    fixed = [f for f in KNOWN if f not in offenders]
    assert not fixed, f"no absolute path left in {fixed}: remove them from KNOWN"


def test_the_check_finds_an_absolute_path(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('A = "/work/shared/data/x.tar"\nB = "../shared/data/x.tar"\nC = "/proc/self/io"\n')
    global TESTS
    saved, TESTS = TESTS, tmp_path
    try:
        assert _absolute_paths(probe) == ["probe.py:1: '/work/shared/data/x.tar'"]
    finally:
        TESTS = saved
