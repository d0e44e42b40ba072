"""End-to-end answers of `hyperowl rag ask` on a generated knowledge base: retrieval, prompt, answer, citations.

`python -m hyperowl.synthetic rag-kb` writes N items (24 invented concepts, one name each, every item a
fresh drawing) and query pictures drawn afresh from another seed. Every query is asked "What is this
called? Say which picture told you." with k retrieved items (`RagAnswerer.ask`, greedy), and scored:

- names: the answer contains the KB's name for the query's concept;
- cites: the answer cites at least one picture, and every cited item is described with that name;
- right: both; retrieved: one of the k items shown describes the query's concept (the ceiling).

Retrieval returns the nearest items, so the k items often repeat one concept, unlike the synthetic
`rag` task's distinct ones. Latency is per question, end to end (embedding, search, prompt, vision,
generation), torch on `--threads` threads.

  python -m benchmarks.rag_answers --items 1000 --queries 200 --k 4 8
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine, write_results
from hyperowl.cli import DEFAULT_MODEL
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.processing.processor import Owl3Processor
from hyperowl.rag import PictureEmbedder, RagAnswerer, build_index
from hyperowl.synthetic.ragkb import write_rag_kb
from hyperowl.synthetic.tasks import concept_text


def score(answerer: RagAnswerer, folder: Path, queries: list[dict], k: int) -> dict:
    counts = {"names": 0, "cites": 0, "right": 0, "retrieved": 0}
    latencies, examples = [], []
    for query in queries:
        described = concept_text(query["colour"], query["shape"], query["name"])
        began = time.perf_counter()
        result = answerer.ask(image=folder / query["image"], k=k)
        latencies.append(time.perf_counter() - began)
        names = re.search(rf"\b{query['name']}\b", result.answer) is not None
        cites = bool(result.citations) and all(c.item.text == described for c in result.citations)
        counts["names"] += names
        counts["cites"] += cites
        counts["right"] += names and cites
        counts["retrieved"] += any(r.text == described for r in result.retrieved)
        if len(examples) < 3:
            examples.append({"query": query, "answer": result.answer, "cited": [c.picture for c in result.citations]})
    n = len(queries)
    return {
        "k": k,
        "queries": n,
        **{key: round(value / n, 3) for key, value in counts.items()},
        "latency_p50_s": round(statistics.median(latencies), 3),
        "examples": examples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--work", type=Path, default=Path("runs/rag-answers"), help="the KB and its index are left here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Owl3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    processor = Owl3Processor.from_pretrained(args.model)
    shutil.rmtree(args.work, ignore_errors=True)
    kb = write_rag_kb(args.work, n=args.items, queries=args.queries, seed=args.seed, image_size=processor.image_size)
    build_index(kb, args.work / "index", PictureEmbedder(model, processor.image_size), args.model, progress=False)
    answerer = RagAnswerer(model, processor, args.work / "index", args.model)
    queries = [json.loads(line) for line in (args.work / "queries.jsonl").read_text().splitlines()]
    rows = []
    for k in args.k:
        rows.append(score(answerer, args.work, queries, k))
        print(json.dumps(rows[-1]), flush=True)
    command = " ".join(["python -m benchmarks.rag_answers", *(argv if argv is not None else sys.argv[1:])])
    shown = Path(args.model).resolve()
    model_name = str(shown.relative_to(Path.cwd())) if shown.is_relative_to(Path.cwd()) else args.model
    res = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": model_name,
           "items": args.items, "results": rows}  # fmt: skip
    lines = [
        f"# hyperowl rag answers ({res['date']})", "", f"`{command}`", "",
        f"Machine: {res['machine']}; model {model_name}; {args.items} KB items, {len(queries)} query pictures drawn afresh.", "",
        "| k | right (names + cites) | names | cites | retrieved (ceiling) | p50 s per question |", "|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['k']} | {r['right']:.3f} | {r['names']:.3f} | {r['cites']:.3f} | {r['retrieved']:.3f} | {r['latency_p50_s']} |")
    lines += ["", "Examples:", ""]
    for r in rows:
        for e in r["examples"]:
            lines.append(f"- k={r['k']}, a {e['query']['colour']} {e['query']['shape']} named {e['query']['name']}: `{e['answer']}` (cites {e['cited']})")
    write_results(args.out, "rag_answers_cpu", "\n".join(lines) + "\n", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
