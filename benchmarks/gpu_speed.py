"""Decode, first-token and vision-tower speed against the hardware limits (memory bandwidth, bf16 FLOPs).

Measured side by side in one run, timing loops interleaved (plain forward steps, eager decode steps and
CUDA-graph decode steps alternate round by round): text-only decode and decode with `--frames` frames through the public `generate`
(batch 1, greedy), decoded frames -> first token (eager and compiled tower), the vision tower alone at several chunk sizes, and the
device's copy bandwidth. The limits: a decode step must read every LLM weight (and, with frames, every
visual K/V) once, so tokens/s <= bandwidth / bytes; the tower's FLOPs over its time give TFLOP/s.
Writes `<out>/limits_<preset>.json` and `.md`.

    python -m benchmarks.gpu_speed --preset 7b           # on a GPU
    python -m benchmarks.gpu_speed --preset tiny --frames 8 --tokens 8 --rounds 1   # a CPU dry run
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    PRESETS_BENCH,
    interleaved,
    machine,
    owl3_batch,
    random_frames,
    random_owl3,
    synchronize,
    vision_flops_per_image,
    write_results,
)
from hyperowl.engine.generate import Owl3ForCausalLM, generate, prefill, stream_tokens
from hyperowl.engine.memory import visual_kv_bytes_per_image
from hyperowl.engine.sampling import SamplingParams


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second (median of `repeats`)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:])


def llm_weight_bytes(model: Owl3ForCausalLM) -> int:
    """Bytes of the language model's parameters (what a decode step streams; the embedding table counted whole)."""
    return sum(p.numel() * p.element_size() for p in model.language_model.parameters())


def decode_rate(model: Owl3ForCausalLM, batch: dict[str, Any], tokens: int, graph: bool) -> float:
    """Tokens/s of the steady decode steps of one generation (`stream_tokens`, as `generate` runs it):
    from the end of the second decode step to the last token. The prefill, the first token and the first
    decode step (which captures the graph) are left out; `first_step_s` reports the latter."""
    stamps = []
    for token in stream_tokens(model, **batch, params=SamplingParams(max_new_tokens=tokens), stop_token_ids=[], cuda_graph=graph):
        token.tolist()
        stamps.append(time.perf_counter())
    FIRST_STEP[graph].append(stamps[1] - stamps[0])
    return (len(stamps) - 3) / (stamps[-1] - stamps[2])


#: Seconds of the first decode step of each measured generation (eager: False, graph: True).
FIRST_STEP: dict[bool, list[float]] = {False: [], True: []}


@torch.no_grad()
def forward_decode_rate(model: Owl3ForCausalLM, batch: dict[str, Any], tokens: int) -> float:
    """The same steady rate with every step a plain `model(...)` forward appending to the cache (the
    dynamic-shape path: the keys attended grow by one per step)."""
    logits, cache, visual = prefill(model, **batch, extra_tokens=tokens)
    token = logits.argmax(-1)
    stamps = []
    for _ in range(tokens - 1):
        token = model(token[:, None], cache=cache, visual=visual, logits_to_keep=1).logits[:, -1].argmax(-1)
        token.tolist()
        stamps.append(time.perf_counter())
    return (len(stamps) - 2) / (stamps[-1] - stamps[1])


@torch.no_grad()
def vision_rate(tower: torch.nn.Module, frames: torch.Tensor, chunk: int, device: torch.device) -> float:
    """Seconds of the vision tower alone over `frames` (host memory) in chunks of `chunk`."""
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, frames.shape[0], chunk):
        tower(frames[i : i + chunk].to(device, non_blocking=True))
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def first_token_s(model: Owl3ForCausalLM, n: int, frames: torch.Tensor) -> float:
    """Decoded frames in host memory -> first token (vision, visual K/V, prefill, argmax)."""
    batch = owl3_batch(n, model.device)
    synchronize(model.device)
    start = time.perf_counter()
    out = generate(model, **batch, pixel_values=frames, max_new_tokens=1, stop_token_ids=[])
    int(out.sequences[0, 0])
    return time.perf_counter() - start


def run(
    preset_name: str, device: torch.device, frames: int, tokens: int, rounds: int, chunks: list[int], compile_vision: bool = True
) -> dict[str, Any]:
    torch.set_grad_enabled(False)
    preset = PRESETS_BENCH[preset_name]
    model = random_owl3(preset.config, preset.dtype, device)
    model.visual_options.chunk_size = preset.chunk_size
    cfg = model.config
    size = cfg.vision_config.image_size
    graphs = device.type == "cuda"
    res: dict[str, Any] = {
        "preset": preset_name,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["python -m benchmarks.gpu_speed", *sys.argv[1:]]),
        "gpu": torch.cuda.get_device_name(device) if graphs else None,
    }
    hbm = copy_bandwidth(device)
    weights = llm_weight_bytes(model)
    visual = frames * visual_kv_bytes_per_image(cfg, model.dtype)
    res.update(hbm_GBps=hbm / 1e9, llm_weight_GB=weights / 1e9, visual_kv_GB=visual / 1e9)
    res["limit_text_decode_tok_s"] = hbm / weights
    res["limit_frames_decode_tok_s"] = hbm / (weights + visual)
    print(f"copy bandwidth {hbm / 1e9:.0f} GB/s; LLM weights {weights / 1e9:.2f} GB; visual K/V at {frames} frames {visual / 1e9:.2f} GB", flush=True)

    text = owl3_batch(0, device)
    text.pop("media_offset")
    pixels = random_frames(frames, size, model.dtype, device)
    with_frames = {**owl3_batch(frames, device), "pixel_values": pixels}
    modes = {"eager": False, "graph": True} if graphs else {"eager": False}
    decode_fns = {
        "text forward": lambda: forward_decode_rate(model, text, tokens),
        "frames forward": lambda: forward_decode_rate(model, with_frames, tokens),
    }
    for mode, graph in modes.items():
        decode_fns[f"text {mode}"] = lambda graph=graph: decode_rate(model, text, tokens, graph)
        decode_fns[f"frames {mode}"] = lambda graph=graph: decode_rate(model, with_frames, tokens, graph)
    for fn in decode_fns.values():  # warm-up: kernels, graph capture paths, allocator
        fn()
    decode = interleaved(decode_fns, rounds)
    for name, value in decode.items():
        print(f"decode {name}: {value:.1f} tok/s", flush=True)
    best = "graph" if graphs else "eager"
    res["decode_tok_s"] = decode
    res["first_decode_step_s"] = {("graph" if g else "eager"): statistics.median(v) for g, v in FIRST_STEP.items() if v}
    res["text_decode_tok_s"] = decode[f"text {best}"]
    res["frames_decode_tok_s"] = decode[f"frames {best}"]
    res["frames"] = frames
    res["decode_tokens"] = tokens

    eager_tower = model.vision_model
    towers = {"eager": eager_tower}
    if compile_vision:
        towers["compiled"] = copy.deepcopy(eager_tower)
        towers["compiled"].compile_layers()

    def first_token_with(tower: torch.nn.Module) -> float:
        model.vision_model = tower
        return first_token_s(model, frames, pixels)

    first_fns = {name: lambda tower=tower: first_token_with(tower) for name, tower in towers.items()}
    for fn in first_fns.values():  # warm-up (and the compile)
        fn()
    first = interleaved(first_fns, max(1, rounds))
    model.vision_model = eager_tower
    res["first_token_s"] = first["eager"]
    res["first_token_compiled_vision_s"] = first.get("compiled")
    for name, seconds in first.items():
        print(f"first token at {frames} frames, {name} tower: {seconds:.3f} s", flush=True)

    flops = frames * vision_flops_per_image(cfg)
    vision_fns = {f"chunk {c}": lambda c=c: vision_rate(eager_tower, pixels, c, device) for c in chunks}
    if compile_vision:
        vision_fns[f"chunk {chunks[-1]}, compiled layers"] = lambda: vision_rate(towers["compiled"], pixels, chunks[-1], device)
    for fn in vision_fns.values():
        fn()
    vision = interleaved(vision_fns, rounds)
    res["vision_s"] = vision
    res["vision_tflop"] = flops / 1e12
    res["vision_tflop_per_s"] = max(flops / s for name, s in vision.items() if "compiled" not in name) / 1e12
    compiled_s = vision.get(f"chunk {chunks[-1]}, compiled layers")
    res["vision_tflop_per_s_compiled"] = flops / compiled_s / 1e12 if compiled_s else None
    for name, seconds in vision.items():
        print(f"vision tower {name}: {seconds:.3f} s = {flops / seconds / 1e12:.1f} TFLOP/s", flush=True)
    # the key limits_7b.json names (first_token_400_s): the faster of the two towers (`--compile-vision` chooses it)
    res[f"first_token_{frames}_s"] = min(v for v in first.values())
    return res


def markdown(res: dict[str, Any]) -> str:
    d = res["decode_tok_s"]
    lines = [
        f"## Speed against the hardware limits — preset `{res['preset']}`",
        "",
        f"Machine: {res['machine']}; random weights; {res['date']}. Command: `{res['command']}`.",
        "",
        (
            f"Copy bandwidth {res['hbm_GBps']:.0f} GB/s (read + write); LLM weights {res['llm_weight_GB']:.2f} GB; "
            f"visual K/V of {res['frames']} frames {res['visual_kv_GB']:.2f} GB."
        ),
        "",
        "| decode (batch 1, greedy) | tokens/s | limit (bandwidth / bytes per step) | share of limit |",
        "|---|---:|---:|---:|",
    ]
    for name, value in d.items():
        limit = res["limit_text_decode_tok_s"] if name.startswith("text") else res["limit_frames_decode_tok_s"]
        what = "text only" if name.startswith("text") else f"{res['frames']} frames"
        how = {"forward": "plain forward", "eager": "decode step, eager", "graph": "decode step, CUDA graph"}[name.split()[1]]
        lines.append(f"| {what}, {how} | {value:.1f} | {limit:.0f} | {100 * value / limit:.0f}% |")
    lines += [
        "",
        "Steady steps: from the end of the second decode step on. First decode step (graph capture included "
        "when graphed): " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in res["first_decode_step_s"].items()) + ".",
        "",
        f"Decoded frames -> first token at {res['frames']} frames: {res['first_token_s']:.3f} s"
        + (f", {res['first_token_compiled_vision_s']:.3f} s with the compiled tower (`--compile-vision`)." if res.get("first_token_compiled_vision_s") else "."),
        "",
        f"Vision tower alone, {res['frames']} frames ({res['vision_tflop']:.3g} TFLOP): "
        + ", ".join(f"{k} {v:.3f} s ({res['vision_tflop'] / v:.3g} TFLOP/s)" for k, v in res["vision_s"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS_BENCH), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per decode measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256], help="vision-tower chunk sizes")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled vision tower (the last chunk size)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    res = run(args.preset, torch.device(args.device), args.frames, args.tokens, args.rounds, args.chunks, not args.no_compile)
    res["serve_speedup_32_clients"] = None  # GPU serving with 32 clients is not measured by this script
    write_results(args.out, f"limits_{args.preset}", markdown(res), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
