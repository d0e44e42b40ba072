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


def cpu_small_checkpoint(path: Path) -> Path:
    """A random checkpoint small enough for CPU serving benchmarks, with a trained toy tokenizer."""
    import torch

    from hyperowl.config import PRESETS
    from hyperowl.engine.generate import Owl3ForCausalLM
    from hyperowl.processing.tokenizer import ENDOFTEXT, IM_END, train_tokenizer

    corpus = [q + " The square is red. A blue circle on a white background. Picture 3." for q in QUESTIONS] * 50
    tokenizer = train_tokenizer(corpus, vocab_size=1024)
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    config = dataclasses.replace(copy.deepcopy(PRESETS["cpu-small"]), vocab_size=len(tokenizer), eos_token_id=stops)
    torch.manual_seed(0)
    Owl3ForCausalLM(config).eval().save_pretrained(path)
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


def start_server(model: Path, batch_size: int, threads: int | None, device: str | None) -> tuple[subprocess.Popen, str]:
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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=300)
    except TimeoutError:
        proc.kill()
        raise
    return proc, url


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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load(url: str, mode: str, round_: int, clients: int, per_client: int, max_tokens: int, image: str | None) -> Result:
    """`clients` threads, each sending `per_client` requests one after the other."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(per_client):
                text = {"type": "text", "text": QUESTIONS[(index + r) % len(QUESTIONS)]}
                parts = [{"type": "image_url", "image_url": {"url": image}}, text] if image and (index + r) % 2 else [text]
                body = {
                    "messages": [{"role": "user", "content": parts}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                start = time.perf_counter()
                response = http.post(f"{url}/v1/chat/completions", json=body)
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    errors.append(response.text)
                    return
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0][:300]}")
    return Result(mode, round_, clients, len(latencies), tokens[0], wall, latencies)


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
        "| round | clients | mode | requests | tokens/s | requests/s | p50 latency (s) | p99 latency (s) | speed-up |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    single = {(r.round, r.clients): r for r in results if r.mode == ONE_AT_A_TIME}
    for r in results:
        speedup = r.tokens_per_s / single[r.round, r.clients].tokens_per_s
        rows.append(
            f"| {r.round} | {r.clients} | {r.mode} | {r.requests} | {r.tokens_per_s:.1f} | {r.requests / r.wall_s:.2f} | "
            f"{statistics.median(r.latencies):.2f} | {r.percentile(0.99):.2f} | {speedup:.2f}x |"
        )
    return rows


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
        speedups = [b.tokens_per_s / s.tokens_per_s for b, s in zip(batched, single)]
        rows.append(
            f"| {c} | {spread([r.tokens_per_s for r in batched], 1)} | {spread([r.tokens_per_s for r in single], 1)} | "
            f"{spread([statistics.median(r.latencies) for r in batched], 2)} | "
            f"{spread([statistics.median(r.latencies) for r in single], 2)} | {spread(speedups, 2, 'x')} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: bundled model, else cpu-small random)")
    parser.add_argument("--device", default="cpu", help="device the servers run on: cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--batch-size", type=int, default=16, help="--max-batch-size of the batched server")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads of each server")
    parser.add_argument("--rounds", type=int, default=3, help="alternating bursts per system and concurrency")
    parser.add_argument("--images", action="store_true", help="every second request carries a small image")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/serve_load_<device>.md)")
    args = parser.parse_args()
    out = args.out or REPO / "benchmarks" / "results" / f"serve_load_{args.device.split(':')[0]}.md"
    command = "python benchmarks/serve_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    machine = machine_line(args.device)
    started = datetime.datetime.now(datetime.timezone.utc)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            model, name = args.model, f"`{args.model}`"
        elif (DEFAULT_MODEL / "config.json").is_file():
            model, name = DEFAULT_MODEL, "bundled default model"
        else:
            model, name = cpu_small_checkpoint(Path(tmp) / "cpu-small"), "random cpu-small (hidden 256, 4 layers)"
        image = tiny_png() if args.images else None
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        results: list[Result] = []
        try:
            for mode, batch_size in ((BATCHED, args.batch_size), (ONE_AT_A_TIME, 1)):
                servers[mode] = start_server(model, batch_size, args.num_threads, args.device)
            for mode, (_, url) in servers.items():
                load(url, mode, 0, 2, 1, 8, image)  # warm-up
            for round_ in range(1, args.rounds + 1):
                order = [BATCHED, ONE_AT_A_TIME] if round_ % 2 else [ONE_AT_A_TIME, BATCHED]
                for clients in args.clients:
                    for mode in order:
                        result = load(servers[mode][1], mode, round_, clients, args.requests, args.max_tokens, image)
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
            f"- load: {args.requests} requests per client, {args.max_tokens} tokens each (ignore_eos, greedy)"
            f"{', every second request with a 96x64 image' if image else ''}; --max-batch-size {args.batch_size} vs 1; "
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
