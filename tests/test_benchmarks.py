"""The benchmark scripts, run the way their docstrings say (as commands: tests import nothing from benchmarks/)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: aten operators that only alias memory; the operator count leaves them out.
ALIASES = {
    "view",
    "_unsafe_view",
    "_reshape_alias",
    "reshape",
    "transpose",
    "t",
    "permute",
    "expand",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "as_strided",
    "alias",
    "detach",
}


def run_benchmark(module: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_decode_profile_counts_the_operators_of_a_step(tmp_path):
    run_benchmark(
        "benchmarks.decode_profile",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--frames",
        "4",
        "--steps",
        "2",
        "--out",
        str(tmp_path),
    )
    text = (tmp_path / "decode_profile_tiny.md").read_text()
    rows = {
        m[1]: (float(m[2]), float(m[3]), int(m[4]))
        for m in re.finditer(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", text, re.MULTILINE)
    }
    (cached_host, cached_wall, cached_ops), (_, _, rebuilt_ops) = rows["cached"], rows["rebuilt"]
    assert rebuilt_ops > cached_ops > 0  # rebuilding the visual K/V adds the vision projections to every step
    assert cached_wall >= cached_host > 0
    most_called = re.search(r"Most called operators of a cached step: (.*)\.$", text, re.MULTILINE)[1]
    names = [entry.rsplit(" ", 1)[0] for entry in most_called.split(", ")]
    assert len(names) == 8 and not ALIASES & set(names)  # views do not count


def test_tests_import_nothing_from_benchmarks():
    imported = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            imported += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "benchmarks"]
    assert not imported
