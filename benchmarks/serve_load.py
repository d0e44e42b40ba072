"""Load test of `hyperowl serve`: N concurrent clients, continuous batching vs. one request at a time.

Two servers run side by side on the same checkpoint, one with `--max-batch-size B` ("batched") and one
with `--max-batch-size 1` ("one at a time"). After a warm-up of each, the script sends bursts: C clients,
each sending R chat completions back to back (fixed length: `ignore_eos`, greedy). The bursts of the two
servers alternate (round 1 batched first, round 2 one-at-a-time first, ...) so a slow spell of a shared
machine lands on both. Every burst is a row of the result table (generated tokens/s, requests/s, p50/p99
request latency); a second table gives each system's median over the rounds and the median of the
per-round speed-ups. The script writes the tables, with its command line, the machine, the date and the
git commit, to `--out` (default `benchmarks/results/serve_load_<device>.md`).

Model: `--model DIR`, else the bundled default model if present, else a random `cpu-small`
checkpoint (hidden 256, 4 layers) written to a temporary folder. `--device cuda` serves on a GPU.

  python benchmarks/serve_load.py --clients 1 8 --images
  python benchmarks/serve_load.py --model /ckpt/mPLUG-Owl3-7B-240728 --device cuda --clients 1 8 32 --max-tokens 128
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import datetime
import io
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hyperowl.hub import DEFAULT_MODEL

QUESTIONS = [
    "What colour is the square?",
    "Describe the picture.",
    "Which picture shows a green triangle?",
    "What happened first in the video?",
]
BATCHED = "batched"
ONE_AT_A_TIME = "one at a time"


def random_checkpoint(path: Path, preset: str, device: str, dtype: str) -> Path:
    """A random checkpoint of `preset`'s shapes (built on `device` in `dtype`) with a trained toy tokenizer,
    whose 1,024 tokens are the vocabulary (the only shape that differs from the preset)."""
    import torch

    from hyperowl.config import PRESETS
    from hyperowl.engine.generate import Owl3ForCausalLM
    from hyperowl.processing.tokenizer import ENDOFTEXT, IM_END, train_tokenizer

    corpus = [q + " The square is red. A blue circle on a white background. Picture 3." for q in QUESTIONS] * 50
    tokenizer = train_tokenizer(corpus, vocab_size=1024)
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    config = dataclasses.replace(copy.deepcopy(PRESETS[preset]), vocab_size=len(tokenizer), eos_token_id=stops)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = Owl3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    tokenizer.save_pretrained(str(path))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Poll `url`/health until it answers 200; fail early when the server process `proc` exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} did not start within {timeout} s")


def start_server(model: Path, batch_size: int, threads: int | None, device: str | None, dtype: str) -> tuple[subprocess.Popen, str]:
    """A `hyperowl serve` subprocess on a free port, answering /health; returns it and its base URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "hyperowl.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--max-batch-size",
        str(batch_size),
        "--max-queue",
        "1024",
        "--log-level",
        "warning",
    ]
    if threads:
        command += ["--num-threads", str(threads)]
    if device:
        command += ["--device", device]
    command += ["--dtype", dtype, "--max-images", "64", "--max-frames", "512"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=300)
    except TimeoutError:
        proc.kill()
        raise
    return proc, url


def video_mp4(seconds: int) -> str:
    """A data URI of a `seconds`-long 160x96 H.264 mp4 at 4 fps (a moving square; a keyframe every second)."""
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.options = {"preset": "ultrafast", "x264-params": "keyint=4:min-keyint=4:scenecut=0"}
        for i in range(seconds * 4):
            rgb = np.full((96, 160, 3), 40, dtype=np.uint8)
            rgb[32:64, (i * 8) % 128 : (i * 8) % 128 + 32] = (220, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


def tiny_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Result:
    """One burst against one server."""

    mode: str
    round: int
    clients: int
    requests: int
    tokens: int
    wall_s: float
    latencies: list[float]
    first_token: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        ordered = sorted(self.latencies if values is None else values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Media:
    """What requests carry: every second request one small picture (`alternate`), or every request
    `images` pictures and/or a video (data URI, `frames` sampled)."""

    image: str | None = None
    alternate: bool = True
    images: int = 0
    video: str | None = None
    frames: int = 0

    def parts(self, index: int) -> list[dict]:
        if self.image is None and self.video is None:
            return []
        if self.alternate:
            return [{"type": "image_url", "image_url": {"url": self.image}}] if index % 2 else []
        parts = [{"type": "image_url", "image_url": {"url": self.image}}] * self.images
        if self.video is not None:
            parts.append({"type": "video_url", "video_url": {"url": self.video, "max_frames": self.frames}})
        return parts

    def describe(self) -> str:
        if self.image is None and self.video is None:
            return "text only"
        if self.alternate:
            return "every second request with a 96x64 image"
        what = [f"{self.images} images of 96x64"] if self.images else []
        what += [f"a {self.frames}-frame 160x96 video"] if self.video else []
        return "every request with " + " and ".join(what)


def ask(http: httpx.Client, url: str, body: dict) -> tuple[float, float, int]:
    """One streamed chat completion: seconds to the first answer chunk, to the end, and completion tokens."""
    start = time.perf_counter()
    first, tokens = None, 0
    with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        if response.status_code != 200:
            raise RuntimeError(response.read().decode()[:300])
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter() - start
    return first if first is not None else end, end, tokens


def load(url: str, mode: str, round_: int, clients: int, per_client: int, max_tokens: int, media: Media) -> Result:
    """`clients` threads, each sending `per_client` streamed requests one after the other."""
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(per_client):
                text = {"type": "text", "text": QUESTIONS[(index + r) % len(QUESTIONS)]}
                body = {
                    "messages": [{"role": "user", "content": [*media.parts(index + r), text]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                try:
                    first, elapsed, count = ask(http, url, body)
                except RuntimeError as exc:
                    errors.append(str(exc))
                    return
                with lock:
                    latencies.append(elapsed)
                    first_tokens.append(first)
                    tokens[0] += count

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0][:300]}")
    return Result(mode, round_, clients, len(latencies), tokens[0], wall, latencies, first_tokens)


def git_commit() -> str:
    """Short hash of the checkout the numbers come from, with `+changes` when it has uncommitted edits."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_line(device: str) -> str:
    """The machine: CPU model and cores, torch, the GPU when serving on one, and the load when the run began."""
    import torch

    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    line = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device.startswith("cuda"):
        line += f", GPU {torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    load1, load5, _ = os.getloadavg()
    return line + f"; load average {load1:.1f} (1 min) / {load5:.1f} (5 min) when the run began"


def table(results: list[Result]) -> list[str]:
    """Every burst, in the order it ran, with the speed-up over the other system's burst of the same round."""
    rows = [
        "| round | clients | mode | requests | tokens/s | requests/s | p50 latency (s) | p99 latency (s) | p50 first token (s) | p99 first token (s) | speed-up |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    single = {(r.round, r.clients): r for r in results if r.mode == ONE_AT_A_TIME}
    for r in results:
        speedup = r.tokens_per_s / single[r.round, r.clients].tokens_per_s
        rows.append(
            f"| {r.round} | {r.clients} | {r.mode} | {r.requests} | {r.tokens_per_s:.1f} | {r.requests / r.wall_s:.2f} | "
            f"{statistics.median(r.latencies):.2f} | {r.percentile(0.99):.2f} | {statistics.median(r.first_token):.2f} | "
            f"{r.percentile(0.99, r.first_token):.2f} | {speedup:.2f}x |"
        )
    return rows


def round_speedups(results: list[Result], clients: int) -> list[float]:
    """Per round, the batched server's tokens/s over the one-at-a-time server's, at `clients` clients."""
    batched = sorted((r for r in results if r.clients == clients and r.mode == BATCHED), key=lambda r: r.round)
    single = sorted((r for r in results if r.clients == clients and r.mode == ONE_AT_A_TIME), key=lambda r: r.round)
    return [b.tokens_per_s / s.tokens_per_s for b, s in zip(batched, single)]


def summary(results: list[Result], clients: list[int]) -> list[str]:
    """Per concurrency: each system's median tokens/s and p50 latency over the rounds (min-max beside), and
    the median of the per-round speed-ups."""
    rows = [
        "| clients | batched tokens/s | one at a time tokens/s | batched p50 (s) | one at a time p50 (s) | speed-up (median, min-max) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]

    def spread(values: list[float], digits: int, unit: str = "") -> str:
        return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    for c in clients:
        batched = sorted((r for r in results if r.clients == c and r.mode == BATCHED), key=lambda r: r.round)
        single = sorted((r for r in results if r.clients == c and r.mode == ONE_AT_A_TIME), key=lambda r: r.round)
        speedups = round_speedups(results, c)
        rows.append(
            f"| {c} | {spread([r.tokens_per_s for r in batched], 1)} | {spread([r.tokens_per_s for r in single], 1)} | "
            f"{spread([statistics.median(r.latencies) for r in batched], 2)} | "
            f"{spread([statistics.median(r.latencies) for r in single], 2)} | {spread(speedups, 2, 'x')} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: bundled model, else cpu-small random)")
    parser.add_argument(
        "--random-preset", choices=["cpu-small", "7b"], default=None, help="serve a random checkpoint of these shapes (toy 1,024-token vocabulary)"
    )
    parser.add_argument("--dtype", default="float32", help="dtype of the random checkpoint and the servers (float32, bfloat16)")
    parser.add_argument("--device", default="cpu", help="device the servers run on: cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--batch-size", type=int, default=16, help="--max-batch-size of the batched server")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads of each server")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bursts per system and concurrency")
    parser.add_argument("--images", action="store_true", help="every second request carries a small image")
    parser.add_argument("--request-images", type=int, default=0, help="every request carries this many small images")
    parser.add_argument("--request-video-frames", type=int, default=0, help="every request carries a video of this many frames")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/serve_load_<device>.md)")
    parser.add_argument(
        "--limits", type=Path, default=None, help="a limits_<preset>.json (benchmarks/gpu_speed.py) to get serve_speedup_<N>_clients for every N"
    )
    args = parser.parse_args()
    out = args.out or REPO / "benchmarks" / "results" / f"serve_load_{args.device.split(':')[0]}.md"
    command = "python benchmarks/serve_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = machine_line(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            model, name = args.model, f"`{args.model}`"
        elif args.random_preset is not None:
            model = random_checkpoint(Path(tmp) / args.random_preset, args.random_preset, args.device, args.dtype)
            name = f"random {args.random_preset}-shaped checkpoint ({args.dtype}, 1,024-token vocabulary)"
        elif (DEFAULT_MODEL / "config.json").is_file():
            model, name = DEFAULT_MODEL, "bundled default model"
        else:
            model, name = random_checkpoint(Path(tmp) / "cpu-small", "cpu-small", "cpu", "float32"), "random cpu-small (hidden 256, 4 layers)"
        every = bool(args.request_images or args.request_video_frames)
        media = Media(
            image=tiny_png() if args.images or args.request_images else None,
            alternate=not every,
            images=args.request_images,
            video=video_mp4(args.request_video_frames) if args.request_video_frames else None,
            frames=args.request_video_frames,
        )
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        results: list[Result] = []
        try:
            for mode, batch_size in ((BATCHED, args.batch_size), (ONE_AT_A_TIME, 1)):
                servers[mode] = start_server(model, batch_size, args.num_threads, args.device, args.dtype)
            for mode, (_, url) in servers.items():
                load(url, mode, 0, 2, 1, 8, media)  # warm-up
            for round_ in range(1, args.rounds + 1):
                order = [BATCHED, ONE_AT_A_TIME] if round_ % 2 else [ONE_AT_A_TIME, BATCHED]
                for clients in args.clients:
                    for mode in order:
                        result = load(servers[mode][1], mode, round_, clients, args.requests, args.max_tokens, media)
                        print(f"round {round_}, {clients} clients, {mode}: {result.tokens_per_s:.1f} tokens/s", flush=True)
                        results.append(result)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                proc.wait(30)

    lines = [
        f"## Serve load: continuous batching vs one at a time, {name} on {args.device}",
        "",
        "Written by `benchmarks/serve_load.py`.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; git commit {git_commit()}",
        (
            f"- load: {args.requests} requests per client, {args.max_tokens} tokens each (ignore_eos, greedy, streamed: "
            f"first token = first answer chunk), {media.describe()}; --max-batch-size {args.batch_size} vs 1; "
            f"server threads: {args.num_threads or 'torch default'}; both servers up, bursts alternating"
        ),
        "",
        f"### Median over {args.rounds} rounds",
        "",
        *summary(results, args.clients),
        "",
        "### Every burst, in the order it ran",
        "",
        *table(results),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {out}")
    if args.limits is not None and args.limits.is_file():
        limits = json.loads(args.limits.read_text())
        for c in args.clients:
            limits[f"serve_speedup_{c}_clients"] = statistics.median(round_speedups(results, c))
        args.limits.write_text(json.dumps(limits, indent=1) + "\n")
        print(f"serve speed-ups written into {args.limits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
