"""Benchmark evaluation: loaders for the published benchmark formats, the distractor-resistance test,
circular multiple-choice scoring, a batched/resumable/sharded runner, and reports (`hyperowl eval`).

See docs/eval.md.
"""

from hyperowl.eval.answers import extract_choice
from hyperowl.eval.data import EvalItem, load_benchmark
from hyperowl.eval.distractor import DistractorSet, build_distractor_set
from hyperowl.eval.report import write_report
from hyperowl.eval.runner import RunOptions, run_requests
from hyperowl.eval.scoring import Record, Summary, summarize
from hyperowl.eval.tasks import EvalRequest, build_requests

__all__ = [
    "DistractorSet",
    "EvalItem",
    "EvalRequest",
    "Record",
    "RunOptions",
    "Summary",
    "build_distractor_set",
    "build_requests",
    "extract_choice",
    "load_benchmark",
    "run_requests",
    "summarize",
    "write_report",
]
