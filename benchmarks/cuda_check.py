"""CUDA correctness check of the long-input paths against the fp32 CPU model (tiny random config):
chunked encoding, blocked cross-attention (mem-efficient/flash kernels on the GPU), pinned-CPU
offload, fp8/bf16 visual K/V storage, bf16 model, greedy generation. Exit code 1 on any failure.

    python -m benchmarks.cuda_check
"""

from __future__ import annotations

import copy

import torch

from hyperowl.config import PRESETS
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.model.owl3 import VisualOptions

IMG = 7


def random_model(fused: bool) -> Owl3ForCausalLM:
    config = copy.deepcopy(PRESETS["tiny"])
    config.fused_hyper_attention = fused
    torch.manual_seed(0)
    model = Owl3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


def batch(model: Owl3ForCausalLM, device: str) -> dict[str, torch.Tensor]:
    """Two left-padded rows with 9 and 3 images (runs of `<|image|>` between text)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in (9, 3):
        ids = torch.randint(10, model.config.vocab_size, (4 + n + n // 2 + 5,), generator=g)
        ids[[4 + i + i // 2 for i in range(n)]] = IMG
        rows.append(ids)
    length = max(len(r) for r in rows)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    offsets = torch.zeros(2, length, 2, dtype=torch.long)
    first = 0
    for b, (row, n) in enumerate(zip(rows, (9, 3))):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
        is_img = (ids[b] == IMG) & mask[b].bool()
        offsets[b, :, 0], offsets[b, :, 1] = first, first + torch.cumsum(is_img, 0) - is_img.long()
        first += n
    s = model.config.vision_config.image_size
    pixels = torch.randn(12, 3, s, s, generator=g)
    out = {"input_ids": ids, "attention_mask": mask, "media_offset": offsets, "pixel_values": pixels}
    return {k: v.to(device) if k != "pixel_values" else v for k, v in out.items()}


def main() -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures = 0
    for fused in (False, True):
        cpu = random_model(fused)
        ref = cpu(**batch(cpu, "cpu")).logits
        gpu = copy.deepcopy(cpu).cuda()
        cases = {
            "fp32 chunk=32": (VisualOptions(), torch.float32, 1e-4),
            "fp32 chunk=2 block=64": (VisualOptions(chunk_size=2, attention_block=64), torch.float32, 1e-4),
            "fp32 offload=always (pinned)": (VisualOptions(chunk_size=4, offload="always"), torch.float32, 1e-4),
            "fp32 kv fp8": (VisualOptions(kv_dtype=torch.float8_e4m3fn), torch.float32, 0.15),
            "bf16 model": (VisualOptions(chunk_size=5), torch.bfloat16, 0.1),
        }
        for name, (options, dtype, tol) in cases.items():
            gpu.to(dtype).visual_options = options
            with torch.no_grad():
                out = gpu(**batch(gpu, "cuda"))
            err = float((out.logits.float().cpu() - ref).abs().max() / ref.abs().max())
            where = out.visual.keys[0].device.type
            ok = err < tol
            failures += not ok
            print(
                f"{'PASS' if ok else 'FAIL'} {'fused' if fused else 'gated'} {name}: rel err {err:.2e} (tol {tol}), K/V on {where}"
            )
        gpu.float().visual_options = VisualOptions(chunk_size=3)
        b = {k: v[:1] for k, v in batch(cpu, "cpu").items() if k != "pixel_values"}
        pixels = batch(cpu, "cpu")["pixel_values"][:9]
        want = cpu.generate(**b, pixel_values=pixels, max_new_tokens=8, stop_token_ids=[]).sequences
        got = gpu.generate(**{k: v.cuda() for k, v in b.items()}, pixel_values=pixels, max_new_tokens=8, stop_token_ids=[])
        ok = torch.equal(want, got.sequences.cpu())
        failures += not ok
        print(
            f"{'PASS' if ok else 'FAIL'} {'fused' if fused else 'gated'} greedy generation CUDA == CPU: {got.sequences.tolist()}"
        )
    print("cuda_check:", "all passed" if not failures else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
