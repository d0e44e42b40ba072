"""hyperowl as an lmms-eval model: registration, the prompt it builds, likelihoods against a plain forward, and whole
`python -m lmms_eval` runs (the `hyperowl` model, and lmms-eval's OpenAI-compatible model against `hyperowl serve`)
on local tasks over the benchmark files of `hyperowl eval make-synthetic`, checked answer by answer and score by score
against `hyperowl eval run` on the same questions (nothing is downloaded).

lmms-eval 0.7.3 turns every loglikelihood result into a string before scoring (`unwrap_generation_output`), so its
`multiple_choice` tasks fail for every model; the likelihoods are checked here without its scoring.

Needs the `lmms` extra (`pip install -e ".[lmms]"`). Skipped without lmms-eval, unless HYPEROWL_TEST_LMMS=1 (CI's
lmms-eval step), where a missing or broken lmms-eval fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if os.environ.get("HYPEROWL_TEST_LMMS") == "1":
    import lmms_eval  # noqa: F401
else:
    pytest.importorskip("lmms_eval")

import hyperowl
from hyperowl import Owl3ForCausalLM, Owl3Processor
from hyperowl.errors import PromptError
from hyperowl.eval import load_benchmark
from hyperowl.eval.answers import extract_choice
from hyperowl.integrations.lmms_eval import Hyperowl, user_message
from hyperowl.processing.choices import format_question
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.synthetic.benchmark_files import write_synthetic_benchmarks

REPO = Path(__file__).resolve().parents[1]
BUNDLED = Path(hyperowl.__file__).parent / "assets" / "default-model"
TASK_DIR = Path(__file__).parent / "lmms_eval_task"
#: Conversations per generate call, on both sides (hyperowl eval's --batch-size, lmms-eval's --batch_size).
BATCH = 4


def test_hyperowl_is_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    assert get_model("hyperowl") is Hyperowl


def test_user_message_places_visuals_like_the_official_prompt():
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    assert user_message("What colour?", [image])[0]["content"] == f"{IMAGE_TOKEN}\nWhat colour?"
    assert user_message("Q", ["a.mp4"])[0]["content"] == f"{VIDEO_TOKEN}\nQ"
    message, images, videos = user_message("<image> 1\n<image> 2\nWhich?", [image, image])
    assert message["content"] == f"{IMAGE_TOKEN} 1\n{IMAGE_TOKEN} 2\nWhich?" and len(images) == 2 and videos == []
    assert user_message("text only", [])[0]["content"] == "text only"
    with pytest.raises(PromptError, match="1 <image> and 0 <video> placeholders for 2 images and 0 videos"):
        user_message("<image> Which?", [image, image])


@dataclass
class Benchmark:
    """One synthetic benchmark file: `hyperowl eval`'s name for it, the file, the lmms-eval task over the same
    questions and that task's docs."""

    name: str
    data: Path
    task: str
    docs: list[dict]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, list[Benchmark]]:
    """`hyperowl eval make-synthetic`'s three files (8 single-picture, 4 two-picture, 4 video questions; the
    two-picture ones made interleaved, `Picture 1: <|image|>` ...) in a folder, and the local tasks' docs for the same
    questions in its `lmms_data/` (pictures as PNG files, lmms-eval's `<image>` placeholders)."""
    root = tmp_path_factory.mktemp("lmms")
    files = write_synthetic_benchmarks(root / "bench", questions=8, multi_image=4, videos=4)
    records = json.loads(files.multi_image.read_text())
    for record in records:
        record["question"] = f"Picture 1: {IMAGE_TOKEN}\nPicture 2: {IMAGE_TOKEN}\n{record['question']}"
    files.multi_image.write_text(json.dumps(records))
    data = root / "lmms_data"
    data.mkdir()
    benchmarks = []
    for name, path, task in (
        ("mmbench", files.mmbench, "mmbench"),
        ("multi-image", files.multi_image, "multi_image"),
        ("longvideobench", files.longvideobench, "video"),
    ):
        docs = []
        for i, item in enumerate(load_benchmark(name, path)):
            images = []
            for k, image in enumerate(item.images):
                if isinstance(image, bytes):  # MMBench: base64 PNG in the TSV
                    images.append(str(data / f"{task}-{i}-{k}.png"))
                    Path(images[-1]).write_bytes(image)
                else:
                    images.append(image)
            docs.append(
                {"id": item.id, "question": item.question.replace(IMAGE_TOKEN, "<image>"), "hint": item.hint}
                | {"options": item.options, "answer": item.answer, "images": images, "video": item.video}
            )
        (data / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        benchmarks.append(Benchmark(name, path, f"hyperowl_synthetic_{task}", docs))
    for task_file in TASK_DIR.iterdir():
        if task_file.is_file():
            shutil.copy(task_file, root / task_file.name)
    return root, benchmarks


def run_command(command: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def hyperowl_eval(bench) -> dict[str, tuple[float, list[str]]]:
    """`hyperowl eval run` on each benchmark file (published option order): its accuracy and its answers in
    question order, by benchmark."""
    root, benchmarks = bench
    scores = {}
    for b in benchmarks:
        out = root / "runs" / b.name
        command = [sys.executable, "-m", "hyperowl.cli", "eval", "run", b.name, "--data", str(b.data), "--out", str(out)]
        command += ["--model", str(BUNDLED), "--no-circular", "--batch-size", str(BATCH), "--device", "cpu", "--no-progress"]
        run = run_command(command, root)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())  # one run: one summary
        records = {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
        assert summary["errors"] == 0 and len(records) == len(b.docs)
        scores[b.name] = (summary["overall"]["accuracy"], [records[d["id"]]["response"] for d in b.docs])
    return scores


def run_lmms_eval(root: Path, model: str, model_args: str, tasks: list[str], *extra: str) -> dict[str, tuple[float, list[str]]]:
    """`python -m lmms_eval` on local tasks in `root`: each task's accuracy and its answers in doc order."""
    out = root / f"out-{model}"
    command = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, *extra]
    command += ["--tasks", ",".join(tasks), "--include_path", str(root), "--output_path", str(out), "--log_samples"]
    run = run_command(command, root, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OPENAI_API_KEY="unused")
    written = list(out.rglob("*_results.json"))  # lmms-eval exits 0 after errors too
    assert run.returncode == 0 and len(written) == 1, run.stderr[-3000:]
    results = json.loads(written[0].read_text())["results"]
    scores = {}
    for task in tasks:
        (path,) = out.rglob(f"*_samples_{task}.jsonl")
        samples = {s["doc_id"]: s for s in map(json.loads, path.read_text().splitlines())}
        scores[task] = (results[task]["accuracy,none"], [samples[i]["filtered_resps"] for i in sorted(samples)])
    return scores


def test_lmms_eval_scores_equal_hyperowl_eval(bench, hyperowl_eval):
    """Single pictures (cut into tiles), two interleaved pictures and videos, batched: every answer and every score of
    `python -m lmms_eval --model hyperowl` equals `hyperowl eval run`'s on the same questions."""
    root, benchmarks = bench
    args = f"pretrained={BUNDLED},device=cpu"
    scores = run_lmms_eval(root, "hyperowl", args, [b.task for b in benchmarks], "--batch_size", str(BATCH))
    for b in benchmarks:
        (accuracy, answers), (expected_accuracy, expected) = scores[b.task], hyperowl_eval[b.name]
        assert answers == expected and accuracy == pytest.approx(expected_accuracy), b.name
        assert len(set(expected)) > 1  # the answers differ from question to question: the comparison can tell
    assert 0 < hyperowl_eval["mmbench"][0] < 1  # and the score counts both right and wrong answers


def served_answer(model: Owl3ForCausalLM, processor: Owl3Processor, doc: dict) -> str:
    """hyperowl's own greedy answer to the request lmms-eval's OpenAI-compatible model sends for `doc`: the pictures
    or the video, then the prompt text, as content parts (`hyperowl serve` joins parts without a separator and cuts
    every picture into tiles)."""
    media = [{"type": "video"}] if doc["video"] else [{"type": "image"}] * len(doc["images"])
    content = media + [{"type": "text", "text": format_question(doc["question"], doc["options"], doc["hint"])}]
    videos = [doc["video"]] if doc["video"] else None
    batch = processor([{"role": "user", "content": content}], images=doc["images"] or None, videos=videos)
    output = model.generate(**batch, max_new_tokens=16, stop_token_ids=processor.stop_token_ids)
    return processor.decode(output.sequences[0, : output.num_generated[0]].tolist(), skip_special_tokens=True).strip()


def test_lmms_eval_openai_backend_against_hyperowl_serve(bench):
    """lmms-eval's own OpenAI-compatible model against `hyperowl serve` (videos as file URLs, `pass_video_url`, read
    by the server from its `--media-dir`): every answer equals hyperowl's own answer to the request it sends, and
    every score the score of those answers. That model sends the visuals before the text (no interleaving), so the
    interleaved two-picture task is left out."""
    from tests.server import free_port, wait_ready

    root, benchmarks = bench
    benchmarks = [b for b in benchmarks if b.name != "multi-image"]
    port = free_port()
    command = [sys.executable, "-m", "hyperowl.cli", "serve", "--model", str(BUNDLED), "--port", str(port)]
    command += ["--media-dir", str(root), "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        args = f"model_version=default-model,base_url=http://127.0.0.1:{port}/v1,num_concurrent=2,pass_video_url=True"
        scores = run_lmms_eval(root, "openai", args, [b.task for b in benchmarks])
    finally:
        server.terminate()
        server.wait(30)
    model = Owl3ForCausalLM.from_pretrained(BUNDLED)
    processor = Owl3Processor.from_pretrained(BUNDLED)
    for b in benchmarks:
        expected = [served_answer(model, processor, doc) for doc in b.docs]
        right = [extract_choice(answer, doc["options"]) == doc["answer"] for answer, doc in zip(expected, b.docs)]
        assert scores[b.task] == (pytest.approx(sum(right) / len(right)), expected), b.name


def test_continuation_loss_equals_a_plain_forward_over_the_whole_answer(bench):
    doc = bench[1][0].docs[0]
    adapter = Hyperowl(pretrained=str(BUNDLED), device="cpu")
    model, processor = adapter.model, adapter.processor
    for choice in doc["options"]:
        batch = processor(
            [{"role": "user", "content": f"{IMAGE_TOKEN}\n{doc['question']}"}, {"role": "assistant", "content": choice}],
            images=doc["images"],
            cut_enable=True,
            return_labels=True,
        )
        with torch.inference_mode():
            logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "media_offset", "pixel_values")}).logits
        n = len(processor.tokenizer.encode(choice, add_special_tokens=False))
        positions = (batch["labels"][0] != -100).nonzero()[:n, 0]  # the answer's tokens (then <|im_end|>, <|endoftext|>)
        logprobs = logits[0, positions - 1].log_softmax(-1).gather(1, batch["input_ids"][0, positions, None])
        loss, greedy = adapter.continuation_loss(doc["question"], choice, [doc_image(doc)])
        assert loss == pytest.approx(float(-logprobs.sum()), rel=1e-5, abs=1e-5)
        assert greedy == bool((logits[0, positions - 1].argmax(-1) == batch["input_ids"][0, positions]).all())


def doc_image(doc: dict):
    from PIL import Image

    return Image.open(doc["images"][0]).convert("RGB")
