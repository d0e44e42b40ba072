"""Training loses no work: a run killed while saving resumes from the newest complete checkpoint with its
metrics cut back; the hyper recipe trains on mixed text-only and image rows."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperowl.train.config import RecipeError, TrainConfig
from hyperowl.train.trainer import STATE_FILE, Trainer, find_resume, train
from tests.test_train import recipe

REPO = Path(__file__).resolve().parents[1]

#: Trains with torch.save killing the process (SIGKILL) half-way through its `n`-th call.
KILLED_WHILE_SAVING = """
import json, os, signal, sys
import torch
from hyperowl.train.config import TrainConfig
from hyperowl.train.trainer import train

real_save, calls = torch.save, []

def dying_save(obj, file, *args, **kwargs):
    calls.append(file)
    if len(calls) == int(sys.argv[2]):
        real_save(obj, file, *args, **kwargs)
        size = os.path.getsize(file)
        with open(file, "r+b") as handle:
            handle.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, file, *args, **kwargs)

torch.save = dying_save
train(TrainConfig.from_dict(json.loads(sys.argv[1])))
"""


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = recipe(tmp_path, steps=6, save_every=2, log_every=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_SAVING, json.dumps(cfg.to_dict()), "2"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed inside the second save (checkpoint-4)
    run = Path(cfg.output_dir)
    assert steps_logged(run) == [1, 2, 3, 4]
    assert not (run / "checkpoint-4").exists()  # only checkpoint-4.tmp: nothing half-written under the real name
    # an older-style damaged checkpoint: a complete copy whose trainer state was cut short
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-3")
    state = run / "checkpoint-3" / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 5, "lo')  # a record cut off by the kill
    resume = recipe(tmp_path, steps=6, save_every=2, log_every=1, resume="auto")
    with caplog.at_level(logging.WARNING, logger="hyperowl.train"):
        assert find_resume(resume) == run / "checkpoint-2"
    assert f"skipping {run / 'checkpoint-3'}: {STATE_FILE} is unreadable" in caplog.text
    result = train(resume)
    assert result.checkpoint == run / "checkpoint-6" and len(result.losses) == 4
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoint-4" / STATE_FILE).is_file() and not (run / "checkpoint-4.tmp").exists()
    with pytest.raises(RecipeError, match=f"checkpoint-3: {STATE_FILE} is unreadable"):
        find_resume(recipe(tmp_path, resume=str(run / "checkpoint-3")))


def test_truncated_weights_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = Path(train(recipe(tmp_path, steps=2, save_every=1)).checkpoint).parent
    weights = next((run / "checkpoint-2").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="hyperowl.train"):
        assert find_resume(recipe(tmp_path, resume="auto")) == run / "checkpoint-1"
    assert "checkpoint-2: the model files are incomplete" in caplog.text


def mixed_rows(tmp_path: Path) -> Path:
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    image_row = {"messages": [{"role": "user", "content": "<|image|> colour?"}, {"role": "assistant", "content": "red"}], "images": ["red.png"]}
    text_row = {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [text_row, image_row, text_row, text_row, image_row, text_row]))
    return path


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_hyper_recipe_trains_on_mixed_text_only_and_image_rows(tiny_checkpoint: Path, tmp_path: Path, grad_accum: int) -> None:
    overrides = {
        "output_dir": str(tmp_path / "run"), "init_from": str(tiny_checkpoint), "train_file": str(mixed_rows(tmp_path)),
        "grad_accum": grad_accum, "steps": 6 // grad_accum, "warmup_steps": 0, "lr": 1e-2, "save_every": 0,
        "progress": False, "num_threads": 1,
    }  # fmt: skip
    cfg = TrainConfig.from_yaml(REPO / "recipes" / "hyper.yaml", overrides)
    assert cfg.policy == "hyper" and cfg.batch_size == 1
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    result = trainer.train()
    assert len(result.losses) == cfg.steps and all(torch.isfinite(torch.tensor(result.losses)))
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("v_kv_proj" in n for n in changed) and any(n.startswith("vision2text_model.") for n in changed)
