"""The `hyperowl` command: one subcommand per task (`chat`, `serve`, `train`, `eval`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from hyperowl.errors import HyperowlError
from hyperowl.hub import DEFAULT_MODEL, checkpoint_dir

# subcommand -> module providing `add_arguments(parser)` and `run(args) -> int`
COMMANDS = {
    "chat": "hyperowl.chat_cli",
    "serve": "hyperowl.serve.cli",
    "eval": "hyperowl.eval.cli",
    "train": "hyperowl.train.cli",
    "rag": "hyperowl.rag.cli",
}

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model/--dtype/--device/--compile-vision`, shared by every subcommand that loads a model."""
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory or Hugging Face Hub repository id (default: the bundled small model)")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (checkpoint's own)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--compile-vision",
        action="store_true",
        help="compile the vision tower's layers with torch.compile: faster encoding of many images on a GPU, "
        "after about 12 s of compiling at the first image",
    )


def resolve_device(device: str | None) -> str:
    """`device` as given (checked: a device type torch knows and this machine has), else cuda when a GPU
    is available, else cpu."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise HyperowlError(f"--device {device}: not a device (use cpu, cuda or cuda:N)") from exc
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise HyperowlError(f"--device {device}: no CUDA GPU is available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise HyperowlError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise HyperowlError(f"--device {device}: MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise HyperowlError(f"--device {device}: unsupported device type {parsed.type!r} (use cpu, cuda or cuda:N)")
    return device


def load_model_and_processor(args: argparse.Namespace, **processor_overrides):
    """The model and processor named by `add_model_arguments`' flags."""
    from hyperowl.engine.generate import Owl3ForCausalLM
    from hyperowl.processing.processor import Owl3Processor

    path = args.model or DEFAULT_MODEL
    if args.model is None and not (DEFAULT_MODEL / "config.json").is_file():
        raise HyperowlError(f"no --model given and the bundled default model is missing ({DEFAULT_MODEL})")
    if args.model is not None and args.model.is_file():
        raise HyperowlError(f"--model {args.model} is a file; give the checkpoint directory (with config.json)")
    device = resolve_device(args.device)
    path = checkpoint_dir(path)  # one Hub look-up for both loaders
    model = Owl3ForCausalLM.from_pretrained(path, dtype=args.dtype, device=device)
    if args.compile_vision:
        model.vision_model.compile_layers()
    return model, Owl3Processor.from_pretrained(path, **processor_overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hyperowl", description="mPLUG-Owl3: chat, serve, train and evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=module.__doc__.strip().splitlines()[0], description=module.__doc__))
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except HyperowlError as exc:
        print(f"hyperowl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
