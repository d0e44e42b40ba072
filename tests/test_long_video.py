"""Long video: chunked encoding, memory-bounded cross-attention, K/V storage options, early limits, mp4 pipeline."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

from hyperowl.engine.generate import Owl3ForCausalLM, prefill
from hyperowl.engine.longvideo import answer_video, video_pixel_stream, video_prompt
from hyperowl.engine.memory import plan_visual_memory
from hyperowl.errors import ResourceLimitError
from hyperowl.model.cache import VisualKV
from hyperowl.model.decoder import CrossPlan, StepContext
from hyperowl.model.owl3 import PixelStream, VisualOptions
from hyperowl.processing.image import image_to_tensor
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.stream import Prefetch
from hyperowl.processing.video import count_sampled_frames, load_video
from tests.media import SECOND_COLORS, block_image, write_pattern_video, write_video
from tests.tiny import random_model, tiny_config

IMG = 7


def many_images_batch(
    model: Owl3ForCausalLM, counts: tuple[int, ...], seed: int = 0, text_every: int = 3
) -> dict[str, torch.Tensor]:
    """Left-padded batch whose row b holds `counts[b]` images: 3 text tokens, runs of `text_every`
    adjacent `<|image|>` tokens separated by one text token, then 4 text tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in counts:
        ids = torch.randint(10, model.config.vocab_size, (3 + n + n // text_every + 4,), generator=g)
        slots = [3 + i + i // text_every for i in range(n)]
        ids[slots] = IMG
        rows.append(ids)
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    offsets = torch.zeros(len(rows), length, 2, dtype=torch.long)
    first = 0
    for b, (row, n) in enumerate(zip(rows, counts)):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
        is_img = (ids[b] == IMG) & mask[b].bool()
        offsets[b, :, 0] = first
        offsets[b, :, 1] = first + torch.cumsum(is_img, 0) - is_img.long()
        first += n
    s = model.config.vision_config.image_size
    pixels = torch.randn(sum(counts), 3, s, s, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "media_offset": offsets, "pixel_values": pixels}


def logits(model: Owl3ForCausalLM, batch: dict[str, torch.Tensor], **options) -> torch.Tensor:
    model.visual_options = VisualOptions(**options)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("fused", [False, True], ids=["gated", "fused"])
def test_chunked_encoding_equals_unchunked(fused):
    model = random_model(tiny_config(fused_hyper_attention=fused), seed=1)
    batch = many_images_batch(model, (7, 4, 0))
    calls = []
    hook = model.vision_model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    whole = logits(model, batch, chunk_size=11)
    for chunk in (1, 4):
        calls.clear()
        torch.testing.assert_close(logits(model, batch, chunk_size=chunk), whole, atol=1e-5, rtol=1e-5)
        assert max(calls) <= chunk and sum(calls) == 11
    hook.remove()
    # a stream of uneven chunks (as a decoder produces them) gives the same result
    pixels = batch["pixel_values"]
    stream = PixelStream(11, [pixels[:4], pixels[4:5], pixels[5:]])
    model.visual_options = VisualOptions(chunk_size=3)
    with torch.no_grad():
        streamed = model(**{**batch, "pixel_values": stream}).logits
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)
    # chunks of features the tower and projector already made (kept from an earlier request) give it too
    with torch.no_grad():
        features = model.encode_images(pixels)
        kept = PixelStream(11, [features[:6], features[6:]])
        from_features = model(**{**batch, "pixel_values": kept}).logits
    torch.testing.assert_close(from_features, whole, atol=1e-5, rtol=1e-5)


def dense_image_attention(q, vis_k, vis_v, counts, p, text_k=None, text_v=None, self_mask=None):
    """The dense formulation: a full `[B, 1, T, N]` prefix mask and one attention call (the pre-chunking code)."""
    n = vis_k.shape[2]
    cross = (torch.arange(n) // p)[None, None, :] < counts[:, :, None]
    if text_k is None:
        has = (counts > 0)[:, :, None]
        return F.scaled_dot_product_attention(q, vis_k, vis_v, attn_mask=(cross | ~has)[:, None], enable_gqa=True)
    mask = torch.cat([cross[:, None], self_mask], -1)
    return F.scaled_dot_product_attention(
        q, torch.cat([vis_k, text_k], 2), torch.cat([vis_v, text_v], 2), attn_mask=mask, enable_gqa=True
    )


@pytest.mark.parametrize("fused", [False, True], ids=["gated", "fused"])
@pytest.mark.parametrize("block", [1, 300, 5000, 2**40])
def test_memory_bounded_cross_attention_equals_dense(fused, block):
    torch.manual_seed(0)
    model = random_model(tiny_config(fused_hyper_attention=fused))
    attn = model.language_model.model.hyper_layers[0].self_attn
    b, t, p, g, d = 3, 13, 16, attn.num_kv_heads, attn.head_dim
    counts = torch.stack([torch.arange(t).clamp(max=6), torch.zeros(t, dtype=torch.long), (torch.arange(t) // 3).clamp(min=1)])
    num_images = [6, 0, 4]
    visual = VisualKV.allocate(len(model.language_model.model.hyper_layers), num_images, p, g, d, torch.float32, "cpu", "cpu")
    for i in range(len(visual.keys)):
        visual.keys[i].normal_()
        visual.values[i].normal_()
    q = torch.randn(b, attn.num_heads, t, d)
    text_k, text_v = torch.randn(b, g, t, d), torch.randn(b, g, t, d)
    self_mask = torch.ones(t, t).tril().bool()[None, None].expand(b, 1, t, t)
    plan = CrossPlan.build(counts, p, attn.num_heads, t if fused else 0, block)
    assert all(blk.t1 - blk.t0 == 1 for blk in plan.blocks) if block == 1 else True
    if block > 2**30:
        assert len(plan.blocks) == 1
    ctx = StepContext(torch.ones(1), torch.zeros(1), self_mask, None, visual, plan)
    k, v = visual.keys[attn.hyper_index], visual.values[attn.hyper_index]
    if fused:
        ours = attn.image_attention(q, ctx, text_k, text_v)
        dense = dense_image_attention(q, k, v, counts, p, text_k, text_v, self_mask)
        torch.testing.assert_close(ours, dense, atol=1e-6, rtol=1e-5)
    else:
        ours = attn.image_attention(q, ctx)
        dense = dense_image_attention(q, k, v, counts, p)
        seen = (counts > 0)[:, None, :, None].expand_as(ours)
        torch.testing.assert_close(ours[seen], dense[seen], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["gated", "fused"])
def test_model_logits_do_not_depend_on_the_attention_block(fused):
    model = random_model(tiny_config(fused_hyper_attention=fused), seed=2)
    batch = many_images_batch(model, (5, 2), seed=3)
    ref = logits(model, batch, attention_block=2**40)
    torch.testing.assert_close(logits(model, batch, attention_block=1), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, batch, attention_block=3000), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kv_dtype, tolerance",
    [(torch.bfloat16, 0.02), (torch.float16, 0.005), (torch.float8_e4m3fn, 0.15)],
    ids=["bf16", "fp16", "fp8"],
)
def test_low_precision_visual_kv_gives_close_logits(kv_dtype, tolerance):
    model = random_model(seed=4)
    batch = many_images_batch(model, (6,), seed=5)
    ref = logits(model, batch)
    low = logits(model, batch, kv_dtype=kv_dtype)
    assert model(**batch).visual.keys[0].dtype == kv_dtype
    err = (low - ref).abs().max() / ref.abs().max()
    assert 0 < err < tolerance
    # greedy decoding with low-precision storage works (cast at use) and starts with the same token
    model.visual_options = VisualOptions(kv_dtype=kv_dtype)
    out = model.generate(**batch, max_new_tokens=3, stop_token_ids=[])
    assert out.sequences.shape == (1, 3) and int(out.sequences[0, 0]) == int(ref[0, -1].argmax())


def test_offload_option_on_cpu_keeps_logits():
    model = random_model(seed=4)
    batch = many_images_batch(model, (3,), seed=6)
    torch.testing.assert_close(logits(model, batch, offload="always"), logits(model, batch, offload="never"))


def test_limit_error_says_how_many_frames_fit():
    model = random_model(seed=8)
    per_frame = VisualOptions(chunk_size=2, memory_budget=0, attention_block=2**12)
    with pytest.raises(ResourceLimitError, match="at most 0 fit"):
        plan_visual_memory(model.config, 1, 10, model.dtype, model.device, per_frame)
    budget = 2**19
    options = dataclasses.replace(per_frame, memory_budget=budget)
    text = 7  # text tokens of a `many_images_batch(..., text_every=10**9)` prompt
    with pytest.raises(ResourceLimitError) as info:
        plan_visual_memory(model.config, 10**6, 10**6 + text, model.dtype, model.device, options)
    fit = int(str(info.value).split("at most ")[1].split()[0])
    assert 1 < fit < 10**6
    plan = plan_visual_memory(model.config, fit, fit + text, model.dtype, model.device, options)
    assert plan.max_images == fit and not plan.offload
    # the engine refuses before running the vision tower, and takes exactly `fit` frames
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *_: calls.append(1))
    model.visual_options = options
    with pytest.raises(ResourceLimitError, match=f"at most {fit} fit"):
        prefill(model, **many_images_batch(model, (fit + 1,), seed=9, text_every=10**9))
    assert not calls
    assert prefill(model, **many_images_batch(model, (fit,), seed=9, text_every=10**9))[2].num_images.tolist() == [fit]
    hook.remove()
    # a lower-precision store fits more frames
    low = dataclasses.replace(options, kv_dtype=torch.float8_e4m3fn)
    with pytest.raises(ResourceLimitError) as info_low:
        plan_visual_memory(model.config, 10**6, 10**6 + text, model.dtype, model.device, low)
    assert int(str(info_low.value).split("at most ")[1].split()[0]) > fit


def test_prefetch_runs_ahead_says_when_ready_and_reraises():
    """The producer thread makes at most `depth` items ahead of the consumer (the one it is making
    included), so with the consumer's own at most `depth + 1` exist, and its error reaches the
    consumer. Synchronised with events: the 30 s waits only keep a broken prefetch from hanging the suite."""
    asked = [threading.Event() for _ in range(6)]

    def items():
        for i in range(5):
            asked[i].set()
            yield i
        asked[5].set()
        raise ValueError("broken file")

    it = Prefetch(items(), depth=2)
    assert next(it) == 0
    assert asked[2].wait(timeout=30)  # items 1 and 2 made while the consumer works on item 0
    assert it.ready()  # item 1 is waiting (made before item 2 was asked for)
    assert not asked[3].is_set()  # two ahead: the producer waits for the consumer
    assert next(it) == 1
    assert asked[3].wait(timeout=30)
    assert not asked[4].is_set()
    assert [next(it) for _ in range(3)] == [2, 3, 4]
    with pytest.raises(ValueError, match="broken file"):
        next(it)


def test_prefetch_consumer_that_stops_closes_the_items():
    closed = threading.Event()

    def items():
        try:
            yield from range(100)
        finally:
            closed.set()

    before = set(threading.enumerate())
    it = Prefetch(items(), depth=2)
    assert next(it) == 0
    it.close()
    assert closed.is_set() and not set(threading.enumerate()) - before


def test_mp4_goes_through_chunked_decode_and_encode(tmp_path, tiny_checkpoint):
    video = write_video(tmp_path / "clip.mp4", seconds=10, fps=4, codec="mpeg4")
    model = Owl3ForCausalLM.from_pretrained(tiny_checkpoint)
    processor = Owl3Processor.from_pretrained(tiny_checkpoint)
    size = model.config.vision_config.image_size
    assert count_sampled_frames(video, fps=1.0, max_frames=None) == 10
    batch = video_prompt(processor, "What happened first?", 10)
    official = processor([{"role": "user", "content": "<|video|>\nWhat happened first?"}], videos=[str(video)], max_frames=10)
    assert torch.equal(batch["input_ids"], official["input_ids"])
    assert torch.equal(batch["media_offset"], official["media_offset"])
    model.visual_options = VisualOptions(chunk_size=3)
    stream = video_pixel_stream(video, size, max_frames=None, chunk_size=4)
    sizes = []
    stream = PixelStream(stream.total, (sizes.append(c.shape[0]) or c for c in stream.chunks))
    with torch.no_grad():
        streamed = model(**batch, pixel_values=stream).logits
        frames = image_to_tensor(load_video(video, max_frames=None).frames, size)
        whole = model(**batch, pixel_values=frames).logits
    assert sizes == [4, 4, 2]
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(official["pixel_values"], frames)
    out = answer_video(model, processor, video, "What happened first?", max_new_tokens=4)
    assert 1 <= out.num_generated[0] <= 4 and out.visual.num_images.tolist() == [10]


@pytest.mark.parametrize("with_images", [False, True], ids=["video", "image-video-image"])
def test_processor_streamed_video_gives_the_logits_and_tokens_of_the_whole_batch(tmp_path, tiny_checkpoint, with_images):
    """`stream_video=True`: the same prompt, and pixels that arrive in chunks (across media, in media
    order) while the file decodes; logits and greedy tokens equal those of the batch with every pixel."""
    video = write_pattern_video(tmp_path / "clip.mp4", 40, fps=4, keyframe_interval=8, b_frames=2)  # 10 s
    model = Owl3ForCausalLM.from_pretrained(tiny_checkpoint)
    model.visual_options = VisualOptions(chunk_size=4)
    processor = Owl3Processor.from_pretrained(tiny_checkpoint)
    content = "<|image|>Look. <|video|>What happened first? <|image|>" if with_images else "<|video|>What happened first?"
    images = [block_image(2, 3, 16, SECOND_COLORS[:6]), block_image(1, 1, 20, SECOND_COLORS[6:7])] if with_images else None
    call = {"images": images, "videos": [str(video)], "max_frames": 10}
    whole = processor([{"role": "user", "content": content}], **call)
    streamed = processor([{"role": "user", "content": content}], **call, stream_video=True, stream_chunk_size=4)
    stream = streamed["pixel_values"]
    assert isinstance(stream, PixelStream) and stream.total == whole["pixel_values"].shape[0] == (7 + 10 + 5 if with_images else 10)
    for key in ("input_ids", "attention_mask", "media_offset"):
        assert torch.equal(streamed[key], whole[key])
    sizes = []
    streamed["pixel_values"] = PixelStream(stream.total, ((sizes.append(c.shape[0]) or c) for c in stream.chunks))
    with torch.no_grad():
        assert torch.equal(model(**streamed).logits, model(**whole).logits)
    assert sizes == ([4, 4, 4, 4, 4, 2] if with_images else [4, 4, 2])  # chunks cross the media
    assert streamed.frame_timestamps == whole.frame_timestamps == [[[float(s) for s in range(10)]]]
    streamed["pixel_values"] = stream  # the batch's own stream decodes anew for every call
    for batch in (streamed, streamed):
        out = model.generate(**batch, max_new_tokens=6, stop_token_ids=[])
        assert torch.equal(out.sequences, model.generate(**whole, max_new_tokens=6, stop_token_ids=[]).sequences)


def test_prefetch_is_not_ready_while_the_next_item_is_being_made():
    gate, made = threading.Event(), threading.Event()

    def items():
        gate.wait(timeout=30)
        made.set()
        yield "chunk"

    it = Prefetch(items(), depth=1)
    assert not it.ready()
    gate.set()
    assert made.wait(timeout=30)
    while not it.ready():  # the item is put right after `made`; the 30 s waits above bound a broken producer
        threading.Event().wait(0.001)
    assert next(it) == "chunk"
    with pytest.raises(StopIteration):
        next(it)
