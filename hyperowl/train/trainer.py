"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation and clipping, bf16 autocast,
DDP/FSDP, resumable checkpoints in the official format, metrics (JSONL, tqdm, optional TensorBoard).

The loss of an optimizer step is the sum of token cross-entropies over the whole global batch divided
by its number of label tokens, so N processes give the same updates as one process with the same
global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.hub import checkpoint_dir
from hyperowl.processing.processor import IGNORE_INDEX, Owl3Processor
from hyperowl.synthetic.guidance import AttentionGuide, bind_video_guidance
from hyperowl.synthetic.tasks import TaskMixture, TaskOptions
from hyperowl.train.config import RecipeError, TrainConfig
from hyperowl.train.data import JsonlDataset, MicroBatches, SyntheticDataset
from hyperowl.train.policy import (
    apply_policy,
    build_from_scratch,
    enable_gradient_checkpointing,
    merged_state_dict,
    save_merged,
)

log = logging.getLogger("hyperowl.train")

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    """Per-step global losses (index 0 = the first step run by this call) and the last checkpoint."""

    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None
    skipped_rows: int = 0


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


class LossModule(nn.Module):
    """Wraps the model so DDP/FSDP see plain tensors: `forward(**batch)` -> (sum of token CE, label tokens).

    With a `guide`, the batch's `guide_targets` add its attention-target loss to the sum.
    """

    def __init__(self, model: Owl3ForCausalLM, guide: AttentionGuide | None = None) -> None:
        super().__init__()
        self.model = model
        self.guide = guide

    def forward(
        self, labels: torch.Tensor, guide_targets: dict[str, tuple[torch.Tensor, ...]] | None = None, **inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.guide is None or not guide_targets:
            return token_loss_sum(self.model(**inputs).logits, labels)
        self.guide.targets = {role: tuple(t.to(labels.device) for t in v) for role, v in guide_targets.items()}
        self.guide.loss = 0.0
        try:
            loss, count = token_loss_sum(self.model(**inputs).logits, labels)
            return loss + self.guide.loss, count
        finally:
            self.guide.targets, self.guide.loss = {}, 0.0


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` `[B, T, V]`, `labels` `[B, T]` (-100 ignored) -> (CE of token t+1 predicted at t, summed
    in fp32; the number of label tokens)."""
    target = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (target != IGNORE_INDEX).sum()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `params` (weight decay on matrices only, none on biases and norms) with the recipe's
    learning rate and betas."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
    )


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the torchrun process group when `WORLD_SIZE` > 1 (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and not (cfg.device or "").startswith("cpu")
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        return DistInfo(dist.get_rank(), world, device)
    return DistInfo(0, 1, torch.device(cfg.device or ("cuda" if cuda else "cpu")))


def lr_lambda(cfg: TrainConfig):
    """Linear warmup over `warmup_steps`, then cosine from 1 down to `min_lr_ratio` at `steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be resumed from (missing, truncated or unreadable
    trainer state, config or weights), or None when it is complete."""
    from hyperowl.errors import CheckpointError
    from hyperowl.model.checkpoint import read_tensors, tensor_files

    if not (path / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    try:
        # mmap: the check reads the file's index and records, not every optimizer tensor
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= state.keys():
            return f"{STATE_FILE} lacks the trainer state"
    except (EOFError, OSError, RuntimeError, ValueError, KeyError, AttributeError, pickle.UnpicklingError) as exc:
        return f"{STATE_FILE} is unreadable ({type(exc).__name__}: {exc})"
    try:
        json.loads((path / "config.json").read_text())
        for file in set(tensor_files(path).values()):
            with read_tensors(file):
                pass
    except (OSError, ValueError, CheckpointError) as exc:
        return f"the model files are incomplete ({exc})"
    return None


def checkpoint_step(path: Path) -> int | None:
    """N of a `checkpoint-N` directory name (None for other names, such as a `checkpoint-N.tmp` being written)."""
    _, _, step = path.name.partition("-")
    return int(step) if step.isdigit() else None


def find_resume(cfg: TrainConfig) -> Path | None:
    """`resume: auto` -> the newest complete `output_dir/checkpoint-N` (None if there is none); incomplete
    or unreadable ones (a run killed while saving) are skipped with a warning saying which and why."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = [p for p in Path(cfg.output_dir).glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
        for path in sorted(found, key=checkpoint_step, reverse=True):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            log.warning("resume: skipping %s: %s", path, problem)
        return None
    path = Path(cfg.resume)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise RecipeError(f"cannot resume from {path}: {problem}")
    return path


def replace_directory(written: Path, path: Path) -> None:
    """Move the complete directory `written` to `path`: one rename when `path` does not exist, else each
    file replaced by rename (other files in `path` stay). Files and directories are synced first, so a
    crash leaves either the old or the new file, never a partial one."""
    for file in written.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())
    if path.exists():
        for file in written.iterdir():
            os.replace(file, path / file.name)
        written.rmdir()
    else:
        os.replace(written, path)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of `path` (metrics JSONL) after `step`, and a half-written last line, atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the run was killed
        if line.endswith("\n") and record.get("step", 0) <= step:
            kept.append(line)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def build(cfg: TrainConfig, resume: Path | None) -> tuple[Owl3ForCausalLM, Owl3Processor]:
    """The model (trainable parameters set by the policy) and processor; from `resume` when given."""
    settings = {"cut_enable": cfg.cut_enable, "video_fps": cfg.video_fps, "max_frames": cfg.max_frames}
    if resume is not None and cfg.policy != "lora":
        model = Owl3ForCausalLM.from_pretrained(resume, dtype=torch.float32)
        processor = Owl3Processor.from_pretrained(resume, **settings)
    elif cfg.init_from is not None:
        source = checkpoint_dir(cfg.init_from)  # one Hub look-up for both loaders
        model = Owl3ForCausalLM.from_pretrained(source, dtype=torch.float32)
        processor = Owl3Processor.from_pretrained(source, **settings)
    else:
        model, processor = build_from_scratch(cfg)
    apply_policy(model, cfg)
    if resume is not None and cfg.policy == "lora":
        params = dict(model.named_parameters())
        # The official checkpoint holds merged weights; the adapters themselves live in the trainer state.
        for name, tensor in torch.load(resume / STATE_FILE, map_location="cpu", weights_only=False)["trainable"].items():
            params[name].data.copy_(tensor)
    return model.train(), processor


def make_dataset(cfg: TrainConfig, image_size: int, world_size: int = 1) -> JsonlDataset | SyntheticDataset:
    if cfg.train_file is not None:
        return JsonlDataset(cfg.train_file, cfg.on_bad_row)
    opts = TaskOptions(
        image_size=image_size,
        distractors=tuple(cfg.synthetic_distractors),
        video_events=tuple(cfg.synthetic_video_events),
        cut_probability=cfg.synthetic_cut_probability,
        choice_probability=cfg.synthetic_choice_probability,
        rag_pictures=tuple(cfg.synthetic_rag_pictures),
    )
    warmup = TaskMixture(cfg.synthetic_warmup_tasks, cfg.seed, opts) if cfg.synthetic_warmup_tasks else None
    warmup_samples = cfg.synthetic_warmup_steps * cfg.batch_size * cfg.grad_accum * world_size
    return SyntheticDataset(TaskMixture(cfg.synthetic_tasks, cfg.seed, opts), cfg.video_fps, cfg.max_frames, warmup, warmup_samples)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Runs `cfg` in this process (one rank of a torchrun job, or alone)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.dist = setup_distributed(cfg)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        seed_everything(cfg.seed)
        self.resume_dir = find_resume(cfg)
        self.model, self.processor = build(cfg, self.resume_dir)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.to(self.dist.device)
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else self.dist.device.type == "cuda"
        self.guide = None
        attention_guide = None
        if cfg.video_guidance:
            self.guide, attention_guide = bind_video_guidance(cfg.video_guidance, self.model, self.processor)
        self.wrapped = self._wrap(LossModule(self.model, attention_guide))
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.step = 0
        if self.resume_dir is not None:
            self._load_state(self.resume_dir)
        self.dataset = make_dataset(cfg, self.model.config.vision_config.image_size, self.dist.world_size)
        self.out = Path(cfg.output_dir)

    def _wrap(self, module: LossModule) -> nn.Module:
        if self.dist.world_size == 1:
            return module
        if self.cfg.distributed == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in self.model.language_model.model.layers:
                fully_shard(layer)
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        # find_unused_parameters: text-only batches leave the hyper-layer and vision parameters unused.
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)

    # ---- state -----------------------------------------------------------------------------------
    def _full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors on CPU, gathered from every rank under FSDP (call on all ranks)."""
        if self.cfg.distributed == "fsdp" and self.dist.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: t.detach().cpu() for n, t in self.model.state_dict().items()}

    def _optimizer_state(self) -> dict[str, Any]:
        if self.cfg.distributed == "fsdp" and self.dist.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return self.optimizer.state_dict()

    def _load_state(self, path: Path) -> None:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        if self.cfg.distributed == "fsdp" and self.dist.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        log.info("resumed from %s at step %d", path, self.step)

    def save(self, path: Path, trainer_state: bool = True) -> None:
        """Official checkpoint (adapters merged) + tokenizer at `path`; with `trainer_state`, also what resuming needs.

        Everything is written into `path.tmp` first and then renamed into place, so a run killed while
        saving leaves no partial checkpoint at `path` (`resume: auto` skips a leftover `.tmp`)."""
        full = self._full_state()
        optimizer = self._optimizer_state() if trainer_state else None
        if self.dist.main:
            final, path = path, path.with_name(path.name + ".tmp")
            if path.exists():
                shutil.rmtree(path)
            save_merged(merged_state_dict(full, self.cfg.lora_alpha / self.cfg.lora_r), self.model.config, self.model.generation_config, path)
            self.processor.save_pretrained(path)
            if trainer_state:
                state = {
                    "step": self.step,
                    "data_position": self.step * self.global_batch,
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "rng": _rng_state(),
                    "world_size": self.dist.world_size,
                    "config": self.cfg.to_dict(),
                }
                if self.cfg.policy == "lora":
                    names = {n for n, p in self.model.named_parameters() if p.requires_grad}
                    state["trainable"] = {n: t for n, t in full.items() if n in names}
                torch.save(state, path / STATE_FILE)
            replace_directory(path, final)
        if self.dist.world_size > 1:
            dist.barrier()

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size

    # ---- loop ------------------------------------------------------------------------------------
    def _all_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().to(self.dist.device, torch.float64 if value.is_floating_point() else torch.long)
        if self.dist.world_size > 1:
            dist.all_reduce(value)
        return value

    def _train_step(self, micro_batches: list[dict[str, Any]]) -> tuple[float, float, int]:
        """One optimizer step over this rank's model batches -> (global loss, grad norm, global tokens)."""
        device = self.dist.device
        local_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        total_labels = int(self._all_sum(torch.tensor(local_labels)))
        if total_labels == 0:
            raise RecipeError(f"step {self.step + 1}: the global batch has no assistant tokens to learn from")
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for i, batch in enumerate(micro_batches):
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            last = i == len(micro_batches) - 1
            sync = nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, _ = self.wrapped(**inputs)
                if not loss.requires_grad:
                    # no trainable parameter took part (e.g. the hyper policy on a batch without images):
                    # a zero-weighted term gives them zero gradients, so backward (and DDP's reduction) runs
                    loss = loss + sum(p.sum() for p in trainable) * 0.0
                # DDP averages gradients over ranks: multiply by world size to get the global token mean.
                (loss * (self.dist.world_size / total_labels)).backward()
            loss_sum += loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
        global_tokens = int(self._all_sum(torch.tensor(tokens)))
        return float(self._all_sum(loss_sum)) / total_labels, float(grad_norm), global_tokens

    def _evaluate(self) -> dict[str, float]:
        from hyperowl.synthetic.accuracy import evaluate_tasks

        opts = TaskOptions(image_size=self.model.config.vision_config.image_size)
        accuracy = evaluate_tasks(self.model, self.processor, self.cfg.eval_tasks, self.cfg.eval_n, opts=opts)
        self.model.train()
        return accuracy

    def train(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(skipped_rows=len(getattr(self.dataset, "skipped", [])))
        micro = MicroBatches(
            self.dataset, self.processor, cfg.cut_enable, cfg.batch_size, cfg.grad_accum,
            self.dist.rank, self.dist.world_size, cfg.seed, cfg.steps, cfg.length_groups, self.guide,
        )
        start = self.step * cfg.grad_accum
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(micro, range(start, len(micro))), batch_size=None, num_workers=cfg.num_workers
        )
        writer = None
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "train_config.yaml")
            writer = _tensorboard(self.out) if cfg.tensorboard else None
        if self.dist.main and self.resume_dir is not None:
            truncate_metrics(self.out / METRICS_FILE, self.step)  # the steps after the checkpoint run again
        metrics = (self.out / METRICS_FILE).open("a") if self.dist.main else None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.dist.main), desc="train")
        began = time.perf_counter()
        pending: list[dict[str, Any]] = []
        micro_batches = 0
        tick = time.perf_counter()
        for groups in loader:
            pending.extend(groups)
            micro_batches += 1
            if micro_batches < cfg.grad_accum:
                continue
            loss, grad_norm, tokens = self._train_step(pending)
            pending, micro_batches = [], 0
            self.step += 1
            result.losses.append(loss)
            now = time.perf_counter()
            tokens_per_s = tokens / max(now - tick, 1e-9)
            tick = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}")
            record = {
                "step": self.step,
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "samples": self.step * self.global_batch,
                "elapsed_s": now - began,
            }
            evaluated = bool(cfg.eval_every and cfg.eval_tasks) and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
            if evaluated:
                if cfg.distributed == "fsdp" and self.dist.world_size > 1:
                    log.warning("eval_every is skipped under FSDP (the model is sharded)")
                elif self.dist.main:
                    record.update({f"eval/{k}": v for k, v in self._evaluate().items()})
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("eval/")))
                if self.dist.world_size > 1:
                    dist.barrier()
            if metrics is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps or evaluated):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if writer is not None:
                    for key, value in record.items():
                        if key != "step":
                            writer.add_scalar(key, value, self.step)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step != cfg.steps:
                self.save(self.out / f"checkpoint-{self.step}")
        bar.close()
        if self.step >= cfg.steps and not (self.out / f"checkpoint-{self.step}" / STATE_FILE).is_file():
            self.save(self.out / f"checkpoint-{self.step}")
        result.checkpoint = self.out / f"checkpoint-{self.step}"
        if cfg.export_dir:
            self.save(Path(cfg.export_dir), trainer_state=False)
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()
        return result


def _tensorboard(out: Path) -> Any:
    """A TensorBoard SummaryWriter in `out/tensorboard`, or None (with a note) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed; metrics go to %s only", out / METRICS_FILE)
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(cfg: TrainConfig) -> TrainResult:
    """Run a whole training job in this process (a torchrun rank or alone)."""
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
