"""The knowledge-base index: picture embeddings and a BM25 full-text index in one LanceDB table.

Layout of an index directory: `items.lance/` (LanceDB table `items`: id, image, video, text,
content_hash, has_picture, vector `[dim]` float32, with a full-text index on `text`) and `index.json`
(format, vision-tower fingerprint, model, dim, count). Building writes into `DIR.building/` beside it,
one LanceDB append per batch, so an interrupted build resumes there; the finished directory then
replaces `DIR` by rename: readers see the old index or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyperowl.rag.embed import PictureEmbedder
from hyperowl.rag.errors import KnowledgeBaseError, RagIndexError
from hyperowl.rag.kb import KBItem, read_kb

INDEX_FORMAT = 1
MANIFEST = "index.json"
TABLE = "items"
#: From this many items with a picture on, the vectors get an IVF index (cosine, full vectors in each
#: partition) and a search scans `NPROBES` partitions instead of every row: at 100,000 items on a busy
#: 2-core machine a full scan took 84-144 ms, the IVF search 14 ms, with the same top 20.
ANN_MIN_ROWS = 20_000
NPROBES = 20
#: Reciprocal-rank-fusion constant (Cormack et al. 2009): an item at rank r of one list scores 1 / (RRF_K + r).
RRF_K = 60


def _lancedb():
    try:
        import lancedb
    except ImportError as exc:  # the `rag` extra
        raise RagIndexError("retrieval needs LanceDB: pip install 'hyperowl[rag]'") from exc
    return lancedb


@dataclass
class BuildStats:
    """What `build_index` did: `items` in the index, `embedded` now, `reused` from the previous index or
    an interrupted build, and the wall time in `seconds`."""

    items: int
    embedded: int
    reused: int
    seconds: float


def _schema(dim: int):
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("image", pa.string()), ("video", pa.string()), ("text", pa.string()),
        ("content_hash", pa.string()), ("has_picture", pa.bool_()), ("vector", pa.list_(pa.float32(), dim)),
    ])


def _rows(items: list[KBItem], vectors: np.ndarray, dim: int):
    import pyarrow as pa

    flat = pa.array(vectors.astype(np.float32).reshape(-1), type=pa.float32())
    return pa.Table.from_arrays(
        [
            pa.array([i.id for i in items]), pa.array([i.image for i in items]), pa.array([i.video for i in items]),
            pa.array([i.text for i in items]), pa.array([i.content_hash for i in items]),
            pa.array([bool(i.image or i.video) for i in items]), pa.FixedSizeListArray.from_arrays(flat, dim),
        ],
        schema=_schema(dim),
    )


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise RagIndexError(f"{directory} is not a hyperowl rag index (no {MANIFEST}); build one with `hyperowl rag index`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RagIndexError(f"{path} is damaged (not JSON); rebuild the index") from None
    if manifest.get("format") != INDEX_FORMAT:
        raise RagIndexError(f"{directory} has index format {manifest.get('format')!r}; this hyperowl reads {INDEX_FORMAT}")
    return manifest


def check_fingerprint(manifest: dict, directory: Path, embedder: PictureEmbedder, model_name: str) -> None:
    """Refuse an index built with another vision tower, naming both checkpoints."""
    if manifest["fingerprint"] != embedder.fingerprint:
        raise RagIndexError(
            f"index {directory} was built with the vision tower of {manifest['model']} (fingerprint {manifest['fingerprint']}), "
            f"not that of {model_name} ({embedder.fingerprint}); re-index the knowledge base with this model"
        )


def _batches(table, columns: list[str], size: int = 4096):
    """The rows of `table` (`columns` only), `size` at a time, streamed from disk."""
    return table.search().select(columns).limit(None).to_batches(size)


def _current_ids(table, wanted: dict[str, str]) -> set[str]:
    """Ids of rows of `table` whose content hash is still `wanted[id]`."""
    return {
        i for batch in _batches(table, ["id", "content_hash"])
        for i, h in zip(batch.column("id").to_pylist(), batch.column("content_hash").to_pylist()) if wanted.get(i) == h
    }


def _copy_current(source, target, by_id: dict[str, KBItem], skip: set[str], dim: int) -> set[str]:
    """Append to `target` the vectors of `source` rows whose item is unchanged in `by_id` (and not in
    `skip`), with the item's current fields; batch by batch, never the whole table in memory. Returns their ids."""
    copied: set[str] = set()
    for batch in _batches(source, ["id", "content_hash", "vector"]):
        ids, hashes = batch.column("id").to_pylist(), batch.column("content_hash").to_pylist()
        keep = [j for j, (i, h) in enumerate(zip(ids, hashes)) if i not in skip and i in by_id and by_id[i].content_hash == h]
        if keep:
            vectors = batch.column("vector").flatten().to_numpy().reshape(-1, dim)[keep]
            target.add(_rows([by_id[ids[j]] for j in keep], vectors, dim))
            copied.update(ids[j] for j in keep)
    return copied


def build_index(
    kb_path: str | Path,
    out: str | Path,
    embedder: PictureEmbedder,
    model_name: str,
    batch_size: int = 64,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> BuildStats:
    """Index the KB file `kb_path` into the directory `out` (see the module docstring).

    Pictures already embedded with the same content hash (in `out` or in an interrupted build) are
    reused; only new or changed items go through the vision tower, `batch_size` at a time. `on_batch`
    is called with the number of items embedded so far after each batch is stored.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    out = Path(out)
    items = read_kb(kb_path)
    if not items:
        raise KnowledgeBaseError(f"{kb_path}: the knowledge base has no items")
    lancedb = _lancedb()
    wanted = {i.id: i.content_hash for i in items}
    if out.exists():
        check_fingerprint(read_manifest(out), out, embedder, model_name)
    staging = out.with_name(out.name + ".building")
    state = staging / "build.json"
    if staging.exists() and not (state.is_file() and json.loads(state.read_text()).get("fingerprint") == embedder.fingerprint):
        shutil.rmtree(staging)  # left by a build with another tower: nothing in it can be reused
    staging.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"fingerprint": embedder.fingerprint, "kb": str(Path(kb_path).resolve())}))
    db = lancedb.connect(staging)
    if TABLE in db.list_tables().tables:
        table = db.open_table(TABLE)
        done = _current_ids(table, wanted)
    else:
        table = db.create_table(TABLE, schema=_schema(embedder.dim))
        done = set()
    copied: set[str] = set()
    if out.exists():
        by_id = {i.id: i for i in items}
        copied = _copy_current(lancedb.connect(out).open_table(TABLE), table, by_id, done, embedder.dim)
    fresh = [i for i in items if i.id not in done and i.id not in copied]
    embedded = 0
    with tqdm(total=len(fresh), desc="embed", unit="item", disable=not progress or not fresh) as bar:
        for begin in range(0, len(fresh), batch_size):
            batch = fresh[begin : begin + batch_size]
            with_picture = [i for i in batch if i.image or i.video]
            pictures = embedder.embed_paths([i.image for i in with_picture if i.image], [i.video for i in with_picture if not i.image])
            order = [i for i in with_picture if i.image] + [i for i in with_picture if not i.image]
            by_id = dict(zip((i.id for i in order), pictures))
            # Text-only items hold a constant unit vector (searches filter them out by has_picture).
            unit = np.eye(1, embedder.dim, dtype=np.float32)[0]
            table.add(_rows(batch, np.stack([by_id.get(i.id, unit) for i in batch]), embedder.dim))
            embedded += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(embedded)
    # Rows of items that left the KB or changed while a build was interrupted.
    drop = [
        i for batch in _batches(table, ["id", "content_hash"])
        for i, h in zip(batch.column("id").to_pylist(), batch.column("content_hash").to_pylist()) if wanted.get(i) != h
    ]
    if drop:
        table.delete("id IN (" + ", ".join("'" + i.replace("'", "''") + "'" for i in drop) + ")")
    _create_text_index(table)
    if sum(1 for i in items if i.image or i.video) >= ANN_MIN_ROWS:
        from lancedb.index import IvfFlat

        table.create_index("vector", config=IvfFlat(distance_type="cosine"), replace=True)
    table.optimize()
    manifest = {
        "format": INDEX_FORMAT, "fingerprint": embedder.fingerprint, "model": model_name, "dim": embedder.dim,
        "count": len(items), "pictures": sum(1 for i in items if i.image or i.video), "kb": str(Path(kb_path).resolve()),
    }
    state.unlink()
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _replace_dir(staging, out)
    return BuildStats(len(items), embedded, len(copied) + len(done), round(time.perf_counter() - start, 2))


def _create_text_index(table) -> None:
    from lancedb.index import FTS

    table.create_index("text", config=FTS(stem=True, remove_stop_words=True, lower_case=True), replace=True)


def _replace_dir(new: Path, out: Path) -> None:
    """Put the finished directory `new` at `out` by renames (an existing `out` is removed after)."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(out.name + f".old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old)


@dataclass
class Retrieved:
    """One retrieved item: its KB fields, the fused `score` (reciprocal-rank fusion) and its 1-based
    rank in the picture search (`image_rank`) and the text search (`text_rank`), 0 when absent there.
    `similarity`: cosine similarity to the query picture (0 without one)."""

    id: str
    image: str
    video: str
    text: str
    score: float
    image_rank: int = 0
    text_rank: int = 0
    similarity: float = 0.0

    @property
    def media(self) -> str:
        return "image" if self.image else "video" if self.video else ""

    def as_dict(self) -> dict:
        return {
            "id": self.id, "image": self.image or None, "video": self.video or None, "text": self.text,
            "score": round(self.score, 6), "image_rank": self.image_rank, "text_rank": self.text_rank,
            "similarity": round(self.similarity, 6),
        }


class RagIndex:
    """An opened index. `search` runs the hybrid retrieval; `embedder` must come from the checkpoint the
    index was built with (its tower fingerprint is checked here)."""

    def __init__(self, directory: str | Path, embedder: PictureEmbedder, model_name: str) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        check_fingerprint(self.manifest, self.directory, embedder, model_name)
        self.embedder = embedder
        self.table = _lancedb().connect(self.directory).open_table(TABLE)
        self.count = self.table.count_rows()
        if self.count == 0:
            raise RagIndexError(f"index {self.directory} is empty; index a knowledge base with items first")

    def search(self, image=None, text: str = "", k: int = 4, candidates: int | None = None) -> list[Retrieved]:
        """The top `k` items for a query picture (a path, PIL image or bytes; optional) and/or `text`.

        Each search returns `candidates` (default `4 * k`, at least 20) items: pictures by cosine
        similarity of the tower embeddings, texts by BM25 (stop words dropped; a question of stop words
        alone adds nothing). The lists are fused by reciprocal rank, ties broken by similarity.
        """
        if k < 1:
            raise RagIndexError(f"k must be at least 1, got {k}")
        depth = candidates or max(20, 4 * k)
        fused: dict[str, Retrieved] = {}
        if image is not None:
            from hyperowl.processing.image import load_image

            query = self.embedder.embed_images([load_image(image)])[0]
            rows = (
                self.table.search(query, vector_column_name="vector").metric("cosine").where("has_picture", prefilter=True)
                .nprobes(NPROBES).limit(depth).select(["id", "image", "video", "text", "_distance"]).to_list()
            )
            for rank, row in enumerate(rows, 1):
                fused[row["id"]] = Retrieved(row["id"], row["image"], row["video"], row["text"], 1 / (RRF_K + rank),
                                             image_rank=rank, similarity=1 - float(row["_distance"]))
        if text.strip():
            rows = self.table.search(text, query_type="fts", fts_columns="text").limit(depth).select(["id", "image", "video", "text", "_score"]).to_list()
            for rank, row in enumerate(rows, 1):
                hit = fused.setdefault(row["id"], Retrieved(row["id"], row["image"], row["video"], row["text"], 0.0))
                hit.score += 1 / (RRF_K + rank)
                hit.text_rank = rank
        return sorted(fused.values(), key=lambda r: (-r.score, -r.similarity, r.id))[:k]
