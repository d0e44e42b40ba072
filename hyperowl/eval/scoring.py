"""Scoring: per-request records, circular/all-variants-right grouping, and summaries with breakdowns."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hyperowl.eval.answers import extract_choice, is_open_answer_correct
from hyperowl.eval.tasks import EvalRequest


@dataclass
class Record:
    """The outcome of one request: one line of ``predictions.jsonl``.

    ``prediction`` is the extracted option index (None: no option recognised, or an open question);
    ``error`` is set when the request could not be run (bad media, too long), which counts as wrong.
    """

    id: str
    group: str
    category: str
    answer: int | str
    response: str
    prediction: int | None
    correct: bool
    level: int | None = None
    variant: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        """Inverse of :meth:`to_json` (unknown keys are ignored)."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def score_response(request: EvalRequest, response: str, error: str | None = None) -> Record:
    """Score one model answer: the extracted option must be the right one (open questions: text match)."""
    if request.item.options:
        prediction = None if error else extract_choice(response, request.item.options)
        correct = prediction is not None and prediction == request.item.answer
    else:
        prediction = None
        correct = error is None and is_open_answer_correct(response, str(request.item.answer))
    return Record(
        id=request.id,
        group=request.group,
        category=request.item.category,
        answer=request.item.answer,
        response=response,
        prediction=prediction,
        correct=correct,
        level=request.level,
        variant=request.variant,
        meta=dict(request.item.meta),
        error=error,
    )


@dataclass
class Tally:
    """Right and total counts of scoring groups."""

    correct: int = 0
    total: int = 0

    @property
    def accuracy(self) -> float:
        """Fraction right (0 when empty)."""
        return self.correct / self.total if self.total else 0.0

    def add(self, right: bool) -> None:
        """Count one group."""
        self.correct += int(right)
        self.total += 1


@dataclass
class Summary:
    """Scores of one run.

    Attributes:
        benchmark: benchmark name; label: the run's name in tables (checkpoint, setting).
        overall: groups right (circular: every rotation right; distractor: all 4 variants right).
        first_variant: the same counted on variant 0 alone (plain single-pass accuracy).
        categories: ``overall`` by category; levels: by number of images (distractor test);
        meta: by each further key (``l2-category``, ``duration``, ...) then by its value.
        requests: requests scored; unanswered: answers where no option was recognised; errors: failed requests.
    """

    benchmark: str
    label: str
    overall: Tally
    first_variant: Tally
    categories: dict[str, Tally]
    levels: dict[int, Tally]
    meta: dict[str, dict[str, Tally]]
    requests: int
    unanswered: int
    errors: int

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict with accuracies spelled out next to the counts."""

        def tally(t: Tally) -> dict[str, Any]:
            return {"correct": t.correct, "total": t.total, "accuracy": round(t.accuracy, 6)}

        return {
            "benchmark": self.benchmark,
            "label": self.label,
            "overall": tally(self.overall),
            "first_variant": tally(self.first_variant),
            "categories": {k: tally(v) for k, v in self.categories.items()},
            "levels": {str(k): tally(v) for k, v in self.levels.items()},
            "meta": {key: {k: tally(v) for k, v in values.items()} for key, values in self.meta.items()},
            "requests": self.requests,
            "unanswered": self.unanswered,
            "errors": self.errors,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Summary:
        """Inverse of :meth:`to_json`."""

        def tally(d: dict[str, Any]) -> Tally:
            return Tally(int(d["correct"]), int(d["total"]))

        return cls(
            benchmark=data["benchmark"],
            label=data["label"],
            overall=tally(data["overall"]),
            first_variant=tally(data["first_variant"]),
            categories={k: tally(v) for k, v in data["categories"].items()},
            levels={int(k): tally(v) for k, v in data["levels"].items()},
            meta={key: {k: tally(v) for k, v in values.items()} for key, values in data["meta"].items()},
            requests=int(data["requests"]),
            unanswered=int(data["unanswered"]),
            errors=int(data["errors"]),
        )


def summarize(records: Sequence[Record], benchmark: str, label: str) -> Summary:
    """Aggregate records into a :class:`Summary` (every breakdown counts groups, not requests)."""
    by_group: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_group[record.group].append(record)
    overall, first = Tally(), Tally()
    categories: dict[str, Tally] = defaultdict(Tally)
    levels: dict[int, Tally] = defaultdict(Tally)
    meta: dict[str, dict[str, Tally]] = defaultdict(lambda: defaultdict(Tally))
    for members in by_group.values():
        right = all(r.correct for r in members)
        head = min(members, key=lambda r: r.variant)
        overall.add(right)
        first.add(head.correct)
        if head.category:
            categories[head.category].add(right)
        if head.level is not None:
            levels[head.level].add(right)
        for key, value in head.meta.items():
            meta[key][value].add(right)
    return Summary(
        benchmark=benchmark,
        label=label,
        overall=overall,
        first_variant=first,
        categories=dict(sorted(categories.items())),
        levels=dict(sorted(levels.items())),
        meta={k: dict(sorted(v.items())) for k, v in sorted(meta.items())},
        requests=len(records),
        unanswered=sum(1 for r in records if isinstance(r.answer, int) and r.prediction is None and r.error is None),
        errors=sum(1 for r in records if r.error is not None),
    )
