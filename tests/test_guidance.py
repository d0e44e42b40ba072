"""Video guidance: the targets built from a video's known events, and the attention loss against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from hyperowl.hub import DEFAULT_MODEL
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.video import VideoClip
from hyperowl.synthetic.draw import Item
from hyperowl.synthetic.guidance import AttentionGuide, VideoGuidance, VideoGuide, video_facts
from hyperowl.synthetic.tasks import Sample
from hyperowl.synthetic.video import Event, SyntheticVideo
from hyperowl.train.config import RecipeError, TrainConfig
from hyperowl.train.data import Example, encode
from hyperowl.train.trainer import LossModule, Trainer, train
from tests.test_model import qwen2_oracle
from tests.test_train import recipe
from tests.tiny import random_model

ALL_HEADS = {"captions": True, "previous_shape": [1, 0], "question_shape": [1, 2], "answer_frames": [3, 0]}
BOX = (4, 4, 28, 28)


def after_x_sample() -> tuple[Sample, list[float]]:
    """red circle 0-2 s, empty 2-3 s, blue cross 3-4 s, green square 4-6 s; "after the red circle?"."""
    events = [
        Event(Item("red", "circle", BOX), 0.0, 2.0),
        Event(Item("blue", "cross", BOX), 3.0, 4.0),
        Event(Item("green", "square", BOX), 4.0, 6.0),
    ]
    video = SyntheticVideo(32, 6.0, 30, events)
    messages = [
        {"role": "user", "content": "<|video|>\nWhat appeared after the red circle?"},
        {"role": "assistant", "content": "blue cross"},
    ]
    times = [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    return Sample("video", messages, videos=[video], answer="blue cross", named="red circle"), times


def test_video_guidance_targets_follow_the_known_events():
    processor = Owl3Processor.from_pretrained(DEFAULT_MODEL)
    sample, times = after_x_sample()
    facts = video_facts(sample, times, seed=0)
    assert facts.frame_events == [0, 0, None, 1, 2, 2]
    assert (facts.answer_event, facts.named_event) == (1, 0)
    clip = VideoClip([sample.videos[0].frame_at(t) for t in times], times)
    guide = VideoGuide(VideoGuidance.from_dict(ALL_HEADS), processor.tokenizer, processor.image_token_id)
    plain = encode(processor, Example(sample.messages, videos=[clip]), cut_enable=False)
    item = encode(processor, Example(sample.messages, videos=[clip], facts=facts), cut_enable=False, guide=guide)

    ids = item.input_ids.tolist()
    seen = [p + 1 for p, t in enumerate(ids) if t == processor.image_token_id]  # sees frame k at distance 0
    answer = seen[-1] + next(i for i, t in enumerate(plain.labels[seen[-1]:].tolist()) if t != -100)
    targets = item.guide_targets
    # blue cross (frame 3) looks back to red circle's last frame (1); green square (4, 5) to blue cross (3)
    assert targets["previous_shape"] == [(seen[3], [seen[1]]), (seen[4], [seen[3]]), (seen[5], [seen[3]])]
    assert targets["answer_frames"] == [(answer - 1, [seen[3]]), (answer, [seen[3]])]
    (_, words), _ = targets["question_shape"]
    assert processor.tokenizer.decode([ids[i] for i in words]) == " red circle"
    assert all(q == p for (q, _), p in zip(targets["question_shape"], (answer - 1, answer)))

    captions = [processor.tokenizer.decode([int(item.labels[s + 1])]).strip() for s in seen]
    names = ["red circle", "red circle", None, "blue cross", "green square", "green square"]
    for caption, name, colour in zip(captions, names, facts.caption_colour):
        assert caption == ("no" if name is None else name.split()[0 if colour else 1])
    unchanged = torch.ones_like(item.labels, dtype=torch.bool)
    unchanged[[s + 1 for s in seen]] = False
    assert torch.equal(item.labels[unchanged], plain.labels[unchanged])


def test_first_and_last_questions_get_no_answer_targets():
    processor = Owl3Processor.from_pretrained(DEFAULT_MODEL)
    sample, times = after_x_sample()
    sample.named = ""
    clip = VideoClip([sample.videos[0].frame_at(t) for t in times], times)
    guide = VideoGuide(VideoGuidance.from_dict(ALL_HEADS), processor.tokenizer, processor.image_token_id)
    item = encode(processor, Example(sample.messages, videos=[clip], facts=video_facts(sample, times, 0)), False, guide)
    assert item.guide_targets["answer_frames"] == [] and item.guide_targets["question_shape"] == []
    assert len(item.guide_targets["previous_shape"]) == 3


def test_an_answer_no_sampled_frame_shows_gets_no_answer_target():
    processor = Owl3Processor.from_pretrained(DEFAULT_MODEL)
    sample, _ = after_x_sample()
    times = [0.5, 4.5]  # too few frames: the blue cross (3-4 s) is never sampled
    clip = VideoClip([sample.videos[0].frame_at(t) for t in times], times)
    guide = VideoGuide(VideoGuidance.from_dict(ALL_HEADS), processor.tokenizer, processor.image_token_id)
    item = encode(processor, Example(sample.messages, videos=[clip], facts=video_facts(sample, times, 0)), False, guide)
    assert item.guide_targets["answer_frames"] == []
    assert len(item.guide_targets["question_shape"]) == 2


def test_attention_target_loss_equals_transformers_attention_weights():
    model = random_model().train()
    hf = qwen2_oracle(model)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    guidance = VideoGuidance.from_dict({"answer_frames": [layers - 1, heads - 1], "previous_shape": [0, 1]})
    loss_module = LossModule(model, AttentionGuide(model, guidance))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    targets = {
        "answer_frames": (torch.tensor([0, 1, 1]), torch.tensor([11, 11, 7]), torch.zeros(3, 12, dtype=torch.bool)),
        "previous_shape": (torch.tensor([0]), torch.tensor([5]), torch.zeros(1, 12, dtype=torch.bool)),
    }
    targets["answer_frames"][2][0, [2, 9]] = True
    targets["answer_frames"][2][1, [4]] = True
    targets["answer_frames"][2][2, [3, 5, 6]] = True
    targets["previous_shape"][2][0, [0, 4]] = True
    labels = torch.full_like(ids, -100)
    with torch.no_grad():
        plain, _ = LossModule(model)(labels=labels, input_ids=ids, attention_mask=mask)
        guided, _ = loss_module(labels=labels, input_ids=ids, attention_mask=mask, guide_targets=targets)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        attn = hf(ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    expected = torch.zeros((), dtype=torch.float64)
    for role, (layer, head) in guidance.heads.items():
        rows, queries, keys = targets[role]
        for r, q, k in zip(rows, queries, keys):
            expected -= attn[layer][r, head, q][k].sum().double().log()
    assert float(plain) == 0.0
    torch.testing.assert_close(guided.double(), expected, atol=1e-4, rtol=1e-5)


def test_video_guidance_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="unknown video_guidance keys: heads"):
        VideoGuidance.from_dict({"heads": 1})
    with pytest.raises(RecipeError, match=r"video_guidance.answer_frames must be \[layer, head\]"):
        VideoGuidance.from_dict({"answer_frames": [3]})
    with pytest.raises(RecipeError, match="video_guidance needs synthetic_tasks"):
        recipe(tmp_path, synthetic_tasks=None, train_file="x.jsonl", video_guidance={"captions": True})
    with pytest.raises(RecipeError, match="video_guidance does not work with gradient_checkpointing"):
        recipe(tmp_path, gradient_checkpointing=True, video_guidance={"captions": True})
    with pytest.raises(RecipeError, match=r"video_guidance.answer_frames = \[5, 0\] is outside the model \(2 layers"):
        Trainer(recipe(tmp_path, video_guidance={"answer_frames": [5, 0]}))


def test_bundled_recipes_parse():
    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert {"default-model.yaml", "default-model-video.yaml"} <= {p.name for p in recipes}
    for path in recipes:
        data = yaml.safe_load(path.read_text())
        if not data.get("init_from") and not data.get("scratch_config"):
            data["init_from"] = "a/checkpoint"  # given on the command line
        if not data.get("train_file") and not data.get("synthetic_tasks"):
            data["train_file"] = "data.jsonl"
        cfg = TrainConfig.from_dict(data)
        if cfg.video_guidance:
            assert set(VideoGuidance.from_dict(cfg.video_guidance).heads) == {"previous_shape", "question_shape", "answer_frames"}


def test_trainer_adds_the_attention_targets_to_the_loss(tmp_path):
    heads = {"previous_shape": [0, 0], "question_shape": [1, 1], "answer_frames": [1, 0]}
    common = {"synthetic_tasks": {"video": 1}, "steps": 1, "batch_size": 4, "synthetic_video_events": [3, 4], "tokenizer_vocab_size": 512}
    plain = train(recipe(tmp_path / "plain", **common)).losses[0]
    guided = train(recipe(tmp_path / "guided", video_guidance=heads, **common)).losses[0]
    captioned = train(recipe(tmp_path / "captioned", video_guidance={"captions": True}, **common)).losses[0]
    assert guided > plain + 0.1  # same weights and batch: only the attention-target terms differ
    assert captioned != plain  # the caption labels join the token loss
