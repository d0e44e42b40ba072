"""Tiny random mPLUG-Owl3 models for tests."""

from __future__ import annotations

import copy

import torch

from hyperowl.config import PRESETS, Owl3Config
from hyperowl.engine.generate import Owl3ForCausalLM


def tiny_config(**overrides) -> Owl3Config:
    config = copy.deepcopy(PRESETS["tiny"])
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def random_model(config: Owl3Config | None = None, seed: int = 0) -> Owl3ForCausalLM:
    """Every parameter (norm weights included) drawn at random so that no term can hide."""
    torch.manual_seed(seed)
    model = Owl3ForCausalLM(config or tiny_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model.eval()


CORPUS = [
    "What colour is the square? The square is red. Describe the picture. A blue circle on a white background.",
    "Which picture shows a green triangle? Picture 3. What happened first in the video? The red square appeared.",
    "Cut to rows columns with a global view subimg global_view 0 1 2 3 4 5 6 7 8 9 yes no",
] * 20


def save_tiny_checkpoint(path, seed: int = 0, release: str = "240728", **config_overrides) -> None:
    """A complete checkpoint directory: config.json, model.safetensors and tokenizer files.

    ``release="241101"`` makes the fused variant (no hyper-attention gate) with a tokenizer that also
    holds the 241101 media markers as single tokens.
    """
    from hyperowl.processing.tokenizer import ENDOFTEXT, IM_END, MARKERS_241101, train_tokenizer

    fused = release == "241101"
    tokenizer = train_tokenizer(CORPUS, vocab_size=400, extra_special_tokens=MARKERS_241101 if fused else ())
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    if fused:
        config_overrides.setdefault("fused_hyper_attention", True)
    config = tiny_config(vocab_size=len(tokenizer), eos_token_id=stops, **config_overrides)
    random_model(config, seed).save_pretrained(path)
    tokenizer.save_pretrained(str(path))
