"""Generation defaults from a checkpoint's generation_config.json (SPEC §4), and what overrides them."""

import argparse
import asyncio
import json
import shutil

import pytest
import torch

from hyperowl.chat_cli import DEFAULT_MAX_NEW_TOKENS, add_arguments, sampling_params
from hyperowl.config import GenerationConfig
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.engine.sampling import SamplingParams
from hyperowl.errors import CheckpointError, HyperowlError
from hyperowl.hub import DEFAULT_MODEL
from hyperowl.processing import Owl3Processor
from hyperowl.serve.completions import prepare_job
from hyperowl.serve.schema import ChatCompletionRequest
from hyperowl.serve.settings import ServerSettings

#: The file the official 7B checkpoints ship (sampling keys; ids left out).
OFFICIAL = {"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}
OFFICIAL_PARAMS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


@pytest.fixture(scope="module")
def sampled_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with the official generation_config.json."""
    path = tmp_path_factory.mktemp("sampled")
    shutil.copytree(tiny_checkpoint, path, dirs_exist_ok=True)
    (path / "generation_config.json").write_text(json.dumps(OFFICIAL))
    return path


def test_read_as_transformers_does(tmp_path):
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()  # no file: greedy
    assert not GenerationConfig().do_sample
    (tmp_path / "generation_config.json").write_text(json.dumps(OFFICIAL))
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config.sampling_kwargs() == OFFICIAL_PARAMS  # no max_new_tokens in the file
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "max_new_tokens": 64}))
    partial = GenerationConfig.from_pretrained(tmp_path)
    assert (partial.temperature, partial.top_p, partial.top_k, partial.max_new_tokens) == (1.0, 1.0, 50, 64)  # transformers' defaults


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "cannot read"),
        ("[1]", "is not a JSON object"),
        ('{"top_k": 2.5}', "top_k must be int"),
        ('{"do_sample": "yes"}', "do_sample must be bool"),
        ('{"top_p": 1.5}', r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_file(tmp_path, content, message):
    (tmp_path / "generation_config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        GenerationConfig.from_pretrained(tmp_path)


def test_bundled_model_is_greedy():
    config = GenerationConfig.from_pretrained(DEFAULT_MODEL)
    assert (DEFAULT_MODEL / "generation_config.json").is_file()
    assert config.sampling_kwargs() == {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def test_generate_uses_the_checkpoint_defaults(sampled_checkpoint, tiny_checkpoint):
    model = Owl3ForCausalLM.from_pretrained(sampled_checkpoint)
    assert model.generation_config.sampling_kwargs() == OFFICIAL_PARAMS
    assert Owl3ForCausalLM.from_pretrained(tiny_checkpoint).generation_config == GenerationConfig()
    ids = Owl3Processor.from_pretrained(sampled_checkpoint)([{"role": "user", "content": "What colour is the square?"}]).input_ids
    run = {"max_new_tokens": 12, "stop_token_ids": []}
    sampled = model.generate(ids, seed=5, **run).sequences
    expected = model.generate(ids, params=SamplingParams(max_new_tokens=12, seed=5, **OFFICIAL_PARAMS), stop_token_ids=[]).sequences
    torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
    greedy = model.generate(ids, params=SamplingParams(max_new_tokens=12), stop_token_ids=[]).sequences
    assert not torch.equal(sampled, greedy)  # the defaults do sample (temperature 0.7 over 400 tokens)
    # An explicit argument replaces its default: do_sample=False with the file's repetition penalty.
    override = model.generate(ids, do_sample=False, **run).sequences
    penalised = model.generate(ids, params=SamplingParams(max_new_tokens=12, repetition_penalty=1.05), stop_token_ids=[]).sequences
    torch.testing.assert_close(override, penalised, rtol=0, atol=0)


def _chat_args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_chat_flags_over_model_defaults():
    official = GenerationConfig(**OFFICIAL_PARAMS)
    assert sampling_params(_chat_args(), official) == SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS, **OFFICIAL_PARAMS)
    assert sampling_params(_chat_args("--temperature", "0"), official).greedy
    flags = sampling_params(_chat_args("--top-k", "5", "--max-new-tokens", "9", "--seed", "1"), official)
    assert (flags.top_k, flags.max_new_tokens, flags.seed, flags.top_p, flags.do_sample) == (5, 9, 1, 0.8, True)
    assert sampling_params(_chat_args(), GenerationConfig(max_new_tokens=33)).max_new_tokens == 33
    assert sampling_params(_chat_args("--temperature", "0.3"), GenerationConfig()).do_sample  # a temperature > 0 samples
    with pytest.raises(HyperowlError, match="top_p must be in"):
        sampling_params(_chat_args("--top-p", "2"), official)


def test_serve_request_fields_over_model_defaults(tiny_checkpoint):
    processor = Owl3Processor.from_pretrained(tiny_checkpoint)
    settings = ServerSettings()
    official = GenerationConfig(**OFFICIAL_PARAMS)

    def params(defaults, **fields):
        request = ChatCompletionRequest(messages=[{"role": "user", "content": "hello"}], **fields)

        async def prepare():
            return await prepare_job(request, processor, settings, 4096, defaults)

        return asyncio.run(prepare()).params

    assert params(official) == SamplingParams(max_new_tokens=settings.default_max_tokens, **OFFICIAL_PARAMS)
    assert params(GenerationConfig()).greedy  # no generation_config.json: greedy, not OpenAI's temperature 1
    given = params(official, temperature=0, top_p=0.5, top_k=0, repetition_penalty=1.2, max_tokens=7, seed=3)
    assert given == SamplingParams(max_new_tokens=7, do_sample=False, temperature=0, top_p=0.5, top_k=0, repetition_penalty=1.2, seed=3)
    assert params(GenerationConfig(), temperature=0.9).do_sample
    assert params(GenerationConfig(max_new_tokens=40)).max_new_tokens == 40
    assert params(GenerationConfig(max_new_tokens=10**6)).max_new_tokens == settings.max_tokens


def test_a_fine_tune_keeps_the_sampling_defaults_of_its_starting_checkpoint(sampled_checkpoint, tmp_path):
    """The checkpoints and the export of a run started from a checkpoint with generation_config.json
    sample as that checkpoint did; a model saved from Python writes its own defaults."""
    from hyperowl.train.config import TrainConfig
    from hyperowl.train.trainer import Trainer

    cfg = TrainConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "export"), "init_from": str(sampled_checkpoint),
        "synthetic_tasks": {"single": 1}, "policy": "hyper", "steps": 2, "batch_size": 2, "save_every": 2,
        "progress": False, "num_threads": 1,
    })  # fmt: skip
    Trainer(cfg).train()
    for path in (tmp_path / "export", tmp_path / "run" / "checkpoint-2"):
        assert GenerationConfig.from_pretrained(path).sampling_kwargs() == OFFICIAL_PARAMS
    model = Owl3ForCausalLM.from_pretrained(sampled_checkpoint)
    model.generation_config.temperature = 0.3
    model.save_pretrained(tmp_path / "saved")
    assert GenerationConfig.from_pretrained(tmp_path / "saved") == model.generation_config
