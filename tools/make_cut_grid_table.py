"""Write ``tests/fixtures/cut_grids.txt``: the official cut grid for every (width, height) in 1..2048 step 7.

The ranking rule is transcribed here from the official mPLUG-Owl3 240728 image processor
(``anchor_rank`` with the ``grid_squ_6`` anchors and 384-pixel cells), in its own tensor arithmetic
and independently of ``hyperowl.processing.image``:

- anchor boxes ``(0, 0, cols * 384, rows * 384)`` in an int64 tensor, their areas int64;
- the shape box is a clone of the anchor boxes whose y2 is set to ``height / width * x2`` (a Python
  float times an int64 tensor, so a float32 product) -- written into the int64 clone, i.e. truncated;
- IoU = intersection / (union + 1e-5) with integer intersection and union, float32 division;
- score = 100 * shape IoU + image IoU, ``argmax`` takes the first of equal maxima.

With ``--check-official DIR`` it also runs the official ``anchor_rank`` from DIR (a copy of the
official remote code; needs torchvision) on every size and fails on any difference.

Output format: ``#`` comment lines, then one line per width ``W:<digits>`` where digit k is the index
into GRID_SQU_6 of the grid for height ``1 + 7 * k``.

    python tools/make_cut_grid_table.py [--check-official /path/to/mPLUG-Owl3-7B-240728]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ANCHORS = [(2, 2), (1, 3), (1, 4), (3, 1), (4, 1), (2, 3), (3, 2)]
CELL = 384
SIZES = range(1, 2049, 7)
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "cut_grids.txt"


def rank(width: int, height: int) -> int:
    """Index into ANCHORS of the official grid for a width x height image."""
    boxes = torch.tensor([[0, 0, cols * CELL, rows * CELL] for rows, cols in ANCHORS], dtype=torch.int64)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    image = torch.tensor([[0, 0, width, height]], dtype=torch.int64)
    shape = boxes.clone()
    shape[:, 3] = height / width * boxes[:, 2]

    def iou(others: torch.Tensor) -> torch.Tensor:
        other_areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
        inter = (torch.minimum(boxes[:, 2], others[:, 2]) * torch.minimum(boxes[:, 3], others[:, 3])).clamp(min=0)
        return inter / (areas + other_areas - inter + 1e-5)

    image_iou = iou(image.expand_as(boxes))
    shape_iou = iou(shape)
    return int(torch.argmax(shape_iou * 100 + image_iou))


def official_rank(code_dir: Path):
    """The official ``anchor_rank`` as a function ``(width, height) -> anchor index``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from official_env import import_official

    processing = import_official(code_dir, "image_processing_mplugowl3")
    resizer = processing.AnchorResize(image_size=(CELL, CELL), anchors=ANCHORS)
    anchor_rank = processing.anchor_rank
    return lambda w, h: int(anchor_rank(resizer.anchors, resizer.anchor_areas, (h, w)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-official", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    official = official_rank(args.check_official) if args.check_official else None
    lines = [
        "# Official mPLUG-Owl3 (240728) cut grids, grid_squ_6 anchors, 384-pixel cells; tools/make_cut_grid_table.py.",
        "# Line 'W:digits': digit k = index into " + " ".join(f"{r}x{c}" for r, c in ANCHORS)
        + " (rows x cols) of the grid for width W, height 1 + 7*k.",
    ]
    mismatches = 0
    for width in SIZES:
        digits = []
        for height in SIZES:
            index = rank(width, height)
            if official is not None and official(width, height) != index:
                mismatches += 1
                print(f"official differs at {width}x{height}: {official(width, height)} vs {index}", file=sys.stderr)
            digits.append(str(index))
        lines.append(f"{width}:{''.join(digits)}")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} ({len(SIZES) ** 2} sizes)" + (f"; {mismatches} differ from the official code" if official else ""))
    if mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
