"""Qwen2 decoder whose hyper layers carry Hyper Attention (SPEC §2), with the official tensor names.

Shapes: B batch, T new text tokens, K cached+new text columns, N visual tokens (images x patches),
H hidden, h query heads, g kv heads, d head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hyperowl.config import Owl3Config
from hyperowl.engine.cache import TextKVCache, VisualKV


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`positions` `[B, L]` -> cos, sin `[B, 1, L, d]` (computed in fp32, then cast, as Qwen2 does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on `x` `[B, heads, L, d]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class StepContext:
    """What every layer of one forward needs besides its input.

    `self_mask` `[B, 1, T, K]` (True = may attend); `cross_mask` `[B, 1, T, N]` and `has_image`
    `[B, 1, T, 1]` (tokens that see at least one image) are None when the step has no images.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    self_mask: torch.Tensor
    cache: TextKVCache | None
    visual: VisualKV | None
    cross_mask: torch.Tensor | None
    has_image: torch.Tensor | None


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

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """`x` `[B, T, H]` (already input-normed) -> `[B, T, H]`."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.write(self.layer_idx, k, v)
        use_images = self.hyper_index is not None and ctx.cross_mask is not None
        if use_images and self.fused:
            vis_k, vis_v = ctx.visual.keys[self.hyper_index], ctx.visual.values[self.hyper_index]
            mask = torch.cat([ctx.cross_mask, ctx.self_mask], dim=-1)
            context = F.scaled_dot_product_attention(
                q, torch.cat([vis_k, k], 2), torch.cat([vis_v, v], 2), attn_mask=mask, enable_gqa=True
            )
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.self_mask, enable_gqa=True)
            if use_images:
                vis_k, vis_v = ctx.visual.keys[self.hyper_index], ctx.visual.values[self.hyper_index]
                # Tokens that see no image get an all-True mask (no NaN); their result is discarded below.
                cross_mask = ctx.cross_mask | ~ctx.has_image
                vis_context = F.scaled_dot_product_attention(q, vis_k, vis_v, attn_mask=cross_mask, enable_gqa=True)
                gate = self.gate_proj(context)
                mixed = context * (1 - gate) + vis_context * gate
                context = torch.where(ctx.has_image, mixed, context)
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
