"""Retrieval-augmented answers with cited evidence: index a knowledge base, ask about a picture.

Examples:
  python -m hyperowl.synthetic rag-kb --out kb --n 200          (a knowledge base to try it on)
  hyperowl rag index kb/kb.jsonl --out kb/index
  hyperowl rag ask --index kb/index --image kb/queries/q0000.png "What is this called? Say which picture told you."
  hyperowl rag ask --index kb/index --image Q.png --k 8 --json "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hyperowl.cli import DEFAULT_MODEL, add_model_arguments, load_model_and_processor
from hyperowl.engine.sampling import SamplingParams
from hyperowl.processing.retrieval import RAG_MAX_NEW_TOKENS, RAG_QUESTION
from hyperowl.rag.errors import RagError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="rag_command", required=True)
    index = sub.add_parser("index", help="embed a KB's pictures and index its texts (re-running embeds only new or changed items)")
    add_model_arguments(index)
    index.add_argument("kb", type=Path, help='JSONL, one {"id", "image", "text", "video"} a line; paths relative to the file')
    index.add_argument("--out", type=Path, required=True, help="index directory (replaced atomically when done)")
    index.add_argument("--batch-size", type=int, default=64, help="pictures per vision-tower batch")
    ask = sub.add_parser("ask", help="answer from the top-k retrieved items and cite them")
    add_model_arguments(ask)
    ask.add_argument("question", nargs="?", default=RAG_QUESTION)
    ask.add_argument("--index", type=Path, required=True)
    ask.add_argument("--image", type=Path, default=None, help="query picture")
    ask.add_argument("--k", type=int, default=4, help="retrieved items shown to the model")
    ask.add_argument("--max-new-tokens", type=int, default=RAG_MAX_NEW_TOKENS)
    ask.add_argument("--json", action="store_true", help='print {"answer", "citations", "retrieved"}')


def _model_name(args: argparse.Namespace) -> str:
    return str(args.model or DEFAULT_MODEL)


def check_flags(args: argparse.Namespace) -> None:
    """`RagError` naming the first count flag below 1 (before any model is loaded)."""
    names = {"index": ("batch_size",), "ask": ("k", "max_new_tokens")}[args.rag_command]
    for name in names:
        if getattr(args, name) < 1:
            raise RagError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def run(args: argparse.Namespace) -> int:
    from hyperowl.rag.ask import RagAnswerer
    from hyperowl.rag.embed import PictureEmbedder
    from hyperowl.rag.index import build_index

    check_flags(args)
    model, processor = load_model_and_processor(args)
    if args.rag_command == "index":
        stats = build_index(args.kb, args.out, PictureEmbedder(model, processor.image_size), _model_name(args), args.batch_size)
        print(f"indexed {stats.items} items into {args.out} ({stats.embedded} embedded, {stats.reused} reused) in {stats.seconds:.1f}s")
        return 0
    answerer = RagAnswerer(model, processor, args.index, _model_name(args))
    result = answerer.ask(args.question, args.image, args.k, SamplingParams(max_new_tokens=args.max_new_tokens))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(result.answer)
    print("Sources:")
    for c in result.citations:
        print(f"  picture {c.picture}: {c.item.id}  {c.item.image or c.item.video or '(text)'}  score {c.item.score:.4f}")
    if not result.citations:
        print("  (the answer cites no picture; retrieved: " + ", ".join(r.id for r in result.retrieved) + ")")
    return 0
