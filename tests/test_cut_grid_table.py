"""select_cut_anchor against the official cut grids (tests/fixtures/cut_grids.txt, tools/make_cut_grid_table.py)."""

from pathlib import Path

import pytest

from hyperowl.processing.image import GRID_SQU_6, select_cut_anchor

TABLE = Path(__file__).parent / "fixtures" / "cut_grids.txt"


def _official_grids() -> dict[tuple[int, int], tuple[int, int]]:
    """{(width, height): (rows, cols)} for every size in the table."""
    grids = {}
    for line in TABLE.read_text().splitlines():
        if line.startswith("#"):
            continue
        width, digits = line.split(":")
        for k, digit in enumerate(digits):
            grids[(int(width), 1 + 7 * k)] = GRID_SQU_6[int(digit)]
    return grids


def test_table_covers_the_sweep():
    grids = _official_grids()
    assert len(grids) == 293 * 293
    assert min(grids) == (1, 1) and max(grids) == (2045, 2045)


def test_select_cut_anchor_matches_every_official_grid():
    wrong = [
        (size, grid, select_cut_anchor(*size, 384))
        for size, grid in _official_grids().items()
        if select_cut_anchor(*size, 384) != grid
    ]
    assert wrong == []


@pytest.mark.parametrize(
    ("width", "height", "official"),
    [
        # Sizes where the truncated shape-box height picks another grid than the exact fraction would.
        (1273, 600, (1, 3)),
        (1014, 829, (2, 3)),
        (1384, 400, (1, 4)),
        # 1-pixel-high images: the shape box heights truncate to 1 (1x3 and 1x4 tie on shape), so the
        # smaller image-box union of 1x3 wins.
        (520, 1, (1, 3)),
        (800, 1, (1, 3)),
        (1000, 1, (1, 3)),
        (1152, 1, (1, 3)),
    ],
)
def test_official_examples(width, height, official):
    assert select_cut_anchor(width, height, 384) == official
