"""The token-concatenation baseline: trained on a recipe, loaded by `hyperowl eval`, greedy answers exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperowl.baselines import LlavaBaseline, expand_image_tokens, is_llava_checkpoint, train_baseline
from hyperowl.eval.data import load_mmbench_tsv
from hyperowl.eval.tasks import build_messages, build_requests
from hyperowl.processing.processor import Owl3Processor
from hyperowl.train.config import TrainConfig
from tests.test_eval import write_mmbench

SCRATCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "hyper_layers": [1],
           "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "image_size": 16, "patch_size": 8}}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("baseline")
    cfg = TrainConfig.from_dict({
        "output_dir": str(out), "scratch_config": SCRATCH, "tokenizer_vocab_size": 300,
        "synthetic_tasks": {"single": 1, "compare": 1}, "policy": "full", "train_vision": True, "steps": 12, "batch_size": 4,
        "lr": 3e-3, "warmup_steps": 1, "seed": 0, "progress": False, "num_threads": 1, "length_groups": 2,
    })
    return out, train_baseline(cfg, out, progress=False)


def test_expand_image_tokens_repeats_placeholders_and_repads():
    ids = torch.tensor([[0, 0, 5, 7, 6], [5, 7, 7, 6, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, -100, -100, -100, 6], [-100, -100, -100, -100, 6]])
    new_ids, new_mask, new_labels = expand_image_tokens(ids, mask, labels, image_token_id=7, tokens_per_image=3, pad_id=0)
    assert new_ids.tolist() == [[0, 0, 0, 0, 5, 7, 7, 7, 6], [5, 7, 7, 7, 7, 7, 7, 6, 6]]
    assert new_mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1], [1] * 9]
    assert new_labels.tolist() == [[-100] * 8 + [6], [-100] * 8 + [6]]
    assert expand_image_tokens(ids, mask, None, 7, 1, 0)[0] is ids


def test_baseline_trains_and_saves_a_llava_checkpoint(baseline):
    out, losses = baseline
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert is_llava_checkpoint(out) and json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # log_every 10: steps 10 and 12


def test_baseline_generate_equals_a_full_recompute_greedy_loop(baseline):
    out, _ = baseline
    model, processor = LlavaBaseline(out), Owl3Processor.from_pretrained(out)
    images = [[Image.new("RGB", (20, 24), "red")], [Image.new("RGB", (16, 16), c) for c in ("blue", "white")]]
    conversations = [[{"role": "user", "content": "<|image|>\nWhat colour is the shape?"}],
                     [{"role": "user", "content": "Picture 1: <|image|>\nPicture 2: <|image|>\nSame colour?"}]]
    batch = processor(conversations, images=images, cut_enable=False)
    result = model.generate(**batch, max_new_tokens=5, stop_token_ids=processor.stop_token_ids)
    for b in range(2):  # one row at a time, no cache, no padding
        row = processor([conversations[b]], images=[images[b]], cut_enable=False)
        ids, _, _ = expand_image_tokens(row["input_ids"], row["attention_mask"], None, processor.image_token_id, 4, 0)
        expected = []
        for _ in range(5):
            with torch.no_grad():
                logits = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=row["pixel_values"]).logits
            token = int(logits[0, -1].argmax())
            expected.append(token)
            if token in processor.stop_token_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
        assert result.num_generated[b] == len(expected)
        assert result.sequences[b, : len(expected)].tolist() == expected


def test_baseline_answers_text_only_prompts(baseline):
    """A batch without pictures (e.g. the synthetic repeat task) equals the LLM's own greedy answer."""
    out, _ = baseline
    model, processor = LlavaBaseline(out), Owl3Processor.from_pretrained(out)
    batch = processor([[{"role": "user", "content": "Repeat: red circle"}]])
    assert batch["pixel_values"] is None
    result = model.generate(**batch, max_new_tokens=3, stop_token_ids=processor.stop_token_ids)
    ids = batch["input_ids"]
    with torch.no_grad():
        first = int(model.model(input_ids=ids).logits[0, -1].argmax())
    assert result.sequences[0, 0].item() == first


def test_eval_cli_scores_the_baseline(baseline, tmp_path):
    from hyperowl.cli import main

    out, _ = baseline
    write_mmbench(tmp_path / "mmbench.tsv", count=3)
    args = ["eval", "run", "mmbench", "--data", str(tmp_path / "mmbench.tsv"), "--out", str(tmp_path / "run"),
            "--model", str(out), "--device", "cpu", "--max-new-tokens", "2", "--no-progress", "--label", "llava"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["label"] == "llava" and summary["overall"]["total"] == 3
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert summary["requests"] == len(predictions) > 3 and summary["errors"] == 0  # every option rotation answered
    # each answer is the baseline's own greedy answer to that prompt (a 12-step model may answer blank)
    model, processor = LlavaBaseline(out), Owl3Processor.from_pretrained(out)
    requests = {r.id: r for r in build_requests(load_mmbench_tsv(tmp_path / "mmbench.tsv"), circular=True)}
    for prediction in predictions:
        request = requests[prediction["id"]]
        batch = processor([build_messages(request)], images=[request.item.images], cut_enable=True)
        result = model.generate(**batch, max_new_tokens=2, stop_token_ids=processor.stop_token_ids)
        tokens = result.sequences[0, : result.num_generated[0]].tolist()
        assert prediction["response"] == processor.decode(tokens, skip_special_tokens=True).strip()


def test_synthetic_eval_scores_the_baseline(baseline, capsys):
    from hyperowl.synthetic.__main__ import main

    out, _ = baseline
    assert main(["eval", "--model", str(out), "--n", "4", "--tasks", "single", "compare", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"].keys() == {"single", "compare"} and result["accuracy_cut"].keys() == {"single"}
    assert all(0 <= value <= 1 for value in result["accuracy"].values())
