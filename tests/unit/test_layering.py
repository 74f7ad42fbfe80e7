"""The layers import downwards only: pcpp -> stages -> pipelines (cluster beside), read from the source.

Every import counts, also those inside functions (a function-level import is still an arrow): pcpp imports
neither stages, pipelines, cluster nor Ray / MLflow / DeepSpeed / matplotlib (it is the pure-torch core);
stages import no pipelines; cluster imports neither stages nor pipelines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "pcpp": ("stages", "pipelines", "cluster", "ray", "mlflow", "deepspeed", "matplotlib", "tqdm"),
    "stages": ("pipelines",),
    "cluster": ("stages", "pipelines"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_up_or_sideways(package):
    offenders = []
    for path in sorted((REPO / package).rglob("*.py")):
        for line, module in imports(path):
            if module.split(".")[0] in FORBIDDEN[package]:
                offenders.append(f"{path.relative_to(REPO)}:{line}: import {module}")
    assert not offenders, f"{package} must not import {', '.join(FORBIDDEN[package])}:\n" + "\n".join(offenders)


def test_the_check_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from pipelines.config import PipelineConfig\n    import ray.train\n")
    assert imports(probe) == [(2, "pipelines.config"), (3, "ray.train")]
