"""Import helpers for the official mPLUG-Owl3 remote code, used only by the tools that make fixtures.

The official code is never committed; point the tools at a copy of it (the files of the 240728 release,
``configuration_*.py``, ``modeling_*.py``, ``processing_mplugowl3.py``, ``image_processing_mplugowl3.py``,
``x_sdpa.py``). It needs transformers 4.44 and torchvision in a separate virtual environment.

The torchvision wheels on PyPI link CUDA libraries that a CPU-only torch lacks, so their compiled ops
(nms, roi_align, ...) cannot load and importing torchvision fails while registering those ops' meta
kernels. The official code uses none of them (only ``box_area`` and the PIL transforms, which are pure
Python), so :func:`import_official` skips those two registration modules.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path


def _skip_torchvision_op_registrations() -> None:
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))


def import_official(code_dir: Path, module: str) -> types.ModuleType:
    """Import one module of the official remote code from ``code_dir`` as a top-level module."""
    _skip_torchvision_op_registrations()
    if str(code_dir) not in sys.path:
        sys.path.insert(0, str(code_dir))
    return importlib.import_module(module)
