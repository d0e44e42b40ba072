"""Memory policy for visual input: whether a request's images fit, and where their visual K/V go.

The model encodes frames in chunks (pixels -> vision tower -> projector -> visual K/V of every hyper
layer, written into preallocated `VisualKV` storage), so one chunk of activations exists at a time.
`plan_visual_memory` checks a request against the memory budget of `VisualOptions` before anything is
encoded and raises `ResourceLimitError` saying how many frames fit; the engine calls it before every
prefill with images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hyperowl.errors import ResourceLimitError
from hyperowl.model.owl3 import VisualOptions

if TYPE_CHECKING:
    from hyperowl.config import Owl3Config

GIB = 2**30


@dataclass
class VisualMemoryPlan:
    """Where a request's visual K/V go and what the estimate was (bytes)."""

    offload: bool
    per_image_device: int
    per_image_host: int
    fixed_device: int
    budget_device: int
    max_images: int


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on `device`: CUDA free memory plus what PyTorch's allocator holds
    unused; on the CPU, `MemAvailable` of /proc/meminfo (or all physical memory where unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def visual_kv_bytes_per_image(config: Owl3Config, dtype: torch.dtype) -> int:
    """Bytes of visual K/V one image takes over all hyper layers, stored in `dtype`."""
    p = config.vision_config.tokens_per_image
    element = torch.empty(0, dtype=dtype).element_size()
    return len(config.hyper_layers) * 2 * config.num_key_value_heads * p * config.head_dim * element


def chunk_activation_bytes(config: Owl3Config, chunk_size: int, dtype: torch.dtype) -> int:
    """Upper estimate of the activations of one chunk going pixels -> features -> visual K/V:
    fp32 pixels, the vision tower's widest point (residual, norm, q/k/v, MLP hidden, score matrix of
    one layer), the projected features with their norm and the K/V projection of one hyper layer."""
    v = config.vision_config
    p = v.tokens_per_image
    element = torch.empty(0, dtype=dtype).element_size()
    pixels = 3 * v.image_size**2 * 4
    tower = p * (6 * v.hidden_size + 2 * v.intermediate_size) + v.num_attention_heads * p * p
    llm_side = p * (3 * config.hidden_size + 4 * config.num_key_value_heads * config.head_dim)
    return chunk_size * (pixels + (tower + llm_side) * element)


def prompt_bytes_per_token(config: Owl3Config, dtype: torch.dtype) -> int:
    """Bytes one prompt token costs: its text KV cache in every layer plus its widest activations."""
    element = torch.empty(0, dtype=dtype).element_size()
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
    return (kv + 8 * config.hidden_size + 3 * config.intermediate_size) * element


def plan_visual_memory(
    config: Owl3Config,
    num_images: int,
    prompt_tokens: int,
    model_dtype: torch.dtype,
    device: torch.device,
    options: VisualOptions,
) -> VisualMemoryPlan:
    """Decide where the visual K/V of `num_images` images go, or fail before any work is done.

    The device must hold: the visual K/V of every image (unless offloaded), one layer of them in the
    model dtype when they are stored otherwise (cast at use), one encoding chunk of activations,
    one cross-attention block (fp32 scores, the worst case) and the prompt's text KV cache and
    activations (`prompt_tokens` tokens, which include one `<|image|>` token per image).

    Raises:
        ResourceLimitError: the request does not fit; the message says how many images do.
    """
    kv_dtype = options.kv_dtype or model_dtype
    stored = visual_kv_bytes_per_image(config, kv_dtype)
    one_layer = visual_kv_bytes_per_image(config, model_dtype) // max(1, len(config.hyper_layers))
    per_token = prompt_bytes_per_token(config, model_dtype)
    p = config.vision_config.tokens_per_image
    fixed = (
        chunk_activation_bytes(config, min(options.chunk_size, max(1, num_images)), model_dtype)
        + min(options.block_elements(device), config.num_attention_heads * prompt_tokens * (num_images * p + prompt_tokens)) * 4
        + max(0, prompt_tokens - num_images) * per_token
    )
    budget = options.memory_budget if options.memory_budget is not None else int(0.9 * available_memory(device))
    room = max(0, budget - fixed)
    on_device = stored + (one_layer if kv_dtype != model_dtype else 0) + per_token
    offloaded = one_layer + per_token
    fit_device = room // on_device
    fit_offloaded = 0
    if device.type == "cuda" and options.offload != "never":
        fit_offloaded = min(room // offloaded, int(0.9 * available_memory(torch.device("cpu"))) // stored)
    if options.offload == "always" and device.type == "cuda":
        fit_device = 0
    if num_images <= fit_device:
        return VisualMemoryPlan(False, on_device, 0, fixed, budget, fit_device)
    if num_images <= fit_offloaded:
        return VisualMemoryPlan(True, offloaded, stored, fixed, budget, fit_offloaded)
    fit = max(fit_device, fit_offloaded)
    raise ResourceLimitError(
        f"{num_images} images/frames do not fit in memory: at most {fit} fit in the "
        f"{budget / GIB:.2f} GiB budget on {device} ({on_device / 2**20:.2f} MiB per frame of visual K/V "
        f"and prompt, {fixed / 2**20:.1f} MiB for one chunk of {options.chunk_size} frames and the "
        f"attention block). Sample fewer frames (max_frames={fit}), store the visual K/V in a "
        f"lower precision (kv_dtype), offload them to the CPU, or raise the memory budget."
    )
