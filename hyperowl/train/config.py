"""`TrainConfig`: every key of a training recipe (YAML), each also a `hyperowl train --key value` flag."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hyperowl.errors import RecipeError

POLICIES = ("hyper", "full", "lora")


@dataclass
class TrainConfig:
    """A fine-tuning or from-scratch training run.

    Model: `init_from` (a checkpoint directory to fine-tune) or, when None, a new model built from
    `scratch_config` (Owl3Config keys, `vision_config` nested) with a tokenizer of
    `tokenizer_vocab_size` trained on the synthetic tasks' texts; `recency_prior` > 0 starts its
    hyper layers' cross-attention leaning towards the most recent image (`init_recency_prior`).

    Data: `train_file` (JSONL conversations, ms-swift layout) or `synthetic_tasks` (task -> weight,
    generated in memory from `seed`; the first `synthetic_warmup_steps` steps draw from
    `synthetic_warmup_tasks` instead, a curriculum); `on_bad_row` = skip | fail for JSONL rows that
    cannot be used. `video_guidance` (synthetic data only) adds frame captions and attention targets to
    the video questions (`hyperowl.synthetic.guidance`).

    Trainable parameters: `policy` hyper (projector + hyper-layer `v_kv_proj`/`gate_proj`, plus the
    hyper layers' whole attention with `hyper_attention`), full (LLM + projector) or lora (LoRA
    adapters on the LLM's linear layers, merged on save); the vision tower only with `train_vision`.

    Batches: each optimizer step sees `batch_size * grad_accum * world_size` samples; `length_groups` > 1
    runs each micro-batch as that many model batches (at most one per sample) of similar-length
    conversations (less padding, the same loss and gradients).
    """

    output_dir: str = "runs/train"
    init_from: str | None = None
    scratch_config: dict[str, Any] = field(default_factory=dict)
    tokenizer_vocab_size: int = 512
    recency_prior: float = 0.0
    export_dir: str | None = None

    train_file: str | None = None
    synthetic_tasks: dict[str, float] | None = None
    synthetic_distractors: list[int] = field(default_factory=lambda: [16, 16])
    synthetic_video_events: list[int] = field(default_factory=lambda: [3, 5])
    synthetic_cut_probability: float = 0.0
    synthetic_choice_probability: float = 0.0
    synthetic_rag_pictures: list[int] = field(default_factory=lambda: [4, 4])
    synthetic_warmup_tasks: dict[str, float] | None = None
    synthetic_warmup_steps: int = 0
    video_guidance: dict[str, Any] | None = None
    on_bad_row: Literal["skip", "fail"] = "fail"
    cut_enable: bool = False
    max_frames: int = 16
    video_fps: float = 1.0
    num_workers: int = 0
    length_groups: int = 1

    policy: Literal["hyper", "full", "lora"] = "hyper"
    train_vision: bool = False
    hyper_attention: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    seed: int = 0
    num_threads: int | None = None
    device: str | None = None
    distributed: Literal["ddp", "fsdp"] = "ddp"

    log_every: int = 10
    save_every: int = 0
    eval_every: int = 0
    eval_tasks: list[str] = field(default_factory=list)
    eval_n: int = 64
    resume: str | None = None
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise RecipeError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.on_bad_row not in ("skip", "fail"):
            raise RecipeError(f"on_bad_row must be skip or fail; got {self.on_bad_row!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise RecipeError(f"distributed must be ddp or fsdp; got {self.distributed!r}")
        if (self.train_file is None) == (self.synthetic_tasks is None):
            raise RecipeError("give exactly one of train_file (JSONL) and synthetic_tasks")
        if self.synthetic_warmup_tasks and self.synthetic_tasks is None:
            raise RecipeError("synthetic_warmup_tasks needs synthetic_tasks (it is the first stage of a synthetic curriculum)")
        if self.video_guidance and self.synthetic_tasks is None:
            raise RecipeError("video_guidance needs synthetic_tasks: its targets come from the synthetic videos' known events")
        if self.video_guidance and self.gradient_checkpointing:
            raise RecipeError("video_guidance does not work with gradient_checkpointing: its attention targets are read inside the recomputed layers")
        if self.init_from is None and not self.scratch_config:
            raise RecipeError("give init_from (a checkpoint to fine-tune) or scratch_config (a new model)")
        if self.policy == "lora" and self.init_from is None:
            raise RecipeError("policy lora needs init_from: LoRA adapts an existing model")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise RecipeError(f"warmup_steps must be in 0..steps; got {self.warmup_steps}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RecipeError(f"unknown recipe keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a YAML recipe; `overrides` (from command-line flags) replace its keys."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise RecipeError(f"recipe not found: {path}") from None
        except yaml.YAMLError as exc:
            raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path} must be a mapping of keys to values")
        return cls.from_dict({**data, **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def flag_parser(name: str) -> typing.Callable[[str], Any]:
    """A parser of the command-line text for `TrainConfig` field `name` (JSON for lists and dicts)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if isinstance(hint, types.UnionType) and len(args) == 1 else hint
    origin = typing.get_origin(base) or base

    def parse(text: str) -> Any:
        if text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
            return None
        if origin is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1", "yes")
        if origin in (list, dict):
            return json.loads(text)
        if origin in (int, float, str):
            return origin(text)
        return text  # Literal choices: checked by TrainConfig

    return parse
