"""Kernel variants side by side on one GPU, for the two places a 7B decode and a long video spend their time.

1. Decode attention of one token over the visual K/V of `--frames` frames (one hyper layer, 7B shapes: 28 query
   heads, 4 kv heads, 128 dims, 729 keys per frame): hyperowl's two matrix products, a split-K (flash-decoding)
   form of them, and PyTorch's fused kernels (flash, cuDNN, memory-efficient) on the folded GQA queries. Each is
   captured in a CUDA graph and replayed, variants interleaved round by round; error against an fp32 reference;
   bandwidth = K + V bytes over time.
2. The SigLIP tower on a chunk of `--vision-frames` frames: eager (hyperowl), cuDNN attention, one fused QKV
   product, each layer compiled with `torch.compile` (compile time reported apart), and the products in fp8
   (e4m3 with a scale per weight row and per activation row, `torch._scaled_mm`), eager and compiled; TFLOP/s
   against a bf16 8192^3 matrix product measured in the same run, error against the eager bf16 tower.
3. Where the time goes (kernels summed by name under the profiler): decoded frames -> first token at `--frames`
   frames (beside its wall time: the difference is time the GPU sat idle), one eager decode step there (a CUDA-graph replay runs the
   same kernels without the host gaps) and one eager tower call.

Writes `<out>/gpu_kernels_<preset>.{md,json}`.

    python -m benchmarks.gpu_kernels --preset 7b                    # on a GPU
    python -m benchmarks.gpu_kernels --preset tiny --frames 8 --vision-frames 4 --no-compile   # CPU dry run
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
from hyperowl.engine.generate import DecodeStep, prefill
from hyperowl.model.decoder import few_query_attention, fold_groups, unfold_groups
from hyperowl.model.vision import SiglipAttention, SiglipVisionTower

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def split_k_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int) -> torch.Tensor:
    """Flash-decoding with matrix products: the keys in `splits` equal slices, each slice's softmax
    statistics (max, sum) in fp32, then the slices' outputs combined exactly. `q` `[B, h, L, d]`, `k`, `v`
    `[B, g, N, d]` with `N % splits == 0` -> `[B, h, L, d]`."""
    b, h, _, d = q.shape
    g, n = k.shape[1], k.shape[2]
    groups = h // g
    folded = fold_groups(q, groups)[:, :, None]  # [B, g, 1, R, d]
    keys, values = k.view(b, g, splits, n // splits, d), v.view(b, g, splits, n // splits, d)
    scores = torch.matmul(folded, keys.transpose(-1, -2)).float() * d**-0.5  # [B, g, S, R, n/S]
    peak = scores.amax(-1, keepdim=True)
    probs = torch.exp(scores - peak)
    total = probs.sum(-1, keepdim=True)
    out = torch.matmul(probs.to(v.dtype), values).float()  # [B, g, S, R, d]
    weight = torch.exp(peak - peak.amax(2, keepdim=True))
    out = (out * weight).sum(2) / (total * weight).sum(2)
    return unfold_groups(out.to(v.dtype), groups)


def folded_sdpa(backend: SDPBackend) -> Attention:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        with sdpa_kernel(backend):
            return unfold_groups(F.scaled_dot_product_attention(fold_groups(q, groups), k, v), groups)

    return run


def splits_for(n: int, tokens_per_image: int, target: int = 64) -> int:
    """A number of key slices near `target` that divides `n` (whole frames per slice when possible)."""
    frames = n // tokens_per_image
    divisors = [s for s in range(1, frames + 1) if frames % s == 0] or [1]
    return min(divisors, key=lambda s: abs(s - target))


def replay_timer(fn: Callable[[], Any], device: torch.device, calls: int, graph: bool = True) -> Callable[[], float]:
    """A function returning the seconds per call of `fn`: `calls` calls captured in one CUDA graph and
    replayed (device time without launch gaps); without `graph` or on a CPU, `calls` plain calls."""
    if device.type == "cuda" and graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()

        def run() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls

        return run

    def run_plain() -> float:
        synchronize(device)
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        return (time.perf_counter() - begin) / calls

    return run_plain


def attention_variants(preset_name: str, device: torch.device, frames: int, rounds: int) -> dict[str, Any]:
    config = PRESETS_BENCH[preset_name].config
    dtype = PRESETS_BENCH[preset_name].dtype
    heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    n = frames * config.vision_config.tokens_per_image
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, 1, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, kv_heads, n, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, kv_heads, n, d, device=device, dtype=dtype, generator=g)
    q32 = q.float().reshape(1, kv_heads, heads // kv_heads, d)
    probs = torch.softmax(torch.matmul(q32, k.float().transpose(-1, -2)) * d**-0.5, -1)
    reference = torch.matmul(probs, v.float()).reshape(1, heads, 1, d)
    del probs
    splits = splits_for(n, config.vision_config.tokens_per_image)
    variants: dict[str, Attention] = {
        "matmul (hyperowl)": lambda q, k, v: few_query_attention(q, [(k, v, None)]),
        f"split-K matmul ({splits} slices)": lambda q, k, v: split_k_attention(q, k, v, splits),
        "SDPA flash (folded GQA)": folded_sdpa(SDPBackend.FLASH_ATTENTION),
        "SDPA cuDNN (folded GQA)": folded_sdpa(SDPBackend.CUDNN_ATTENTION),
        "SDPA memory-efficient (folded GQA)": folded_sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    rows: dict[str, dict[str, Any]] = {}
    timers = {}
    for name, fn in variants.items():
        try:
            out = fn(q, k, v)
            rows[name] = {"max_abs_err": float((out.float() - reference).abs().max())}
            timers[name] = replay_timer(lambda fn=fn: fn(q, k, v), device, calls=10 if device.type == "cuda" else 1)
        except RuntimeError as exc:  # a backend that does not take these shapes on this device
            rows[name] = {"error": str(exc).splitlines()[0][:160]}
        print(f"attention {name}: {rows[name]}", flush=True)
    kv_bytes = 2 * k.numel() * k.element_size()
    for name, seconds in interleaved(timers, rounds).items():
        rows[name].update(us=seconds * 1e6, GBps=kv_bytes / seconds / 1e9)
        print(f"attention {name}: {seconds * 1e6:.1f} us, {kv_bytes / seconds / 1e9:.0f} GB/s", flush=True)
    return {"frames": frames, "keys": n, "kv_bytes": kv_bytes, "rows": rows}


def fuse_qkv(tower: SiglipVisionTower) -> None:
    """Give each attention one `[3H, H]` product in place of three (same weights, concatenated)."""

    def forward(self: SiglipAttention, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(n, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))

    for layer in tower.encoder.layers:
        attn = layer.self_attn
        attn.qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        attn.qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        attn.forward = forward.__get__(attn)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` `[M, K]` -> (`[M, K]` float8_e4m3fn, `[M, 1]` fp32 scales) with `x ~ fp8 * scale` row by row."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_products(tower: SiglipVisionTower) -> None:
    """Run every matrix product of the encoder layers in fp8: each weight quantized once with a scale per
    output row, each activation on the fly with a scale per token, bf16 out (`torch._scaled_mm`, rowwise)."""

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        rows, scale = fp8_rows(x.reshape(-1, x.shape[-1]))
        out = torch._scaled_mm(rows, self.fp8_weight.t(), scale_a=scale, scale_b=self.fp8_scale, bias=self.bias, out_dtype=x.dtype)
        return out.view(*x.shape[:-1], -1)

    for module in tower.encoder.modules():
        if isinstance(module, torch.nn.Linear):
            module.fp8_weight, scale = fp8_rows(module.weight)
            module.fp8_scale = scale.t().contiguous()  # [1, N]
            module.forward = forward.__get__(module)


def compile_each_layer(tower: SiglipVisionTower) -> SiglipVisionTower:
    """A copy of `tower` with every encoder layer compiled."""
    compiled = copy.deepcopy(tower)
    compiled.compile_layers()
    return compiled


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    timer = replay_timer(lambda: a @ b, device, calls=repeats)
    return 2 * size**3 / statistics.median(timer() for _ in range(3)) / 1e12


def vision_variants(preset_name: str, device: torch.device, frames: int, rounds: int, compile_layers: bool) -> dict[str, Any]:
    preset = PRESETS_BENCH[preset_name]
    config = preset.config
    torch.manual_seed(0)
    with torch.device(device):
        eager = SiglipVisionTower(config.vision_config).to(preset.dtype).eval()
    size = config.vision_config.image_size
    pixels = torch.randn(frames, 3, size, size, device=device, dtype=preset.dtype)
    fused = copy.deepcopy(eager)
    fuse_qkv(fused)
    fp8 = copy.deepcopy(eager)
    fp8_products(fp8)
    reference = eager(pixels).float()
    variants: dict[str, Callable[[], torch.Tensor]] = {
        "eager (hyperowl)": lambda: eager(pixels),
        "cuDNN attention": lambda: cudnn_context(lambda: eager(pixels)),
        "fused QKV product": lambda: fused(pixels),
        "fp8 products (rowwise scales)": lambda: fp8(pixels),
    }
    compile_s = None
    if compile_layers:
        compiled = compile_each_layer(fused)
        begin = time.perf_counter()
        compiled(pixels)
        synchronize(device)
        compile_s = time.perf_counter() - begin
        variants["fused QKV + torch.compile per layer"] = lambda: compiled(pixels)
        compiled_fp8 = compile_each_layer(fp8)
        variants["fp8 products + torch.compile per layer"] = lambda: compiled_fp8(pixels)
    rows: dict[str, dict[str, Any]] = {}
    timers = {}
    for name, fn in variants.items():
        try:
            out = fn()
            rows[name] = {
                "max_rel_err": float((out.float() - reference).abs().max() / reference.abs().max()),
                "min_cosine": float(F.cosine_similarity(out.float(), reference, dim=-1).min()),
            }
            timers[name] = replay_timer(fn, device, calls=1, graph=False)  # long calls: launch gaps do not count
        except RuntimeError as exc:
            rows[name] = {"error": str(exc).splitlines()[0][:160]}
        print(f"vision {name}: {rows[name]}", flush=True)
    flops = frames * vision_flops_per_image(config)
    for name, seconds in interleaved(timers, rounds).items():
        rows[name].update(s=seconds, TFLOPs=flops / seconds / 1e12)
        print(f"vision {name}: {seconds * 1e3:.1f} ms, {flops / seconds / 1e12:.0f} TFLOP/s", flush=True)
    return {"frames": frames, "tflop": flops / 1e12, "compile_s": compile_s, "rows": rows}


def cudnn_context(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return fn()


def kernel_profile(fn: Callable[[], Any], device: torch.device, calls: int, top: int = 15) -> dict[str, Any]:
    """Device time per kernel name over `calls` calls of `fn` (mean per call), the `top` largest; on a CPU,
    operator self time."""
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    if device.type == "cuda":  # kernels only: operator rows double-count their kernels
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    rows = sorted(
        ({"name": e.key[:90], "calls": e.count // calls, "us": getattr(e, attr) / calls} for e in events),
        key=lambda r: -r["us"],
    )
    return {"total_us": sum(getattr(e, attr) for e in events) / calls, "kernels": rows[:top]}


def model_profiles(preset_name: str, device: torch.device, frames: int) -> dict[str, dict[str, Any]]:
    """Kernels of decoded frames -> first token at `frames` frames (`prefill`: tower, visual K/V, text; after a
    warm-up prefill), with its wall time beside the summed kernel time (the difference: the GPU idle), and of one
    eager static-shape decode step (`DecodeStep`, the step a CUDA graph captures), mean over 3 steps."""
    preset = PRESETS_BENCH[preset_name]
    model = random_owl3(preset.config, preset.dtype, device)
    model.visual_options.chunk_size = preset.chunk_size
    frames_in = random_frames(frames, preset.config.vision_config.image_size, preset.dtype, device)
    batch = owl3_batch(frames, device)
    made: list[Any] = []

    def first_token() -> None:
        made.clear()
        made.extend(prefill(model, **batch, pixel_values=frames_in, extra_tokens=8))
        made[0].argmax(-1).tolist()

    first_token()
    synchronize(device)
    begin = time.perf_counter()
    first_token()
    wall_s = time.perf_counter() - begin
    first = {"frames": frames, "wall_us": wall_s * 1e6, **kernel_profile(first_token, device, calls=1)}
    logits, cache, visual = made
    step = DecodeStep(model, cache, visual)
    token = [step(logits.argmax(-1)).argmax(-1)]

    def one_step() -> None:
        token[0] = step(token[0]).argmax(-1)

    return {"first_token_profile": first, "profile": {"frames": frames, **kernel_profile(one_step, device, calls=3)}}


def tower_profile(preset_name: str, device: torch.device, frames: int) -> dict[str, Any]:
    """Kernels of one eager tower call over `frames` frames (after a warm-up call)."""
    preset = PRESETS_BENCH[preset_name]
    vision = preset.config.vision_config
    with torch.device(device):
        tower = SiglipVisionTower(vision).to(preset.dtype).eval()
    pixels = torch.randn(frames, 3, vision.image_size, vision.image_size, device=device, dtype=preset.dtype)
    tower(pixels)
    return {"frames": frames, **kernel_profile(lambda: tower(pixels), device, calls=1)}


def kernel_lines(title: str, prof: dict[str, Any]) -> list[str]:
    if "error" in prof:
        return ["", f"{title}: profile not taken: {prof['error']}"]
    return [
        "",
        f"### {title}: {prof['total_us'] / 1e3:.2f} ms of device time; the largest kernels",
        "",
        "| kernel | calls | us | share |",
        "|---|---:|---:|---:|",
        *(f"| `{r['name']}` | {r['calls']} | {r['us']:.0f} | {r['us'] / prof['total_us']:.0%} |" for r in prof["kernels"]),
    ]


def variant_rows(rows: dict[str, dict[str, Any]], columns: int, cells: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    """Table rows `| name | cells... |`; a variant that did not run gets dashes and its error in the last column."""
    return [
        f"| {name} | " + " | ".join(["—"] * (columns - 1) + [f"not run: {r['error']}"] if "error" in r else cells(r)) + " |"
        for name, r in rows.items()
    ]


def markdown(res: dict[str, Any]) -> str:
    att, vis, prof = res["attention"], res["vision"], res["profile"]
    lines = [
        f"## Kernel variants — preset `{res['preset']}`",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']}; {res['date']}. Random inputs and weights.",
        "",
        (
            f"### Decode attention over the visual K/V of {att['frames']} frames ({att['keys']} keys, one hyper layer, "
            f"K + V = {att['kv_bytes'] / 1e6:.0f} MB), one CUDA graph of 10 calls replayed, {res['rounds']} rounds interleaved"
        ),
        "",
        "| variant | time per call (us) | K + V read (GB/s) | max abs error vs fp32 |",
        "|---|---:|---:|---:|",
    ]
    lines += variant_rows(att["rows"], 3, lambda r: [f"{r['us']:.1f}", f"{r['GBps']:.0f}", f"{r['max_abs_err']:.2e}"])
    lines += [
        "",
        (
            f"### SigLIP tower, {vis['frames']} frames per call ({vis['tflop']:.1f} TFLOP of products); bf16 8192^3 "
            f"matrix product in the same run: {res['matmul_tflops']:.0f} TFLOP/s"
        ),
        "",
        "| variant | seconds | TFLOP/s | share of the bf16 matrix-product rate | max rel. error vs eager | least token cosine vs eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    peak = res["matmul_tflops"]
    lines += variant_rows(
        vis["rows"],
        5,
        lambda r: [f"{r['s']:.3f}", f"{r['TFLOPs']:.0f}", f"{r['TFLOPs'] / peak:.0%}", f"{r['max_rel_err']:.1e}", f"{r['min_cosine']:.4f}"],
    )
    if vis["compile_s"] is not None:
        lines += ["", f"Compiling the layers (first call) took {vis['compile_s']:.1f} s."]
    first = res["first_token_profile"]
    lines += kernel_lines(
        f"Decoded frames -> first token at {first['frames']} frames"
        + (f" ({first['wall_us'] / 1e3:.1f} ms wall)" if "wall_us" in first else ""),
        first,
    )
    lines += kernel_lines(f"One eager decode step at {prof['frames']} frames", prof)
    lines += kernel_lines(f"One eager tower call over {res['tower_profile']['frames']} frames", res["tower_profile"])
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS_BENCH), default="7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=400, help="frames of visual K/V for the decode attention and profile")
    parser.add_argument("--vision-frames", type=int, default=256, help="frames per vision-tower call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    res: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.gpu_kernels", *(sys.argv[1:] if argv is None else argv)]),
        "preset": args.preset,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": args.rounds,
    }
    res["attention"] = attention_variants(args.preset, device, args.frames, args.rounds)
    res["matmul_tflops"] = matmul_tflops(device, 8192 if device.type == "cuda" else 512)
    res["vision"] = vision_variants(args.preset, device, args.vision_frames, args.rounds, not args.no_compile)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    for keys, profiles, frames in (
        (("first_token_profile", "profile"), model_profiles, args.frames),
        (("tower_profile",), lambda *a: {"tower_profile": tower_profile(*a)}, args.vision_frames),
    ):
        try:
            res.update(profiles(args.preset, device, frames))
        except (RuntimeError, AttributeError) as exc:  # the profiler's event fields differ between releases
            res.update({key: {"frames": frames, "error": f"{type(exc).__name__}: {exc}"[:300]} for key in keys})
        torch.cuda.empty_cache() if device.type == "cuda" else None
    write_results(args.out, f"gpu_kernels_{args.preset}", markdown(res), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
