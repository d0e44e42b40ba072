"""Model numbers: transformers oracles for the text path and vision tower; a plain SPEC reference for Hyper Attention."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from tests.tiny import random_model, tiny_config

IMG = 7  # any id works: the model finds images through media_offset


def media_offset_for(ids: torch.Tensor, first: int = 0, extra_visible: int = 0) -> torch.Tensor:
    """`[T, 2]` for one row: token t sees the images whose token is strictly before t."""
    count = torch.cumsum((ids == IMG).long(), 0) - (ids == IMG).long()
    return torch.stack([torch.full_like(count, first), first + count], -1)


def qwen2_oracle(model) -> Qwen2ForCausalLM:
    hf = Qwen2ForCausalLM(model.config.to_transformers(tie_word_embeddings=False, attn_implementation="eager"))
    state = {k.removeprefix("language_model."): v for k, v in model.state_dict().items() if k.startswith("language_model.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing
    assert all("v_kv_proj" in k or "gate_proj.0" in k for k in unexpected)
    return hf.eval()


def test_text_only_logits_equal_transformers_qwen2():
    model = random_model()
    hf = qwen2_oracle(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    assert ours.shape == (2, 19, model.config.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_vision_features_equal_transformers_siglip_hidden_states_minus_2():
    model = random_model()
    v = model.config.vision_config
    hf = SiglipVisionModel(v.to_transformers(attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(model.vision_model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    pixels = torch.randn(3, 3, v.image_size, v.image_size)
    with torch.no_grad():
        ours = model.vision_model(pixels)
        theirs = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ---- a plain reference of SPEC §2-3, one token at a time ---------------------------------------


def rms(norm, x):
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def rope(x, pos, d, theta):
    """x `[..., d]` rotated by the single position `pos`."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat([pos * inv, pos * inv]).float()
    half = d // 2
    return x * ang.cos() + torch.cat([-x[..., half:], x[..., :half]], -1) * ang.sin()


def softmax_attend(q, keys, values):
    w = torch.softmax(keys @ q / math.sqrt(q.shape[-1]), 0)
    return w @ values


def reference_logits(model, ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
    """Logits `[T, vocab]` of one row written straight from SPEC §2-3 (loops, no masks)."""
    cfg = model.config
    d, nh, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    group = nh // kvh
    lm = model.language_model.model
    img_pos = (ids == IMG).nonzero().flatten().tolist()
    feats = model.vision2text_model(model.vision_model(pixels)) if pixels is not None else None
    x = lm.embed_tokens(ids)
    T = len(ids)
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        h = rms(layer.input_layernorm, x)
        q = a.q_proj(h).view(T, nh, d)
        k = a.k_proj(h).view(T, kvh, d)
        v = a.v_proj(h).view(T, kvh, d)
        q = torch.stack([rope(q[t], t, d, cfg.rope_theta) for t in range(T)])
        k = torch.stack([rope(k[t], t, d, cfg.rope_theta) for t in range(T)])
        hyper = cfg.is_hyper_layer(i) and feats is not None
        if hyper:
            kv = a.v_kv_proj(rms(layer.input_layernorm, feats)).view(feats.shape[0], feats.shape[1], kvh, 2, d)
            img_k = torch.stack([rope(kv[n, :, :, 0], img_pos[n] + 1, d, cfg.rope_theta) for n in range(len(img_pos))])
            img_v = kv[..., 1, :]
        out = torch.zeros(T, nh, d)
        for t in range(T):
            seen = [n for n, p in enumerate(img_pos) if p < t]
            for head in range(nh):
                g = head // group
                c_text = softmax_attend(q[t, head], k[: t + 1, g], v[: t + 1, g])
                out[t, head] = c_text
                if not hyper or not seen:
                    continue
                vk = img_k[seen][:, :, g].reshape(-1, d)
                vv = img_v[seen][:, :, g].reshape(-1, d)
                if cfg.fused_hyper_attention:
                    out[t, head] = softmax_attend(q[t, head], torch.cat([vk, k[: t + 1, g]]), torch.cat([vv, v[: t + 1, g]]))
                else:
                    c_vis = softmax_attend(q[t, head], vk, vv)
                    gate = torch.sigmoid(a.gate_proj[0](c_text))
                    out[t, head] = c_text * (1 - gate) + c_vis * gate
        x = x + a.o_proj(out.reshape(T, -1))
        x = x + layer.mlp(rms(layer.post_attention_layernorm, x))
    return model.language_model.lm_head(rms(lm.norm, x))


def interleaved_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (22,), generator=g)
    ids[[4, 5, 13]] = IMG  # text before the first image, two adjacent images, one later
    return ids


@pytest.mark.parametrize("fused", [False, True], ids=["gated-240728", "fused-241101"])
def test_hyper_attention_matches_plain_spec_reference(fused):
    model = random_model(tiny_config(num_key_value_heads=2, fused_hyper_attention=fused))
    v = model.config.vision_config
    ids = interleaved_ids(model.config.vocab_size)
    pixels = torch.randn(3, 3, v.image_size, v.image_size)
    with torch.no_grad():
        ours = model(ids[None], media_offset=media_offset_for(ids)[None], pixel_values=pixels).logits[0]
        ref = reference_logits(model, ids, pixels)
        text_only = model(ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    # tokens up to and including the first <|image|> see no image: identical to the text-only model
    torch.testing.assert_close(ours[:5], text_only[:5], atol=1e-6, rtol=0)
    assert (ours[6:] - text_only[6:]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_of_16_bit_input_is_qwen2s_fp32_formula(dtype):
    from hyperowl.model.decoder import RMSNorm

    norm = RMSNorm(96, eps=1e-6).to(dtype)
    norm.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(5, 96) * 3).to(dtype)
    qwen2 = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), norm.weight * qwen2.to(dtype))


@pytest.mark.parametrize("queries", [1, 3, 9])
@pytest.mark.parametrize("keys", [5, 4096 + 37])
def test_attention_paths_equal_dense_softmax(queries, keys):
    """Every path of `attention` (matrix products for a few queries, the fused kernel with native or
    folded GQA otherwise; keys sliced when over SPLIT_KEYS) equals a dense GQA softmax under a mask."""
    from hyperowl.model.decoder import FEW_QUERIES, SPLIT_KEYS, attention

    assert 3 <= FEW_QUERIES < 9 and 5 < SPLIT_KEYS < 4096 + 37  # the cases cover both paths
    g, groups, d = 2, 3, 8
    gen = torch.Generator().manual_seed(queries * 10_000 + keys)
    q = torch.randn(2, g * groups, queries, d, generator=gen)
    k, v = torch.randn(2, g, keys, d, generator=gen), torch.randn(2, g, keys, d, generator=gen)
    mask = torch.rand(2, 1, queries, keys, generator=gen) < 0.7
    mask[..., 0] = True
    scores = q.double() @ k.double().repeat_interleave(groups, 1).transpose(-1, -2) / math.sqrt(d)
    values = v.double().repeat_interleave(groups, 1)
    dense = (torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ values).float()
    full = (torch.softmax(scores, -1) @ values).float()
    for fold in (False, True):
        torch.testing.assert_close(attention(q, k, v, mask, fold=fold), dense)
        torch.testing.assert_close(attention(q, k, v, None, fold=fold), full)


def test_batch_with_left_padding_equals_single_rows():
    model = random_model()
    v = model.config.vision_config
    a, b = interleaved_ids(model.config.vocab_size, 1), interleaved_ids(model.config.vocab_size, 2)[6:]
    pix_a, pix_b = torch.randn(3, 3, v.image_size, v.image_size), torch.randn(1, 3, v.image_size, v.image_size)
    pad = len(a) - len(b)
    ids = torch.stack([a, torch.cat([torch.zeros(pad, dtype=torch.long), b])])
    mask = torch.stack([torch.ones_like(a), torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones_like(b)])])
    off_b = media_offset_for(b, first=3)
    offsets = torch.stack([media_offset_for(a), torch.cat([off_b[:1].expand(pad, 2), off_b])])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, media_offset=offsets, pixel_values=torch.cat([pix_a, pix_b])).logits
        row_a = model(a[None], media_offset=media_offset_for(a)[None], pixel_values=pix_a).logits[0]
        row_b = model(b[None], media_offset=media_offset_for(b)[None], pixel_values=pix_b).logits[0]
    torch.testing.assert_close(batched[0], row_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1, pad:], row_b, atol=1e-5, rtol=1e-5)


def count_calls(modules):
    calls = [0]
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in modules]
    return calls, handles


@pytest.mark.parametrize("fused", [False, True], ids=["gated", "fused"])
def test_cached_greedy_generation_equals_full_recomputation(fused):
    model = random_model(tiny_config(fused_hyper_attention=fused), seed=3)
    v = model.config.vision_config
    ids = interleaved_ids(model.config.vocab_size, 4)
    pixels = torch.randn(3, 3, v.image_size, v.image_size)
    hyper = model.language_model.model.hyper_layers
    calls, handles = count_calls([layer.self_attn.v_kv_proj for layer in hyper])
    out = model.generate(ids[None], media_offset=media_offset_for(ids)[None], pixel_values=pixels, max_new_tokens=10, stop_token_ids=[])
    for h in handles:
        h.remove()
    assert calls[0] == len(hyper)  # visual K/V: once per hyper layer per request, not per token
    seq = ids.clone()
    expected = []
    with torch.no_grad():
        for _ in range(10):
            logits = model(seq[None], media_offset=media_offset_for(seq)[None], pixel_values=pixels).logits[0, -1]
            nxt = int(logits.argmax())
            expected.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
    assert out.sequences[0].tolist() == expected


def test_generation_stops_and_pads_rows():
    model = random_model(seed=5)
    ids = torch.randint(10, model.config.vocab_size, (1, 9))
    free = model.generate(ids, max_new_tokens=6, stop_token_ids=[])
    stop = int(free.sequences[0, 2])
    out = model.generate(ids, max_new_tokens=6, stop_token_ids=[stop])
    first = free.sequences[0].tolist().index(stop)
    assert out.num_generated == [first + 1]
    assert out.sequences.shape[1] == first + 1


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = random_model(seed=6)
    ids = torch.randint(10, model.config.vocab_size, (1, 9))
    greedy = model.generate(ids, max_new_tokens=5, stop_token_ids=[]).sequences
    topk1 = model.generate(ids, max_new_tokens=5, stop_token_ids=[], do_sample=True, top_k=1, temperature=0.7).sequences
    assert torch.equal(greedy, topk1)
    a = model.generate(ids, max_new_tokens=8, stop_token_ids=[], do_sample=True, temperature=1.5, seed=11).sequences
    b = model.generate(ids, max_new_tokens=8, stop_token_ids=[], do_sample=True, temperature=1.5, seed=11).sequences
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype):
    model = random_model(seed=7)
    v = model.config.vision_config
    ids = interleaved_ids(model.config.vocab_size, 8)
    pixels = torch.randn(3, 3, v.image_size, v.image_size)
    batch = {"input_ids": ids[None], "media_offset": media_offset_for(ids)[None], "pixel_values": pixels}
    with torch.no_grad():
        ref = model(**batch).logits
        half = model.to(dtype)(**batch).logits
    assert half.dtype == dtype
    assert (half.float() - ref).abs().max() < 0.1 * ref.abs().max()
