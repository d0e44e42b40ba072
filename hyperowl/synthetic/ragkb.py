"""A generated knowledge base for retrieval: pictures of invented concepts with their descriptions.

Each of the 24 colour-shape concepts gets one invented name for the whole KB ("a diro is a red
circle"); every item is a fresh drawing of its concept (`shape_picture`: size, position and background
vary). Query pictures are drawn afresh from another seed, so none of them is in the KB.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from hyperowl.synthetic.draw import shape_picture
from hyperowl.synthetic.tasks import COMBOS, NAME_ENDS, NAME_STARTS, concept_text


@dataclass(frozen=True)
class Query:
    """A query picture file and the concept it shows (`colour`, `shape`, the KB's `name` for it)."""

    image: str
    colour: str
    shape: str
    name: str


def concept_names(seed: int) -> dict[tuple[str, str], str]:
    """One distinct invented name per (colour, shape) concept."""
    rng = random.Random(f"rag-kb-names:{seed}")
    names = rng.sample([s + e for s in NAME_STARTS for e in NAME_ENDS], len(COMBOS))
    return dict(zip(COMBOS, names))


def write_rag_kb(out: str | Path, n: int = 200, queries: int = 20, seed: int = 0, image_size: int = 32) -> Path:
    """Write `out/kb.jsonl` (`n` items, pictures under `out/images/`) and `out/queries.jsonl` (`queries`
    fresh query pictures under `out/queries/` with their concept). Returns the KB file."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    names = concept_names(seed)
    rng = random.Random(f"rag-kb:{seed}")
    lines = []
    for i in range(n):
        colour, shape = COMBOS[i % len(COMBOS)] if i < len(COMBOS) else rng.choice(COMBOS)
        image, _ = shape_picture(rng, image_size, colour, shape)
        path = f"images/{i:06d}.png"
        image.save(out / path)
        lines.append(json.dumps({"id": f"item-{i:06d}", "image": path, "text": concept_text(colour, shape, names[colour, shape])}))
    (out / "kb.jsonl").write_text("\n".join(lines) + "\n")
    qrng = random.Random(f"rag-kb-queries:{seed}")
    rows = []
    for i in range(queries):
        colour, shape = qrng.choice(COMBOS)
        image, _ = shape_picture(qrng, image_size, colour, shape)
        path = out / "queries" / f"q{i:04d}.png"
        image.save(path)
        rows.append(json.dumps(Query(str(path.relative_to(out)), colour, shape, names[colour, shape]).__dict__))
    (out / "queries.jsonl").write_text("\n".join(rows) + "\n")
    return out / "kb.jsonl"
