"""Benchmark files in the published formats, built from the synthetic tasks (`hyperowl eval make-synthetic`).

They let the whole evaluation pipeline run anywhere, without downloading a benchmark:

- ``mmbench_synthetic.tsv``: MMBench-format single-image questions from the ``single``, ``digit``
  and ``count`` tasks (base64 PNG images); the correct answer plus 3 other answers of the same kind
  as options A-D. Also the source of the distractor test.
- ``multi_image/multi_image.json`` (+ PNGs): Mantis-Eval-style two-picture yes/no questions from
  the ``compare`` task.
- ``longvideobench/lvb_val.json`` (+ ``videos/*.mp4``): LongVideoBench-format questions from the
  ``video`` task; the wrong candidates are preferably other shapes of the same video.

Samples come from the synthetic held-out seed by default, so models trained on the synthetic
tasks are tested on pictures they never saw.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from hyperowl.processing.choices import option_letter
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.synthetic.accuracy import HELD_OUT_SEED
from hyperowl.synthetic.tasks import TaskOptions, answer_space, make_sample, sample_options

#: Single-picture tasks turned into MMBench questions.
MMBENCH_TASKS = ("single", "digit", "count")

#: MMBench TSV columns written (the published files' names).
MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image", "split")


@dataclass
class SyntheticFiles:
    """Paths of the written benchmark files."""

    mmbench: Path
    multi_image: Path
    longvideobench: Path


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_mmbench(path: Path, count: int, seed: int, opts: TaskOptions) -> Path:
    """``count`` MMBench-format questions, cycling through :data:`MMBENCH_TASKS`."""
    rng = random.Random(f"mmbench:{seed}")
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(MMBENCH_COLUMNS)
        for index in range(count):
            sample = make_sample(MMBENCH_TASKS[index % len(MMBENCH_TASKS)], seed, index // len(MMBENCH_TASKS), opts)
            category, _ = answer_space(sample)
            options, answer = sample_options(rng, sample)
            question = sample.question.replace(IMAGE_TOKEN, "").strip()
            l2 = "counting" if category in ("count", "digit") else "attribute"
            writer.writerow(
                [index, question, "", *options, option_letter(answer), category, l2, _png_base64(sample.images[0]), "dev"]
            )
    return path


def write_multi_image(folder: Path, count: int, seed: int, opts: TaskOptions) -> Path:
    """``count`` two-picture yes/no questions (Mantis-Eval-style JSON) from the ``compare`` task."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        sample = make_sample("compare", seed, index, opts)
        names = []
        for k, image in enumerate(sample.images):
            names.append(f"images/compare-{index}-{k}.png")
            image.save(folder / names[-1])
        question = sample.question.replace("Picture 1: ", "").replace("Picture 2: ", "")
        question = question.replace(IMAGE_TOKEN, "").strip()
        records.append(
            {
                "id": f"compare-{index}",
                "question_type": "multi-choice",
                "question": question,
                "images": names,
                "options": ["yes", "no"],
                "answer": "A" if sample.answer == "yes" else "B",
                "category": "colour" if "colour" in question else "shape",
            }
        )
    path = folder / "multi_image.json"
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return path


def write_video_mc(folder: Path, count: int, seed: int, opts: TaskOptions) -> Path:
    """``count`` LongVideoBench-format questions (``lvb_val.json`` + mp4) from the ``video`` task."""
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"video:{seed}")
    records = []
    for index in range(count):
        sample = make_sample("video", seed, index, opts)
        video = sample.videos[0]
        name = f"video-{index}.mp4"
        video.write_mp4(folder / "videos" / name)
        options, answer = sample_options(rng, sample)
        question = sample.question.replace(VIDEO_TOKEN, "").strip()
        kind, _ = answer_space(sample)
        records.append(
            {
                "id": f"video-{index}",
                "video_id": f"video-{index}",
                "video_path": name,
                "duration": video.duration,
                "duration_group": 15,
                "question": question,
                "candidates": options,
                "correct_choice": answer,
                "question_category": kind,
            }
        )
    path = folder / "lvb_val.json"
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return path


def write_synthetic_benchmarks(
    out_dir: str | Path,
    questions: int = 300,
    multi_image: int = 100,
    videos: int = 60,
    seed: int = HELD_OUT_SEED,
    opts: TaskOptions | None = None,
) -> SyntheticFiles:
    """Write the three synthetic benchmark files under ``out_dir`` (see the module docstring)."""
    if min(questions, multi_image, videos) < 1:
        raise ValueError("questions, multi_image and videos must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = opts or TaskOptions()
    return SyntheticFiles(
        mmbench=write_mmbench(out_dir / "mmbench_synthetic.tsv", questions, seed, opts),
        multi_image=write_multi_image(out_dir / "multi_image", multi_image, seed, opts),
        longvideobench=write_video_mc(out_dir / "longvideobench", videos, seed, opts),
    )
