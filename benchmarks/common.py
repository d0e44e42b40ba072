"""Shared pieces of the long-input benchmarks: presets, random models, prompts for hyperowl and the
token-concatenation baseline (`hyperowl.baselines.build_baseline`), timers and a peak-memory meter."""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hyperowl.baselines import default_dtype_device
from hyperowl.config import PRESETS, Owl3Config
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.model.cache import TextKVCache, VisualKV

IMAGE_ID = 7  # `<|image|>` of the random models (the model finds images through media_offset)
TEXT_BEFORE, TEXT_AFTER = 6, 24  # prompt text around the images (system turn / question)

@dataclass
class Preset:
    """A benchmark setting: model shapes, dtype, frame counts and limits."""

    name: str
    config: Owl3Config
    dtype: torch.dtype
    frames: list[int]
    baseline_frames: list[int]
    memory_budget: int
    decode_frames: int
    decode_tokens: int
    chunk_size: int
    baseline_time_limit_s: float


PRESETS_BENCH: dict[str, Preset] = {
    "cpu-small": Preset(
        "cpu-small",
        copy.deepcopy(PRESETS["cpu-small"]),
        torch.float32,
        [1, 8, 32, 100, 400, 1000, 1500, 2000],
        [1, 8, 32, 64, 100, 128, 160, 200],
        memory_budget=160 * 2**20,
        decode_frames=100,
        decode_tokens=12,
        chunk_size=32,
        baseline_time_limit_s=60.0,
    ),
    "7b": Preset(
        "7b",
        copy.deepcopy(PRESETS["7b"]),
        torch.bfloat16,
        [1, 8, 32, 100, 400, 1000, 2000],
        [1, 8, 32, 100],
        memory_budget=80 * 10**9,
        decode_frames=400,
        decode_tokens=16,
        chunk_size=64,
        baseline_time_limit_s=20.0,
    ),
    "tiny": Preset(
        "tiny",
        copy.deepcopy(PRESETS["tiny"]),
        torch.float32,
        [1, 8, 32],
        [1, 8, 32],
        memory_budget=64 * 2**20,
        decode_frames=8,
        decode_tokens=4,
        chunk_size=8,
        baseline_time_limit_s=10.0,
    ),
}


def machine() -> str:
    """One line naming the machine the numbers come from."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cores = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {cores} threads (torch {torch.__version__})"


def random_owl3(config: Owl3Config, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Owl3ForCausalLM:
    """A randomly initialised model built directly on `device` in `dtype` (PyTorch's default inits)."""
    torch.manual_seed(seed)
    with default_dtype_device(dtype, device):
        model = Owl3ForCausalLM(config)
    return model.eval()


def owl3_batch(n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """hyperowl prompt: text, one `<|image|>` per frame, question (batch 1, no pixels)."""
    ids = torch.full((1, TEXT_BEFORE + n + TEXT_AFTER), 11, dtype=torch.long)
    ids[0, TEXT_BEFORE : TEXT_BEFORE + n] = IMAGE_ID
    is_image = ids == IMAGE_ID
    seen = torch.cumsum(is_image, 1) - is_image.long()
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "media_offset": torch.stack([torch.zeros_like(seen), seen], -1).to(device),
    }


def llava_ids(n: int, tokens_per_image: int, device: torch.device) -> torch.Tensor:
    """Baseline prompt: the same text with each frame's `tokens_per_image` visual tokens in the sequence."""
    ids = torch.full((1, TEXT_BEFORE + n * tokens_per_image + TEXT_AFTER), 11, dtype=torch.long)
    ids[0, TEXT_BEFORE : TEXT_BEFORE + n * tokens_per_image] = IMAGE_ID
    return ids.to(device)


def random_frames(n: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[n, 3, size, size]` "decoded frames" in host memory (pinned when a GPU runs the model)."""
    g = torch.Generator().manual_seed(n)
    pool = torch.randn(min(n, 16), 3, size, size, generator=g).to(dtype)
    frames = torch.empty(n, 3, size, size, dtype=dtype, pin_memory=device.type == "cuda")
    for i in range(0, n, pool.shape[0]):
        frames[i : i + pool.shape[0]] = pool[: n - i]
    return frames


@dataclass
class DecodeStart:
    """State after the prefill of a prompt with `n` random frames, ready to decode token by token.

    `features` `[n, P, H]` (None unless asked for) and `positions` (MI-Rope, one row) rebuild the
    visual K/V the way the official code does before every token."""

    cache: TextKVCache
    visual: VisualKV
    token: torch.Tensor
    features: torch.Tensor | None
    positions: list[torch.Tensor]

    def step(self, model: Owl3ForCausalLM, rebuild: bool = False) -> None:
        """One greedy decode step (with `rebuild`, the visual K/V are rebuilt from `features` first)."""
        if rebuild:
            if self.features is None:
                raise ValueError("rebuilding the visual K/V needs decode_start(..., keep_features=True)")
            self.visual = model.build_visual_kv(self.features, [range(self.features.shape[0])], self.positions)
        logits = model(self.token[:, None], cache=self.cache, visual=self.visual, logits_to_keep=1).logits
        self.token = logits[:, -1].argmax(-1)


def decode_start(model: Owl3ForCausalLM, n: int, tokens: int, keep_features: bool) -> DecodeStart:
    """Prefill `owl3_batch(n)` with random frames into a cache with room for `tokens` more tokens;
    `keep_features` also encodes the frames once more for `DecodeStart.step(rebuild=True)`."""
    device = model.device
    batch = owl3_batch(n, device)
    frames = random_frames(n, model.config.vision_config.image_size, model.dtype, device)
    cache = model.new_cache(1, batch["input_ids"].shape[1] + tokens + 1)
    out = model(**batch, pixel_values=frames, cache=cache, logits_to_keep=1)
    features = model.encode_images(frames, model.visual_options.chunk_size) if keep_features else None
    positions = [torch.arange(n, device=device) + TEXT_BEFORE + 1]  # MI-Rope: just after each <|image|>
    return DecodeStart(cache, out.visual, out.logits[:, -1].argmax(-1), features, positions)


def vision_flops_per_image(config: Owl3Config) -> float:
    """Multiply-add FLOPs x 2 of the tower for one image: patch embedding and the encoder layers that run
    (all but the last, features = hidden_states[-2]): q/k/v/out projections, attention scores and
    weighted sum, MLP."""
    v = config.vision_config
    p, h, i = v.tokens_per_image, v.hidden_size, v.intermediate_size
    patch = 2 * p * h * 3 * v.patch_size**2
    layer = 2 * p * (4 * h * h + 2 * h * i) + 2 * 2 * p * p * h
    return patch + (v.num_hidden_layers - 1) * layer


def interleaved(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run each function (returning seconds) once per round, in alternating order; the median of each."""
    results: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(fns[name]())
    return {name: statistics.median(values) for name, values in results.items()}


def write_results(out: Path, stem: str, text: str, res: dict[str, Any]) -> Path:
    """Print the markdown `text` and write it and `res` as `<out>/<stem>.md` and `.json`; returns the stem path."""
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    return out / stem


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensors created inside the block and alive at once (the CPU counterpart of
    `torch.cuda.max_memory_allocated`; tensors from before the block, e.g. weights, do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.refs: dict[int, int] = {}

    def _release(self, key: int, size: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if not size:
                continue
            if key not in self.refs:
                self.refs[key] = 0
                self.live += size
                self.peak = max(self.peak, self.live)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key, size)
        return out


def measure(fn: Callable[[], Any], device: torch.device, track_memory: bool) -> tuple[Any, float, int | None]:
    """Run `fn` once: (result, seconds, peak bytes above what was allocated before, or None).

    On a GPU the peak comes from the caching allocator's statistics (no overhead); on the CPU
    `track_memory` runs `fn` under `PeakTensorMemory` (slower: time that run separately)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out, seconds = timed(fn, device)
        return out, seconds, torch.cuda.max_memory_allocated(device) - before
    if not track_memory:
        out, seconds = timed(fn, device)
        return out, seconds, None
    meter = PeakTensorMemory()
    with meter:
        out, seconds = timed(fn, device)
    return out, seconds, meter.peak
