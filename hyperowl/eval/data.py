"""Loaders for local copies of the benchmarks, in the formats their authors publish.

Every loader returns a list of :class:`EvalItem`; nothing is downloaded.

- MMBench TSV (``mmbench_dev_en_20231003.tsv``, ``MMBench_DEV_EN.tsv``): columns ``index``,
  ``question``, ``hint``, ``A``-``D`` (more letters if present; empty cells are absent options),
  ``answer`` (a letter), ``image`` (base64), ``category``, ``l2-category``, ``split``, ``source``.
  VLMEvalKit's files carry circular copies of each question at ``index + k * 1_000_000``; they are
  dropped (:func:`load_mmbench_tsv` rotates the options itself).
- Multi-image JSON / JSONL: Mantis-Eval style records (``id``, ``question``, ``images``,
  ``options``, ``answer`` as a letter or the option text, ``question_type``, ``category``) or
  NLVR2 records (``identifier``, ``sentence``, ``label`` "True"/"False"; images
  ``{identifier minus its last field}-img0.png`` / ``-img1.png``, searched in the image root and
  its ``directory`` subfolder).
- LongVideoBench ``lvb_val.json``: ``id``, ``video_path`` (under ``videos/``), ``question``,
  ``candidates``, ``correct_choice`` (index), ``duration_group``, ``question_category``.
- Video-MME parquet (``videomme/test-00000-of-00001.parquet``): ``question_id``, ``videoID``
  (file ``{videoID}.mp4`` under ``data/`` or ``video/``), ``question``, ``options``
  (``"A. ..."`` strings), ``answer`` (a letter), ``duration``, ``domain``, ``task_type``.
  Needs ``pyarrow``.
- MVBench: the ``json/`` folder of task files (``video``, ``question``, ``candidates``,
  ``answer`` as the option text, ``start``/``end`` for some tasks), videos under ``video/`` in the
  official per-task subfolders (:data:`MVBENCH_TASKS`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperowl.errors import HyperowlError

#: Index offset VLMEvalKit uses for the circular copies of an MMBench question.
MMBENCH_CIRCULAR_OFFSET = 1_000_000

#: File extensions searched for a video named only by id.
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")

#: Image files that make up a frame folder.
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetError(HyperowlError, ValueError):
    """A benchmark file is missing, malformed, or refers to media that are not there."""


@dataclass
class EvalItem:
    """One benchmark question.

    Attributes:
        id: unique question id (string form of the benchmark's own id).
        question: question text.
        options: option texts in published order; empty for open questions.
        answer: index of the correct option, or the expected text for open questions.
        images: image sources (file paths, or encoded bytes for MMBench), in prompt order.
        video: a video file or a folder of frame images, or None.
        video_window: ``(start, end)`` seconds of the video the question is about, or None (whole video).
        frame_rate: recording rate of a frame folder (frames per second); None for files.
        hint: context shown before the question (MMBench ``hint``).
        category: main breakdown key (MMBench ``category``, MVBench task, ...).
        meta: further breakdown keys (``l2-category``, ``duration``, ``task_type``, ...).
        image_keys: for MMBench, a content hash per image (equal hashes = the same picture).
    """

    id: str
    question: str
    options: list[str]
    answer: int | str
    images: list[str | bytes] = field(default_factory=list)
    video: str | None = None
    video_window: tuple[float, float] | None = None
    frame_rate: float | None = None
    hint: str = ""
    category: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    image_keys: list[str] = field(default_factory=list)


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON list, a JSON object with one list value, or JSON Lines."""
    if not path.is_file():
        raise DatasetError(f"benchmark file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} is neither JSON nor JSON Lines: {exc}") from exc
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DatasetError(f"{path}: expected a list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DatasetError(f"{path}: expected a list of JSON objects")
    return data


def _require(record: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")


def _cell(value: Any) -> str:
    """A text cell: None and pandas' written NaN become ''."""
    if value is None:
        return ""
    text = str(value).strip()
    return "" if text.lower() == "nan" else text


def load_mmbench_tsv(path: str | Path, keep_circular_copies: bool = False) -> list[EvalItem]:
    """Load an MMBench-format TSV (base64 images).

    Args:
        path: the ``.tsv`` file.
        keep_circular_copies: keep VLMEvalKit's pre-rotated copies (``index >= 1_000_000``).

    Raises:
        DatasetError: missing file or columns, bad base64, an answer that is not an option letter.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"MMBench TSV not found: {path}")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as fh:
        # pandas-written files quote cells holding tabs, quotes or line breaks (hints often do)
        reader = csv.DictReader(fh, delimiter="\t")
        columns = reader.fieldnames or []
        missing = [c for c in ("index", "question", "A", "B", "image") if c not in columns]
        if missing:
            raise DatasetError(f"{path}: not an MMBench TSV, missing column(s) {', '.join(missing)}")
        rows = list(enumerate(reader, start=2))
    letters = [c for c in columns if len(c) == 1 and c.isupper()]
    numbers = []
    for line, row in rows:
        index = _cell(row["index"])
        try:
            numbers.append(int(float(index)))
        except ValueError as exc:
            raise DatasetError(f"{path}:{line}: index {index!r} is not a number") from exc
    # VLMEvalKit stores a repeated picture once: a short 'image' cell is the index of the row holding it.
    encoded_by_index = {str(n): _cell(row["image"]) for n, (_, row) in zip(numbers, rows)}
    items = []
    for number, (line, row) in zip(numbers, rows):
        where = f"{path}:{line}"
        if number >= MMBENCH_CIRCULAR_OFFSET and not keep_circular_copies:
            continue
        options, option_letters = [], []
        for letter in letters:
            text = _cell(row.get(letter))
            if text:
                options.append(text)
                option_letters.append(letter)
        answer_letter = _cell(row.get("answer")).upper()
        if not answer_letter:
            raise DatasetError(f"{where}: no answer (MMBench test files hide the answers; use a dev file)")
        if answer_letter not in option_letters:
            raise DatasetError(f"{where}: answer {answer_letter!r} is not one of the options {option_letters}")
        encoded = _cell(row["image"])
        if len(encoded) <= 64:
            if encoded not in encoded_by_index or len(encoded_by_index[encoded]) <= 64:
                raise DatasetError(f"{where}: image refers to row index {encoded!r}, which holds no image")
            encoded = encoded_by_index[encoded]
        try:
            image = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DatasetError(f"{where}: column 'image' is not base64 ({exc})") from exc
        meta = {"l2-category": _cell(row["l2-category"])} if _cell(row.get("l2-category")) else {}
        items.append(
            EvalItem(
                id=str(number),
                question=_cell(row["question"]),
                options=options,
                answer=option_letters.index(answer_letter),
                images=[image],
                hint=_cell(row.get("hint")),
                category=_cell(row.get("category")),
                meta=meta,
                image_keys=[hashlib.sha1(image).hexdigest()],
            )
        )
    return _checked(items, path)


def _answer_index(answer: Any, options: list[str], where: str) -> int:
    """An answer given as an index, a letter or an option's text -> option index."""
    if isinstance(answer, bool):
        raise DatasetError(f"{where}: answer {answer!r} is not an option")
    if isinstance(answer, int):
        if 0 <= answer < len(options):
            return answer
        raise DatasetError(f"{where}: answer index {answer} out of range for {len(options)} options")
    text = _cell(answer)
    letter = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
    if letter and 0 <= (i := ord(letter.group(1).upper()) - ord("A")) < len(options):
        return i
    for i, option in enumerate(options):
        if option.strip() == text:
            return i
    raise DatasetError(f"{where}: answer {answer!r} is neither an option letter nor an option text")


_LABEL_PREFIX = re.compile(r"^\(?[A-Z][.):]\s*")


def _strip_label(option: str) -> str:
    """``"A. cat"`` / ``"(A) cat"`` -> ``"cat"``."""
    return _LABEL_PREFIX.sub("", option.strip(), count=1)


def _resolve(root: Path, name: str, where: str) -> str:
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.exists():
        raise DatasetError(f"{where}: media file not found: {path}")
    return str(path)


def _nlvr2_images(record: dict[str, Any], root: Path, where: str) -> list[str]:
    stem = "-".join(str(record["identifier"]).split("-")[:-1])
    folders = [root] + ([root / str(record["directory"])] if "directory" in record else [])
    paths = []
    for k in (0, 1):
        found = [f / f"{stem}-img{k}.png" for f in folders if (f / f"{stem}-img{k}.png").is_file()]
        if not found:
            raise DatasetError(f"{where}: image {stem}-img{k}.png not found in {', '.join(map(str, folders))}")
        paths.append(str(found[0]))
    return paths


def load_multi_image_json(path: str | Path, image_root: str | Path | None = None) -> list[EvalItem]:
    """Load multi-image questions (Mantis-Eval style records or NLVR2 records).

    Args:
        path: JSON list / JSON Lines file.
        image_root: folder relative image paths are under (default: the file's folder).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    items = []
    for n, record in enumerate(_read_json_records(path)):
        where = f"{path} record {n}"
        if "sentence" in record and "label" in record:
            _require(record, ("identifier",), where)
            images = (
                [_resolve(root, str(p), where) for p in record["images"]]
                if "images" in record
                else _nlvr2_images(record, root, where)
            )
            label = _cell(record["label"]).lower()
            if label not in ("true", "false"):
                raise DatasetError(f"{where}: label {record['label']!r} is not True/False")
            question = (
                f"The first image is <|image|>, the second image is <|image|>. Is this statement true? {record['sentence']}"
            )
            items.append(
                EvalItem(
                    id=str(record["identifier"]),
                    question=question,
                    options=["yes", "no"],
                    answer=0 if label == "true" else 1,
                    images=images,
                    category="nlvr2",
                )
            )
            continue
        _require(record, ("question", "images", "answer"), where)
        images = [_resolve(root, str(p), where) for p in record["images"]]
        options = [_strip_label(str(o)) for o in record.get("options") or []]
        is_open = record.get("question_type") == "short-answer" or not options
        answer: int | str = _cell(record["answer"]) if is_open else _answer_index(record["answer"], options, where)
        items.append(
            EvalItem(
                id=str(record.get("id", n)),
                question=str(record["question"]),
                options=[] if is_open else options,
                answer=answer,
                images=images,
                category=_cell(record.get("category") or record.get("data_source")),
            )
        )
    return _checked(items, path)


def _find_video(folders: list[Path], name: str, where: str) -> str:
    """A video file (named with or without extension) or frame folder, in the first folder that has it."""
    candidates = [name] if Path(name).suffix else [name, *(name + ext for ext in VIDEO_EXTENSIONS)]
    for folder in folders:
        for candidate in candidates:
            if (folder / candidate).exists():
                return str(folder / candidate)
    raise DatasetError(f"{where}: video {name} not found in {', '.join(map(str, folders))}")


def load_longvideobench(path: str | Path, video_root: str | Path | None = None) -> list[EvalItem]:
    """Load LongVideoBench ``lvb_val.json`` (videos under ``video_root``, default ``<file dir>/videos``)."""
    path = Path(path)
    root = Path(video_root) if video_root is not None else path.parent / "videos"
    items = []
    for n, record in enumerate(_read_json_records(path)):
        where = f"{path} record {n}"
        _require(record, ("video_path", "question", "candidates", "correct_choice"), where)
        options = [str(c) for c in record["candidates"]]
        meta = {k: _cell(record.get(k)) for k in ("duration_group", "level", "topic_category") if _cell(record.get(k))}
        items.append(
            EvalItem(
                id=str(record.get("id", n)),
                question=str(record["question"]),
                options=options,
                answer=_answer_index(int(record["correct_choice"]), options, where),
                video=_find_video([root, path.parent], str(record["video_path"]), where),
                category=_cell(record.get("question_category")),
                meta=meta,
            )
        )
    return _checked(items, path)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DatasetError("reading Video-MME's parquet file needs pyarrow: pip install pyarrow") from exc
    if not path.is_file():
        raise DatasetError(f"benchmark file not found: {path}")
    return pq.read_table(path).to_pylist()


def load_videomme(path: str | Path, video_root: str | Path | None = None) -> list[EvalItem]:
    """Load Video-MME (parquet, or the same records as JSON); videos ``{videoID}.mp4``.

    ``video_root`` defaults to searching ``data/`` and ``video/`` next to the parquet's folder.
    """
    path = Path(path)
    records = _read_parquet(path) if path.suffix == ".parquet" else _read_json_records(path)
    base = path.parent.parent if path.parent.name == "videomme" else path.parent
    folders = [Path(video_root)] if video_root is not None else [base / "data", base / "video", base / "videos", base]
    items = []
    for n, record in enumerate(records):
        where = f"{path} record {n}"
        _require(record, ("videoID", "question", "options", "answer"), where)
        options = [_strip_label(str(o)) for o in record["options"]]
        meta = {k: _cell(record.get(k)) for k in ("duration", "domain", "sub_category") if _cell(record.get(k))}
        items.append(
            EvalItem(
                id=str(record.get("question_id", n)),
                question=str(record["question"]),
                options=options,
                answer=_answer_index(record["answer"], options, where),
                video=_find_video(folders, str(record["videoID"]), where),
                category=_cell(record.get("task_type")),
                meta=meta,
            )
        )
    return _checked(items, path)


@dataclass(frozen=True)
class MVBenchTask:
    """One MVBench task: its JSON file, video subfolder, whether videos are frame folders, and whether
    questions carry a ``start``/``end`` window."""

    name: str
    json_file: str
    video_folder: str
    frames: bool
    bound: bool


#: The 20 official MVBench tasks (the table of the official evaluation notebook).
MVBENCH_TASKS: tuple[MVBenchTask, ...] = (
    MVBenchTask("Action Sequence", "action_sequence.json", "star/Charades_v1_480", False, True),
    MVBenchTask("Action Prediction", "action_prediction.json", "star/Charades_v1_480", False, True),
    MVBenchTask("Action Antonym", "action_antonym.json", "ssv2_video", False, False),
    MVBenchTask("Fine-grained Action", "fine_grained_action.json", "Moments_in_Time_Raw/videos", False, False),
    MVBenchTask("Unexpected Action", "unexpected_action.json", "FunQA_test/test", False, False),
    MVBenchTask("Object Existence", "object_existence.json", "clevrer/video_validation", False, False),
    MVBenchTask("Object Interaction", "object_interaction.json", "star/Charades_v1_480", False, True),
    MVBenchTask("Object Shuffle", "object_shuffle.json", "perception/videos", False, False),
    MVBenchTask("Moving Direction", "moving_direction.json", "clevrer/video_validation", False, False),
    MVBenchTask("Action Localization", "action_localization.json", "sta/sta_video", False, True),
    MVBenchTask("Scene Transition", "scene_transition.json", "scene_qa/video", False, False),
    MVBenchTask("Action Count", "action_count.json", "perception/videos", False, False),
    MVBenchTask("Moving Count", "moving_count.json", "clevrer/video_validation", False, False),
    MVBenchTask("Moving Attribute", "moving_attribute.json", "clevrer/video_validation", False, False),
    MVBenchTask("State Change", "state_change.json", "perception/videos", False, False),
    MVBenchTask("Fine-grained Pose", "fine_grained_pose.json", "nturgbd", False, False),
    MVBenchTask("Character Order", "character_order.json", "perception/videos", False, False),
    MVBenchTask("Egocentric Navigation", "egocentric_navigation.json", "vlnqa", False, False),
    MVBenchTask("Episodic Reasoning", "episodic_reasoning.json", "tvqa/frames_fps3_hq", True, True),
    MVBenchTask("Counterfactual Inference", "counterfactual_inference.json", "clevrer/video_validation", False, False),
)

#: Frame rate of MVBench's frame folders (tvqa ``frames_fps3_hq``).
MVBENCH_FRAME_RATE = 3.0


def load_mvbench(path: str | Path, video_root: str | Path | None = None) -> list[EvalItem]:
    """Load MVBench: ``path`` is the ``json/`` folder (all task files present are read) or one task file.

    Videos are looked up in ``video_root/<task folder>/`` (default ``<path's parent>/video``), then
    directly in ``video_root``. A task file with an unknown name is read as a plain video task.
    """
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"no MVBench task files (*.json) in {path}")
    json_dir = path if path.is_dir() else path.parent
    root = Path(video_root) if video_root is not None else json_dir.parent / "video"
    tasks = {task.json_file: task for task in MVBENCH_TASKS}
    items = []
    for file in files:
        task = tasks.get(file.name, MVBenchTask(file.stem.replace("_", " "), file.name, "", False, True))
        folders = [root / task.video_folder, root] if task.video_folder else [root]
        for n, record in enumerate(_read_json_records(file)):
            where = f"{file} record {n}"
            _require(record, ("video", "question", "candidates", "answer"), where)
            options = [str(c) for c in record["candidates"]]
            window = None
            if task.bound and "start" in record and "end" in record:
                window = (float(record["start"]), float(record["end"]))
            items.append(
                EvalItem(
                    id=f"{file.stem}/{n}",
                    question=str(record["question"]),
                    options=options,
                    answer=_answer_index(record["answer"], options, where),
                    video=_find_video(folders, str(record["video"]), where),
                    video_window=window,
                    frame_rate=MVBENCH_FRAME_RATE if task.frames else None,
                    category=task.name,
                )
            )
    return _checked(items, path)


def _checked(items: list[EvalItem], path: Path) -> list[EvalItem]:
    if not items:
        raise DatasetError(f"{path}: no questions")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"{path}: question id {duplicate!r} appears more than once")
    return items


#: Benchmark name -> loader ``(path, media_root) -> items``.
LOADERS: dict[str, Callable[[Path, Path | None], list[EvalItem]]] = {
    "mmbench": lambda path, _root: load_mmbench_tsv(path),
    "multi-image": load_multi_image_json,
    "longvideobench": load_longvideobench,
    "videomme": load_videomme,
    "mvbench": load_mvbench,
}


def load_benchmark(name: str, path: str | Path, media_root: str | Path | None = None) -> list[EvalItem]:
    """Load benchmark ``name`` (a key of :data:`LOADERS`) from ``path``."""
    if name not in LOADERS:
        raise DatasetError(f"unknown benchmark {name!r}; choose from {', '.join(LOADERS)}")
    return LOADERS[name](Path(path), Path(media_root) if media_root is not None else None)
