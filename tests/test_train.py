"""Training: label masks, loss going down, resume, LoRA merge, 2 processes = 1 process, bad rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.model.decoder import apply_rotary, rotary_cos_sin
from hyperowl.processing.processor import IGNORE_INDEX, Owl3Processor
from hyperowl.train.config import RecipeError, TrainConfig
from hyperowl.train.data import DataError, Example, JsonlDataset, collate, encode, length_groups
from hyperowl.train.policy import build_from_scratch
from hyperowl.train.trainer import Trainer, make_dataset, train

SCRATCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "hyper_layers": [1],
           "vision_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}}


def recipe(tmp_path: Path, **overrides) -> TrainConfig:
    base = {
        "output_dir": str(tmp_path / "run"), "scratch_config": SCRATCH, "tokenizer_vocab_size": 300,
        "synthetic_tasks": {"single": 1, "compare": 1}, "policy": "full", "train_vision": True,
        "steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "seed": 0, "progress": False, "num_threads": 1,
    }
    return TrainConfig.from_dict({**base, **overrides})


def test_labels_cover_exactly_the_assistant_answers(tiny_checkpoint):
    processor = Owl3Processor.from_pretrained(tiny_checkpoint)
    messages = [
        {"role": "user", "content": "<|image|>\nWhat colour is the square?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Which picture shows a circle?"},
        {"role": "assistant", "content": "Picture 3"},
    ]
    item = encode(processor, Example(messages, [Image.new("RGB", (32, 32), "red")]), cut_enable=False)
    ids, labels = item.input_ids.tolist(), item.labels.tolist()
    spans, current = [], []
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            assert label == ids[i]
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    texts = [processor.decode([ids[i] for i in span]) for span in spans]
    assert texts == ["red<|im_end|><|endoftext|>", "Picture 3<|im_end|><|endoftext|>"]
    for span in spans:  # each span starts right after "<|im_start|>assistant\n"
        assert processor.decode(ids[: span[0]]).endswith("<|im_start|>assistant\n")


def test_collate_matches_the_processor_batch(tiny_checkpoint):
    processor = Owl3Processor.from_pretrained(tiny_checkpoint)
    convs = [
        [{"role": "user", "content": "<|image|><|image|> same?"}, {"role": "assistant", "content": "yes"}],
        [{"role": "user", "content": "<|image|> colour?"}, {"role": "assistant", "content": "red"}],
    ]
    images = [[Image.new("RGB", (32, 32), c) for c in ("red", "blue")], [Image.new("RGB", (32, 32), "green")]]
    ours = collate([encode(processor, Example(c, i), False) for c, i in zip(convs, images)], processor.pad_token_id)
    theirs = processor(convs, images=images, cut_enable=False, add_generation_prompt=False, return_labels=True)
    for key in ("input_ids", "attention_mask", "labels", "media_offset", "pixel_values"):
        assert torch.equal(ours[key], theirs[key]), key


def test_loss_decreases(tmp_path):
    result = train(recipe(tmp_path, steps=25, synthetic_tasks={"single": 1}))
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:3]) / 3 - 1.0
    checkpoint = result.checkpoint
    assert (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "trainer_state.pt").is_file()
    Owl3ForCausalLM.from_pretrained(checkpoint)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 25 and "tokens_per_s" in lines[-1]


def test_resume_continues_the_same_loss_curve(tmp_path):
    straight = train(recipe(tmp_path / "a", steps=6)).losses
    first = train(recipe(tmp_path / "b", steps=6, save_every=3))
    assert first.losses == straight
    resumed = train(recipe(tmp_path / "b", steps=6, resume=str(tmp_path / "b" / "run" / "checkpoint-3"))).losses
    assert resumed == pytest.approx(straight[3:], abs=1e-6)


def test_length_groups_cut_sorted_runs_with_least_padding():
    lengths = [30, 120, 28, 110, 31, 25]
    runs = length_groups(lengths, 2)
    assert runs == [[5, 2, 0, 4], [3, 1]]  # 4 x 31 + 2 x 120 padded tokens instead of 6 x 120
    assert length_groups(lengths, 1) == [[5, 2, 0, 4, 3, 1]]
    assert sorted(i for run in length_groups(lengths, 10) for i in run) == list(range(6))
    assert length_groups([7, 7, 7], 3) == [[0], [1], [2]]  # always as many groups (same count on every process)


def test_length_groups_give_the_same_losses(tmp_path):
    tasks = {"single": 1, "distractor": 1}
    one = train(recipe(tmp_path / "a", steps=3, synthetic_tasks=tasks, synthetic_distractors=[4, 6])).losses
    grouped = train(recipe(tmp_path / "b", steps=3, synthetic_tasks=tasks, synthetic_distractors=[4, 6], length_groups=3)).losses
    assert grouped == pytest.approx(one, abs=1e-5)


def test_synthetic_warmup_stage_comes_first(tmp_path):
    cfg = recipe(tmp_path, synthetic_tasks={"distractor": 1}, synthetic_warmup_tasks={"single": 1}, synthetic_warmup_steps=2,
                 batch_size=3, grad_accum=2, synthetic_distractors=[2, 3])
    dataset = make_dataset(cfg, 16, world_size=2)  # 2 steps x 3 x 2 micro-batches x 2 processes = 24 samples
    assert all(len(dataset[i].images) == 1 for i in range(24))
    assert all(len(dataset[i].images) in (2, 3) for i in range(24, 30))  # distractor samples from then on
    with pytest.raises(RecipeError, match="synthetic_warmup_tasks needs synthetic_tasks"):
        recipe(tmp_path, synthetic_tasks=None, train_file="x.jsonl", synthetic_warmup_tasks={"single": 1})


def latest_image_attention(model: Owl3ForCausalLM) -> torch.Tensor:
    """Cross-attention weight, per head, of a random text token at position 20 on the last of 4 random
    images whose MI-Rope positions are 5, 10, 15 and 20, in the first hyper layer."""
    layer, config = model.language_model.model.hyper_layers[0], model.config
    attn, d = layer.self_attn, config.head_dim
    generator = torch.Generator().manual_seed(0)
    text, images = (layer.input_layernorm(torch.randn(1, n, config.hidden_size, generator=generator)) for n in (1, 4))
    q = attn.q_proj(text).view(1, 1, attn.num_heads, d).transpose(1, 2)
    q = apply_rotary(q, *rotary_cos_sin(torch.tensor([[20]]), d, config.rope_theta, q.dtype))
    keys, _ = attn.visual_kv(images, *rotary_cos_sin(torch.tensor([[5, 10, 15, 20]]), d, config.rope_theta, q.dtype))
    keys = keys.repeat_interleave(attn.num_heads // attn.num_kv_heads, 1)
    return (q @ keys.transpose(-1, -2) / d**0.5).softmax(-1)[0, :, 0, -1]


@torch.no_grad()
def test_recency_prior_starts_cross_attention_on_the_latest_image(tmp_path):
    plain, _ = build_from_scratch(recipe(tmp_path))
    primed, _ = build_from_scratch(recipe(tmp_path, recency_prior=4.0))
    assert latest_image_attention(plain).max() < 0.4  # about uniform over the 4 images
    assert latest_image_attention(primed).min() > 0.95
    assert torch.equal(plain.language_model.model.layers[0].self_attn.k_proj.weight,
                       primed.language_model.model.layers[0].self_attn.k_proj.weight)  # only the two biases differ


def test_hyper_policy_trains_projector_and_hyper_modules(tiny_checkpoint, tmp_path):
    trainer = Trainer(recipe(tmp_path, init_from=str(tiny_checkpoint), scratch_config={}, policy="hyper", train_vision=False))
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("vision2text_model.") or ".v_kv_proj." in n or ".gate_proj.0." in n for n in names)
    assert any(".v_kv_proj." in n for n in names) and any("gate_proj.0" in n for n in names)


def test_lora_merged_checkpoint_equals_adapted_model(tiny_checkpoint, tmp_path):
    cfg = recipe(tmp_path, init_from=str(tiny_checkpoint), scratch_config={}, policy="lora", lr=2e-2, steps=4, lora_r=4)
    trainer = Trainer(cfg)
    result = trainer.train()
    lora = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().max() > 0 for p in lora)
    merged = Owl3ForCausalLM.from_pretrained(result.checkpoint)
    processor = Owl3Processor.from_pretrained(result.checkpoint)
    batch = processor([{"role": "user", "content": "<|image|> what colour?"}], images=[Image.new("RGB", (32, 32), "red")], cut_enable=False)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.model(**batch).logits, merged(**batch).logits, atol=1e-5)
    base = Owl3ForCausalLM.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, merged(**batch).logits, atol=1e-4)


def test_two_processes_give_the_same_losses_as_one(tmp_path):
    common = ["--scratch_config", json.dumps(SCRATCH), "--tokenizer_vocab_size", "300", "--synthetic_tasks", '{"single": 1, "compare": 1}',
              "--policy", "full", "--train_vision", "true", "--steps", "4", "--lr", "3e-3", "--progress", "false", "--num_threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "hyperowl.train.cli", *common, "--batch_size", "4", "--output_dir", str(one), "--log_every", "1"],
                   check=True, env=env, capture_output=True)
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hyperowl.train.cli",
                    *common, "--batch_size", "2", "--output_dir", str(two), "--log_every", "1"], check=True, env=env, capture_output=True)
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], abs=1e-5)


def write_rows(tmp_path: Path) -> Path:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = {"messages": [{"role": "user", "content": "<|image|> colour?"}, {"role": "assistant", "content": "red"}], "images": ["ok.png"]}
    rows = [
        json.dumps(good),
        json.dumps({**good, "images": ["missing.png"]}),
        json.dumps({**good, "images": []}),
        json.dumps({**good, "images": ["broken.png"]}),
        "{not json",
        json.dumps(good),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_bad_rows_are_skipped_with_line_numbers(tmp_path, caplog):
    dataset = JsonlDataset(write_rows(tmp_path), on_bad_row="skip")
    assert len(dataset) == 2 and dataset[0].images == [str(tmp_path / "ok.png")]
    assert [line for line, _ in dataset.skipped] == [2, 3, 4, 5]
    reasons = " ".join(reason for _, reason in dataset.skipped)
    assert "missing file" in reasons and "placeholder" in reasons and "unreadable image" in reasons and "invalid JSON" in reasons
    assert "data.jsonl:2" in caplog.text and "skipped 4 bad row(s)" in caplog.text


def test_bad_rows_fail_the_run_with_their_line(tmp_path):
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing file"):
        JsonlDataset(write_rows(tmp_path), on_bad_row="fail")


def test_recipe_flags_override_yaml(tmp_path):
    import argparse

    from hyperowl.train.cli import add_arguments

    (tmp_path / "r.yaml").write_text("synthetic_tasks: {single: 1}\nscratch_config: {hidden_size: 32}\nsteps: 10\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "r.yaml"), "--steps", "3", "--bf16", "false", "--adam_betas", "[0.9, 0.95]"])
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_")}
    cfg = TrainConfig.from_yaml(args.config, overrides)
    assert cfg.steps == 3 and cfg.bf16 is False and cfg.adam_betas == [0.9, 0.95] and cfg.synthetic_tasks == {"single": 1}


@pytest.mark.parametrize("name", ["hyper", "full", "lora"])
def test_shipped_fine_tuning_recipes_parse(name):
    from hyperowl.train.config import TrainConfig

    recipe = Path(__file__).parents[1] / "recipes" / f"{name}.yaml"
    config = TrainConfig.from_yaml(recipe, {"init_from": "ckpt", "train_file": "data.jsonl"})
    assert config.policy == name and not config.train_vision
