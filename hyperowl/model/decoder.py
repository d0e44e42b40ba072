"""Qwen2 decoder whose hyper layers carry Hyper Attention (SPEC §2), with the official tensor names.

Shapes: B batch, T new text tokens, K cached+new text columns, N visual tokens (images x patches),
H hidden, h query heads, g kv heads, d head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hyperowl.config import Owl3Config
from hyperowl.model.cache import TextKVCache, VisualKV


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Qwen2's order: normalised in fp32 and cast back (what `rms_norm` does for 16-bit input, in a
        fused kernel where PyTorch has one), then scaled."""
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`positions` `[B, L]` -> cos and signed sin `[B, 1, L, d]` for `apply_rotary` (computed in fp32,
    then cast, as Qwen2 does). The sin's first half is negated: rotate-half becomes a swap of halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1)[:, None].to(dtype), torch.cat([-sin, sin], dim=-1)[:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on `x` `[B, heads, L, d]`: `x cos + rotate_half(x) sin`, where
    `rotate_half(x) sin` = (x with its halves swapped) x `signed_sin` (three kernels)."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat([x[..., half:], x[..., :half]], dim=-1), signed_sin)


@dataclass
class CrossBlock:
    """Queries `t0 .. t1 - 1` of one prefill cross-attention block see at most `num_images` images
    (the max over rows and queries); `full`: every query of every row sees exactly those (no mask)."""

    t0: int
    t1: int
    num_images: int
    full: bool


@dataclass
class CrossPlan:
    """Which images each query sees, in blocks that bound the cross-attention memory.

    Token t of row b sees the images `[0, counts[b, t])` of its row: a PREFIX (SPEC §3), so a block
    of queries needs only the first `max(counts) * tokens_per_image` visual keys and a mask
    `[B, 1, queries, keys]` built per block; the dense `[B, 1, T, N]` mask never exists.
    """

    counts: torch.Tensor
    blocks: list[CrossBlock]

    @staticmethod
    def build(counts: torch.Tensor, tokens_per_image: int, heads: int, extra_keys: int, max_elements: int) -> CrossPlan:
        """Group the queries of `counts` `[B, T]` into blocks of at most `max_elements`
        (batch x `heads` x queries x (visual + `extra_keys`) keys) elements; one query at least."""
        batch = counts.shape[0]
        hi = counts.max(0).values.tolist()
        lo = counts.min(0).values.tolist()
        blocks: list[CrossBlock] = []
        t0 = 0
        while t0 < len(hi):
            t1, most, least = t0 + 1, hi[t0], lo[t0]
            while t1 < len(hi):
                wider = max(most, hi[t1])
                if (t1 + 1 - t0) * batch * heads * (wider * tokens_per_image + extra_keys) > max_elements:
                    break
                most, least, t1 = wider, min(least, lo[t1]), t1 + 1
            blocks.append(CrossBlock(t0, t1, most, least == most))
            t0 = t1
        return CrossPlan(counts, blocks)


@dataclass
class StepContext:
    """What every layer of one forward needs besides its input.

    `cos`, `sin`: the rotary tables of `rotary_cos_sin` (sin signed); `self_mask` `[B, 1, T, K]`
    (True = may attend); `cross` says which images each token sees and is None when the step has no images.
    `write_index` (`[1]` long, a decode step of `Owl3Model.decode`): the new keys go to that column of
    `cache` and the attention reads its whole capacity; None: they are appended (`TextKVCache.write`).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    self_mask: torch.Tensor
    cache: TextKVCache | None
    visual: VisualKV | None
    cross: CrossPlan | None
    write_index: torch.Tensor | None = None


def fold_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[B, g * groups, L, d]` query heads -> `[B, g, groups * L, d]`: the query heads sharing one kv
    head become extra queries of it (exact GQA with kernels that lack native GQA support)."""
    b, h, length, d = x.shape
    return x.reshape(b, h // groups, groups * length, d)


def unfold_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of `fold_groups`."""
    b, g, length, d = x.shape
    return x.reshape(b, g * groups, length // groups, d)


#: Up to this many query tokens (decoding), attention runs as two matrix products over all keys at once.
FEW_QUERIES = 4
#: Key slice length of `few_query_attention`'s second product.
SPLIT_KEYS = 4096


def flash_decodable(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether keys `k` can be attended with the flash kernel: unmasked, 16-bit on a GPU, `d % 8 == 0`."""
    d = q.shape[-1]
    return mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and d % 8 == 0 and d <= 256


def flash_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flash kernel's attention `[B, g, R, d]` of `q` `[B, g, R, d]` over `k`, `v` `[B, g, N, d]` and its
    log-sum-exp `[B, g, R]` (fp32, natural log, scores scaled by `d ** -0.5`)."""
    out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
    return out, lse


def few_query_attention(
    q: torch.Tensor, segments: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
) -> torch.Tensor:
    """Softmax attention of a few query heads `q` `[B, h, L, d]` over the keys of every segment
    `(k, v, mask)` together (`k`, `v` `[B, g, N_i, d]`, `mask` `[B, 1, L, N_i]` or None, True = may
    attend) -> `[B, h, L, d]`; the query heads of one kv head are folded into extra queries of it (GQA
    without expanding K/V).

    Decoding against ~1e5-1e6 visual keys: an unmasked 16-bit segment on a GPU goes through the flash
    kernel, whose split-K decoding streams the keys at memory bandwidth (measured: 3.6 TB/s over 400
    frames on an H200, against 0.86 TB/s for matrix products); its log-sum-exp merges it exactly with the
    other segments. The others (masked, fp32, CPU) are matrix products with one fp32 softmax over all
    their scores `[B, g, h/g x L, N]` (small because L is), the long value product split over key slices.
    Segments (the visual K/V and the text cache of a fused hyper layer) are read where they lie: only
    their scores are concatenated, never their keys.
    """
    b, h, length, d = q.shape
    g = segments[0][0].shape[1]
    groups = h // g
    folded = fold_groups(q, groups)
    flash, rest = [], []
    for k, v, mask in segments:
        (flash if flash_decodable(q, k, mask) else rest).append((k, v, mask))
    parts: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (fp32 output, log-sum-exp or None when alone)
    for k, v, _ in flash:
        out, lse = flash_attention_with_lse(folded, k, v)
        parts.append((out.float(), lse))
    if rest:
        scores = []
        for k, _, mask in rest:
            part = torch.matmul(folded, k.transpose(-1, -2)).float() * d**-0.5
            if mask is not None:  # scores seen as [B, g, groups, L, N] against the mask [B, 1, 1, L, N]
                n = k.shape[2]
                part = torch.where(mask[:, :, None], part.view(b, g, groups, length, n), float("-inf")).view(part.shape)
            scores.append(part)
        joined = scores[0] if len(scores) == 1 else torch.cat(scores, -1)
        lse = torch.logsumexp(joined, -1) if flash else None
        probs = torch.softmax(joined, dim=-1) if lse is None else torch.exp(joined - lse[..., None])
        out = None
        start = 0
        for k, v, _ in rest:
            n = k.shape[2]
            part = weighted_values(probs[..., start : start + n].to(v.dtype), v)
            out = part if out is None else out + part
            start += n
        parts.append((out, lse))
    if len(parts) == 1:
        out = parts[0][0]
    else:
        total = torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)
        out = sum(part * torch.exp(lse - total)[..., None] for part, lse in parts)
    return unfold_groups(out.to(segments[0][1].dtype), groups)


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`probs` `[B, g, rows, N]` times `v` `[B, g, N, d]` -> fp32 `[B, g, rows, d]`. The long key axis is
    split into slices summed in fp32: a product with a ~1e6-long inner axis and a tiny output would
    otherwise run on a few GPU blocks."""
    b, g, rows, n = probs.shape
    d = v.shape[-1]
    main = n - n % SPLIT_KEYS
    if not main:
        return torch.matmul(probs, v).float()
    out = torch.matmul(probs[..., main:], v[:, :, main:]).float()
    sliced = probs[..., :main].reshape(b, g, rows, main // SPLIT_KEYS, SPLIT_KEYS).transpose(2, 3)
    parts = torch.matmul(sliced, v[:, :, :main].reshape(b, g, main // SPLIT_KEYS, SPLIT_KEYS, d))
    return out + parts.float().sum(2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, fold: bool = False
) -> torch.Tensor:
    """Softmax attention of the query heads `q` `[B, h, L, d]` over `k`, `v` `[B, g, N, d]` (GQA, h = g x
    groups) under `mask` `[B, 1, L, N]` (True = may attend; None = all) -> `[B, h, L, d]`.

    Up to `FEW_QUERIES` queries (decoding) take `few_query_attention`. More queries take the fused
    kernel with native GQA or, with `fold` (long visual K/V), with the query heads of one kv head
    folded into extra queries of it, so the memory-efficient kernel runs without expanding K/V.
    """
    if q.shape[2] <= FEW_QUERIES:
        return few_query_attention(q, [(k, v, mask)])
    if not fold:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    if mask is not None and groups > 1:
        mask = mask.repeat(1, 1, groups, 1)
    return unfold_groups(F.scaled_dot_product_attention(fold_groups(q, groups), k, v, attn_mask=mask), groups)


class Qwen2Attention(nn.Module):
    """Qwen2 self-attention; in a hyper layer also the cross-attention to the visual K/V.

    Gated variant (7B-240728): `gate_proj` mixes the per-head self- and cross-attention contexts.
    Fused variant (7B-241101): visual K/V in front of the text K/V in one attention call, no gate.
    """

    def __init__(self, config: Owl3Config, layer_idx: int, hyper_index: int | None, fused: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hyper_index = hyper_index
        self.fused = fused
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, kv_dim = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, hidden, bias=True)
        self.k_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.v_proj = nn.Linear(hidden, kv_dim, bias=True)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        if hyper_index is not None:
            self.v_kv_proj = nn.Linear(hidden, 2 * kv_dim, bias=True)
            if not fused:
                self.gate_proj = nn.Sequential(nn.Linear(self.head_dim, self.head_dim, bias=True), nn.Sigmoid())

    def visual_kv(self, normed_images: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`normed_images` `[B, N, H]` (after the shared input RMSNorm) -> K (MI-Rope applied), V `[B, g, N, d]`.

        `v_kv_proj` output is head-major: for each kv head, its key then its value (SPEC §2.3).
        """
        b, n, _ = normed_images.shape
        kv = self.v_kv_proj(normed_images).view(b, n, self.num_kv_heads, 2, self.head_dim)
        keys, values = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)
        return apply_rotary(keys, cos, sin), values

    def image_attention(
        self, q: torch.Tensor, ctx: StepContext, text_k: torch.Tensor | None = None, text_v: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-attention of the queries `q` `[B, h, T, d]` to the visual K/V, block by block (`ctx.cross`).

        Gated variant (no `text_k`): the visual context `[B, h, T, d]`; queries that see no image get
        zeros (their result is discarded by the caller). Fused variant: attention over the visible
        visual keys followed by the text keys `text_k`/`text_v` `[B, g, K, d]` under `ctx.self_mask`.
        Per block only the visible visual prefix is read and only a `[B, 1, queries, keys]` mask is built.
        """
        plan, visual = ctx.cross, ctx.visual
        p = visual.tokens_per_image
        widest = max(block.num_images for block in plan.blocks) * p
        vis_k, vis_v = visual.layer(self.hyper_index, widest, q.device, q.dtype)
        token_image = torch.arange(widest, device=q.device) // p
        parts = []
        for block in plan.blocks:
            n = block.num_images * p
            qb = q[:, :, block.t0 : block.t1]
            counts = plan.counts[:, block.t0 : block.t1, None]
            if text_k is None:
                if n == 0:
                    parts.append(torch.zeros_like(qb))
                    continue
                keys, values = vis_k[:, :, :n], vis_v[:, :, :n]
                # a row that sees no image gets an all-True mask (no NaN); the caller discards its result
                mask = None if block.full else ((token_image[:n] < counts) | (counts == 0))[:, None]
            elif n == 0:  # no image visible yet: plain text attention
                parts.append(attention(qb, text_k, text_v, ctx.self_mask[:, :, block.t0 : block.t1]))
                continue
            elif qb.shape[2] <= FEW_QUERIES:  # decoding: the visual and the text keys stay where they are
                vis_mask = None if block.full else (token_image[:n] < counts)[:, None]
                text_mask = ctx.self_mask[:, :, block.t0 : block.t1]
                parts.append(few_query_attention(qb, [(vis_k[:, :, :n], vis_v[:, :, :n], vis_mask), (text_k, text_v, text_mask)]))
                continue
            else:
                keys, values = torch.cat([vis_k[:, :, :n], text_k], 2), torch.cat([vis_v[:, :, :n], text_v], 2)
                mask = torch.cat([(token_image[:n] < counts)[:, None], ctx.self_mask[:, :, block.t0 : block.t1]], -1)
            parts.append(attention(qb, keys, values, mask, fold=True))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """`x` `[B, T, H]` (already input-normed) -> `[B, T, H]`."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None and ctx.write_index is not None:
            k, v = ctx.cache.write_at(self.layer_idx, k, v, ctx.write_index)
        elif ctx.cache is not None:
            k, v = ctx.cache.write(self.layer_idx, k, v)
        if self.hyper_index is None or ctx.cross is None:
            context = attention(q, k, v, ctx.self_mask)
        elif self.fused:
            context = self.image_attention(q, ctx, k, v)
        else:
            context = attention(q, k, v, ctx.self_mask)
            vis_context = self.image_attention(q, ctx)
            gate = self.gate_proj(context)
            mixed = context * (1 - gate) + vis_context * gate
            context = torch.where((ctx.cross.counts > 0)[:, None, :, None], mixed, context)
        return self.o_proj(context.transpose(1, 2).reshape(b, t, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, config: Owl3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: Owl3Config, layer_idx: int, hyper_index: int | None, fused: bool) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx, hyper_index, fused)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class HyperQwen2Model(nn.Module):
    """`language_model.model.*`: embeddings, decoder layers, final norm."""

    def __init__(self, config: Owl3Config, fused: bool) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        hyper_idx = [i for i in range(config.num_hidden_layers) if config.is_hyper_layer(i)]
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, hyper_idx.index(i) if i in hyper_idx else None, fused)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hyper_layers = [self.layers[i] for i in hyper_idx]

    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)


class HyperQwen2ForCausalLM(nn.Module):
    """`language_model.*`: the decoder plus `lm_head`."""

    def __init__(self, config: Owl3Config, fused: bool) -> None:
        super().__init__()
        self.model = HyperQwen2Model(config, fused)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
