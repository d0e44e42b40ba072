"""Read and write official mPLUG-Owl3 checkpoint directories (config.json + safetensors).

Tensors are read memory-mapped with `safetensors.safe_open` straight to the target device and dtype;
pickled `*.bin` checkpoints are refused. Every mismatch (unknown or missing tensor, wrong shape) is
reported by name before anything is loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from hyperowl.config import GenerationConfig, Owl3Config
from hyperowl.errors import CheckpointError
from hyperowl.hub import checkpoint_dir

if TYPE_CHECKING:
    from hyperowl.model.owl3 import Owl3Model

M = TypeVar("M", bound="Owl3Model")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some official files carry that the model never uses: SigLIP's pooling head (features are
# hidden_states[-2]) and rotary inverse frequencies saved by old transformers versions.
IGNORED = re.compile(r"^vision_model\.head\.|\.rotary_emb\.inv_freq$")
GATE = re.compile(r"\.self_attn\.gate_proj\.0\.weight$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The `torch.nn.init` functions the model's layers call from their constructors.
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_", "kaiming_normal_")


@contextmanager
def uninitialised_weights() -> Iterator[None]:
    """Layers built inside skip their random initialisation (their weights are loaded right after).

    Besides the wasted work, initialising meta tensors imports `torch._dynamo` (about 2-3 s per
    process with torch 2.13), which was most of the start-up time of `hyperowl chat` on small models.
    The functions are swapped process-wide while the block runs: build nothing else meanwhile.
    """
    saved = {name: getattr(nn.init, name) for name in INIT_FUNCTIONS}
    for name in INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def resolve_dtype(dtype: torch.dtype | str | None, config: Owl3Config) -> torch.dtype:
    """`None`/"auto" -> the checkpoint's `torch_dtype` (float32 if unset); strings like "bf16" accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = {None: config.torch_dtype or "float32", "auto": config.torch_dtype or "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[name]


@contextmanager
def read_tensors(file: Path, device: str = "cpu") -> Iterator[Any]:
    """`safe_open(file)`; an unreadable, corrupt or truncated file raises a CheckpointError naming it."""
    try:
        with safe_open(file, framework="pt", device=device) as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {file} ({exc}); is it a complete safetensors file?") from exc


def tensor_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index with a weight_map ({exc!r})") from exc
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found pickle files {pickled}; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
    out: dict[str, Path] = {}
    for file in files:
        with read_tensors(file) as f:
            out.update(dict.fromkeys(f.keys(), file))
    return out


def check_names_and_shapes(model: Owl3Model, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {"language_model.lm_head.weight"} if model.config.tie_word_embeddings else set()
    unknown = sorted(n for n in shapes if n not in expected and not IGNORED.search(n))
    missing = sorted(n for n in expected if n not in shapes and n not in optional)
    wrong = sorted(f"{n}: checkpoint {list(shapes[n])} vs model {list(s)}" for n, s in expected.items() if n in shapes and shapes[n] != s)
    problems = []
    for label, items in (("unknown tensors", unknown), ("missing tensors", missing), ("wrong shapes", wrong)):
        if items:
            more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
            problems.append(f"{label} ({len(items)}): {items[:10]}{more}")
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


def is_fused_checkpoint(path: Path, config: Owl3Config | None = None) -> bool:
    """Whether the checkpoint is the fused 7B-241101 variant: ``config.json``'s ``fused_hyper_attention``
    when set, else no hyper-attention gate among the tensor names (7B-240728 has one per hyper layer, SPEC §2)."""
    config = config or Owl3Config.from_pretrained(path)
    if config.fused_hyper_attention is not None:
        return bool(config.fused_hyper_attention)
    return not any(GATE.search(n) for n in tensor_files(path))


def load_checkpoint(
    cls: type[M], path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
) -> M:
    """A `cls` (an `Owl3Model` class) built from the checkpoint at `path` (directory or Hub id), its tensors
    read straight to `device` in `dtype` (None/"auto": the checkpoint's own)."""
    path = checkpoint_dir(path)
    config = Owl3Config.from_pretrained(path)
    files = tensor_files(path)
    config.fused_hyper_attention = is_fused_checkpoint(path, config)
    target = resolve_dtype(dtype, config)
    with torch.device("meta"), uninitialised_weights():
        model = cls(config)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    shapes: dict[str, tuple[int, ...]] = {}
    for file, names in by_file.items():
        with read_tensors(file) as f:
            shapes.update({n: tuple(f.get_slice(n).get_shape()) for n in names})
    check_names_and_shapes(model, shapes)
    expected = model.state_dict().keys()
    state: dict[str, torch.Tensor] = {}
    device_name = str(torch.device(device))
    for file, names in by_file.items():
        with read_tensors(file, device_name) as f:
            for n in names:
                if n in expected:
                    state[n] = f.get_tensor(n).to(target)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def save_checkpoint(model: Owl3Model, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    state = {n: t.detach().contiguous().cpu() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("language_model.lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
