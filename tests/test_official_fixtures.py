"""hyperowl against the official mPLUG-Owl3 240728 code, through fixtures it wrote (tools/make_official_fixtures.py).

The checkpoint under tests/fixtures/official was saved by the official classes; cases.json and
logits.safetensors hold what the official processor and model computed on it. No official code runs here.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.processing import Owl3Processor

FIXTURES = Path(__file__).parent / "fixtures" / "official"
META = json.loads((FIXTURES / "cases.json").read_text())
CASES = {case["name"]: case for case in META["cases"]}
#: Cases where hyperowl deliberately differs from the official code (SPEC §4); tested on their own below.
SAME = [name for name in CASES if name not in ("three_images_cut",)]


@pytest.fixture(scope="module")
def model():
    return Owl3ForCausalLM.from_pretrained(FIXTURES / "checkpoint", dtype=torch.float32)


@pytest.fixture(scope="module")
def processor():
    return Owl3Processor.from_pretrained(FIXTURES / "checkpoint")


@pytest.fixture(scope="module")
def official_logits():
    return load_file(str(FIXTURES / "logits.safetensors"))


def _run(processor, case):
    """hyperowl's processor on a fixture case (one conversation or a batch)."""
    conversations, images, videos = [], [], []
    for text, names, frames in zip(case["user_texts"], case["images"], case["videos"]):
        conversations.append(text if isinstance(text, list) else [{"role": "user", "content": text}])
        images.append([FIXTURES / "images" / f"{n}.png" for n in names])
        videos.append([[FIXTURES / "images" / f"{n}.png" for n in frames]] if frames else [])
    if len(conversations) == 1:
        return processor(conversations[0], images=images[0], videos=videos[0], cut_enable=case["cut"])
    return processor(conversations, images=images, videos=videos, cut_enable=case["cut"])


def _pixel_hash(pixels):
    return hashlib.sha256(pixels.float().contiguous().numpy().tobytes()).hexdigest()


def _until_stop(tokens, stops):
    """The tokens up to and including the first stop (the official generate pads after it)."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("name", SAME)
def test_processor_matches_official(processor, name):
    case = CASES[name]
    batch = _run(processor, case)
    assert batch.input_ids.tolist() == case["input_ids"]
    assert batch.attention_mask.tolist() == case["attention_mask"]
    # The official processor marks a sample without images with end -1000000 (< start: sees none);
    # hyperowl writes the empty range [start, start].
    official_offsets = [[[start, max(end, start)] for start, end in row] for row in case["media_offset"]]
    assert batch.media_offset.tolist() == official_offsets
    if case["pixels"] is None:
        assert batch.pixel_values is None
    else:
        assert list(batch.pixel_values.shape) == case["pixels"]["shape"]
        assert _pixel_hash(batch.pixel_values) == case["pixels"]["sha256"]


@pytest.mark.parametrize("name", SAME)
def test_logits_match_official(model, processor, official_logits, name):
    case = CASES[name]
    batch = _run(processor, case)
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "media_offset", "pixel_values")}).logits
    mask = batch.attention_mask.bool()
    official = official_logits[name]
    torch.testing.assert_close(logits[mask], official[mask], atol=1e-5, rtol=0)
    for row in range(mask.shape[0]):
        alone = official_logits.get(f"{name}.row{row}_alone")
        if alone is not None:  # hyperowl's row in the batch equals the official row run alone
            torch.testing.assert_close(logits[row, -alone.shape[1] :], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", SAME)
def test_greedy_tokens_match_official(model, processor, name):
    case = CASES[name]
    batch = _run(processor, case)
    stops = META["stop_token_ids"]
    out = model.generate(**batch, max_new_tokens=META["greedy_tokens"], do_sample=False, stop_token_ids=stops)
    for row, official in enumerate(case["greedy_tokens"]):
        # In a left-padded batch hyperowl's positions are pad-aware: its padded rows match the official row
        # run alone (the official batch differs there, see test_official_padded_batch_defect).
        expected = case["measured"].get(f"row{row}_greedy_tokens_alone", official)
        expected = _until_stop(expected, stops)
        assert out.sequences[row, : len(expected)].tolist() == expected


def test_official_padded_batch_defect():
    """The official MI-Rope image positions ignore left padding during generation: the padded row with an
    image in the batch leaves its own greedy path (text-only rows and unpadded rows do not)."""
    for name, diverges_at in (("padded_batch", 7), ("padded_batch_images", 5)):
        case = CASES[name]
        batch_row, alone = case["greedy_tokens"][0], case["measured"]["row0_greedy_tokens_alone"]
        assert batch_row[:diverges_at] == alone[:diverges_at] and batch_row[diverges_at] != alone[diverges_at]
        assert case["greedy_tokens"][1] == case["measured"]["row1_greedy_tokens_alone"]


def test_several_cut_images(processor, model, official_logits):
    """hyperowl gives each cut image its own grid; the official processor looks grids up by list position
    while it appends a (1, 1) per global view, so from the second image on its prompt is wrong."""
    case = CASES["three_images_cut"]
    batch = _run(processor, case)
    image_id = processor.image_token_id
    ours = batch.input_ids[0].tolist()
    official = case["input_ids"][0]
    # Same views, same pixels; hyperowl has a placeholder for each of them, the official prompt drops 3.
    assert _pixel_hash(batch.pixel_values) == case["pixels"]["sha256"]
    assert ours.count(image_id) == case["pixels"]["shape"][0] == 16
    assert official.count(image_id) == 13
    # The first image is expanded alike (up to its global view), then the prompts part.
    first_global = [i for i, t in enumerate(official) if t == image_id][3]
    assert ours[: first_global + 1] == official[: first_global + 1]
    assert "Cut to 1 rows 1 columns" in case["prompts"][0] and "Cut to 1 rows 1 columns" not in processor.decode(ours)
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "media_offset", "pixel_values")}).logits
    # Up to the first global view the inputs agree, and so do the logits.
    torch.testing.assert_close(logits[0, : first_global + 1], official_logits["three_images_cut"][0, : first_global + 1], atol=1e-5, rtol=0)


def test_official_masks_token_id_0_without_attention_mask(model, processor):
    """Without attention_mask the official generate masks every id-0 token ("!" in the Qwen2 tokenizer);
    hyperowl never infers a mask from token ids, so a batch without one decodes like one with it."""
    case = CASES["multi_turn"]
    assert case["measured"]["id0_tokens_in_prompt"] == 3
    assert case["measured"]["greedy_tokens_without_attention_mask"][0] != case["greedy_tokens"][0]
    batch = _run(processor, case)
    stops = META["stop_token_ids"]
    expected = _until_stop(case["greedy_tokens"][0], stops)
    out = model.generate(batch.input_ids, media_offset=batch.media_offset, pixel_values=batch.pixel_values,
                         max_new_tokens=META["greedy_tokens"], do_sample=False, stop_token_ids=stops)
    assert out.sequences[0, : len(expected)].tolist() == expected
