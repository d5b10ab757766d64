"""The README's Python blocks run as written (in a fresh process, in an empty directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_the_readme_has_python_blocks() -> None:
    assert BLOCKS, "README.md has no ```python block"
    assert any("eval_ctx(" in b and "persia.metrics" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(BLOCKS[index])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_why_persia_quotes_only_benchmark_figures() -> None:
    """Every number in the README's "Why persia" section is one benchmarks/README.md records."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Why persia, and when not", 1)[1].split("\n## ", 1)[0]
    recorded = (ROOT / "benchmarks" / "README.md").read_text()
    numbers = re.findall(r"-?\d+(?:\.\d+)?", section)
    assert len(numbers) >= 5
    for n in numbers:
        assert n in recorded, f"{n} is not a figure of benchmarks/README.md"
