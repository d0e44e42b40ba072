"""The 240728 and 241101 prompt formats (SPEC §4, §4b), chosen from the checkpoint or by argument."""

import json

import pytest
from PIL import Image

from hyperowl.errors import CheckpointError
from hyperowl.processing import Owl3Processor
from hyperowl.processing.tokenizer import MARKERS_241101, single_token_id
from hyperowl.processing.video import VideoClip
from tests.tiny import save_tiny_checkpoint

WIDE = Image.new("RGB", (96, 32), (200, 10, 10))  # 3:1 -> a 1x3 grid
TALL = Image.new("RGB", (40, 60), (10, 200, 10))  # 2:3 -> a 3x2 grid
HEAD = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for release in ("240728", "241101"):
        paths[release] = tmp_path_factory.mktemp(f"tiny-{release}")
        save_tiny_checkpoint(paths[release], release=release)
    return paths


def _check_ids(processor, batch, prompt):
    ids = batch.input_ids[0].tolist()
    assert ids == processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert processor.decode(ids) == prompt
    return ids


def test_format_is_chosen_from_the_checkpoint(checkpoints, tmp_path):
    assert Owl3Processor.from_pretrained(checkpoints["240728"]).prompt_format == "240728"
    assert Owl3Processor.from_pretrained(checkpoints["241101"]).prompt_format == "241101"
    # Without the config key, the weights decide: the 241101 model has no gate_proj.
    config = json.loads((checkpoints["241101"] / "config.json").read_text())
    assert config.pop("fused_hyper_attention") is True
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in checkpoints["241101"].iterdir():
        (bare / file.name).write_bytes(file.read_bytes())
    (bare / "config.json").write_text(json.dumps(config))
    assert Owl3Processor.from_pretrained(bare).prompt_format == "241101"
    # The markers alone do not make a 241101 model: a gated model with them keeps the 240728 format.
    gated = tmp_path / "gated"
    save_tiny_checkpoint(gated, release="241101", fused_hyper_attention=False)
    assert Owl3Processor.from_pretrained(gated).prompt_format == "240728"


def test_override(checkpoints):
    assert Owl3Processor.from_pretrained(checkpoints["241101"], prompt_format="240728").prompt_format == "240728"
    with pytest.raises(CheckpointError, match="<|start_cut|>"):
        Owl3Processor.from_pretrained(checkpoints["240728"], prompt_format="241101")
    with pytest.raises(ValueError, match="prompt_format must be one of 240728, 241101"):
        Owl3Processor.from_pretrained(checkpoints["240728"], prompt_format="2024")


def test_241101_markers_are_single_tokens(checkpoints):
    processor = Owl3Processor.from_pretrained(checkpoints["241101"])
    ids = [single_token_id(processor.tokenizer, marker) for marker in MARKERS_241101]
    assert None not in ids and len(set(ids)) == 4


def test_cut_image(checkpoints):
    messages = [{"role": "user", "content": "<|image|>Describe."}]
    new = Owl3Processor.from_pretrained(checkpoints["241101"])
    batch = new(messages, images=[WIDE])
    ids = _check_ids(
        new, batch, HEAD + "<|start_cut|>1*3\n<|image|> <|image|> <|image|>\n<|image|><|end_cut|>Describe." + TAIL
    )
    start_cut, end_cut = (single_token_id(new.tokenizer, t) for t in MARKERS_241101[:2])
    image = new.image_token_id
    at = ids.index(start_cut)
    assert ids.count(image) == 4 and ids.count(end_cut) == 1 and ids[ids.index(end_cut) - 1] == image
    assert ids[at + 1 : ids.index(end_cut)].count(image) == 4
    assert batch.pixel_values.shape[0] == 4  # 3 tiles + the global view

    old = Owl3Processor.from_pretrained(checkpoints["240728"])
    _check_ids(
        old,
        old(messages, images=[WIDE]),
        HEAD
        + "Cut to 1 rows 3 columns with a global view\n"
        + "subimg(0,0)<|image|> subimg(0,1)<|image|> subimg(0,2)<|image|>\nglobal_view<|image|>Describe."
        + TAIL,
    )


def test_several_cut_images_each_get_their_grid(checkpoints):
    processor = Owl3Processor.from_pretrained(checkpoints["241101"])
    batch = processor([{"role": "user", "content": "<|image|> and <|image|>"}], images=[WIDE, TALL])
    prompt = (
        HEAD
        + "<|start_cut|>1*3\n<|image|> <|image|> <|image|>\n<|image|><|end_cut|>"
        + " and "
        + "<|start_cut|>3*2\n<|image|> <|image|>\n<|image|> <|image|>\n<|image|> <|image|>\n<|image|><|end_cut|>"
        + TAIL
    )
    _check_ids(processor, batch, prompt)
    assert batch.pixel_values.shape[0] == 4 + 7
    assert batch.media_offset[0, -1].tolist() == [0, 11]


def test_video_frames(checkpoints):
    clip = VideoClip([Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)], [0.0, 1.0, 2.0])
    messages = [{"role": "user", "content": "<|video|>What happens?"}]
    new = Owl3Processor.from_pretrained(checkpoints["241101"])
    _check_ids(
        new,
        new(messages, videos=[clip]),
        HEAD + "<|start_video_frame|><|image|><|image|><|image|><|end_video_frame|>What happens?" + TAIL,
    )
    old = Owl3Processor.from_pretrained(checkpoints["240728"])
    _check_ids(old, old(messages, videos=[clip]), HEAD + "<|image|><|image|><|image|>What happens?" + TAIL)
