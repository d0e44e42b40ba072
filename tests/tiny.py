"""Tiny random mPLUG-Owl3 models for tests."""

from __future__ import annotations

import copy

import torch

from hyperowl.config import PRESETS, Owl3Config
from hyperowl.model.owl3 import Owl3ForCausalLM


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
