"""Multi-turn chat reuse and the `hyperowl chat` command."""

from __future__ import annotations

import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

from hyperowl import Owl3ForCausalLM, Owl3Processor
from hyperowl.cli import main
from hyperowl.engine.conversation import ChatSession
from hyperowl.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def owl(tiny_checkpoint):
    return Owl3ForCausalLM.from_pretrained(tiny_checkpoint), Owl3Processor.from_pretrained(tiny_checkpoint)


@pytest.fixture()
def pictures(tmp_path):
    paths = []
    for i, (size, colour) in enumerate([((40, 30), "red"), ((20, 60), "blue")]):
        path = tmp_path / f"pic{i}.png"
        Image.new("RGB", size, colour).save(path)
        paths.append(str(path))
    return paths


def fresh_answer(model, processor, messages, images, max_new_tokens, videos=None):
    batch = processor(messages, images=images or None, videos=videos)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, stop_token_ids=processor.stop_token_ids)
    ids = out.sequences[0, : out.num_generated[0]].tolist()
    return processor.decode([i for i in ids if i not in processor.stop_token_ids], skip_special_tokens=True)


def count_visual_projections(model):
    calls = [0]
    hooks = [
        layer.self_attn.v_kv_proj.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for layer in model.language_model.model.hyper_layers
    ]
    return calls, hooks


def test_multi_turn_reuses_caches_and_equals_fresh_runs(owl, pictures):
    model, processor = owl
    session = ChatSession(model, processor, params=SamplingParams(max_new_tokens=6))
    calls, hooks = count_visual_projections(model)
    first = session.ask("What colour is the square?", images=[pictures[0]])
    assert calls[0] == len(hooks)
    for h in hooks:
        h.remove()
    messages = [{"role": "user", "content": "<|image|>What colour is the square?"}]
    assert first == fresh_answer(model, processor, messages, [pictures[0]], 6)
    full_prompt = session.cached_ids.shape[0]

    calls, hooks = count_visual_projections(model)
    second = session.ask("Describe the picture.")
    assert calls[0] == 0  # no new image: the cached visual K/V serve the second turn
    assert session.last_stats["prompt_tokens"] < full_prompt // 2
    for h in hooks:
        h.remove()
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "Describe the picture."}]
    assert second == fresh_answer(model, processor, messages, [pictures[0]], 6)

    calls, hooks = count_visual_projections(model)
    third = session.ask("And this one?", images=[pictures[1]])
    assert calls[0] == len(hooks)  # only the new image is encoded, once
    for h in hooks:
        h.remove()
    messages += [{"role": "assistant", "content": second}, {"role": "user", "content": "<|image|>And this one?"}]
    assert third == fresh_answer(model, processor, messages, pictures, 6)


def test_each_medium_is_loaded_and_converted_once_across_turns(owl, pictures, tmp_path, monkeypatch):
    from hyperowl.engine import conversation as chat_module
    from hyperowl.processing import processor as processor_module
    from hyperowl.processing import stream as stream_module
    from hyperowl.processing.video import load_video
    from tests.media import write_video

    model, processor = owl
    video = str(write_video(tmp_path / "clip.mp4", seconds=4, fps=4, codec="libx264"))
    loads: dict[str, int] = {}
    converted = [0]

    def counting(load):
        def wrapper(src, *args, **kwargs):
            loads[str(src)] = loads.get(str(src), 0) + 1
            return load(src, *args, **kwargs)

        return wrapper

    def counting_conversion(views, size):
        converted[0] += len(views)
        return to_tensor(views, size)

    to_tensor = stream_module.image_to_tensor
    monkeypatch.setattr(processor_module, "load_image", counting(processor_module.load_image))
    monkeypatch.setattr(chat_module, "plan_video", counting(chat_module.plan_video))
    monkeypatch.setattr(stream_module, "image_to_tensor", counting_conversion)
    session = ChatSession(model, processor, params=SamplingParams(max_new_tokens=5))
    turns = [("What is shown?", [pictures[0]], [video]), ("And then?", [], []), ("Compare with this.", [pictures[1]], [])]
    answers = [session.ask(text, images=images, videos=videos) for text, images, videos in turns]
    monkeypatch.undo()
    assert loads == {pictures[0]: 1, video: 1, pictures[1]: 1}
    assert session.videos == [video]  # the file, not its frames
    clip = load_video(video, fps=processor.video_fps, max_frames=processor.max_frames)
    contents = ["<|image|><|video|>What is shown?", "And then?", "<|image|>Compare with this."]
    messages: list[dict[str, str]] = []
    for turn, (content, answer) in enumerate(zip(contents, answers)):
        messages.append({"role": "user", "content": content})
        images = [pictures[0]] + ([pictures[1]] if turn == 2 else [])
        batch = processor(messages, images=images, videos=[clip])
        out = model.generate(**batch, max_new_tokens=5, stop_token_ids=processor.stop_token_ids)
        ids = [i for i in out.sequences[0, : out.num_generated[0]].tolist() if i not in processor.stop_token_ids]
        assert answer == processor.decode(ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
    assert converted[0] == batch["pixel_values"].shape[0]  # every view of the conversation, converted once


def test_a_video_turn_holds_at_most_depth_plus_one_chunks_of_frames(owl, tmp_path, monkeypatch):
    """The frames of a 12-frame video turn go through the model in 6 chunks of 2; the pipeline decodes
    ahead of the vision tower, but never more than `STREAM_DEPTH` chunks ahead of the one being encoded."""
    from hyperowl.processing import stream as stream_module
    from hyperowl.processing.video import load_video
    from tests.media import write_pattern_video

    model, processor = owl
    video = str(write_pattern_video(tmp_path / "clip.mp4", 24, fps=2))  # 12 s
    limit = stream_module.STREAM_DEPTH + 1
    lock = threading.Lock()
    alive, peaks = [0], []
    ahead = threading.Event()  # the producer has run as far ahead as it may

    def dropped():
        with lock:
            alive[0] -= 1

    def tracked(views, size):
        pixels = to_tensor(views, size)
        with lock:
            alive[0] += 1
            peaks.append(alive[0])
            if alive[0] == limit:
                ahead.set()
        weakref.finalize(pixels, dropped)
        return pixels

    def vision_waits_for_the_producer(*_):
        assert ahead.wait(timeout=30)  # a safety net against a hang, not a timing check

    to_tensor = stream_module.image_to_tensor
    monkeypatch.setattr(stream_module, "image_to_tensor", tracked)
    hook = model.vision_model.register_forward_hook(vision_waits_for_the_producer)
    try:
        session = ChatSession(model, processor, params=SamplingParams(max_new_tokens=5), vision_chunk_size=2)
        answer = session.ask("What happened?", videos=[video])
    finally:
        hook.remove()
        monkeypatch.undo()
    assert len(peaks) == 6 and max(peaks) == limit and alive[0] == 0
    clip = load_video(video, fps=processor.video_fps, max_frames=processor.max_frames)
    assert len(clip) == 12
    messages = [{"role": "user", "content": "<|video|>What happened?"}]
    assert answer == fresh_answer(model, processor, messages, None, 5, videos=[clip])


def test_bad_turn_leaves_the_session_usable(owl, pictures, tmp_path):
    model, processor = owl
    session = ChatSession(model, processor, params=SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="missing.png"):
        session.ask("Look", images=[str(tmp_path / "missing.png")])
    assert session.messages == [] and session.images == []
    assert isinstance(session.ask("Hello", images=[pictures[0]]), str)


def test_chat_command_answers_like_generate(owl, tiny_checkpoint, pictures, capsys):
    model, processor = owl
    code = main(["chat", "--model", str(tiny_checkpoint), "--image", pictures[0], "--max-new-tokens", "5", "What colour?"])
    assert code == 0
    printed = capsys.readouterr().out
    expected = fresh_answer(model, processor, [{"role": "user", "content": "<|image|>What colour?"}], [pictures[0]], 5)
    assert printed == f"{expected}\n"  # one-shot: the bare answer


def test_chat_command_reports_bad_input_without_traceback(tiny_checkpoint, tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"not really a jpeg")
    run = subprocess.run(
        [sys.executable, "-m", "hyperowl.cli", "chat", "--model", str(tiny_checkpoint), "--image", str(corrupt), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2
    assert "broken.jpg" in run.stderr and "Traceback" not in run.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "hyperowl.cli", "chat", "--model", str(tmp_path / "nope"), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_interactive_chat_keeps_the_conversation(tiny_checkpoint, pictures):
    script = f"/image {pictures[0]}\nWhat colour?\n/image /no/such/file.png\nbroken turn\nAnd now?\n/quit\n"
    run = subprocess.run(
        [sys.executable, "-m", "hyperowl.cli", "chat", "--model", str(tiny_checkpoint), "--max-new-tokens", "3"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("owl> ") == 2  # the turn with the missing image prints only its error
    assert "file.png" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("sampling", ["exact", "keyframe"])
def test_chat_command_with_a_video_file(owl, tiny_checkpoint, tmp_path, capsys, sampling):
    from hyperowl.processing.video import load_video
    from tests.media import write_video

    model, processor = owl
    video = tmp_path / "clip.mp4"
    write_video(video, seconds=6, fps=4, codec="libx264")
    flags = ["--max-frames", "4", "--max-new-tokens", "4", "--video-sampling", sampling]
    code = main(["chat", "--model", str(tiny_checkpoint), "--video", str(video), *flags, "What happened?"])
    assert code == 0
    clip = load_video(video, max_frames=4, sampling=sampling)
    assert clip.timestamps == ([0.0, 2.0, 3.0, 5.0] if sampling == "exact" else [0.0, 2.0, 3.0, 4.0])  # no keyframe at 5 s
    batch = processor([{"role": "user", "content": "<|video|>What happened?"}], videos=[clip])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 4
    out = model.generate(**batch, max_new_tokens=4, stop_token_ids=processor.stop_token_ids)
    ids = [i for i in out.sequences[0, : out.num_generated[0]].tolist() if i not in processor.stop_token_ids]
    assert capsys.readouterr().out == f"{processor.decode(ids, skip_special_tokens=True)}\n"


def test_quick_start_uses_the_bundled_model(capsys):
    """The README's first command: no --model, the bundled default model answers."""
    example = Path(__file__).parents[1] / "examples" / "red-circle.png"
    code = main(["chat", "--image", str(example), "What colour is the shape?"])
    assert code == 0
    assert capsys.readouterr().out == "red\n"


def test_a_video_that_stops_decoding_leaves_the_session_as_it_was(owl, pictures, tmp_path):
    """The packet index of the file reads (the turn's prompt is built), its frames do not decode: the turn
    fails while the model consumes the stream, and the conversation goes on from the turn before."""
    from hyperowl.errors import MediaError
    from tests.media import write_undecodable_video

    model, processor = owl
    session = ChatSession(model, processor, params=SamplingParams(max_new_tokens=4))
    first = session.ask("What colour is the square?", images=[pictures[0]])
    state = (list(session.messages), session.cached_ids.clone(), session.visual.num_images.tolist())
    with pytest.raises(MediaError, match="cannot read video"):
        session.ask("And in the film?", videos=[str(write_undecodable_video(tmp_path / "broken.mp4"))])
    assert (session.messages, session.visual.num_images.tolist()) == (state[0], state[2])
    assert torch.equal(session.cached_ids, state[1][: len(session.cached_ids)])
    second = session.ask("Describe the picture.")
    messages = [
        {"role": "user", "content": "<|image|>What colour is the square?"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Describe the picture."},
    ]
    assert second == fresh_answer(model, processor, messages, [pictures[0]], 4)
