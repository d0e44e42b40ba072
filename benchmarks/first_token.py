"""First-token latency and peak memory vs number of frames: hyperowl vs a token-concatenation baseline.

hyperowl encodes frames in chunks into per-hyper-layer visual K/V (never in the LLM sequence); the
baseline is transformers' `LlavaForConditionalGeneration` (the LLaVA-Next-Interleave design:
SigLIP -> MLP projector -> every visual token inserted into the Qwen2 sequence) sharing the same
vision tower and LLM weights. Also: decode speed of hyperowl with cached visual K/V vs recomputing
them at every token (the official code's behaviour), and how many frames each system fits in a
memory budget. Prints markdown, writes `<out>/first_token_<preset>.{md,json,png}`.

    python -m benchmarks.first_token --preset cpu-small
    python -m benchmarks.first_token --preset 7b --device cuda   # random bf16 weights, exact 7B shapes
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    IMAGE_ID,
    PRESETS_BENCH,
    TEXT_AFTER,
    TEXT_BEFORE,
    Preset,
    decode_start,
    llava_ids,
    machine,
    measure,
    owl3_batch,
    random_frames,
    random_owl3,
    synchronize,
    write_results,
)
from hyperowl.baselines import build_baseline, pooled_logits
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.engine.memory import plan_visual_memory

MIB = 2**20


def owl_first_token(model: Owl3ForCausalLM, n: int, frames: torch.Tensor, track: bool) -> tuple[float, int | None]:
    """Seconds and peak bytes from decoded frames (host memory) to the first generated token."""
    batch = owl3_batch(n, model.device)

    def run() -> int:
        logits = model(**batch, pixel_values=frames, logits_to_keep=1).logits
        return int(logits[0, -1].argmax())

    _, seconds, peak = measure(run, model.device, track)
    if not track and seconds < 10:  # best of two: no first-use kernel loading, less noise from other jobs
        seconds = min(seconds, measure(run, model.device, track)[1])
    return seconds, peak


def llava_first_token(llava: Any, n: int, frames: torch.Tensor, tokens_per_image: int, track: bool) -> tuple[float, int | None]:
    device = llava.lm_head.weight.device
    ids = llava_ids(n, tokens_per_image, device)

    def run() -> int:
        pixels = frames.to(device, non_blocking=True)
        logits = llava(input_ids=ids, pixel_values=pixels, logits_to_keep=1, use_cache=True).logits
        return int(logits[0, -1].argmax())

    _, seconds, peak = measure(run, device, track)
    if not track and seconds < 10:  # best of two: no first-use kernel loading, less noise from other jobs
        seconds = min(seconds, measure(run, device, track)[1])
    return seconds, peak


def decode_speed(model: Owl3ForCausalLM, n: int, tokens: int, recompute: bool) -> float:
    """Greedy decode tokens/s after a prefill with `n` frames; `recompute` rebuilds the visual K/V
    from the kept image features before every token (the official behaviour) instead of reusing them."""
    state = decode_start(model, n, tokens, keep_features=recompute)
    synchronize(model.device)
    start = time.perf_counter()
    for _ in range(tokens):
        state.step(model, rebuild=recompute)
    synchronize(model.device)
    return tokens / (time.perf_counter() - start)


def pooled_first_token(llava: Any, frames: torch.Tensor) -> float:
    """Seconds from decoded frames to the first token of the pooled baseline (196 tokens per 384-px
    frame), between the same prompt texts as the other systems."""
    device = llava.lm_head.weight.device
    before, after = (torch.full((1, n), 11, dtype=torch.long, device=device) for n in (TEXT_BEFORE, TEXT_AFTER))

    def run() -> int:
        return int(pooled_logits(llava, frames, before, after).argmax())

    seconds = measure(run, device, False)[1]
    if seconds < 10:  # best of two, as for the other systems
        seconds = min(seconds, measure(run, device, False)[1])
    return seconds


def baseline_rows(
    rows: dict[int, dict[str, Any]],
    key: str,
    counts: list[int],
    measure_one: Callable[[int, torch.Tensor], tuple[float, int | None]],
    preset: Preset,
    device: torch.device,
) -> None:
    """Time a baseline at each frame count of `counts` (`measure_one(n, frames)` -> seconds, peak bytes or
    None) into `rows[n]` as `{key}_s` / `{key}_peak`; once it is over the memory budget or the time limit,
    or out of memory, the larger counts are marked `{key}_skipped` with the reason."""
    stopped = None
    for n in counts:
        if stopped:
            rows[n][f"{key}_skipped"] = stopped
            continue
        frames = random_frames(n, preset.config.vision_config.image_size, preset.dtype, device)
        try:
            seconds, peak = measure_one(n, frames)
            rows[n][f"{key}_s"] = seconds
            if peak is not None:
                rows[n][f"{key}_peak"] = peak
            print(f"{key:8s} {n:5d} frames: {seconds:8.3f} s" + (f"  peak {peak / MIB:9.1f} MiB" if peak else ""), flush=True)
            if peak is not None and peak > preset.memory_budget:
                stopped = f"over the {preset.memory_budget / MIB:.0f} MiB budget at {n} frames"
            elif seconds > preset.baseline_time_limit_s:
                stopped = f"over {preset.baseline_time_limit_s:.0f} s at {n} frames"
        except torch.cuda.OutOfMemoryError:
            rows[n][f"{key}_error"] = "CUDA out of memory"
            stopped = f"out of memory at {n} frames"
            torch.cuda.empty_cache()
        finally:
            del frames


def run(
    preset: Preset, device: torch.device, max_frames: int | None, skip_baseline: bool, compile_vision: bool = False
) -> dict[str, Any]:
    """All rows of one preset; with `compile_vision` every encoder layer of both systems' vision towers is
    compiled (`torch.compile`), hyperowl's as `--compile-vision` does and the baselines' alike."""
    torch.set_grad_enabled(False)
    model = random_owl3(preset.config, preset.dtype, device)
    model.visual_options.chunk_size = preset.chunk_size
    llava = None if skip_baseline else build_baseline(model, IMAGE_ID)
    size = preset.config.vision_config.image_size
    p = preset.config.vision_config.tokens_per_image
    cpu = device.type == "cpu"
    frames_list = [n for n in preset.frames if max_frames is None or n <= max_frames]
    base_list = [n for n in preset.baseline_frames if max_frames is None or n <= max_frames]
    if compile_vision:
        model.vision_model.compile_layers()
        if llava is not None:
            for layer in llava.model.vision_tower.encoder.layers:
                layer.compile()
    # warm-up (kernels, allocator, thread pools; compiled towers: one image, then a batch size that makes
    # the compiled graphs take any number of frames, so no timed call compiles)
    for n in (1, 3) if compile_vision else (1,):
        warm = random_frames(n, size, preset.dtype, device)
        owl_first_token(model, n, warm, False)
        if llava is not None:
            llava_first_token(llava, n, warm, p, False)
    rows: dict[int, dict[str, Any]] = {}
    for n in sorted(set(frames_list) | set(base_list)):
        rows[n] = {"frames": n}
    for n in frames_list:
        frames = random_frames(n, size, preset.dtype, device)
        try:
            seconds, peak = owl_first_token(model, n, frames, track=False)
            if cpu:
                peak = owl_first_token(model, n, frames, track=True)[1]
            rows[n].update(owl_s=seconds, owl_peak=peak)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            rows[n].update(owl_error=type(exc).__name__)
            break
        finally:
            del frames
        print(f"hyperowl  {n:5d} frames: {seconds:8.3f} s  peak {rows[n].get('owl_peak', 0) / MIB:9.1f} MiB", flush=True)
    if llava is not None:

        def full(n: int, frames: torch.Tensor) -> tuple[float, int | None]:
            seconds, peak = llava_first_token(llava, n, frames, p, track=False)
            return seconds, llava_first_token(llava, n, frames, p, track=True)[1] if cpu else peak

        baseline_rows(rows, "llava", base_list, full, preset, device)
        # the pooled design has 3.7x fewer tokens per frame: it is measured up to 4x the baseline's frames
        widest = max(base_list, default=0)
        pooled_list = base_list + [m for m in frames_list if widest < m <= 4 * widest]
        baseline_rows(rows, "pooled", pooled_list, lambda n, frames: (pooled_first_token(llava, frames), None), preset, device)
    decode = {}
    n_dec = preset.decode_frames if max_frames is None else min(preset.decode_frames, max_frames)
    for recompute in (False, True):
        decode["recompute" if recompute else "cached"] = decode_speed(model, n_dec, preset.decode_tokens, recompute)
    print(f"decode at {n_dec} frames: {decode}", flush=True)
    results = {
        "preset": preset.name,
        "machine": machine(),
        "dtype": str(preset.dtype),
        "tokens_per_image": p,
        "memory_budget": preset.memory_budget,
        "rows": list(rows.values()),
        "decode": {"frames": n_dec, "tokens": preset.decode_tokens, **decode},
        "fits": fits(rows, preset, model),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "compiled_vision": compile_vision,
    }
    return results


def fits(rows: dict[int, dict[str, Any]], preset: Preset, model: Owl3ForCausalLM) -> dict[str, Any]:
    """Largest measured frame count within the budget per system, plus a linear extrapolation of
    the measured peak memory (bytes per frame from the two largest measured points)."""
    out: dict[str, Any] = {}
    for key in ("owl", "llava"):
        measured = [(n, r[f"{key}_peak"]) for n, r in sorted(rows.items()) if r.get(f"{key}_peak") is not None]
        within = [n for n, peak in measured if peak <= preset.memory_budget]
        over = any(peak > preset.memory_budget for _, peak in measured)
        entry: dict[str, Any] = {"measured": max(within, default=0), "exceeded": over}
        if len(measured) >= 2:
            (n1, m1), (n2, m2) = measured[-2], measured[-1]
            slope = max(1.0, (m2 - m1) / (n2 - n1))
            entry["bytes_per_frame"] = slope
            entry["extrapolated"] = int(n2 + (preset.memory_budget - m2) / slope)
        out[key] = entry
    plan = plan_visual_memory(model.config, 1, 1 + 30, model.dtype, model.device, model.visual_options)
    out["owl_estimate_free_memory"] = plan.max_images
    return out


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(res: dict[str, Any]) -> str:
    budget = res["memory_budget"] / MIB
    lines = [
        f"## First token: hyperowl vs token concatenation (LLaVA-Next-Interleave design, and pooled as in LLaVA-Video) — preset `{res['preset']}`",
        "",
        (
            f"Machine: {res['machine']}; dtype {res['dtype']}; {res['tokens_per_image']} visual tokens per frame; "
            f"random weights; {res['date']}. Latency = decoded frames in host memory -> first token (vision, "
            "visual K/V or visual tokens, LLM prefill). Peak = tensor memory above the weights."
            + (" Every system's vision tower has its encoder layers compiled (`torch.compile`)." if res.get("compiled_vision") else "")
        ),
        "",
        (
            "| frames | hyperowl first token (s) | hyperowl peak (MiB) | baseline first token (s) | baseline peak (MiB) | "
            "speed-up | pooled baseline first token (s) | speed-up vs pooled |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        owl, base, pooled = r.get("owl_s"), r.get("llava_s"), r.get("pooled_s")
        speed = f"{base / owl:.1f}x" if owl and base else "—"
        base_s = (
            fmt(base, ".3f")
            if base is not None
            else r.get("llava_error") or ("skipped: " + r["llava_skipped"] if "llava_skipped" in r else "—")
        )
        lines.append(
            f"| {r['frames']} | {fmt(owl, '.3f') if owl is not None else r.get('owl_error', '—')} | "
            f"{fmt(r.get('owl_peak') and r['owl_peak'] / MIB, '.1f')} | {base_s} | "
            f"{fmt(r.get('llava_peak') and r['llava_peak'] / MIB, '.1f')} | {speed} | "
            f"{fmt(pooled, '.3f') if pooled is not None else r.get('pooled_error') or r.get('pooled_skipped', '—')} | "
            f"{f'{pooled / owl:.1f}x' if owl and pooled else '—'} |"
        )
    f = res["fits"]
    lines += [
        "",
        f"Frames within a {budget:.0f} MiB budget (peak memory above the weights):",
        "",
        "| system | largest measured | exceeded budget | MiB per frame (measured slope) | extrapolated max |",
        "|---|---:|---|---:|---:|",
    ]
    for key, name in (("owl", "hyperowl"), ("llava", "baseline")):
        e = f.get(key, {})
        lines.append(
            f"| {name} | {e.get('measured', 0)} | {'yes' if e.get('exceeded') else 'no'} | "
            f"{fmt(e.get('bytes_per_frame') and e['bytes_per_frame'] / MIB, '.3f')} | {e.get('extrapolated', '—')} |"
        )
    d = res["decode"]
    lines += [
        "",
        (
            f"Decode at {d['frames']} frames ({d['tokens']} greedy tokens): cached visual K/V {d['cached']:.1f} tok/s, "
            f"recomputed every token (official) {d['recompute']:.1f} tok/s: **{d['cached'] / d['recompute']:.1f}x**."
        ),
        "",
    ]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (
        ("owl", "hyperowl (hyper attention)", "o-"),
        ("llava", "token concatenation (LLaVA design)", "s--"),
    ):
        pts = [(r["frames"], r[f"{key}_s"], r.get(f"{key}_peak")) for r in res["rows"] if r.get(f"{key}_s") is not None]
        if not pts:
            continue
        left.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        right.plot([p[0] for p in pts if p[2]], [p[2] / MIB for p in pts if p[2]], style, label=label)
    right.axhline(res["memory_budget"] / MIB, color="gray", lw=0.8, ls=":", label="memory budget")
    for ax, title, unit in ((left, "first-token latency", "seconds"), (right, "peak memory above weights", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("frames / images")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"preset {res['preset']} — {res['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS_BENCH), default="cpu-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-frames", type=int, default=None, help="skip frame counts above this (quick checks)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--compile-vision", action="store_true", help="compile the vision towers' layers, of all systems (results: *_compiled-vision)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    res = run(PRESETS_BENCH[args.preset], torch.device(args.device), args.max_frames, args.skip_baseline, args.compile_vision)
    suffix = "_compiled-vision" if args.compile_vision else ""
    stem = write_results(args.out, f"first_token_{args.preset}{suffix}", markdown(res), res)
    plot(res, stem.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
