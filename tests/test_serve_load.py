"""`benchmarks/serve_load.py` writes its own result file: command, machine, date, every burst in alternating order."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_serve_load_writes_its_result_file(tiny_checkpoint, tmp_path):
    out = tmp_path / "serve_load.md"
    args = ["--model", str(tiny_checkpoint), "--clients", "1", "2", "--requests", "1", "--max-tokens", "3", "--rounds", "2"]
    args += ["--num-threads", "1", "--out", str(out)]
    subprocess.run([sys.executable, "benchmarks/serve_load.py", *args], cwd=REPO, check=True, capture_output=True, timeout=600)
    text = out.read_text()
    assert f"- command: `python benchmarks/serve_load.py {' '.join(args)}`" in text
    assert re.search(r"- machine: .+, \d+ cores, torch \S+; load average", text)
    assert re.search(r"- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC; git commit \w+", text)
    bursts = re.findall(r"^\| (\d) \| (\d) \| (batched|one at a time) \| (\d) \| ([\d.]+) \|", text, flags=re.MULTILINE)
    # round 1 batched first, round 2 one-at-a-time first; each concurrency's pair adjacent; requests = clients x 1
    assert [(r, c, mode, n) for r, c, mode, n, _ in bursts] == [
        ("1", "1", "batched", "1"),
        ("1", "1", "one at a time", "1"),
        ("1", "2", "batched", "2"),
        ("1", "2", "one at a time", "2"),
        ("2", "1", "one at a time", "1"),
        ("2", "1", "batched", "1"),
        ("2", "2", "one at a time", "2"),
        ("2", "2", "batched", "2"),
    ]
    assert all(float(tokens_per_s) > 0 for *_, tokens_per_s in bursts)
    assert len(re.findall(r"^\| [12] \| [\d.]+ \([\d.]+-[\d.]+\) \|", text, flags=re.MULTILINE)) == 2  # the medians table
