"""Where one decode step goes: host time, device time and the work it launches, with the visual K/V
cached and rebuilt before the token (the official behaviour).

A decode step of a large model at batch 1 is bound by the host when it launches many small kernels;
this says by how much, and which operators launch them. Prints markdown and writes
`<out>/decode_profile_<preset>.md`.

    python -m benchmarks.decode_profile --preset 7b --frames 400      # on a GPU
    python -m benchmarks.decode_profile --preset tiny --frames 8      # on a CPU: operator counts only
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import PRESETS_BENCH, DecodeStart, decode_start, machine, random_owl3, synchronize
from hyperowl.engine.generate import Owl3ForCausalLM

#: Operators that only relabel memory although their schema does not say so.
VIEWS = {"_unsafe_view", "_reshape_alias"}


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators that do work (views and other aliases are left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema, name = func._schema, func.overloadpacket.__name__
        if (schema.is_mutable or not any(r.alias_info for r in schema.returns)) and name not in VIEWS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def host_and_wall_ms(model: Owl3ForCausalLM, state: DecodeStart, rebuild: bool, steps: int) -> tuple[float, float]:
    """Mean milliseconds per step until the Python call returns (host) and until the device is done (wall)."""
    host = wall = 0.0
    for _ in range(steps):
        synchronize(model.device)
        start = time.perf_counter()
        state.step(model, rebuild)
        host += time.perf_counter() - start
        synchronize(model.device)
        wall += time.perf_counter() - start
    return 1e3 * host / steps, 1e3 * wall / steps


def device_profile(model: Owl3ForCausalLM, state: DecodeStart, rebuild: bool) -> dict[str, Any]:
    """Kernels launched and device milliseconds of one step, and the operators with the most device time (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        state.step(model, rebuild)
        synchronize(model.device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ops = sorted(
        (e for e in prof.key_averages() if e.key.startswith("aten::") and e.self_device_time_total > 0),
        key=lambda e: -e.self_device_time_total,
    )
    return {
        "kernels": len(kernels),
        "device_ms": sum(k.device_time for k in kernels) / 1e3,
        "top": [(e.key, e.count, e.self_device_time_total / 1e3) for e in ops[:8]],
    }


@torch.no_grad()
def run(preset_name: str, device: torch.device, frames: int, steps: int) -> dict[str, Any]:
    preset = PRESETS_BENCH[preset_name]
    model = random_owl3(preset.config, preset.dtype, device)
    model.visual_options.chunk_size = preset.chunk_size
    state = decode_start(model, frames, 3 * steps + 8, keep_features=True)
    result: dict[str, Any] = {"preset": preset_name, "machine": machine(), "frames": frames, "date": time.strftime("%Y-%m-%d %H:%M")}
    for mode, rebuild in (("cached", False), ("rebuilt", True)):
        state.step(model, rebuild)  # warm-up
        host, wall = host_and_wall_ms(model, state, rebuild, steps)
        with OperatorCount() as counter:
            state.step(model, rebuild)
        entry: dict[str, Any] = {"host_ms": host, "wall_ms": wall, "operators": sum(counter.counts.values())}
        entry["most_called"] = counter.counts.most_common(8)
        if device.type == "cuda":
            entry.update(device_profile(model, state, rebuild))
        result[mode] = entry
        print(f"{mode}: {entry}", flush=True)
    return result


def markdown(res: dict[str, Any]) -> str:
    gpu = "kernels" in res["cached"]
    lines = [
        f"## One decode step at {res['frames']} frames — preset `{res['preset']}`",
        "",
        (
            f"Machine: {res['machine']}; random weights; {res['date']}. Host = until the Python call returns; "
            "wall = until the device is done; operators = aten operators that do work (views left out)."
        ),
        "",
        "| visual K/V | host (ms) | wall (ms) | operators |" + (" kernels | device (ms) |" if gpu else ""),
        "|---|---:|---:|---:|" + ("---:|---:|" if gpu else ""),
    ]
    for mode in ("cached", "rebuilt"):
        e = res[mode]
        row = f"| {mode} | {e['host_ms']:.1f} | {e['wall_ms']:.1f} | {e['operators']} |"
        lines.append(row + (f" {e['kernels']} | {e['device_ms']:.1f} |" if gpu else ""))
    e = res["cached"]
    lines += ["", "Most called operators of a cached step: " + ", ".join(f"{name} {n}" for name, n in e["most_called"]) + "."]
    if gpu:
        lines.append("Most device time, cached step: " + ", ".join(f"{k} {n}x {ms:.2f} ms" for k, n, ms in e["top"]) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS_BENCH), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    res = run(args.preset, torch.device(args.device), args.frames, args.steps)
    text = markdown(res)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"decode_profile_{args.preset}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
