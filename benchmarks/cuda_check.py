"""CUDA correctness check of the long-input paths against the fp32 CPU model (tiny random config):
chunked encoding, blocked cross-attention (mem-efficient/flash kernels on the GPU), pinned-CPU
offload, fp8/bf16 visual K/V storage, bf16 model, greedy generation, CUDA-graph decode steps against
eager ones, rows with and without images joining and leaving the graphed slots of a serving batch; the bundled (trained) model in bf16 on the GPU against fp32 on the CPU (greedy tokens on
prompts of the synthetic tasks); then the 7B-shaped model in bf16 against the same model in fp32 (greedy tokens on random
prompts with images and on text-only prompts, where transformers' Qwen2 with the same weights runs beside
it as a peer; every first difference is checked for a near tie). Exit code 1 on any failure.

    python -m benchmarks.cuda_check [--parity-prompts 10 --parity-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hyperowl.config import PRESETS
from hyperowl.engine.batching import DecodeBatch
from hyperowl.engine.generate import DecodeStep, Owl3ForCausalLM, prefill
from hyperowl.hub import DEFAULT_MODEL
from hyperowl.model import decoder
from hyperowl.model.owl3 import VisualOptions
from hyperowl.processing.processor import Owl3Processor
from hyperowl.synthetic.accuracy import greedy_agreement, parity_samples
from tests.arrivals import decode_arrivals  # the greedy arrivals driver of the DecodeBatch tests

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


def batch(model: Owl3ForCausalLM, device: str | torch.device, images: tuple[int, ...] = (9, 3), seed: int = 1) -> dict[str, torch.Tensor]:
    """Left-padded rows with `images[b]` images each (runs of `<|image|>` between text)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in images:
        ids = torch.randint(10, model.config.vocab_size, (4 + n + n // 2 + 5,), generator=g)
        ids[[4 + i + i // 2 for i in range(n)]] = IMG
        rows.append(ids)
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(images), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    offsets = torch.zeros(len(images), length, 2, dtype=torch.long)
    first = 0
    for b, (row, n) in enumerate(zip(rows, images)):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
        is_img = (ids[b] == IMG) & mask[b].bool()
        offsets[b, :, 0], offsets[b, :, 1] = first, first + torch.cumsum(is_img, 0) - is_img.long()
        first += n
    s = model.config.vision_config.image_size
    pixels = torch.randn(sum(images), 3, s, s, generator=g)
    out = {"input_ids": ids, "attention_mask": mask, "media_offset": offsets, "pixel_values": pixels}
    # pixels stay on the host: a CUDA model copies them through its pinned side-stream upload (`uploaded`)
    return {k: v.to(device) if k != "pixel_values" else v for k, v in out.items()}


def bucket_rows_match(model: Owl3ForCausalLM, images: int) -> tuple[bool, int]:
    """Rows joining and leaving a graphed `DecodeBatch` (slots of a batch-size bucket, the serving path),
    `images` images each (0: text rows) but one with an image fewer: whether every request gets the greedy
    tokens of its own eager generation, and how many decode steps were replayed from a graph."""
    plan = [(images, 0, 20), (images, 0, 9), (images, 3, 7), (images, 6, 14), (max(images - 1, 0), 8, 10), (images, 12, 16)]
    requests = [(batch(model, model.device, (n,), seed=i), at, t) for i, (n, at, t) in enumerate(plan)]
    for inputs, _, _ in requests:
        if images == 0:
            inputs["pixel_values"] = None
    want = [model.generate(**inputs, max_new_tokens=t, stop_token_ids=[], cuda_graph=False).sequences[0].tolist() for inputs, at, t in requests]
    graphed: list[bool] = []
    got = decode_arrivals(DecodeBatch(model, graph_after=2, graphs=True), requests, 60, lambda b: graphed.append(b._graphed))
    return got == want, sum(graphed)


def graph_matches_eager(model: Owl3ForCausalLM, inputs: dict[str, torch.Tensor], steps: int = 6) -> tuple[float, bool]:
    """Largest |logit difference| between graphed and eager decode steps from the same prefill, and
    whether their greedy tokens agree at every step."""
    logits, cache, visual = prefill(model, **inputs, extra_tokens=steps + 1)
    twin_cache, twin_visual = copy.deepcopy(cache), copy.deepcopy(visual)
    eager, graphed = DecodeStep(model, cache, visual), DecodeStep(model, twin_cache, twin_visual, graph=True)
    a = b = logits.argmax(-1)
    worst, same = 0.0, True
    for _ in range(steps):
        la, lb = eager(a), graphed(b).clone()
        worst = max(worst, float((la.float() - lb.float()).abs().max()))
        a, b = la.argmax(-1), lb.argmax(-1)
        same &= torch.equal(a, b)
    return worst, same


def flash_matches_products(model: Owl3ForCausalLM, inputs: dict[str, torch.Tensor], steps: int = 6) -> tuple[float, bool, int]:
    """Decode steps whose unmasked visual attention takes the flash kernel against the same steps with
    matrix products only, from one prefill: largest |logit difference|, whether the greedy tokens agree
    at every step, and how many flash calls the first ones made."""
    logits, cache, visual = prefill(model, **inputs, extra_tokens=steps + 1)
    twin_cache, twin_visual = copy.deepcopy(cache), copy.deepcopy(visual)
    flash_step, product_step = DecodeStep(model, cache, visual), DecodeStep(model, twin_cache, twin_visual)
    calls = []
    flash, decodable = decoder.flash_attention_with_lse, decoder.flash_decodable
    a = b = logits.argmax(-1)
    worst, same = 0.0, True
    try:
        for _ in range(steps):
            decoder.flash_attention_with_lse = lambda q, k, v: calls.append(1) or flash(q, k, v)
            la = flash_step(a)
            decoder.flash_attention_with_lse, decoder.flash_decodable = flash, lambda q, k, mask: False
            lb = product_step(b)
            decoder.flash_decodable = decodable
            worst = max(worst, float((la.float() - lb.float()).abs().max()))
            a, b = la.argmax(-1), lb.argmax(-1)
            same &= torch.equal(a, b)
    finally:
        decoder.flash_attention_with_lse, decoder.flash_decodable = flash, decodable
    return worst, same, len(calls)


@dataclass
class Parity:
    """bf16 against fp32 greedy decoding on random prompts: per prompt, how many of the first `tokens`
    greedy tokens agree before the first difference, and at that difference the fp32 logit margin
    between the two picks against the largest |bf16 - fp32| logit difference of that step (a margin
    below the error is a near tie that any bf16 rounding may flip)."""

    tokens: int
    prefixes: list[int] = field(default_factory=list)
    margins: list[tuple[float, float]] = field(default_factory=list)

    @property
    def agree(self) -> int:
        return sum(p == self.tokens for p in self.prefixes)

    def near_ties(self) -> int:
        return sum(margin < error for margin, error in self.margins)

    def line(self) -> str:
        ties = f"{self.near_ties()} of {len(self.margins)} first differences are near ties" if self.margins else "no difference"
        worst = max((m for m, _ in self.margins), default=0.0)
        return (
            f"{self.agree}/{len(self.prefixes)} prompts agree on all {self.tokens} tokens (agreeing prefix per prompt: "
            f"{self.prefixes}); {ties} (largest margin at a difference {worst:.3f})"
        )


def compare(
    parity: Parity,
    generate: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    last_logits: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    fp32: torch.nn.Module,
    bf16: torch.nn.Module,
    ids: torch.Tensor,
) -> None:
    """Greedy `parity.tokens` tokens after `ids` `[1, T]` from both models; at the first difference, the
    margin analysis of `Parity` on the shared prefix."""
    outs = [generate(m, ids)[0].cpu() for m in (fp32, bf16)]
    differ = (outs[0] != outs[1]).nonzero()
    if not len(differ):
        parity.prefixes.append(parity.tokens)
        return
    first = int(differ[0])
    parity.prefixes.append(first)
    prefix = torch.cat([ids[0].cpu(), outs[0][:first]])[None].to(ids.device)
    exact, rounded = (last_logits(m, prefix).float() for m in (fp32, bf16))
    margin = float(exact[outs[0][first]] - exact[outs[1][first]])
    parity.margins.append((margin, float((exact - rounded).abs().max())))


def parity_7b(prompts: int, tokens: int, frames: int = 4, preset: str = "7b", device: str = "cuda") -> dict[str, Parity]:
    """The 7B-shaped random model in bf16 against itself in fp32 (TF32 off), both on the GPU, on random
    prompts with `frames` random frames and on text-only prompts; and, as a peer on the same text-only
    prompts and the same language-model weights, transformers' `Qwen2ForCausalLM` in bf16 against fp32."""
    from transformers import Qwen2ForCausalLM

    config = copy.deepcopy(PRESETS[preset])
    torch.manual_seed(0)
    with torch.device(device):
        fp32 = Owl3ForCausalLM(config).eval()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    size = config.vision_config.image_size
    results = {name: Parity(tokens) for name in ("hyperowl, frames", "hyperowl, text", "transformers Qwen2, text")}
    texts = []
    for _ in range(prompts):
        ids = torch.randint(100, min(150000, config.vocab_size), (1, 24 + frames), generator=g)
        texts.append(ids[:, frames:].to(device))
        ids[0, 8 : 8 + frames] = IMG
        pixels = torch.randn(frames, 3, size, size, generator=g)

        def offsets(ids: torch.Tensor) -> torch.Tensor:
            is_img = ids == IMG
            seen = torch.cumsum(is_img, 1) - is_img.long()
            return torch.stack([torch.zeros_like(seen), seen], -1)

        def owl_generate(m: torch.nn.Module, ids: torch.Tensor, pixels: torch.Tensor = pixels) -> torch.Tensor:
            out = m.generate(input_ids=ids, media_offset=offsets(ids), pixel_values=pixels.to(m.dtype), max_new_tokens=tokens, stop_token_ids=[])
            return out.sequences

        def owl_logits(m: torch.nn.Module, ids: torch.Tensor, pixels: torch.Tensor = pixels) -> torch.Tensor:
            return m(ids, media_offset=offsets(ids), pixel_values=pixels.to(m.dtype), logits_to_keep=1).logits[0, -1]

        compare(results["hyperowl, frames"], owl_generate, owl_logits, fp32, bf16, ids.to(device))
    for ids in texts:
        compare(
            results["hyperowl, text"],
            lambda m, ids: m.generate(input_ids=ids, max_new_tokens=tokens, stop_token_ids=[]).sequences,
            lambda m, ids: m(ids, logits_to_keep=1).logits[0, -1],
            fp32,
            bf16,
            ids,
        )
    hf_config = config.to_transformers(tie_word_embeddings=False)
    with torch.device(device):
        hf32 = Qwen2ForCausalLM(hf_config).eval()
    state = {k.removeprefix("language_model."): v for k, v in fp32.state_dict().items() if k.startswith("language_model.")}
    missing, _ = hf32.load_state_dict(state, strict=False)  # hyper-layer extras are left over
    assert not missing, missing
    del fp32, bf16, state
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    for ids in texts:
        compare(
            results["transformers Qwen2, text"],
            lambda m, ids: m.generate(ids, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)[:, ids.shape[1] :],
            lambda m, ids: m(ids).logits[0, -1],
            hf32,
            hf16,
            ids,
        )
    del hf32, hf16
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parity-prompts", type=int, default=10, help="7B bf16-vs-fp32 prompts (0 skips the check)")
    parser.add_argument("--parity-tokens", type=int, default=32)
    args = parser.parse_args(argv)
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
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            gpu.to(dtype)
            inputs = {k: v.cuda() if k != "pixel_values" else v.to(dtype) for k, v in batch(cpu, "cpu").items()}
            worst, same = graph_matches_eager(gpu, inputs)
            ok = same and worst <= tol
            failures += not ok
            print(
                f"{'PASS' if ok else 'FAIL'} {'fused' if fused else 'gated'} {str(dtype)[6:]} CUDA-graph decode == eager: "
                f"max |logit diff| {worst:.2e} (tol {tol}), greedy tokens {'equal' if same else 'differ'}"
            )
        for images in (0, 3):
            same, replays = bucket_rows_match(gpu.float(), images)
            ok = same and replays > 0
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {'fused' if fused else 'gated'} fp32 serving batch, rows with {images} images joining and "
                  f"leaving graphed bucket slots: tokens {'equal' if same else 'differ'} to each request's own generation, "
                  f"{replays} graphed steps")  # fmt: skip
        gpu.to(torch.bfloat16)
        two = batch(cpu, "cpu")
        one = {k: v[:1].cuda() for k, v in two.items() if k != "pixel_values"}
        one["pixel_values"] = two["pixel_values"][:9].to(torch.bfloat16)
        worst, same, calls = flash_matches_products(gpu, one)
        ok = same and worst <= 5e-2 and calls > 0
        failures += not ok
        print(
            f"{'PASS' if ok else 'FAIL'} {'fused' if fused else 'gated'} bf16 decode, flash visual attention == matrix products: "
            f"max |logit diff| {worst:.2e} (tol 0.05), greedy tokens {'equal' if same else 'differ'}, {calls} flash calls"
        )
        gpu.float()
    # trained weights: the bundled model in bf16 on the GPU against fp32 on the CPU
    agree = greedy_agreement(
        Owl3ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32),
        Owl3ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.bfloat16, device="cuda"),
        Owl3Processor.from_pretrained(DEFAULT_MODEL),
        parity_samples(),
    )
    ok = sum(agree) >= 0.9 * len(agree)
    failures += not ok
    print(f"{'PASS' if ok else 'FAIL'} bundled model (trained) bf16 on CUDA vs fp32 on CPU, greedy tokens (up to 32): "
          f"{sum(agree)}/{len(agree)} prompts with pictures agree", flush=True)  # fmt: skip
    if args.parity_prompts:
        for name, parity in parity_7b(args.parity_prompts, args.parity_tokens).items():
            ok = parity.agree >= 0.9 * args.parity_prompts
            failures += not ok and name.startswith("hyperowl")
            verdict = ("PASS" if ok else "FAIL") if name.startswith("hyperowl") else "PEER"
            print(f"{verdict} 7b bf16 vs fp32 greedy tokens, {name}: {parity.line()}", flush=True)
    print("cuda_check:", "all passed" if not failures else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
