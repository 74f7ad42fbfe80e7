"""Tests find data relative to the repository, never by one machine's absolute path: on another machine
such a test would be skipped, or write, where nobody looks. They use the repository's own sample
(pipelines/demo_data); only the full-data checks read ../shared beside the repository, and skip, saying
why, where it is absent."""

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
# the only tests that read ../shared: checks on the full data sets, which the repository does not hold
FULL_DATA = {"integration/test_teacher_accuracy.py"}


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


def _shared_paths(path: Path) -> list[str]:
    """String constants that name ../shared: the directory name itself or a path under it."""
    return [f"{path.relative_to(TESTS)}:{node.lineno}: {node.value!r}"
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and (node.value == "shared" or node.value.startswith(("../shared/", "shared/")))]


def test_only_the_full_data_checks_read_shared():
    readers = {p.relative_to(TESTS).as_posix(): _shared_paths(p) for p in sorted(TESTS.rglob("*.py"))
               if p.name != Path(__file__).name}
    readers = {f: found for f, found in readers.items() if found}
    assert set(readers) <= FULL_DATA, f"tests reading ../shared besides the full-data checks: {readers}"
    source = {f: (TESTS / f).read_text() for f in FULL_DATA}
    assert all("skipif" in text for text in source.values()), "a full-data check must skip where ../shared is absent"


def test_the_check_finds_an_absolute_path(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('A = "/work/shared/data/x.tar"\nB = "../shared/data/x.tar"\nC = "/proc/self/io"\n')
    global TESTS
    saved, TESTS = TESTS, tmp_path
    try:
        assert _absolute_paths(probe) == ["probe.py:1: '/work/shared/data/x.tar'"]
    finally:
        TESTS = saved
