"""Building the model to train: from a checkpoint or from scratch, trainable-parameter policies,
LoRA adapters (peft) and merged saving, and gradient checkpointing of the decoder layers."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hyperowl.config import PRESETS, GenerationConfig, Owl3Config, VisionConfig
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.tokenizer import ENDOFTEXT, IM_END, train_tokenizer
from hyperowl.synthetic.tasks import TaskOptions, corpus
from hyperowl.train.config import RecipeError, TrainConfig

#: The LLM's linear layers LoRA adapts (the attention's `gate_proj` is a Sequential and is left alone).
LORA_TARGETS = r"language_model\.model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
ADAPTER = "default"


def scratch_config(overrides: dict[str, Any], vocab_size: int, stop_ids: list[int]) -> Owl3Config:
    """`PRESETS["tiny"]` with `overrides` (Owl3Config keys; `vision_config` a dict of VisionConfig keys)."""
    config = copy.deepcopy(PRESETS["tiny"])
    vision = dict(overrides.get("vision_config") or {})
    try:
        data = {**config.to_dict(), **{k: v for k, v in overrides.items() if k != "vision_config"}}
        data["vision_config"] = {**config.vision_config.to_dict(), **vision}
        data.update(vocab_size=vocab_size, eos_token_id=stop_ids, bos_token_id=None, torch_dtype="float32")
        data.pop("architectures", None)
        return Owl3Config.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"bad scratch_config: {exc}") from exc


def init_weights(model: Owl3ForCausalLM, seed: int, std: float = 0.02) -> None:
    """GPT-style init: linear/conv/embedding weights ~ N(0, std), biases 0, norms 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif hasattr(module, "weight") and type(module).__name__ == "RMSNorm":
                module.weight.fill_(1.0)


def init_recency_prior(model: Owl3ForCausalLM, scale: float) -> None:
    """Make every hyper layer's cross-attention start out preferring the most recent image.

    The query bias (`q_proj.bias`) and the visual key bias (the key half of `v_kv_proj.bias`) are set
    to the same constant `scale` in every dimension. Under RoPE their dot product is
    `2 * scale**2 * sum_i cos(theta_i * distance)`, largest at distance 0 (the text right after an
    image, SPEC §2.4) and falling with distance, so a text token leans towards the image just before
    it from the first step; training can unlearn it. `scale` 0 leaves the zero biases alone.
    """
    if scale == 0:
        return
    with torch.no_grad():
        for layer in model.language_model.model.hyper_layers:
            attn = layer.self_attn
            attn.q_proj.bias.fill_(scale)
            attn.v_kv_proj.bias.view(attn.num_kv_heads, 2, attn.head_dim)[:, 0].fill_(scale)


def build_from_scratch(cfg: TrainConfig) -> tuple[Owl3ForCausalLM, Owl3Processor]:
    """A new model whose tokenizer is trained on the synthetic tasks' texts (seeded: same recipe, same model)."""
    image_size = int((cfg.scratch_config.get("vision_config") or {}).get("image_size", VisionConfig().image_size))
    texts = corpus(cfg.seed, n=500, opts=TaskOptions(image_size=image_size, distractors=(2, 16), choice_probability=0.5))
    tokenizer = train_tokenizer(texts, vocab_size=cfg.tokenizer_vocab_size)
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    config = scratch_config(cfg.scratch_config, len(tokenizer), stops)
    model = Owl3ForCausalLM(config)
    init_weights(model, cfg.seed)
    init_recency_prior(model, cfg.recency_prior)
    processor = Owl3Processor(
        tokenizer, config.vision_config.image_size, cut_enable=cfg.cut_enable, video_fps=cfg.video_fps, max_frames=cfg.max_frames
    )
    return model, processor


def unused_parameters(model: Owl3ForCausalLM) -> list[str]:
    """Names of tensors kept for the official layout but never run (last SigLIP layer, post_layernorm)."""
    last = len(model.vision_model.encoder.layers) - 1
    prefixes = (f"vision_model.encoder.layers.{last}.", "vision_model.post_layernorm.")
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


def apply_policy(model: Owl3ForCausalLM, cfg: TrainConfig) -> None:
    """Set `requires_grad` by `cfg.policy` (+ `train_vision`); for lora, inject the adapters first."""
    if cfg.policy == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=LORA_TARGETS)
        inject_adapter_in_model(lora, model, adapter_name=ADAPTER)
    never = set(unused_parameters(model))
    for name, p in model.named_parameters():
        if name in never:
            trainable = False
        elif name.startswith("vision_model."):
            trainable = cfg.train_vision
        elif name.startswith("vision2text_model.") or cfg.policy == "full":
            trainable = True
        elif cfg.policy == "lora":
            trainable = ".lora_" in name
        else:
            trainable = _is_hyper_param(model, name, cfg.hyper_attention)
        p.requires_grad_(trainable)
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError(f"policy {cfg.policy!r} leaves nothing to train in this model")


def _is_hyper_param(model: Owl3ForCausalLM, name: str, whole_attention: bool) -> bool:
    hyper = [i for i in range(model.config.num_hidden_layers) if model.config.is_hyper_layer(i)]
    for i in hyper:
        prefix = f"language_model.model.layers.{i}.self_attn."
        if name.startswith(prefix) and (whole_attention or re.match(r"(v_kv_proj|gate_proj)\.", name[len(prefix) :])):
            return True
    return False


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """`state` of a model with LoRA adapters -> the official names, each adapter folded into its base
    weight (`W + scaling * B @ A`, scaling = lora_alpha / r); a state without adapters is returned as is."""
    merged = {}
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            prefix, kind = name.split(".base_layer.")
            name = f"{prefix}.{kind}"
            if kind == "weight":
                a, b = state[f"{prefix}.lora_A.{ADAPTER}.weight"], state[f"{prefix}.lora_B.{ADAPTER}.weight"]
                tensor = tensor + scaling * (b.float() @ a.float()).to(tensor.dtype)
        merged[name] = tensor.detach()
    return merged


def save_merged(state: dict[str, torch.Tensor], config: Owl3Config, generation: GenerationConfig, path: str | Path) -> None:
    """Write a (merged) state dict as an official checkpoint: config.json, generation_config.json (the
    sampling defaults `generation`, kept from the checkpoint training started from) + safetensors."""
    with torch.device("meta"):
        plain = Owl3ForCausalLM(config)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.generation_config = generation
    plain.save_pretrained(path)


def enable_gradient_checkpointing(model: Owl3ForCausalLM) -> None:
    """Recompute each decoder layer's activations in the backward pass (torch.utils.checkpoint)."""
    for layer in model.language_model.model.layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)


def _checkpointed(forward: Any, x: torch.Tensor, ctx: Any) -> torch.Tensor:
    return checkpoint(forward, x, ctx, use_reentrant=False)
