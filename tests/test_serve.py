"""`hyperowl serve`: the official openai client against a live server, limits, safety, batching."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn
from PIL import Image

from hyperowl.engine.batching import DecodeBatch
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.engine.sampling import SamplingParams
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.video import load_video
from hyperowl.serve import scheduler as scheduler_module
from hyperowl.serve.app import create_app
from hyperowl.serve.errors import ApiError
from hyperowl.serve.media import fetch_remote
from hyperowl.serve.scheduler import Job, Row
from hyperowl.serve.settings import ServerSettings
from tests.arrivals import decode_arrivals
from tests.media import block_image, png_header, write_video
from tests.server import free_port, stop, wait_ready

REPO = Path(__file__).resolve().parents[1]
#: Seconds a test client waits for an answer: far above any request of these tests (tiny model, short
#: answers); it only keeps a hung server from hanging the suite.
TIMEOUT = 120

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


@contextmanager
def thread_server(model: Owl3ForCausalLM, processor: Owl3Processor, settings: ServerSettings) -> Iterator[str]:
    """The app served by uvicorn in a thread of this process; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(model, processor, settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(seed: int) -> Image.Image:
    return block_image(2, 3, 16, [COLORS[(seed + i) % len(COLORS)] for i in range(6)])


def image_part(image: Image.Image) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_uri(png_bytes(image), "image/png")}}


class Reference:
    """In-process greedy answers for the same processor call as the server's."""

    def __init__(self, path: Path) -> None:
        self.model = Owl3ForCausalLM.from_pretrained(path)
        self.processor = Owl3Processor.from_pretrained(path)

    def answer(
        self, messages: list[dict], images: list | None = None, videos: list | None = None, max_tokens: int = 16, **sampling
    ) -> tuple[str, int, int]:
        """(text, prompt tokens, completion tokens) for processor-format `messages` (`sampling`: `generate` settings)."""
        batch = self.processor(messages, images=images or [], videos=videos or [])
        stops = self.processor.stop_token_ids
        out = self.model.generate(**batch, max_new_tokens=max_tokens, stop_token_ids=stops, **sampling)
        ids = out.sequences[0, : out.num_generated[0]].tolist()
        text = self.processor.decode([i for i in ids if i not in stops], skip_special_tokens=True)
        return text, batch["input_ids"].shape[1], len(ids)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve-media")
    inside = root / "media"
    inside.mkdir()
    picture(0).save(inside / "pic.png")
    picture(1).save(root / "outside.png")
    (root / "secret.txt").write_text("top secret")
    (inside / "escape.png").symlink_to(root / "outside.png")
    write_video(inside / "clip.mp4", seconds=3, fps=4, codec="mpeg4")
    return inside


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, media_dir: Path) -> Iterator[str]:
    """A `hyperowl serve` subprocess with small limits; yields its base URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "hyperowl.cli",
        "serve",
        "--model",
        str(tiny_checkpoint),
        "--port",
        str(port),
        "--media-dir",
        str(media_dir),
        "--max-images",
        "4",
        "--max-frames",
        "8",
        "--max-image-pixels",
        "65536",
        "--max-tokens",
        "3000",
        "--max-body-mb",
        "1",
        "--max-batch-size",
        "8",
        "--log-level",
        "warning",
        "--num-threads",
        "1",  # many threads on 2 shared cores make every step many times slower
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYPEROWL_API_KEY": ""}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def ref(tiny_checkpoint: Path) -> Iterator[Reference]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server subprocess shares the cores
    yield Reference(tiny_checkpoint)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server: str, tiny_checkpoint: Path) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(tiny_checkpoint: Path) -> str:
    return tiny_checkpoint.resolve().name


def user(*parts: Any) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def test_text_answer_equals_generate(client: openai.OpenAI, ref: Reference, model_name: str) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What colour is the square?"}]
    reply = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=16)
    text, prompt_tokens, completion_tokens = ref.answer(messages)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("length" if completion_tokens == 16 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens


def test_image_streaming_equals_generate(client: openai.OpenAI, ref: Reference, model_name: str) -> None:
    image = picture(2)
    stream = client.chat.completions.create(
        model=model_name,
        messages=user(image_part(image), {"type": "text", "text": "Describe the picture."}),
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text, prompt_tokens, completion_tokens = ref.answer(
        user({"type": "image"}, {"type": "text", "text": "Describe the picture."}), images=[image], max_tokens=20
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_image_non_streaming_and_media_dir_file(client: openai.OpenAI, ref: Reference, model_name: str, media_dir: Path) -> None:
    question = {"type": "text", "text": "Which picture shows a green triangle?"}
    expected = ref.answer(user({"type": "image"}, {"type": "image"}, question), images=[picture(3), picture(0)])[0]
    for local in (f"file://{media_dir / 'pic.png'}", "pic.png", str(media_dir / "pic.png")):
        parts = [image_part(picture(3)), {"type": "image_url", "image_url": {"url": local}}, question]
        reply = client.chat.completions.create(model=model_name, messages=user(*parts), temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected


def test_video_streaming_and_not(client: openai.OpenAI, ref: Reference, model_name: str, media_dir: Path) -> None:
    data = (media_dir / "clip.mp4").read_bytes()
    part = {"type": "video_url", "video_url": {"url": data_uri(data, "video/mp4"), "max_frames": 3}}
    question = {"type": "text", "text": "What happened first in the video?"}
    clip = load_video(media_dir / "clip.mp4", fps=ref.processor.video_fps, max_frames=3)
    assert len(clip) == 3
    expected = ref.answer(user({"type": "video"}, question), videos=[clip])[0]
    reply = client.chat.completions.create(model=model_name, messages=user(part, question), temperature=0, max_tokens=16)
    assert reply.choices[0].message.content == expected
    local = {"type": "video_url", "video_url": {"url": "clip.mp4", "max_frames": 3}}
    stream = client.chat.completions.create(
        model=model_name, messages=user(local, question), temperature=0, max_tokens=16, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def media_cache_counts(server: str) -> tuple[float, float]:
    """(hits, misses) of the server's media feature cache."""
    values = {}
    for line in httpx.get(f"{server}/metrics", timeout=TIMEOUT).text.splitlines():
        if line.startswith(("hyperowl_media_cache_hits ", "hyperowl_media_cache_misses ")):
            name, value = line.split()
            values[name] = float(value)
    return values["hyperowl_media_cache_hits"], values["hyperowl_media_cache_misses"]


def test_a_repeated_film_is_not_decoded_again(
    server: str, client: openai.OpenAI, ref: Reference, model_name: str, media_dir: Path
) -> None:
    """Two questions about the same video: the second takes the kept features (a cache hit, no decode, no
    vision tower) and both answers equal in-process generation; other frame settings are another entry."""
    data = (media_dir / "clip.mp4").read_bytes()
    part = {"type": "video_url", "video_url": {"url": data_uri(data, "video/mp4"), "max_frames": 2}}
    clip = load_video(media_dir / "clip.mp4", fps=ref.processor.video_fps, max_frames=2)
    hits, misses = media_cache_counts(server)
    for n, text in enumerate(("What happened first in the video?", "What happened last in the video?")):
        question = {"type": "text", "text": text}
        expected, prompt_tokens, _ = ref.answer(user({"type": "video"}, question), videos=[clip])
        reply = client.chat.completions.create(model=model_name, messages=user(part, question), temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected and reply.usage.prompt_tokens == prompt_tokens
        assert media_cache_counts(server) == (hits + n, misses + 1)
    other = {"type": "video_url", "video_url": {"url": "clip.mp4", "max_frames": 1}}
    client.chat.completions.create(model=model_name, messages=user(other, question), temperature=0, max_tokens=4)
    assert media_cache_counts(server) == (hits + 1, misses + 2)


@pytest.mark.parametrize("cache_mb", [0, 8], ids=["no-cache", "cache"])
def test_video_frames_decode_while_the_model_encodes_them(
    ref: Reference, media_dir: Path, monkeypatch: pytest.MonkeyPatch, cache_mb: int
) -> None:
    """A video request is only planned when it arrives; its frames decode in the scheduler's stream (a
    background thread beside the vision tower), with or without the media cache, and the answer equals
    in-process generation. A file whose packets index but do not decode gets 400 `invalid_media`,
    streamed or not, and the server keeps serving."""
    from hyperowl.processing.video import VideoPlan
    from tests.media import write_undecodable_video

    question = {"type": "text", "text": "What happened first in the video?"}
    clip = load_video(media_dir / "clip.mp4", fps=ref.processor.video_fps, max_frames=3)
    expected = ref.answer(user({"type": "video"}, question), videos=[clip])[0]
    write_undecodable_video(media_dir / "broken.mp4")
    decoded_in: list[str] = []
    chunks = VideoPlan.chunks

    def recorded(plan: VideoPlan, *args: Any, **kwargs: Any) -> Any:
        decoded_in.append(threading.current_thread().name)
        return chunks(plan, *args, **kwargs)

    monkeypatch.setattr(VideoPlan, "chunks", recorded)
    settings = ServerSettings(model_name="m", media_dir=media_dir, media_cache_bytes=cache_mb * 2**20)
    with thread_server(ref.model, ref.processor, settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        part = {"type": "video_url", "video_url": {"url": "clip.mp4", "max_frames": 3}}
        reply = client.chat.completions.create(model="m", messages=user(part, question), temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected
        assert decoded_in == ["hyperowl-prefetch"]
        broken = {"type": "video_url", "video_url": {"url": "broken.mp4", "max_frames": 3}}
        for stream in (False, True):
            body = {"model": "m", "messages": user(broken, question), "max_tokens": 4, "stream": stream}
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT)
            error = response.json()["error"]
            assert response.status_code == 400 and error["code"] == "invalid_media", response.text
            assert "cannot read video" in error["message"] and "Invalid data" in error["message"]
        reply = client.chat.completions.create(model="m", messages=user(part, question), temperature=0, max_tokens=16)
        assert reply.choices[0].message.content == expected


def test_video_keyframe_sampling(client: openai.OpenAI, ref: Reference, model_name: str, media_dir: Path) -> None:
    """`"sampling": "keyframe"` answers about the keyframes nearest to the sampled frames."""
    from tests.media import write_pattern_video

    path = write_pattern_video(media_dir / "gop.mp4", 40, fps=4, keyframe_interval=20)  # keyframes at 0 s and 5 s
    question = {"type": "text", "text": "What happened first in the video?"}
    clip = load_video(path, fps=ref.processor.video_fps, max_frames=3, sampling="keyframe")
    exact = load_video(path, fps=ref.processor.video_fps, max_frames=3)
    assert (clip.timestamps, exact.timestamps) == ([0.0, 5.0, 5.0], [1.0, 5.0, 8.0])
    expected = ref.answer(user({"type": "video"}, question), videos=[clip])[0]
    part = {"type": "video_url", "video_url": {"url": "gop.mp4", "max_frames": 3, "sampling": "keyframe"}}
    reply = client.chat.completions.create(model=model_name, messages=user(part, question), temperature=0, max_tokens=16)
    assert reply.choices[0].message.content == expected


def test_stop_strings_seed_and_sampling(client: openai.OpenAI, ref: Reference, model_name: str) -> None:
    messages = [{"role": "user", "content": "Describe the picture."}]
    full = ref.answer(messages, max_tokens=30)[0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = full[: full.index(stop)]
    for stream in (False, True):
        reply = client.chat.completions.create(
            model=model_name, messages=messages, temperature=0, max_tokens=30, stop=[stop], stream=stream
        )
        if stream:
            pieces = list(reply)
            assert "".join(c.choices[0].delta.content or "" for c in pieces) == cut
            assert pieces[-1].choices[0].finish_reason == "stop"
        else:
            assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    sampled = [
        client.chat.completions.create(model=model_name, messages=messages, temperature=1.0, top_p=0.9, seed=seed, max_tokens=12)
        .choices[0]
        .message.content
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]


def test_sampling_extensions_and_neutral_openai_fields(client: openai.OpenAI, ref: Reference, model_name: str) -> None:
    messages = [{"role": "user", "content": "Describe the picture."}]
    greedy = ref.answer(messages, max_tokens=30)[0]
    penalised = ref.answer(messages, max_tokens=30, repetition_penalty=1.5)[0]
    assert penalised != greedy  # the penalty matters for this prompt, so the comparison below tests it

    def ask(**extra) -> str:
        reply = client.chat.completions.create(model=model_name, messages=messages, max_tokens=30, **extra)
        return reply.choices[0].message.content

    assert ask(temperature=0, extra_body={"repetition_penalty": 1.5}) == penalised
    assert ask(temperature=1.0, seed=3, extra_body={"top_k": 1}) == greedy
    neutral = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0, "response_format": {"type": "text"}}
    assert ask(temperature=0, **neutral) == greedy
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        ask(temperature=0, top_logprobs=2)


def test_logprobs_are_the_models_and_stream_like_the_answer(client: openai.OpenAI, ref: Reference, model_name: str) -> None:
    messages = [{"role": "user", "content": "Describe the picture."}]
    reply = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    stop_token = reply.choices[0].finish_reason == "stop"
    assert len(entries) == reply.usage.completion_tokens - stop_token  # the stop token has no entry
    # teacher-forced reference: the model's log-softmax at each answer position
    batch = ref.processor(messages)
    out = ref.model.generate(**batch, max_new_tokens=len(entries), stop_token_ids=ref.processor.stop_token_ids)
    answer_ids = out.sequences[0, : len(entries)].tolist()
    ids = torch.cat([batch["input_ids"], torch.tensor([answer_ids])], 1)
    with torch.no_grad():
        expected = torch.log_softmax(ref.model(input_ids=ids).logits[0, batch["input_ids"].shape[1] - 1 : -1].float(), -1)
    for step, (entry, token) in enumerate(zip(entries, answer_ids)):
        assert entry.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the top one
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes) == entry.token.encode()
    streamed = client.chat.completions.create(
        model=model_name, messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True
    )
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert [e.model_dump() for c in chunks if c.logprobs for e in c.logprobs.content] == [e.model_dump() for e in entries]
    plain = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_sixteen_concurrent_requests_equal_their_sequential_answers(
    server: str, client: openai.OpenAI, ref: Reference, model_name: str
) -> None:
    questions = ["What colour is the square?", "Describe the picture.", "Which picture shows a green triangle?", "yes or no"]
    cases = []
    for i in range(16):
        text = {"type": "text", "text": questions[i % 4] + " " * (i % 3)}
        images = [picture(i + k) for k in range(i % 3)]  # 0, 1 or 2 images: mixed batches
        cases.append((user(*[image_part(im) for im in images], text), user(*[{"type": "image"}] * len(images), text), images))
    expected = [ref.answer(messages, images=images, max_tokens=24)[0] for _, messages, images in cases]

    def ask(case: tuple) -> str:
        return (
            client.chat.completions.create(model=model_name, messages=case[0], temperature=0, max_tokens=24)
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, cases))
    assert answers == expected
    steps = decode_batch_histogram(server)
    assert steps["+Inf"] > steps["2.0"], "no decode step ran more than 2 requests together"


def decode_batch_histogram(server: str) -> dict[str, float]:
    """Cumulative counts of `hyperowl_decode_batch_size` by bucket bound."""
    prefix = 'hyperowl_decode_batch_size_bucket{le="'
    lines = [line for line in httpx.get(f"{server}/metrics", timeout=TIMEOUT).text.splitlines() if line.startswith(prefix)]
    return {line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1]) for line in lines}


def test_models_health_metrics(server: str, client: openai.OpenAI, model_name: str) -> None:
    assert [m.id for m in client.models.list()] == [model_name]
    health = httpx.get(f"{server}/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["model"] == model_name
    text = httpx.get(f"{server}/metrics", timeout=TIMEOUT).text
    for name in (
        "hyperowl_requests_total",
        "hyperowl_errors_total",
        "hyperowl_queue_depth",
        "hyperowl_first_token_seconds_bucket",
        "hyperowl_tokens_per_second",
        "hyperowl_generated_tokens_total",
    ):
        assert name in text


def bad_requests(media_dir: Path, model_name: str) -> list[tuple[str, Any, int, str | None]]:
    """(name, body (bytes = raw), status, error code)."""
    ok_image = image_part(picture(0))
    text = {"type": "text", "text": "hi"}
    big_png = data_uri(png_header(5000, 5000), "image/png")
    outside = media_dir.parent
    body = lambda *parts, **extra: {"model": model_name, "messages": user(*parts), **extra}
    return [
        ("invalid json", b"{not json", 400, "invalid_json"),
        ("not utf-8", b"\xff\xfe", 400, "invalid_json"),
        ("no messages", {"model": model_name}, 422, "invalid_request"),
        ("empty messages", {"messages": []}, 422, "invalid_request"),
        ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "invalid_request"),
        ("unknown part", body({"type": "audio", "audio": "x"}), 422, "invalid_request"),
        ("n > 1", body(text, n=2), 422, "invalid_request"),
        ("temperature", body(text, temperature=5), 422, "invalid_request"),
        ("wrong model", {**body(text), "model": "gpt-4"}, 404, "model_not_found"),
        ("max_tokens cap", body(text, max_tokens=5000), 400, "max_tokens"),
        ("top_k < 0", body(text, top_k=-1), 422, "invalid_request"),
        ("top_logprobs > 20", body(text, logprobs=True, top_logprobs=21), 422, "invalid_request"),
        ("tools", body(text, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter"),
        ("json mode", body(text, response_format={"type": "json_object"}), 400, "unsupported_parameter"),
        ("presence penalty", body(text, presence_penalty=0.5), 400, "unsupported_parameter"),
        ("too many stops", body(text, stop=["a", "b", "c", "d", "e"]), 400, None),
        ("too many images", body(*[ok_image] * 5, text), 400, "max_images"),
        ("too many pixels", body({"type": "image_url", "image_url": {"url": big_png}}, text), 400, "max_image_pixels"),
        (
            "video frames cap",
            body({"type": "video_url", "video_url": {"url": "clip.mp4", "max_frames": 9}}, text),
            400,
            "max_frames",
        ),
        (
            "unknown video sampling",
            body({"type": "video_url", "video_url": {"url": "clip.mp4", "sampling": "fast"}}, text),
            422,
            "invalid_request",
        ),
        (
            "body too large",
            body({"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1_200_000}}),
            413,
            "max_body_bytes",
        ),
        (
            "bad base64",
            body({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, text),
            400,
            "invalid_media",
        ),
        (
            "not an image",
            body({"type": "image_url", "image_url": {"url": data_uri(b"hello", "image/png")}}, text),
            400,
            "invalid_media",
        ),
        (
            "not a video",
            body({"type": "video_url", "video_url": {"url": data_uri(b"hello", "video/mp4")}}, text),
            400,
            "invalid_media",
        ),
        ("image placeholder mismatch", body({"type": "text", "text": "<|image|> what?"}), 400, "invalid_prompt"),
        (
            "system not first",
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            400,
            "invalid_prompt",
        ),
        ("path traversal", body({"type": "image_url", "image_url": {"url": "../outside.png"}}, text), 400, "media_path_refused"),
        (
            "absolute path outside",
            body({"type": "image_url", "image_url": {"url": str(outside / "secret.txt")}}, text),
            400,
            "media_path_refused",
        ),
        (
            "file url outside",
            body({"type": "image_url", "image_url": {"url": f"file://{outside}/outside.png"}}, text),
            400,
            "media_path_refused",
        ),
        ("symlink out", body({"type": "image_url", "image_url": {"url": "escape.png"}}, text), 400, "media_path_refused"),
        ("missing file", body({"type": "image_url", "image_url": {"url": "nope.png"}}, text), 400, "media_path_refused"),
        ("folder", body({"type": "image_url", "image_url": {"url": "."}}, text), 400, "media_path_refused"),
        (
            "remote disabled",
            body({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}, text),
            400,
            "remote_media_disabled",
        ),
        ("bad scheme", body({"type": "image_url", "image_url": {"url": "ftp://host/x.png"}}, text), 400, "invalid_media"),
    ]


def test_every_bad_input_gets_its_4xx_and_the_server_keeps_serving(
    server: str, media_dir: Path, model_name: str, client: openai.OpenAI, ref: Reference
) -> None:
    failures = []
    for name, body, status, code in bad_requests(media_dir, model_name):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(
            f"{server}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}, timeout=60
        )
        error = response.json().get("error", {})
        if (
            response.status_code != status
            or (code and error.get("code") != code)
            or set(error) != {"message", "type", "param", "code"}
        ):
            failures.append((name, response.status_code, response.text[:300]))
    assert not failures
    assert httpx.get(f"{server}/nowhere", timeout=TIMEOUT).json()["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    messages = [{"role": "user", "content": "yes or no"}]
    reply = client.chat.completions.create(model=model_name, messages=messages, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content == ref.answer(messages, max_tokens=8)[0]


def wait_until(condition, timeout: float = TIMEOUT) -> bool:
    """Poll `condition` until it holds; the bound only keeps a broken server from hanging the suite."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_disconnected_clients_are_cancelled(server: str, model_name: str) -> None:
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Describe the picture."}],
        "max_tokens": 3000,
        "ignore_eos": True,
        "temperature": 0,
    }
    active = lambda: httpx.get(f"{server}/health", timeout=TIMEOUT).json()["active"]
    # 3000 tokens take far longer than the few polls of /health before the client leaves
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=TIMEOUT) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert wait_until(lambda: active() == 1)
    assert wait_until(lambda: active() == 0), "streaming request kept running after the client left"
    payload = json.dumps(body).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:  # a plain request whose client hangs up mid-generation
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (host.encode(), len(payload))
            + payload
        )
        assert wait_until(lambda: active() == 1)
    assert wait_until(lambda: active() == 0), "request kept running after the client left"


class MovableClock:
    """Stands in for the scheduler's `time` module: the real monotonic clock plus an offset the test moves
    forward, so a request's deadline passes when the test says so, whatever the machine's speed."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture(scope="module")
def strict_clock() -> Iterator[MovableClock]:
    clock = MovableClock()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scheduler_module, "time", clock)
        yield clock


@pytest.fixture(scope="module")
def strict(ref: Reference, strict_clock: MovableClock) -> Iterator[str]:
    """In-process server: API key, one request at a time, no queue, 60 s per request on `strict_clock` (the
    tests move that clock past the limit; requests that should finish take well under it)."""
    settings = ServerSettings(
        model_name="strict", api_key="sesame", max_batch_size=1, max_queue=0, request_timeout_s=60, max_tokens=4000
    )
    with thread_server(ref.model, ref.processor, settings) as url:
        yield url


def test_api_key(strict: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        response = httpx.post(f"{strict}/v1/chat/completions", json=body, headers=headers, timeout=TIMEOUT)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{strict}/v1/models", timeout=TIMEOUT).status_code == 401
    assert httpx.get(f"{strict}/metrics", timeout=TIMEOUT).status_code == 401
    assert httpx.get(f"{strict}/health", timeout=TIMEOUT).status_code == 200
    good = openai.OpenAI(base_url=f"{strict}/v1", api_key="sesame", max_retries=0)
    assert good.chat.completions.create(model="strict", messages=body["messages"], max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{strict}/v1", api_key="nope", max_retries=0).models.list()


def test_queue_limit_and_timeout(strict: str, strict_clock: MovableClock) -> None:
    headers = {"Authorization": "Bearer sesame"}
    long = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "ignore_eos": True}
    results: dict[str, httpx.Response] = {}
    thread = threading.Thread(
        target=lambda: results.update(
            long=httpx.post(f"{strict}/v1/chat/completions", json=long, headers=headers, timeout=TIMEOUT)
        )
    )
    thread.start()
    assert wait_until(lambda: httpx.get(f"{strict}/health", timeout=TIMEOUT).json()["active"] == 1)
    short = {"messages": long["messages"], "max_tokens": 2}
    busy = httpx.post(f"{strict}/v1/chat/completions", json=short, headers=headers, timeout=TIMEOUT)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "max_queue" and busy.headers["retry-after"] == "1"
    strict_clock.offset += 61  # past the running request's deadline (its 4000 tokens are far from done)
    thread.join(TIMEOUT)
    assert results["long"].status_code == 408 and results["long"].json()["error"]["code"] == "request_timeout_s"
    assert "did not finish within 60 s" in results["long"].json()["error"]["message"]
    with httpx.stream(
        "POST", f"{strict}/v1/chat/completions", json={**long, "stream": True}, headers=headers, timeout=TIMEOUT
    ) as response:
        lines = (line[6:] for line in response.iter_lines() if line.startswith("data: "))
        events = [next(lines)]  # generating
        strict_clock.offset += 61
        events += list(lines)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout_s"
    ok = httpx.post(f"{strict}/v1/chat/completions", json=short, headers=headers, timeout=TIMEOUT)
    assert ok.status_code == 200


def test_remote_media_size_cap_and_timeout() -> None:
    """/slow answers only once the test is over, so its fetch times out whatever the limit; the other fetches
    get a limit far above a loopback transfer of 5 kB."""
    payload = b"x" * 5000
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow":
                release.wait(TIMEOUT)
            self.send_response(200 if self.path != "/missing" else 404)
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (size cap, timeout), as the test wants

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        allowed = ServerSettings(allow_remote_media=True, max_media_bytes=8000, remote_timeout_s=TIMEOUT)
        assert asyncio.run(fetch_remote(f"{base}/ok", allowed)) == payload
        impatient = ServerSettings(allow_remote_media=True, max_media_bytes=8000, remote_timeout_s=0.2)
        for path, settings, code in (
            ("/ok", ServerSettings(allow_remote_media=True, max_media_bytes=1000), "max_media_bytes"),
            ("/slow", impatient, "media_fetch_timeout"),
            ("/missing", allowed, "media_fetch_failed"),
            ("/ok", ServerSettings(), "remote_media_disabled"),
        ):
            with pytest.raises(ApiError) as info:
                asyncio.run(fetch_remote(f"{base}{path}", settings))
            assert info.value.code == code and info.value.status == 400
    finally:
        release.set()
        http.shutdown()


def test_mixed_batch_rows_equal_their_own_generation(ref: Reference) -> None:
    """Rows with and without images join and leave a running batch; each row's greedy tokens equal its own run."""
    model, processor = ref.model, ref.processor
    requests = [  # (messages, images, join at step, tokens)
        (user({"type": "image"}, {"type": "text", "text": "What colour is the square?"}), [picture(0)], 0, 5),
        ([{"role": "user", "content": "Describe the picture."}], [], 2, 12),
        (user({"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which picture?"}), [picture(1), picture(2)], 8, 8),
        ([{"role": "user", "content": "yes or no"}], [], 9, 6),
    ]
    inputs = [(dict(processor(messages, images=images)), at, tokens) for messages, images, at, tokens in requests]
    expected = [model.generate(**batch, max_new_tokens=t, stop_token_ids=[]).sequences[0].tolist() for batch, _, t in inputs]
    batch, visual_rows = DecodeBatch(model), []
    assert decode_arrivals(batch, inputs, 40, lambda b: visual_rows.append(b.visual is not None)) == expected
    assert any(visual_rows) and not all(visual_rows) and batch.size == 0  # the visual K/V went when the last image row did


def test_streamed_text_holds_back_stop_string_prefixes_and_partial_characters() -> None:
    pieces = {1: "Hel", 2: "lo ", 3: "ST", 4: "OP", 5: "x", 6: "\ufffd", 7: "é"}

    def decode(ids: list[int]) -> str:
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")  # token 6 is the first byte of "é"

    async def run(tokens: list[int], max_tokens: int = 10) -> tuple[list[str], str | None]:
        batch = {"attention_mask": torch.ones(1, 3, dtype=torch.long)}
        job = Job(batch, SamplingParams(max_new_tokens=max_tokens), ["STOP"], False, 10.0)
        row = Row(job, decode, {0}, torch.device("cpu"))
        reasons = [row.accept(t) for t in tokens]
        await asyncio.sleep(0)
        sent = []
        while not job.events.empty():
            sent.append(job.events.get_nowait().text)
        return sent, reasons[-1]

    assert asyncio.run(run([1, 2, 3, 4])) == (["Hel", "lo "], "stop")
    assert asyncio.run(run([1, 2, 3, 5, 0])) == (["Hel", "lo ", "STx"], "stop")
    assert asyncio.run(run([1, 6, 7, 3], max_tokens=4)) == (["Hel", "é", "ST"], "length")


def test_media_cache_keeps_the_most_recently_used_within_its_bytes() -> None:
    from hyperowl.serve.media_cache import CachedMedium, MediaCache, media_key

    entry = lambda n: CachedMedium("<|image|>" * n, torch.zeros(n, 4, 8))  # n x 128 bytes
    cache = MediaCache(max_bytes=5 * 128)
    cache.put("a", entry(2))
    cache.put("b", entry(2))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", entry(2))  # 6 x 128 > 5 x 128: the least recently used ("b") goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert (len(cache), cache.nbytes, cache.hits, cache.misses) == (2, 4 * 128, 3, 1)
    cache.put("huge", entry(6))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    same = media_key(b"film", ("video", 384, 16))
    assert same == media_key(b"film", ("video", 384, 16)) != media_key(b"film", ("video", 384, 8)) != media_key(b"other", ("video", 384, 16))


def test_a_decode_step_picks_every_row_on_the_device_and_reads_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pick_step` gives each row what it would pick alone (greedy, penalised greedy, seeded sampling,
    sampling with logprobs), keeps one row's failure to that row, and reads the device back once."""
    from hyperowl.engine.sampling import pick_row
    from hyperowl.serve.scheduler import pick_step

    vocab = 50
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(0)) * 3
    prompt = {"input_ids": torch.tensor([[4, 7, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    settings = [
        (SamplingParams(), None),
        (SamplingParams(repetition_penalty=1.5), None),
        (SamplingParams(do_sample=True, temperature=0.8, top_k=10, seed=3), None),
        (SamplingParams(do_sample=True, top_p=0.9, seed=4), 3),
        (SamplingParams(do_sample=True, seed=5), None),
    ]

    async def run() -> tuple[list[Any], list[Row]]:
        rows = [Row(Job(prompt, params, [], False, 10.0, top), str, {0}, torch.device("cpu")) for params, top in settings]
        rows[4].pick = lambda _logits: (_ for _ in ()).throw(ValueError("bad row"))  # type: ignore[method-assign]
        reads = []
        for name in ("tolist", "item", "__int__", "__float__", "__bool__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: (reads.append(_n), _o(self, *a))[1])
        picks = pick_step(rows, logits)
        monkeypatch.undo()
        assert reads == ["tolist"]
        return picks, rows

    picks, rows = asyncio.run(run())
    alone = []
    for (params, _), i in zip(settings[:4], range(4)):
        seen = prompt["input_ids"][0] if params.repetition_penalty != 1.0 else None
        alone.append(int(pick_row(logits[i], params, seen, params.generator(torch.device("cpu")))))
    assert [p[0] for p in picks[:4]] == alone
    assert [p[1] is None for p in picks[:4]] == [True, True, True, False]
    logprobs = torch.log_softmax(logits[3], -1)
    top = torch.topk(logprobs, 3)
    assert picks[3][1] == pytest.approx([float(logprobs[alone[3]]), *top.values.tolist(), *map(float, top.indices)], abs=1e-6)
    assert isinstance(picks[4], ValueError)
    assert rows[1].history.tolist() == [4, 7, 9, alone[1]]  # the penalty's history grows on the device
