"""hyperowl as an lmms-eval model: registration, the prompt it builds, likelihoods against a plain forward, and a
whole `python -m lmms_eval` run of a local task over locally written synthetic questions (no download).

lmms-eval 0.7.3 turns every loglikelihood result into a string before scoring (`unwrap_generation_output`), so its
`multiple_choice` tasks fail for every model; the likelihoods are checked here without its scoring.

Needs the `lmms` extra (`pip install -e ".[lmms]"`); skipped without it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

import hyperowl
from hyperowl import Owl3ForCausalLM, Owl3Processor
from hyperowl.errors import PromptError
from hyperowl.integrations.lmms_eval import Hyperowl, user_message
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN
from hyperowl.synthetic.accuracy import HELD_OUT_SEED
from hyperowl.synthetic.tasks import make_sample, sample_options

REPO = Path(__file__).resolve().parents[1]
BUNDLED = Path(hyperowl.__file__).parent / "assets" / "default-model"
TASK_DIR = Path(__file__).parent / "lmms_eval_task"


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


def write_docs(out: Path, n: int, tasks: tuple[str, ...] = ("single", "video")) -> list[dict]:
    """`n` held-out synthetic questions of each of `tasks` as lmms-eval docs (`out/lmms_data/docs.jsonl`)."""
    data = out / "lmms_data"
    data.mkdir(parents=True)
    docs = []
    for task in tasks:
        for i in range(n):
            sample = make_sample(task, HELD_OUT_SEED, i)
            choices, label = sample_options(random.Random(i), sample)
            doc = {"question": sample.question.replace(IMAGE_TOKEN, "<image>").replace(VIDEO_TOKEN, "<video>")}
            doc.update(image=None, video=None, answer=sample.answer, choices=choices, label=label)
            if sample.images:
                doc["image"] = str(data / f"{task}-{i}.png")
                sample.images[0].save(doc["image"])
            else:
                doc["video"] = str(data / f"{task}-{i}.mp4")
                sample.videos[0].write_mp4(doc["video"])
            docs.append(doc)
    (data / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def reference_answer(model: Owl3ForCausalLM, processor: Owl3Processor, doc: dict) -> str:
    """What hyperowl's own generation answers (the `hyperowl eval` path: processor batch, greedy generate, decode)."""
    content = doc["question"].replace("<image>", IMAGE_TOKEN).replace("<video>", VIDEO_TOKEN)
    batch = processor(
        [{"role": "user", "content": content}],
        images=[doc["image"]] if doc["image"] else None,
        videos=[doc["video"]] if doc["video"] else None,
        cut_enable=doc["image"] is not None,
    )
    out = model.generate(**batch, max_new_tokens=8, stop_token_ids=processor.stop_token_ids)
    return processor.decode(out.sequences[0, : out.num_generated[0]].tolist(), skip_special_tokens=True).split("\n")[0].strip()


def doc_image(doc: dict):
    from PIL import Image

    return Image.open(doc["image"]).convert("RGB")


def test_continuation_loss_equals_a_plain_forward_over_the_whole_answer(tmp_path):
    doc = write_docs(tmp_path, 1)[0]
    adapter = Hyperowl(pretrained=str(BUNDLED), device="cpu")
    model, processor = adapter.model, adapter.processor
    content = doc["question"].replace("<image>", IMAGE_TOKEN)
    for choice in doc["choices"]:
        batch = processor(
            [{"role": "user", "content": content}, {"role": "assistant", "content": choice}],
            images=[doc["image"]],
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


def run_lmms_eval(folder: Path, model: str, model_args: str, *extra: str) -> tuple[dict, list[str]]:
    """`python -m lmms_eval` on the local task in `folder` (docs already written there): the task's results and
    the answers in doc order."""
    for name in ("utils.py", "hyperowl_synthetic_gen.yaml"):
        shutil.copy(TASK_DIR / name, folder / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "unused"}
    command = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, *extra]
    command += ["--tasks", "hyperowl_synthetic_gen", "--include_path", str(folder)]
    command += ["--output_path", str(folder / "out"), "--log_samples"]
    run = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900, check=False)
    written = list((folder / "out").rglob("*_results.json"))  # lmms-eval exits 0 after errors too
    assert run.returncode == 0 and len(written) == 1, run.stderr[-3000:]
    samples = {}
    for path in (folder / "out").rglob("*_samples_hyperowl_synthetic_gen.jsonl"):
        samples.update({json.loads(line)["doc_id"]: json.loads(line) for line in path.read_text().splitlines()})
    return json.loads(written[0].read_text())["results"]["hyperowl_synthetic_gen"], [samples[i]["filtered_resps"] for i in sorted(samples)]


def test_lmms_eval_run_on_local_tasks_equals_hyperowl(tmp_path):
    docs = write_docs(tmp_path, 4)
    results, answers = run_lmms_eval(tmp_path, "hyperowl", f"pretrained={BUNDLED},device=cpu", "--batch_size", "3")
    model = Owl3ForCausalLM.from_pretrained(BUNDLED)
    processor = Owl3Processor.from_pretrained(BUNDLED)
    expected = [reference_answer(model, processor, doc) for doc in docs]
    assert answers == expected
    right = sum(answer == doc["answer"] for answer, doc in zip(expected, docs)) / len(docs)
    assert results["exact_match,none"] == pytest.approx(right)
    assert right >= 0.5  # the bundled model: single pictures 1.00, video order 0.86 held out


def test_lmms_eval_openai_backend_against_hyperowl_serve(tmp_path):
    """lmms-eval's own OpenAI-compatible model against `hyperowl serve` (pictures only: that backend reads videos
    with decord, which lmms-eval does not install)."""
    from tests.server import free_port, wait_ready

    docs = write_docs(tmp_path, 4, tasks=("single",))
    port = free_port()
    command = [sys.executable, "-m", "hyperowl.cli", "serve", "--model", str(BUNDLED), "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_ready(f"http://127.0.0.1:{port}", server)
        results, answers = run_lmms_eval(
            tmp_path, "openai", f"model_version=default-model,base_url=http://127.0.0.1:{port}/v1,num_concurrent=2"
        )
    finally:
        server.terminate()
        server.wait(30)
    model = Owl3ForCausalLM.from_pretrained(BUNDLED)
    processor = Owl3Processor.from_pretrained(BUNDLED)
    assert answers == [reference_answer(model, processor, doc) for doc in docs]
    assert results["exact_match,none"] == pytest.approx(sum(a == d["answer"] for a, d in zip(answers, docs)) / len(docs))
