"""Reports over one or more runs: markdown tables, PNG plots (matplotlib) and a JSON summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from hyperowl.errors import HyperowlError
from hyperowl.eval.scoring import Summary, Tally

#: File names written by :func:`write_report`.
REPORT_MD = "report.md"
SUMMARY_JSON = "summary.json"
LEVELS_PNG = "distractor.png"
CATEGORIES_PNG = "categories.png"


def _pct(tally: Tally | None) -> str:
    return "–" if tally is None or tally.total == 0 else f"{100 * tally.accuracy:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def overview_table(summaries: Sequence[Summary]) -> str:
    """One row per run: all-variants accuracy (circular / distractor rule), first-variant accuracy, counts."""
    rows = [
        [
            s.label,
            s.benchmark,
            str(s.overall.total),
            _pct(s.overall),
            _pct(s.first_variant),
            str(s.unanswered),
            str(s.errors),
        ]
        for s in summaries
    ]
    header = ["run", "benchmark", "questions", "accuracy % (all variants)", "accuracy % (first variant)", "unanswered", "errors"]
    return _table(header, rows)


def _column_label(summary: Summary, summaries: Sequence[Summary]) -> str:
    benchmarks = {s.benchmark for s in summaries}
    return summary.label if len(benchmarks) == 1 else f"{summary.label} ({summary.benchmark})"


def breakdown_table(summaries: Sequence[Summary], key: str) -> str:
    """Accuracy % by ``key`` (``levels``, ``categories`` or a meta key), one column per run; empty
    string when no run has that breakdown."""

    def values(s: Summary) -> dict[str, Tally]:
        if key == "levels":
            return {str(k): v for k, v in s.levels.items()}
        if key == "categories":
            return s.categories
        return s.meta.get(key, {})

    per_run = [values(s) for s in summaries]
    names: list[str] = []
    for table in per_run:
        names += [name for name in table if name not in names]
    if not names:
        return ""
    if key == "levels":
        names.sort(key=int)
    first = {"levels": "images", "categories": "category"}.get(key, key)
    header = [first, *(_column_label(s, summaries) for s in summaries)]
    return _table(header, [[name, *(_pct(table.get(name)) for table in per_run)] for name in names])


def markdown_report(summaries: Sequence[Summary]) -> str:
    """The full markdown report: overview, distractor levels, categories, then every meta breakdown."""
    parts = ["# Evaluation results", "", overview_table(summaries)]
    titles = {"levels": "Distractor resistance: accuracy % by number of images", "categories": "Accuracy % by category"}
    meta_keys: list[str] = []
    for s in summaries:
        meta_keys += [k for k in s.meta if k not in meta_keys]
    for key in ["levels", "categories", *meta_keys]:
        table = breakdown_table(summaries, key)
        if table:
            parts += ["", f"## {titles.get(key, f'Accuracy % by {key}')}", "", table]
    return "\n".join(parts) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_levels(summaries: Sequence[Summary], path: Path) -> bool:
    """Accuracy vs. number of images (log axis), one line per run with levels; False when none has any."""
    runs = [s for s in summaries if s.levels]
    plt = _pyplot()
    if not runs or plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for s in runs:
        levels = sorted(s.levels)
        ax.plot(levels, [100 * s.levels[n].accuracy for n in levels], marker="o", label=_column_label(s, runs))
    ax.set_xscale("log")
    all_levels = sorted({n for s in runs for n in s.levels})
    ax.set_xticks(all_levels, [str(n) for n in all_levels])
    ax.minorticks_off()
    ax.set_ylim(0, 100)
    ax.set_xlabel("images in the prompt (1 relevant + distractors)")
    ax.set_ylabel("accuracy % (all variants right)")
    ax.set_title("Distractor resistance")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_categories(summaries: Sequence[Summary], path: Path) -> bool:
    """Horizontal grouped bars of per-category accuracy, one colour per run; False when no categories."""
    runs = [s for s in summaries if s.categories]
    plt = _pyplot()
    if not runs or plt is None:
        return False
    names: list[str] = []
    for s in runs:
        names += [n for n in s.categories if n not in names]
    height = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(7.0, 1.2 + 0.35 * len(names) * max(1, len(runs) / 2)), dpi=120)
    for k, s in enumerate(runs):
        positions = [i + k * height for i in range(len(names))]
        values = [100 * s.categories[n].accuracy if n in s.categories else 0.0 for n in names]
        ax.barh(positions, values, height=height, label=_column_label(s, runs))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy %")
    ax.set_title("Accuracy by category")
    ax.grid(axis="x", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(summaries: Sequence[Summary], out_dir: str | Path) -> list[Path]:
    """Write ``report.md``, ``summary.json`` and the plots that apply; returns the written paths.

    Plots are skipped (with the markdown still written) when matplotlib is not installed.
    """
    if not summaries:
        raise ValueError("no runs to report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / REPORT_MD, out_dir / SUMMARY_JSON]
    (out_dir / REPORT_MD).write_text(markdown_report(summaries), encoding="utf-8")
    payload = [s.to_json() for s in summaries]
    (out_dir / SUMMARY_JSON).write_text(json.dumps(payload[0] if len(payload) == 1 else payload, indent=1) + "\n")
    for plot, name in ((plot_levels, LEVELS_PNG), (plot_categories, CATEGORIES_PNG)):
        if plot(summaries, out_dir / name):
            written.append(out_dir / name)
    return written


def load_summaries(paths: Sequence[str | Path]) -> list[Summary]:
    """Summaries from run folders or ``summary.json`` files (a file may hold one summary or a list)."""
    summaries = []
    for path in map(Path, paths):
        file = path / SUMMARY_JSON if path.is_dir() else path
        if not file.is_file():
            raise HyperowlError(f"no {SUMMARY_JSON} at {path} (run `hyperowl eval run` there first)")
        data = json.loads(file.read_text())
        summaries += [Summary.from_json(d) for d in (data if isinstance(data, list) else [data])]
    return summaries
