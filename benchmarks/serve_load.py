"""Load test of `hyperowl serve`: N concurrent clients, batched vs. one request at a time.

For each mode (continuous batching with `--max-batch-size B`, and `--max-batch-size 1`) the script
starts a server subprocess, warms it up, then lets C clients each send R chat completions back to
back (fixed length: `ignore_eos`, greedy). It prints a markdown table of generated tokens/s,
requests/s and p50/p99 request latency, plus the speed-up of batching at each concurrency.

Model: `--model DIR`, else the bundled default model if present, else a random `cpu-small`
checkpoint (hidden 256, 4 layers) written to a temporary folder.

  python benchmarks/serve_load.py --clients 1 8 16 --requests 4 --max-tokens 64
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import io
import os
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


def start_server(model: Path, batch_size: int, threads: int | None) -> tuple[subprocess.Popen, str]:
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
    mode: str
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


def load(url: str, mode: str, clients: int, per_client: int, max_tokens: int, image: str | None) -> Result:
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
    return Result(mode, clients, len(latencies), tokens[0], wall, latencies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: bundled model, else cpu-small random)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--batch-size", type=int, default=16, help="--max-batch-size of the batched server")
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads of the server")
    parser.add_argument("--images", action="store_true", help="every second request carries a small image")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            model, name = args.model, str(args.model)
        elif (DEFAULT_MODEL / "config.json").is_file():
            model, name = DEFAULT_MODEL, "bundled default model"
        else:
            model, name = cpu_small_checkpoint(Path(tmp) / "cpu-small"), "random cpu-small (hidden 256, 4 layers)"
        image = tiny_png() if args.images else None
        results: list[Result] = []
        for mode, batch_size in (("batched", args.batch_size), ("one at a time", 1)):
            proc, url = start_server(model, batch_size, args.num_threads)
            try:
                load(url, mode, 2, 1, 8, image)  # warm-up
                results += [load(url, mode, c, args.requests, args.max_tokens, image) for c in args.clients]
            finally:
                proc.terminate()
                proc.wait(30)

    print(
        f"\nmodel: {name}; {args.requests} requests per client, {args.max_tokens} tokens each"
        f"{', every second request with an image' if image else ''}; threads: {args.num_threads or 'default'}\n"
    )
    print("| mode | clients | requests | tokens/s | requests/s | p50 latency (s) | p99 latency (s) | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    single = {r.clients: r for r in results if r.mode == "one at a time"}
    for r in results:
        speedup = r.tokens_per_s / single[r.clients].tokens_per_s
        print(
            f"| {r.mode} | {r.clients} | {r.requests} | {r.tokens_per_s:.1f} | {r.requests / r.wall_s:.2f} | "
            f"{statistics.median(r.latencies):.2f} | {r.percentile(0.99):.2f} | {speedup:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
