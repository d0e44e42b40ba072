"""Processing: cut anchors and tiles, pixel numbers, chat template, labels, media offsets, video sampling, errors."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from hyperowl.errors import CheckpointError, MediaError, PromptError
from hyperowl.processing import (
    ENDOFTEXT,
    IGNORE_INDEX,
    IM_END,
    IMAGE_TOKEN,
    Owl3Processor,
    VideoClip,
    cut_image,
    cut_placeholder,
    image_to_tensor,
    iter_video_chunks,
    load_image,
    load_tokenizer,
    load_video,
    render_chat,
    render_chat_with_spans,
    sample_frame_indices,
    select_cut_anchor,
    train_tokenizer,
)
from hyperowl.processing.video import FILE_MAX_FRAMES
from tests.media import SECOND_COLORS, block_image, nearest_second, png_header, write_video

CELL = 16
CORPUS = [
    "Describe this image. The cat sat on the mat. What is in the video? A red square, then green.",
    "Cut to rows columns with a global view subimg global_view user assistant system hello world",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def processor(tokenizer) -> Owl3Processor:
    return Owl3Processor(tokenizer, image_size=CELL)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", seconds=10, fps=8, codec="libx264")


def solid(color: tuple[int, int, int], size: tuple[int, int] = (20, 20)) -> Image.Image:
    return Image.new("RGB", size, color)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nhello <|image|><|video|>world<|im_end|><|endoftext|>"
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert loaded.decode(ids) == text
    assert ids[0] == loaded.convert_tokens_to_ids("<|im_start|>")
    assert loaded.encode(IMAGE_TOKEN, add_special_tokens=False) == [loaded.convert_tokens_to_ids(IMAGE_TOKEN)]
    assert loaded.convert_tokens_to_ids(ENDOFTEXT) == 0 and loaded.pad_token_id == 0
    assert load_tokenizer(tmp_path).encode(text, add_special_tokens=False) == ids


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no tokenizer files in .*tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="could not load a tokenizer"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (100, 100, (2, 2)),
        (1000, 1000, (2, 2)),
        (300, 100, (1, 3)),
        (400, 100, (1, 4)),
        (2000, 100, (1, 4)),
        (100, 300, (3, 1)),
        (100, 400, (4, 1)),
        (100, 2000, (4, 1)),
        (300, 200, (2, 3)),
        (200, 300, (3, 2)),
        (200, 100, (2, 3)),  # 2:1 -> shape IoU 0.75 for (2,3) beats 2/3 for (1,3)
        (100, 200, (3, 2)),
    ],
)
def test_select_cut_anchor(width, height, expected):
    assert select_cut_anchor(width, height, 384) == expected


def test_cut_placeholder_text():
    assert cut_placeholder(2, 3) == (
        "Cut to 2 rows 3 columns with a global view\n"
        "subimg(0,0)<|image|> subimg(0,1)<|image|> subimg(0,2)<|image|>\n"
        "subimg(1,0)<|image|> subimg(1,1)<|image|> subimg(1,2)<|image|>\n"
        "global_view<|image|>"
    )
    assert cut_placeholder(1, 1) == "Cut to 1 rows 1 columns with a global view\nsubimg(0,0)<|image|>\nglobal_view<|image|>"


def test_cut_tiles_are_row_major_crops_plus_global_view():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    image = block_image(2, 3, 40, colors)  # 120 x 80 -> anchor (2, 3)
    views, grid = cut_image(image, CELL)
    assert grid == (2, 3) and len(views) == 7
    assert all(v.size == (CELL, CELL) for v in views)
    resized = image.resize((3 * CELL, 2 * CELL), Image.Resampling.BICUBIC)
    for k, tile in enumerate(views[:6]):
        i, j = divmod(k, 3)
        crop = resized.crop((j * CELL, i * CELL, (j + 1) * CELL, (i + 1) * CELL))
        assert np.array_equal(np.asarray(tile), np.asarray(crop))
        assert tuple(np.asarray(tile)[CELL // 2, CELL // 2]) == colors[k]  # block (i, j) lands in tile (i, j)
    assert np.array_equal(np.asarray(views[6]), np.asarray(image.resize((CELL, CELL), Image.Resampling.BICUBIC)))


def test_image_to_tensor_normalisation():
    pixels = image_to_tensor([solid((255, 0, 128)), solid((51, 102, 204), (CELL, CELL))], CELL)
    assert pixels.shape == (2, 3, CELL, CELL) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, :, 5, 5], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]))
    torch.testing.assert_close(pixels[1, :, 0, 0], torch.tensor([-0.6, -0.2, 0.6]))


def test_load_image_sources_agree(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    for src in (path, str(path), path.read_bytes(), Image.fromarray(array), array, array / 255.0):
        assert np.array_equal(np.asarray(load_image(src)), array)
    rgba = Image.fromarray(np.dstack([array, np.full((12, 10), 7, np.uint8)]))
    assert np.array_equal(np.asarray(load_image(rgba)), array)
    gray = load_image(array[:, :, 0])
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[:, :, 2], array[:, :, 0])


def test_high_bit_depth_images_keep_their_contrast(tmp_path):
    levels = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    deep = levels.astype(np.uint16) * 257  # the same picture with 16 bits per pixel
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")
    for src in (path, Image.fromarray(deep), Image.fromarray(deep.astype(np.int32), mode="I")):
        assert np.array_equal(np.asarray(load_image(src))[:, :, 0], levels)
    as_float = Image.fromarray(levels.astype(np.float32) / 255.0, mode="F")
    assert np.array_equal(np.asarray(load_image(as_float))[:, :, 1], levels)
    dark = Image.fromarray(levels.astype(np.int32), mode="I")  # 32-bit integers within 0-255 are kept
    assert np.array_equal(np.asarray(load_image(dark))[:, :, 2], levels)


def test_image_errors(tmp_path):
    with pytest.raises(MediaError, match="not found.*missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"this is not an image at all")
    with pytest.raises(MediaError, match="cannot decode image .*bad.jpg: not a file in an image format"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(MediaError, match="^cannot decode image <bytes>: not a file in an image format PIL reads$"):
        load_image(b"hello")
    buffer = io.BytesIO()
    solid((1, 2, 3), (64, 64)).save(buffer, format="PNG")
    with pytest.raises(MediaError, match="cannot decode"):
        load_image(buffer.getvalue()[:60])  # truncated PNG data
    with pytest.raises(MediaError, match=r"image too large: <bytes> is 12000 x 10000 pixels > limit of 100000000"):
        load_image(png_header(12_000, 10_000), max_pixels=10**8)  # only the header is read
    with pytest.raises(MediaError, match=r"image too large: .*10000000000 pixels"):
        load_image(png_header(100_000, 100_000))  # over twice PIL's own cap: PIL refuses it at open
    with pytest.raises(MediaError, match=r"64 x 64 pixels > limit of 1000"):
        load_image(buffer.getvalue(), max_pixels=1000)
    with pytest.raises(MediaError, match=r"shape .*\(4, 4, 2\)"):
        load_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(MediaError, match="dtype int64"):
        load_image(np.zeros((4, 4, 3), np.int64))


# ---------------------------------------------------------------- chat template and labels


def test_chat_template_exact():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<|image|>Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "video"}, {"type": "text", "text": "?"}]},
    ]
    assert render_chat(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>"
        "\n<|im_start|>user\n<|image|>Hi<|im_end|>"
        "\n<|im_start|>assistant\nHello!<|im_end|><|endoftext|>"
        "\n<|im_start|>user\nAnd <|video|>?<|im_end|>"
        "\n<|im_start|>assistant\n"
    )
    no_system = [{"role": "user", "content": "Q"}]
    expected = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQ<|im_end|>"
    assert render_chat(no_system, add_generation_prompt=False) == expected
    assert render_chat(no_system) == expected + "\n<|im_start|>assistant\n"
    # the official demo ends with an empty assistant message as the generation prompt
    assert render_chat(no_system + [{"role": "assistant", "content": ""}], False) == expected + "\n<|im_start|>assistant\n"
    # a conversation that ends with an answer gets no extra prompt
    answered = no_system + [{"role": "assistant", "content": "A"}]
    assert render_chat(answered) == expected + "\n<|im_start|>assistant\nA<|im_end|><|endoftext|>"


def test_chat_spans_and_errors():
    text, spans = render_chat_with_spans(
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ]
    )
    assert [text[s:e] for s, e in spans] == ["A1<|im_end|><|endoftext|>", "A2<|im_end|><|endoftext|>"]
    with pytest.raises(PromptError, match="unknown role 'robot'"):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(PromptError, match="system message is only allowed as the first"):
        render_chat([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(PromptError, match="unknown content part"):
        render_chat([{"role": "user", "content": [{"type": "audio"}]}])


def test_labels_cover_exactly_assistant_spans(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is <|image|> here?"},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "The cat sat."},
    ]
    batch = processor(messages, images=[solid((255, 0, 0))], return_labels=True)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    keep = labels != IGNORE_INDEX
    assert torch.equal(labels[keep], ids[keep])
    assert processor.decode(ids[keep]) == "A red square.<|im_end|><|endoftext|>The cat sat.<|im_end|><|endoftext|>"
    # two contiguous runs, the second ending the sequence (an answered conversation gets no generation prompt)
    edges = torch.nonzero(keep.int().diff()).flatten().tolist()
    assert len(edges) == 3 and bool(keep[-1])
    assert processor.decode(ids[: edges[0] + 1]).endswith("global_view<|image|> here?<|im_end|>\n<|im_start|>assistant\n")
    assert processor.decode(ids[edges[1] + 1 : edges[2] + 1]) == "\n<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"


# ---------------------------------------------------------------- processor, media offsets


def offsets_from_ids(ids: list[int], image_id: int, first: int) -> list[list[int]]:
    """Reference: token t sees images [first, first + #image tokens strictly before t)."""
    out, seen = [], 0
    for token in ids:
        out.append([first, first + seen])
        seen += token == image_id
    return out


def test_media_offset_interleaved_single(processor):
    images = [solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))]
    messages = [{"role": "user", "content": "A<|image|>B<|image|>C hello<|image|>"}]
    batch = processor(messages, images=images, cut_enable=False)
    assert set(batch.keys()) == {"input_ids", "attention_mask", "media_offset", "pixel_values"}
    ids = batch.input_ids[0].tolist()
    image_id = processor.image_token_id
    positions = [t for t, x in enumerate(ids) if x == image_id]
    assert len(positions) == 3
    offset = batch.media_offset
    assert offset.shape == (1, len(ids), 2) and offset.dtype == torch.long
    assert offset[0].tolist() == offsets_from_ids(ids, image_id, 0)
    for k, p in enumerate(positions):
        assert offset[0, p].tolist() == [0, k]  # the image token itself does not see its image
        assert offset[0, p + 1].tolist() == [0, k + 1]
    assert offset[0, 0].tolist() == [0, 0] and offset[0, -1].tolist() == [0, 3]
    assert batch.pixel_values.shape == (3, 3, CELL, CELL)
    torch.testing.assert_close(batch.pixel_values[:, :, 0, 0], torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]]))
    assert torch.equal(batch.attention_mask, torch.ones_like(batch.input_ids))
    assert processor.decode(ids).endswith("C hello<|image|><|im_end|>\n<|im_start|>assistant\n")


def test_media_offset_batch_with_cut_and_left_padding(processor):
    wide = block_image(1, 3, 20, [(255, 0, 0), (0, 255, 0), (0, 0, 255)])  # 60 x 20 -> (1, 3)
    conversations = [
        [{"role": "user", "content": "<|image|>Describe this image."}],
        [{"role": "user", "content": "<|image|>and<|image|>"}],
    ]
    batch = processor(conversations, images=[[wide], [solid((255, 255, 0)), solid((0, 255, 255))]])
    # sample 0: 3 tiles + global view; sample 1: two square images cut to 2x2 + global view each
    assert batch.pixel_values.shape == (4 + 5 + 5, 3, CELL, CELL)
    centre = batch.pixel_values[:3, :, CELL // 2, CELL // 2]
    torch.testing.assert_close(centre, torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]]))
    image_id = processor.image_token_id
    ids0 = processor(conversations[0], images=[wide]).input_ids[0].tolist()
    ids1 = processor(conversations[1], images=[solid((255, 255, 0)), solid((0, 255, 255))]).input_ids[0].tolist()
    assert ids0.count(image_id) == 4 and ids1.count(image_id) == 10
    length = max(len(ids0), len(ids1))
    pad = processor.pad_token_id
    rows = [[pad] * (length - len(ids)) + ids for ids in (ids0, ids1)]
    assert batch.input_ids.tolist() == rows
    assert batch.attention_mask.tolist() == [[0] * (length - len(ids)) + [1] * len(ids) for ids in (ids0, ids1)]
    expected = torch.tensor([offsets_from_ids(rows[0], image_id, 0), offsets_from_ids(rows[1], image_id, 4)])
    assert torch.equal(batch.media_offset, expected)
    assert batch.media_offset[1, 0].tolist() == [4, 4] and batch.media_offset[1, -1].tolist() == [4, 14]
    text0 = processor.decode(ids0)
    assert "<|im_start|>user\nCut to 1 rows 3 columns with a global view\nsubimg(0,0)<|image|> subimg(0,1)<|image|>" in text0
    assert "subimg(0,2)<|image|>\nglobal_view<|image|>Describe this image.<|im_end|>" in text0


def test_batch_to_and_attributes(processor):
    batch = processor([{"role": "user", "content": "<|image|>x"}], images=solid((1, 2, 3)), cut_enable=False)
    moved = batch.to("cpu", torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.long
    assert moved.media_offset.dtype == torch.long and moved.frame_timestamps == [[]]
    text_only = processor([{"role": "user", "content": "hello"}])
    assert text_only.pixel_values is None and text_only.media_offset.abs().sum() == 0
    assert processor.stop_token_ids == [processor.tokenizer.convert_tokens_to_ids(IM_END), 0]
    with pytest.raises(AttributeError):
        _ = batch.labels


def test_media_from_content_parts(processor):
    image = solid((0, 0, 255))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}]
    batch = processor(messages, cut_enable=False)
    assert batch.pixel_values.shape == (1, 3, CELL, CELL) and batch.pixel_values[0, 2, 0, 0] == 1.0


def test_prompt_errors(processor):
    two = [{"role": "user", "content": "<|image|><|image|>"}]
    with pytest.raises(PromptError, match=r"2 <\|image\|> placeholder\(s\) but 1 image\(s\) given"):
        processor(two, images=[solid((0, 0, 0))])
    with pytest.raises(PromptError, match=r"0 <\|video\|> placeholder\(s\) but 1 video\(s\)"):
        processor([{"role": "user", "content": "x"}], videos=[[solid((0, 0, 0))]])
    with pytest.raises(PromptError, match="1 image lists for 2 conversations"):
        processor([two, two], images=[[solid((0, 0, 0))] * 2])
    with pytest.raises(PromptError, match="in conversation 1"):
        processor([two, two], images=[[solid((0, 0, 0))] * 2, []])
    with pytest.raises(PromptError, match="unknown role"):
        processor([{"role": "bot", "content": "x"}])


def test_processor_from_pretrained(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        Owl3Processor.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"image_size": 28}}))
    loaded = Owl3Processor.from_pretrained(tmp_path, max_frames=4)
    assert loaded.image_size == 28 and loaded.max_frames == 4 and loaded.cut_enable
    assert loaded.image_token_id == processor.image_token_id
    assert Owl3Processor.from_pretrained(tmp_path, image_size=32).image_size == 32


# ---------------------------------------------------------------- video


def test_sample_frame_indices():
    assert sample_frame_indices(80, 8.0) == list(range(0, 80, 8))
    assert sample_frame_indices(80, 8.0, max_frames=4) == [8, 24, 48, 64]  # gap 2.5 -> picks 1, 3, 6, 8
    assert sample_frame_indices(80, 8.0, fps=2.0, max_frames=None) == list(range(0, 80, 4))
    assert sample_frame_indices(100, 29.97) == [0, 30, 60, 90]
    assert sample_frame_indices(5, 30.0, fps=60.0) == [0, 1, 2, 3, 4]
    long = sample_frame_indices(2 * 3600 * 25, 25.0, max_frames=16)  # 2 h at 25 fps: 7200 candidates
    assert len(long) == 16 and long[0] == 225 * 25 and long[-1] == (15 * 450 + 225) * 25
    assert sample_frame_indices(0, 25.0) == []


def test_load_video_mp4_indices_timestamps_colours(mp4):
    clip = load_video(mp4, max_frames=4, progress=False)
    assert len(clip) == 4
    assert clip.timestamps == pytest.approx([1.0, 3.0, 6.0, 8.0])
    assert [nearest_second(f) for f in clip.frames] == [1, 3, 6, 8]
    assert all(f.size == (64, 48) and f.mode == "RGB" for f in clip.frames)
    full = load_video(mp4, max_frames=16, progress=False)
    assert full.timestamps == pytest.approx([float(s) for s in range(10)])
    assert [nearest_second(f) for f in full.frames] == list(range(10))
    half = load_video(mp4, fps=2.0, max_frames=None, progress=False)
    assert half.timestamps == pytest.approx([k / 2 for k in range(20)])


@pytest.mark.parametrize(("suffix", "codec"), [("mkv", "mpeg4"), ("avi", "mpeg4"), ("webm", "libvpx")])
def test_load_video_other_containers(tmp_path, suffix, codec):
    path = write_video(tmp_path / f"clip.{suffix}", seconds=5, fps=4, codec=codec)
    clip = load_video(path, max_frames=3, progress=False)
    assert clip.timestamps == pytest.approx([0.0, 2.0, 4.0])  # 5 candidates (1 per s), gap 5/3 -> 0, 2, 4
    assert [nearest_second(f) for f in clip.frames] == [0, 2, 4]


def test_iter_video_chunks_matches_load_video(mp4):
    chunks = list(iter_video_chunks(mp4, chunk_size=3, max_frames=None, progress=False))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert [t for c in chunks for t in c.timestamps] == pytest.approx([float(s) for s in range(10)])
    assert [nearest_second(f) for c in chunks for f in c.frames] == list(range(10))
    from_bytes = load_video(mp4.read_bytes(), max_frames=2, progress=False)
    assert from_bytes.timestamps == pytest.approx([2.0, 7.0])


def test_video_from_frame_list():
    frames = [np.full((8, 8, 3), c, np.uint8) for c in SECOND_COLORS]
    clip = load_video(frames, max_frames=4)
    assert clip.timestamps == [1.0, 3.0, 6.0, 8.0]
    assert [nearest_second(f) for f in clip.frames] == [1, 3, 6, 8]
    recorded = load_video(frames, frame_rate=2.0, max_frames=None)  # 2 fps recording sampled at 1 fps
    assert recorded.timestamps == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_frame_list_keeps_every_frame_unless_capped(tokenizer, mp4):
    frames = [np.full((8, 8, 3), 10 * i, np.uint8) for i in range(20)]
    assert len(load_video(frames)) == 20
    assert len(load_video(frames, max_frames=5)) == 5
    assert FILE_MAX_FRAMES == 16
    assert len(load_video(mp4, fps=2.0, progress=False)) == FILE_MAX_FRAMES  # 20 sampled frames, file default cap
    assert len(load_video(mp4, fps=2.0, max_frames=None, progress=False)) == 20

    processor = Owl3Processor(tokenizer, image_size=CELL, max_frames=3)
    messages = [{"role": "user", "content": "<|video|><|video|>"}]
    batch = processor(messages, videos=[frames, mp4])
    assert [len(t) for t in batch.frame_timestamps[0]] == [20, 3]  # the list keeps all, the file takes max_frames
    assert batch.input_ids[0].tolist().count(processor.image_token_id) == 23
    capped = processor(messages, videos=[frames, mp4], max_frames=4)  # a call's cap applies to both
    assert [len(t) for t in capped.frame_timestamps[0]] == [4, 4]


def test_frames_resized_as_decoded_give_the_processors_pixels(processor, mp4):
    """`frame_size` resizes each frame while the file is decoded: the clip holds model-sized frames only,
    and their pixels are those the processor gets by resizing full-size frames later."""
    full = load_video(mp4, max_frames=4, progress=False)
    small = load_video(mp4, max_frames=4, progress=False, frame_size=CELL)
    assert all(f.size == (CELL, CELL) for f in small.frames) and small.timestamps == full.timestamps
    torch.testing.assert_close(image_to_tensor(small.frames, CELL), image_to_tensor(full.frames, CELL), atol=0, rtol=0)
    batch = processor([{"role": "user", "content": "<|video|>"}], videos=[mp4], max_frames=4)
    torch.testing.assert_close(batch.pixel_values, image_to_tensor(full.frames, CELL), atol=0, rtol=0)


def test_processor_video(processor, mp4):
    messages = [{"role": "user", "content": "<|video|>What happens?"}]
    batch = processor(messages, videos=[mp4], max_frames=4)
    assert batch.frame_timestamps == [[pytest.approx([1.0, 3.0, 6.0, 8.0])]]
    ids = batch.input_ids[0].tolist()
    assert ids.count(processor.image_token_id) == 4  # frames are never cut
    assert batch.pixel_values.shape == (4, 3, CELL, CELL)
    assert batch.media_offset[0, -1].tolist() == [0, 4]
    assert "user\n<|image|><|image|><|image|><|image|>What happens?" in processor.decode(ids)
    clip = VideoClip([solid((0, 255, 0))], [0.5])
    both = processor(
        [{"role": "user", "content": "<|image|><|video|>"}], images=[solid((255, 0, 0))], videos=[clip], cut_enable=False
    )
    assert both.frame_timestamps == [[[0.5]]]
    torch.testing.assert_close(both.pixel_values[:, :, 0, 0], torch.tensor([[1.0, -1, -1], [-1, 1, -1]]))


def test_video_errors(tmp_path):
    with pytest.raises(MediaError, match="video file not found: .*missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video file\n" * 170)  # fixed bytes: random ones can look like some format
    with pytest.raises(MediaError, match="cannot read video .*junk.mp4"):
        load_video(junk)
    audio = tmp_path / "sound.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    with pytest.raises(MediaError, match="no video stream in .*sound.wav"):
        load_video(audio)
    empty = write_video(tmp_path / "empty.avi", seconds=0, fps=8, codec="mpeg4", frames=0)
    with pytest.raises(MediaError, match="video has no frames: .*empty.avi"):
        iter_video_chunks(empty)
    with pytest.raises(MediaError, match="frame list is empty"):
        load_video([])
