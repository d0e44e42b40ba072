"""`hyperowl chat` refuses every bad flag with one line naming it (exit 2), before loading a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperowl.cli import main

REPO = Path(__file__).resolve().parents[1]

BAD_FLAGS = [
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda:x"], "--device cuda:x"),
    (["--max-frames", "0"], "--max-frames"),
    (["--fps", "0"], "--fps"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "5"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--repetition-penalty", "1e-300"], "--repetition-penalty"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", str(-(2**63) - 1)], "--seed"),
    (["--vision-chunk-size", "0"], "--vision-chunk-size"),
]


@pytest.mark.parametrize(("flags", "named"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_chat_flag_is_one_line_naming_it(flags: list[str], named: str, tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["chat", "--model", str(tiny_checkpoint), *flags, "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hyperowl chat: error: ") and named in lines[0], captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_refused(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["chat", "--model", str(tiny_checkpoint), "--device", "cuda", "hi"]) == 2
    assert capsys.readouterr().err.strip() == "hyperowl chat: error: --device cuda: no CUDA GPU is available on this machine"


def test_model_pointing_at_a_file_says_it_is_a_file(tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tiny_checkpoint / "config.json"
    assert main(["chat", "--model", str(weights), "hi"]) == 2
    assert f"--model {weights} is a file" in capsys.readouterr().err


def test_an_empty_question_is_an_error_not_interactive_mode(tiny_checkpoint: Path) -> None:
    """Run as a real process with stdin open: interactive mode would print its banner and wait."""
    proc = subprocess.run(
        [sys.executable, "-m", "hyperowl.cli", "chat", "--model", str(tiny_checkpoint), "  "],
        cwd=REPO,
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "hyperowl chat: error: the question is empty; leave it out to chat interactively"


def test_compile_vision_compiles_every_tower_layer(tiny_checkpoint: Path) -> None:
    import argparse

    from hyperowl.cli import add_model_arguments, load_model_and_processor

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    for flags, compiled in (([], False), (["--compile-vision"], True)):
        model, _ = load_model_and_processor(parser.parse_args(["--model", str(tiny_checkpoint), "--device", "cpu", *flags]))
        layers = model.vision_model.encoder.layers
        assert all((layer._compiled_call_impl is not None) == compiled for layer in layers)
