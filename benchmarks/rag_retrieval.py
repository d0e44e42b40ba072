"""Retrieval benchmark of `hyperowl rag`: recall@k and search latency on generated knowledge bases.

For each size N: `python -m hyperowl.synthetic rag-kb` writes N items (24 invented concepts, every item
a fresh drawing) and query pictures drawn afresh from another seed; `build_index` indexes them with
the bundled model's vision tower (build time measured); then every query runs the full hybrid search
(query-picture embedding + vector search + BM25 over the question) and counts a hit when one of the
top k items shows the query's concept. Latency is per query, end to end, after 5 warm-up queries.
torch runs on `--threads` threads (default 1: one query picture gains nothing from intra-op threads,
and on a busy 2-core machine two spinning threads made the tower 50x slower, 200 ms against 4 ms).

  python benchmarks/rag_retrieval.py --sizes 10000 100000 --queries 200 --out benchmarks/results/rag_retrieval_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from hyperowl.cli import DEFAULT_MODEL
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.processing.retrieval import RAG_QUESTION
from hyperowl.rag import PictureEmbedder, RagIndex, build_index
from hyperowl.synthetic.ragkb import write_rag_kb
from hyperowl.synthetic.tasks import concept_text


def run_size(n: int, queries: int, k: int, work: Path, embedder: PictureEmbedder, batch_size: int) -> dict:
    folder = work / f"kb-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    kb = write_rag_kb(folder, n=n, queries=queries, seed=0)
    written = time.perf_counter() - start
    stats = build_index(kb, folder / "index", embedder, str(DEFAULT_MODEL), batch_size=batch_size, progress=False)
    index = RagIndex(folder / "index", embedder, str(DEFAULT_MODEL))
    rows = [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]
    for row in rows[:5]:
        index.search(image=folder / row["image"], text=RAG_QUESTION, k=k)
    hits, latencies = 0, []
    for row in rows:
        began = time.perf_counter()
        top = index.search(image=folder / row["image"], text=RAG_QUESTION, k=k)
        latencies.append(time.perf_counter() - began)
        hits += any(r.text == concept_text(row['colour'], row['shape'], row['name']) for r in top)
    latencies.sort()
    size_mb = sum(p.stat().st_size for p in (folder / "index").rglob("*") if p.is_file()) / 2**20
    return {
        "items": n, "queries": len(rows), "k": k, f"recall@{k}": hits / len(rows),
        "latency_p50_ms": round(1000 * statistics.median(latencies), 2),
        "latency_p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 2),
        "kb_write_s": round(written, 1), "index_build_s": stats.seconds, "index_mb": round(size_mb, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work", type=Path, default=Path("runs/rag-bench"), help="KBs and indexes are left here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rag_retrieval_cpu"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Owl3ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    embedder = PictureEmbedder(model, model.config.vision_config.image_size)
    results = []
    for n in args.sizes:
        results.append(run_size(n, args.queries, args.k, args.work, embedder, args.batch_size))
        print(json.dumps(results[-1]), flush=True)
    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.platform()}",
        "python": platform.python_version(), "torch": torch.__version__,
        "lancedb": __import__("lancedb").__version__, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    versions = f"Python {report['python']}, torch {report['torch']}, LanceDB {report['lancedb']}"
    lines = [f"# hyperowl rag retrieval ({report['date']})", "", f"`{report['command']}`", "", f"Machine: {report['machine']}; {versions}.", "",
             f"| items | queries | recall@{args.k} | p50 ms | p95 ms | KB write s | index build s | index MiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['items']} | {r['queries']} | {r[f'recall@{args.k}']:.3f} | {r['latency_p50_ms']} | {r['latency_p95_ms']} | "
                     f"{r['kb_write_s']} | {r['index_build_s']} | {r['index_mb']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
