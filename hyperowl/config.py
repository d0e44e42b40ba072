"""Typed configs that read and write the official mPLUG-Owl3 `config.json` keys unchanged.

The official `config.json` is a Qwen2 config (its keys at the top level) plus `hyper_layers`
(1-based indices of the decoder layers that carry Hyper Attention) and `vision_config` (a SigLIP
vision config). Keys we do not use are kept in `extra` and written back on save.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyperowl.errors import CheckpointError

MODEL_TYPE = "mplugowl3"
ARCHITECTURE = "mPLUGOwl3Model"


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in names}, {k: v for k, v in data.items() if k not in names}


@dataclass
class VisionConfig:
    """SigLIP vision transformer (`config.json["vision_config"]`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    model_type: str = "siglip_vision_model"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        known, extra = _split_known(cls, data)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        return {**self.extra, **out}

    def to_transformers(self, **overrides: Any) -> Any:
        """The same tower as a transformers `SiglipVisionConfig` (oracles, baselines)."""
        from transformers import SiglipVisionConfig

        fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels")
        more = ("image_size", "patch_size", "layer_norm_eps", "hidden_act")
        return SiglipVisionConfig(**{**{k: getattr(self, k) for k in fields + more}, **overrides})


@dataclass
class Owl3Config:
    """Qwen2 decoder with Hyper Attention layers, plus the vision tower config.

    `hyper_layers` is 1-based as in the official file: decoder layer `i` (0-based) is a hyper layer
    iff `i + 1 in hyper_layers`. `fused_hyper_attention` selects the 7B-241101 variant (visual K/V in
    front of the text K/V, no gate); when `config.json` does not say, the checkpoint's tensor names
    decide (see `hyperowl.model.checkpoint`).
    """

    vocab_size: int = 151851
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    hyper_layers: list[int] = field(default_factory=lambda: [1, 9, 17, 25])
    fused_hyper_attention: bool | None = None
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    torch_dtype: str | None = "bfloat16"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    model_type: str = MODEL_TYPE
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise CheckpointError(f"unsupported model_type {self.model_type!r}: hyperowl loads {MODEL_TYPE!r} checkpoints")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        bad = [i for i in self.hyper_layers if not 1 <= i <= self.num_hidden_layers]
        if bad:
            raise CheckpointError(f"hyper_layers {bad} outside 1..num_hidden_layers={self.num_hidden_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_hyper_layer(self, layer_idx: int) -> bool:
        """`layer_idx` is 0-based; `hyper_layers` is 1-based (official convention)."""
        return layer_idx + 1 in self.hyper_layers

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Owl3Config:
        data = dict(data)
        if "model_type" not in data:
            raise CheckpointError("config.json has no model_type; expected 'mplugowl3'")
        vision = VisionConfig.from_dict(data.pop("vision_config", {}) or {})
        known, extra = _split_known(cls, data)
        known.pop("vision_config", None)
        return cls(**known, vision_config=vision, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("extra", "vision_config")}
        if not out["fused_hyper_attention"]:
            del out["fused_hyper_attention"]  # written only for the fused (241101) variant
        out["vision_config"] = self.vision_config.to_dict()
        out.setdefault("architectures", [ARCHITECTURE])
        return {**self.extra, **out}

    def to_transformers(self, **overrides: Any) -> Any:
        """The language model without hyper layers as a transformers `Qwen2Config` (oracles, baselines)."""
        from transformers import Qwen2Config

        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        more = ("num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings")
        return Qwen2Config(**{**{k: getattr(self, k) for k in fields + more}, **overrides})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Owl3Config:
        file = Path(path) / "config.json"
        if not Path(path).is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        if not file.is_file():
            raise CheckpointError(f"no config.json in {path}")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{file} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


PRESETS: dict[str, Owl3Config] = {
    "7b": Owl3Config(),
    # Scaled-down Qwen2 + SigLIP with the 7B's proportions (1 hyper layer in 7, GQA, a vision tower much
    # cheaper per token than the LLM, 36 visual tokens per image): benchmarks that finish on 2 CPU cores.
    "cpu-small": Owl3Config(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=14,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        hyper_layers=[1, 8],
        bos_token_id=None,
        eos_token_id=None,
        torch_dtype="float32",
        vision_config=VisionConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=48, patch_size=8
        ),
    ),
    "tiny": Owl3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        hyper_layers=[2, 4],
        bos_token_id=None,
        eos_token_id=None,
        torch_dtype="float32",
        vision_config=VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
        ),
    ),
}


GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class GenerationConfig:
    """A checkpoint's sampling defaults, read from its ``generation_config.json`` as transformers reads it.

    Keys the file lacks take transformers' ``GenerationConfig`` defaults (so ``top_k`` is 50 when the
    file turns sampling on without naming it); a checkpoint without the file decodes greedily. The
    official 7B checkpoints ship ``do_sample: true, temperature 0.7, top_p 0.8, top_k 20,
    repetition_penalty 1.05`` (SPEC §4). ``max_new_tokens`` is None unless the file sets it (then the
    caller's own default applies). Other keys (ids, ``transformers_version``) are not used here.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GenerationConfig:
        """Read ``path/generation_config.json``; the defaults when there is none.

        Raises:
            CheckpointError: the file is not a JSON object, or a used key has a value of the wrong type.
        """
        file = Path(path) / GENERATION_CONFIG_FILE
        if not file.is_file():
            return cls()
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{file} is not a JSON object")
        known, _ = _split_known(cls, data)
        kinds = {"do_sample": (bool,), "top_k": (int,), "max_new_tokens": (int, type(None))}
        for key, value in known.items():
            allowed = kinds.get(key, (int, float))
            if not isinstance(value, allowed) or (key != "do_sample" and isinstance(value, bool)):
                raise CheckpointError(f"{file}: {key} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
        config = cls(**known)
        ranges = (
            (config.temperature >= 0, "temperature must be >= 0"),
            (0 < config.top_p <= 1, "top_p must be in (0, 1]"),
            (config.top_k >= 0, "top_k must be >= 0"),
            (config.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (config.max_new_tokens is None or config.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
        )
        for ok, rule in ranges:
            if not ok:
                raise CheckpointError(f"{file}: {rule}")
        return config

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``path/generation_config.json`` with these defaults (the keys read above; others a file
        it was read from had, such as token ids, are not kept)."""
        (Path(path) / GENERATION_CONFIG_FILE).write_text(json.dumps(self.sampling_kwargs(), indent=2) + "\n")

    def sampling_kwargs(self) -> dict[str, Any]:
        """The defaults as ``SamplingParams`` keyword arguments (``max_new_tokens`` only when set)."""
        out = dataclasses.asdict(self)
        if self.max_new_tokens is None:
            del out["max_new_tokens"]
        return out
