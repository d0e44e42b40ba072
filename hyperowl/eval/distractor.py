"""The distractor-resistance test of the mPLUG-Owl3 paper (SPEC §5), built from any MMBench-format file.

For each question and each level ``N`` (number of images shown), ``variants`` prompts are made: the
question's own image plus ``N - 1`` images of other questions, in a shuffled order; variant ``v``
shows the options rotated by ``v`` places and draws its own distractors. A question counts at a
level only when all its variants are right.

Images are compared by content (a hash of the decoded file): a picture shared by several questions
is one image, never a distractor for those questions. The set is drawn from a seed and saved as
JSON that refers to images by question id, so the same set can be rerun on any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from hyperowl.eval.data import DatasetError, EvalItem
from hyperowl.eval.tasks import EvalRequest, rotate_options

#: Image counts of the paper's figure.
DEFAULT_LEVELS: tuple[int, ...] = (1, 5, 10, 20, 50, 100, 200, 400)

#: Prompts per question and level.
DEFAULT_VARIANTS = 4

#: Version of the saved JSON layout.
FORMAT_VERSION = 1


@dataclass
class DistractorEntry:
    """One prompt of the test: ``images`` are question ids whose image is shown, in order (the
    target question's id exactly once); options are rotated by ``rotation``."""

    question: str
    level: int
    variant: int
    rotation: int
    images: list[str]


@dataclass
class DistractorSet:
    """A drawn distractor test, saved and reloaded as JSON.

    Attributes:
        source: the MMBench-format file it was drawn from (as given).
        fingerprint: hash of the source's question ids and image contents; checked on reuse.
        seed, levels, variants: how it was drawn (``levels`` after capping to the available images).
        entries: the prompts.
    """

    source: str
    fingerprint: str
    seed: int
    levels: list[int]
    variants: int
    entries: list[DistractorEntry] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        """Write as JSON."""
        data = {"format": FORMAT_VERSION, **asdict(self)}
        Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> DistractorSet:
        """Read a set written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DatasetError(f"distractor set not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            raise DatasetError(f"{path} is not a distractor set (format {FORMAT_VERSION})")
        entries = [DistractorEntry(**entry) for entry in data.pop("entries")]
        data.pop("format")
        return cls(**data, entries=entries)

    def requests(self, items: Sequence[EvalItem]) -> list[EvalRequest]:
        """The prompts as requests, with images and options taken from ``items`` (the source file's
        questions). Raises DatasetError when ``items`` are not the questions the set was drawn from."""
        if fingerprint(items) != self.fingerprint:
            raise DatasetError(
                f"the distractor set was drawn from another version of {self.source}: question ids or images differ"
            )
        by_id = {item.id: item for item in items}
        requests = []
        for entry in self.entries:
            item = by_id[entry.question]
            options, answer = rotate_options(item.options, int(item.answer), entry.rotation)
            sources = [by_id[ref] for ref in entry.images]
            images, keys = [s.images[0] for s in sources], [k for s in sources for k in s.image_keys[:1]]
            shown = replace(item, options=options, answer=answer, images=images, image_keys=keys)
            requests.append(
                EvalRequest(
                    id=f"{entry.question}@{entry.level}#v{entry.variant}",
                    group=f"{entry.question}@{entry.level}",
                    item=shown,
                    level=entry.level,
                    variant=entry.variant,
                )
            )
        return requests


def fingerprint(items: Sequence[EvalItem]) -> str:
    """Hash of the questions' ids and image contents, in order."""
    digest = hashlib.sha1()
    for item in items:
        digest.update(f"{item.id}:{','.join(item.image_keys)}\n".encode())
    return digest.hexdigest()


def cap_levels(levels: Sequence[int], available: int, log: Callable[[str], None]) -> list[int]:
    """Levels that fit ``available`` distinct images: the first too-large level becomes ``available``
    (when not already a level), larger ones are skipped; each change is reported through ``log``."""
    if any(level < 1 for level in levels):
        raise ValueError(f"levels must be >= 1, got {list(levels)}")
    kept: list[int] = []
    for level in sorted(set(levels)):
        if level <= available:
            kept.append(level)
        elif available not in kept:
            log(f"distractor test: level {level} needs {level} distinct images, the file has {available}: capped to {available}")
            kept.append(available)
        else:
            log(f"distractor test: level {level} needs {level} distinct images, the file has {available}: skipped")
    return kept


def build_distractor_set(
    items: Sequence[EvalItem],
    source: str,
    levels: Sequence[int] = DEFAULT_LEVELS,
    variants: int = DEFAULT_VARIANTS,
    seed: int = 0,
    max_questions: int | None = None,
    log: Callable[[str], None] = print,
) -> DistractorSet:
    """Draw a distractor test from single-image multiple-choice ``items`` (an MMBench-format file).

    Args:
        items: all questions of the file; every one's image is a candidate distractor.
        source: the file name recorded in the set.
        levels: images per prompt (capped by :func:`cap_levels`).
        variants: prompts per question and level (option rotation ``v mod #options`` and own distractors).
        seed: the draw; the same items, levels, variants and seed give the same set.
        max_questions: test only the first this-many questions (distractors still come from all).
        log: where capping messages go.
    """
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    bad = [item.id for item in items if len(item.images) != 1 or len(item.image_keys) != 1 or len(item.options) < 2]
    if bad:
        raise DatasetError(f"the distractor test needs single-image multiple-choice questions; not so: {bad[:5]}")
    representative: dict[str, str] = {}
    for item in items:
        representative.setdefault(item.image_keys[0], item.id)
    pool_keys = list(representative)
    kept_levels = cap_levels(levels, len(pool_keys), log)
    questions = list(items if max_questions is None else items[:max_questions])
    entries = []
    for item in questions:
        target_key = item.image_keys[0]
        others = [representative[key] for key in pool_keys if key != target_key]
        for level in kept_levels:
            for variant in range(variants):
                rng = random.Random(f"{seed}:{item.id}:{level}:{variant}")
                shown = [item.id, *rng.sample(others, level - 1)]
                rng.shuffle(shown)
                entries.append(DistractorEntry(item.id, level, variant, variant % len(item.options), shown))
    return DistractorSet(source, fingerprint(items), seed, kept_levels, variants, entries)
