"""hyperowl.eval: loaders, distractor test, circular scoring, answer extraction, runner, reports, CLI."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from hyperowl.eval.answers import extract_choice
from hyperowl.eval.data import (
    DatasetError,
    load_longvideobench,
    load_mmbench_tsv,
    load_multi_image_json,
    load_mvbench,
    load_videomme,
)
from hyperowl.eval.distractor import DistractorSet, build_distractor_set, cap_levels
from hyperowl.eval.report import load_summaries, write_report
from hyperowl.eval.runner import RunOptions, init_distributed, read_records, request_video, run_requests
from hyperowl.eval.scoring import score_response, summarize
from hyperowl.eval.tasks import build_requests, rotate_options
from hyperowl.processing.choices import format_question
from tests.media import SECOND_COLORS, nearest_second, write_video

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (128, 128, 128), (0, 0, 0)]


def png_base64(colour: tuple[int, int, int], size: int = 16) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_mmbench(path, count: int = 8, circular_copy: bool = False) -> None:
    """An MMBench-format TSV as pandas writes it: one colour picture per question."""
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category", "split"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for i in range(count):
            options = ["red", "green", "blue", "yellow" if i % 2 == 0 else ""]
            hint = "line one\nline\ttwo" if i == 0 else ""
            writer.writerow(
                [i, f"Question {i}?", hint, *options, "ABC"[i % 3], f"cat{i % 2}", png_base64(COLOURS[i]), "src", "l2", "dev"]
            )
        if circular_copy:
            writer.writerow(
                [1_000_000, "Question 0?", "", "green", "blue", "yellow", "red", "D", "cat0", "0", "src", "l2", "dev"]
            )


# ---------------------------------------------------------------- loaders


def test_mmbench_tsv(tmp_path):
    path = tmp_path / "mmbench.tsv"
    write_mmbench(path, count=4, circular_copy=True)
    items = load_mmbench_tsv(path)
    assert [item.id for item in items] == ["0", "1", "2", "3"]
    first = items[0]
    assert first.hint == "line one\nline\ttwo"
    assert first.options == ["red", "green", "blue", "yellow"] and first.answer == 0
    assert items[1].options == ["red", "green", "blue"] and items[1].answer == 1
    assert Image.open(io.BytesIO(first.images[0])).getpixel((0, 0)) == COLOURS[0]
    assert first.category == "cat0" and first.meta == {"l2-category": "l2"}
    with_copies = load_mmbench_tsv(path, keep_circular_copies=True)
    assert with_copies[-1].id == "1000000" and with_copies[-1].images == first.images and with_copies[-1].answer == 3


def test_mmbench_errors(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\tA\tB\tanswer\n0\tq\tx\ty\tA\n")
    with pytest.raises(DatasetError, match="missing column"):
        load_mmbench_tsv(path)
    with pytest.raises(DatasetError, match="not found"):
        load_mmbench_tsv(tmp_path / "missing.tsv")
    path.write_text(f"index\tquestion\tA\tB\tanswer\timage\n0\tq\tx\ty\tC\t{png_base64(COLOURS[0])}\n")
    with pytest.raises(DatasetError, match="answer 'C'"):
        load_mmbench_tsv(path)


def test_multi_image_json(tmp_path):
    for name in ("a.png", "b.png", "dev-7-0-img0.png", "dev-7-0-img1.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    records = [
        {
            "id": "m1",
            "question_type": "multi-choice",
            "question": "Same?",
            "images": ["a.png", "b.png"],
            "options": ["(A) yes", "(B) no"],
            "answer": "B",
            "category": "compare",
        },
        {"id": "m2", "question_type": "short-answer", "question": "Colour?", "images": ["a.png"], "options": [], "answer": "red"},
        {"identifier": "dev-7-0-1", "sentence": "There are two dogs.", "label": "True"},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    mantis, short, nlvr2 = load_multi_image_json(tmp_path / "data.json")
    assert mantis.options == ["yes", "no"] and mantis.answer == 1 and len(mantis.images) == 2 and mantis.category == "compare"
    assert short.options == [] and short.answer == "red"
    assert nlvr2.images == [str(tmp_path / "dev-7-0-img0.png"), str(tmp_path / "dev-7-0-img1.png")]
    assert nlvr2.answer == 0 and nlvr2.question.count("<|image|>") == 2
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q", "images": ["nope.png"], "answer": "A"}]))
    with pytest.raises(DatasetError, match="not found"):
        load_multi_image_json(tmp_path / "bad.json")


def test_longvideobench(tmp_path):
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "v1.mp4", seconds=3, fps=4, codec="mpeg4")
    record = {
        "id": "86CxyhFV9MI_0",
        "video_id": "86CxyhFV9MI",
        "video_path": "v1.mp4",
        "question": "What colour?",
        "candidates": ["red", "green", "blue"],
        "correct_choice": 2,
        "duration_group": 15,
        "question_category": "S2E",
        "duration": 3.0,
        "level": "L1-Perception",
    }
    (tmp_path / "lvb_val.json").write_text(json.dumps([record]))
    (item,) = load_longvideobench(tmp_path / "lvb_val.json")
    assert item.id == "86CxyhFV9MI_0" and item.answer == 2 and item.category == "S2E"
    assert item.video == str(tmp_path / "videos" / "v1.mp4") and item.meta["duration_group"] == "15"


def test_videomme_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "videomme").mkdir()
    (tmp_path / "data").mkdir()
    write_video(tmp_path / "data" / "fFjv93ACGo8.mp4", seconds=2, fps=4, codec="mpeg4")
    rows = {
        "video_id": ["001"],
        "duration": ["short"],
        "domain": ["Knowledge"],
        "sub_category": ["Humanity & History"],
        "url": ["https://www.youtube.com/watch?v=fFjv93ACGo8"],
        "videoID": ["fFjv93ACGo8"],
        "question_id": ["001-1"],
        "task_type": ["Counting Problem"],
        "question": ["How many?"],
        "options": [["A. 1.", "B. 2.", "C. 3.", "D. 4."]],
        "answer": ["C"],
    }
    pq.write_table(pa.table(rows), tmp_path / "videomme" / "test-00000-of-00001.parquet")
    (item,) = load_videomme(tmp_path / "videomme" / "test-00000-of-00001.parquet")
    assert item.id == "001-1" and item.options == ["1.", "2.", "3.", "4."] and item.answer == 2
    assert item.category == "Counting Problem" and item.meta["duration"] == "short"
    assert item.video == str(tmp_path / "data" / "fFjv93ACGo8.mp4")


def test_mvbench_video_window_and_frames(tmp_path):
    charades = tmp_path / "video" / "star" / "Charades_v1_480"
    charades.mkdir(parents=True)
    write_video(charades / "ABC12.mp4", seconds=6, fps=4, codec="mpeg4")
    frames = tmp_path / "video" / "tvqa" / "frames_fps3_hq" / "clip1"
    frames.mkdir(parents=True)
    for i in range(9):  # 3 s at 3 fps: second k has colour k
        Image.new("RGB", (16, 16), SECOND_COLORS[i // 3]).save(frames / f"{i:05d}.jpg")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "action_sequence.json").write_text(
        json.dumps(
            [
                {
                    "video": "ABC12.mp4",
                    "question": "What happened?",
                    "candidates": ["x", "y"],
                    "answer": "y",
                    "start": 2.0,
                    "end": 4.0,
                }
            ]
        )
    )
    (tmp_path / "json" / "episodic_reasoning.json").write_text(
        json.dumps(
            [{"video": "clip1", "question": "Who?", "candidates": ["a", "b", "c"], "answer": "a", "start": 1.0, "end": 2.9}]
        )
    )
    items = load_mvbench(tmp_path / "json")
    by_task = {item.category: item for item in items}
    action, episodic = by_task["Action Sequence"], by_task["Episodic Reasoning"]
    assert action.answer == 1 and action.video_window == (2.0, 4.0)
    assert episodic.frame_rate == 3.0 and episodic.video == str(frames)
    (request,) = build_requests([action], circular=False)
    clip = request_video(request, fps=1.0, max_frames=8)
    assert [nearest_second(frame) for frame in clip.frames] == [2, 3, 4]
    (request,) = build_requests([episodic], circular=False)
    clip = request_video(request, fps=3.0, max_frames=2)
    assert len(clip) == 2 and {nearest_second(frame) for frame in clip.frames} <= {1, 2}


def test_make_synthetic_files_load(tmp_path):
    from hyperowl.synthetic.benchmark_files import write_synthetic_benchmarks

    files = write_synthetic_benchmarks(tmp_path, questions=6, multi_image=2, videos=1)
    mmbench = load_mmbench_tsv(files.mmbench)
    assert len(mmbench) == 6 and all(len(item.options) == 4 for item in mmbench)
    assert {item.category for item in mmbench} >= {"digit", "count"}
    assert len(load_multi_image_json(files.multi_image)) == 2
    (video,) = load_longvideobench(files.longvideobench)
    assert len(video.options) == 4 and video.options[video.answer]


# ---------------------------------------------------------------- distractor test


def test_distractor_set(tmp_path, capsys):
    path = tmp_path / "mmbench.tsv"
    write_mmbench(path, count=8)
    items = load_mmbench_tsv(path)
    key_of = {item.id: item.image_keys[0] for item in items}
    drawn = build_distractor_set(items, str(path), levels=[1, 3, 5, 20], variants=4, seed=3)
    assert drawn.levels == [1, 3, 5, 8]
    assert "level 20" in capsys.readouterr().out
    for level in drawn.levels:
        entries = [e for e in drawn.entries if e.level == level]
        assert len(entries) == len(items) * 4 and all(len(e.images) == level for e in entries)
    for entry in drawn.entries:
        assert entry.images.count(entry.question) == 1
        target_key = key_of[entry.question]
        assert [key_of[ref] for ref in entry.images].count(target_key) == 1
    requests = drawn.requests(items)
    by_id = {item.id: item for item in items}
    for request, entry in zip(requests, drawn.entries):
        item = by_id[entry.question]
        assert request.item.options[request.item.answer] == item.options[item.answer]
        assert (
            request.item.options
            == item.options[entry.variant % len(item.options) :] + item.options[: entry.variant % len(item.options)]
        )
        assert request.item.images.count(item.images[0]) == 1 and len(request.item.images) == entry.level
    distractors = {tuple(e.images) for e in drawn.entries if e.level == 5 and e.question == "0"}
    assert len(distractors) == 4
    again = build_distractor_set(items, str(path), levels=[1, 3, 5, 20], variants=4, seed=3, log=lambda m: None)
    assert again == drawn
    other = build_distractor_set(items, str(path), levels=[1, 3, 5, 20], variants=4, seed=4, log=lambda m: None)
    assert other.entries != drawn.entries
    drawn.save(tmp_path / "set.json")
    assert DistractorSet.load(tmp_path / "set.json") == drawn
    with pytest.raises(DatasetError, match="another version"):
        drawn.requests(items[:-1])


def test_distractor_skips_duplicate_pictures(tmp_path):
    path = tmp_path / "mmbench.tsv"
    write_mmbench(path, count=4)
    items = load_mmbench_tsv(path)
    items[1].images, items[1].image_keys = items[0].images, items[0].image_keys  # questions 0 and 1 share a picture
    drawn = build_distractor_set(items, "x", levels=[3], variants=2, seed=0)
    for entry in drawn.entries:
        if entry.question in ("0", "1"):
            other = "1" if entry.question == "0" else "0"
            assert other not in entry.images and entry.images.count(entry.question) == 1
    assert cap_levels([1, 5, 10, 20], 7, log=lambda m: None) == [1, 5, 7]


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("B", 1),
        ("b", 1),
        ("B.", 1),
        ("(B)", 1),
        ("B) green", 1),
        ("b. green", 1),
        ("**C**", 2),
        ("The answer is (B)", 1),
        ("The answer is B.", 1),
        ("answer: c", 2),
        ("The correct option is C because", 2),
        ("green", 1),
        ("Green.", 1),
        ("It is a blue one.", 2),
        ("I think D is right", 3),
        ("A", 0),
        ("the answer is a red square", 0),
        ("A red square", 0),
        ("", None),
        ("E", None),
        ("none of them", None),
        ("A or B", None),
        ("blue or green", None),
    ],
)
def test_extract_choice(response, expected):
    assert extract_choice(response, ["red square", "green", "blue", "yellow"]) == expected


def test_format_question():
    text = format_question("Which?", ["x", "y"], hint="look")
    assert text.splitlines() == [
        "Hint: look",
        "Question: Which?",
        "Options:",
        "A. x",
        "B. y",
        "Answer with the option's letter from the given choices directly.",
    ]


def test_circular_scoring(tmp_path):
    path = tmp_path / "mmbench.tsv"
    write_mmbench(path, count=2)
    items = load_mmbench_tsv(path)
    requests = build_requests(items, circular=True)
    assert len(requests) == 4 + 3
    for request in requests:
        item = items[int(request.group)]
        assert request.item.options[request.item.answer] == item.options[item.answer]
    assert rotate_options(["a", "b", "c"], 0, 1) == (["b", "c", "a"], 2)
    # question 0: every rotation right; question 1: all but the last rotation right
    records = [score_response(r, r.item.options[r.item.answer]) for r in requests[:-1]]
    records.append(score_response(requests[-1], "nonsense"))
    summary = summarize(records, "mmbench", "test")
    assert (summary.overall.correct, summary.overall.total) == (1, 2)
    assert summary.first_variant.correct == 2 and summary.unanswered == 1
    assert summary.categories["cat0"].accuracy == 1.0 and summary.categories["cat1"].accuracy == 0.0
    plain = build_requests(items, circular=False)
    assert [r.item.options for r in plain] == [item.options for item in items]


def test_report(tmp_path):
    path = tmp_path / "mmbench.tsv"
    write_mmbench(path, count=4)
    items = load_mmbench_tsv(path)
    requests = build_distractor_set(items, "x", levels=[1, 2, 4], variants=2, seed=0).requests(items)
    records = [score_response(r, "A" if r.level == 1 else "B") for r in requests]
    summaries = [summarize(records, "distractor", "model-a"), summarize(records[::-1], "distractor", "model-b")]
    written = write_report(summaries, tmp_path / "report")
    assert {p.name for p in written} == {"report.md", "summary.json", "distractor.png", "categories.png"}
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| images | model-a | model-b |" in text and "| 4 |" in text
    assert load_summaries([tmp_path / "report"]) == summaries


# ---------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    from hyperowl.engine.generate import Owl3ForCausalLM
    from hyperowl.processing.processor import Owl3Processor

    return Owl3ForCausalLM.from_pretrained(tiny_checkpoint, dtype="float32"), Owl3Processor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def mmbench_items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-data")
    write_mmbench(folder / "mmbench.tsv", count=4)
    return load_mmbench_tsv(folder / "mmbench.tsv")


@pytest.fixture(scope="module")
def mixed_requests(mmbench_items):
    """Circular MMBench requests plus two-level distractor requests (single- and multi-image batches)."""
    items = mmbench_items
    distractor = build_distractor_set(items[:2], "x", levels=[1, 3], variants=2, seed=0).requests(items[:2])
    return build_requests(items[:2], circular=True)[:5] + distractor


OPTIONS = RunOptions(batch_size=3, max_new_tokens=3, progress=False)


def test_run_and_resume(tiny_model, mixed_requests, tmp_path):
    model, processor = tiny_model
    calls = []
    first = run_requests(model, processor, mixed_requests[:5], tmp_path, OPTIONS, on_batch=calls.append)
    assert [r.id for r in first] == [r.id for r in mixed_requests[:5]] and sum(map(len, calls)) == 5
    with open(tmp_path / "predictions.jsonl", "a") as fh:
        fh.write('{"id": "trunc')  # a run killed mid-write
    calls.clear()
    records = run_requests(model, processor, mixed_requests, tmp_path, OPTIONS, on_batch=calls.append)
    assert sum(map(len, calls)) == len(mixed_requests) - 5
    assert [r.id for r in records] == [r.id for r in mixed_requests]
    assert records[:5] == first
    assert all(isinstance(r.response, str) and r.error is None for r in records)
    assert set(read_records(tmp_path)) == {r.id for r in mixed_requests}
    assert not list(tmp_path.glob("predictions.rank*"))
    calls.clear()
    assert run_requests(model, processor, mixed_requests, tmp_path, OPTIONS, on_batch=calls.append) == records
    assert calls == []


def test_bad_media_is_recorded(tiny_model, mmbench_items, tmp_path):
    model, processor = tiny_model
    requests = build_requests(mmbench_items[:3], circular=False)
    requests[0].item.images = [b"not an image"]
    records = run_requests(model, processor, requests, tmp_path, OPTIONS)
    assert "MediaError" in records[0].error and not records[0].correct
    assert all(r.error is None for r in records[1:])


def _shard_worker(rank: int, world_size: int, port: int, checkpoint: str, requests, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from hyperowl.engine.generate import Owl3ForCausalLM
    from hyperowl.processing.processor import Owl3Processor

    dist = init_distributed()
    model = Owl3ForCausalLM.from_pretrained(checkpoint, dtype="float32")
    run_requests(model, Owl3Processor.from_pretrained(checkpoint), requests, out, OPTIONS, dist)
    torch.distributed.destroy_process_group()


def test_sharded_run_equals_single(tiny_checkpoint, tiny_model, mixed_requests, tmp_path):
    model, processor = tiny_model
    single = run_requests(model, processor, mixed_requests, tmp_path / "single", OPTIONS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the loaded modules (spawn would import torch again in each, slow on small CI machines)
    args = (2, port, str(tiny_checkpoint), mixed_requests, str(tmp_path / "sharded"))
    mp.start_processes(_shard_worker, args=args, nprocs=2, start_method="fork")
    sharded = read_records(tmp_path / "sharded")
    assert not list((tmp_path / "sharded").glob("predictions.rank*"))
    assert [sharded[r.id] for r in mixed_requests] == single
    lines = (tmp_path / "sharded" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r.id for r in mixed_requests]


def test_cli_end_to_end(tiny_checkpoint, tmp_path):
    from hyperowl.cli import main

    write_mmbench(tmp_path / "mmbench.tsv", count=5)
    common = ["--model", str(tiny_checkpoint), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "2", "--no-progress"]

    def run_distractor(limit: int) -> int:
        args = ["eval", "run", "distractor", "--data", str(tmp_path / "mmbench.tsv"), "--out", str(tmp_path / "d")]
        return main([*args, "--levels", "1,3", "--variants", "2", "--limit", str(limit), *common])

    assert run_distractor(limit=2) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["levels"].keys() == {"1", "3"} and summary["levels"]["3"]["total"] == 2
    assert (tmp_path / "d" / "distractor_set.json").is_file() and (tmp_path / "d" / "distractor.png").is_file()
    assert run_distractor(limit=3) == 2
    assert (
        main(["eval", "report", str(tmp_path / "d"), str(tmp_path / "d"), "--labels", "x,y", "--out", str(tmp_path / "r")]) == 0
    )
    assert "| images | x | y |" in (tmp_path / "r" / "report.md").read_text()


def test_a_half_written_shard_line_is_cut_before_appending(tiny_model, mixed_requests, tmp_path):
    model, processor = tiny_model
    first = run_requests(model, processor, mixed_requests[:3], tmp_path, OPTIONS)
    whole = (tmp_path / "predictions.jsonl").read_text()
    (tmp_path / "predictions.jsonl").unlink()
    # a rank killed while writing its fourth line: three complete records and half of the next
    (tmp_path / "predictions.rank0.jsonl").write_text(whole + whole.splitlines()[0][:25])
    records = run_requests(model, processor, mixed_requests[:6], tmp_path, OPTIONS)
    assert [r.id for r in records] == [r.id for r in mixed_requests[:6]] and records[:3] == first
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r.id for r in mixed_requests[:6]]


def test_merge_fails_loudly_unless_every_request_has_one_record(tiny_model, mixed_requests, tmp_path):
    from hyperowl.eval.runner import PredictionsError, merge_shards

    model, processor = tiny_model
    records = run_requests(model, processor, mixed_requests[:3], tmp_path, OPTIONS)
    with pytest.raises(PredictionsError, match=rf"1 of 4 requests have no record \(first: \['{mixed_requests[3].id}'\]\)"):
        merge_shards(tmp_path, mixed_requests[:4])
    other = {**records[0].to_json(), "response": "something else"}
    (tmp_path / "predictions.rank1.jsonl").write_text(json.dumps(other) + "\n")
    with pytest.raises(PredictionsError, match="1 have differing records"):
        merge_shards(tmp_path, mixed_requests[:3])
    assert (tmp_path / "predictions.rank1.jsonl").is_file()  # kept for a look
    (tmp_path / "predictions.rank1.jsonl").write_text(json.dumps(records[0].to_json()) + "\n")  # an identical copy is fine
    assert merge_shards(tmp_path, mixed_requests[:3]) == records


class ForeignModel:
    """hyperowl's model behind another class, as the runner sees a model that is not hyperowl's (the LLaVA
    baseline): it gets every pixel in one tensor."""

    def __init__(self, model) -> None:
        self.model = model
        self.device, self.dtype = model.device, model.dtype

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)


def test_video_requests_stream_to_hyperowl_with_the_same_records(tiny_model, tmp_path, monkeypatch):
    """Batches of video questions: hyperowl's model gets the frames streamed (decoded in the stream's
    background thread while it encodes them), another model one tensor; the records are the same."""
    import threading

    from hyperowl.processing.video import VideoPlan
    from hyperowl.synthetic.benchmark_files import write_synthetic_benchmarks

    model, processor = tiny_model
    files = write_synthetic_benchmarks(tmp_path / "data", questions=1, multi_image=1, videos=4)
    requests = build_requests(load_longvideobench(files.longvideobench), circular=False)
    decoded_in: list[str] = []
    chunks = VideoPlan.chunks

    def recorded(plan, *args, **kwargs):
        decoded_in.append(threading.current_thread().name)
        return chunks(plan, *args, **kwargs)

    monkeypatch.setattr(VideoPlan, "chunks", recorded)
    options = RunOptions(batch_size=3, max_new_tokens=3, max_frames=4, progress=False)
    streamed = run_requests(model, processor, requests, tmp_path / "streamed", options)
    assert decoded_in == ["hyperowl-prefetch"] * 4
    decoded_in.clear()
    whole = run_requests(ForeignModel(model), processor, requests, tmp_path / "whole", options)
    assert decoded_in == ["MainThread"] * 4
    assert len(streamed) == 4 and all(r.error is None for r in streamed)
    assert streamed == whole
