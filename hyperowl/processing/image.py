"""Image loading, shape-adaptive cutting ("cut") and conversion to normalised pixel tensors.

An image with cutting enabled becomes ``rows * cols`` tiles (row-major) plus one global view, each
``cell x cell`` pixels, and its single ``<|image|>`` placeholder becomes :func:`cut_placeholder`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from hyperowl.errors import MediaError
from hyperowl.processing.tokenizer import END_CUT, IMAGE_TOKEN, START_CUT

ImageSource = str | Path | bytes | Image.Image | np.ndarray

#: Default pixel cap (width * height). PIL itself refuses images above twice its
#: ``Image.MAX_IMAGE_PIXELS`` at open time; that refusal is reported as a MediaError too.
DEFAULT_MAX_PIXELS = 178_956_970

#: Anchors (rows, cols) of the official ``grid_squ_6`` set, in the official order (ties go to the first).
GRID_SQU_6: tuple[tuple[int, int], ...] = ((2, 2), (1, 3), (1, 4), (3, 1), (4, 1), (2, 3), (3, 2))

#: Normalisation of the SigLIP vision tower: ``(x / 255 - mean) / std`` per channel.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5

# The official code adds this to IoU unions (float32); it only matters for ties and empty boxes.
_IOU_EPS = np.float32(1e-5)


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    if width * height > max_pixels:
        raise MediaError(f"image too large: {name} is {width} x {height} pixels > limit of {max_pixels} pixels")


def _array_to_image(array: np.ndarray) -> Image.Image:
    """Convert an ``[H, W]`` or ``[H, W, C]`` (C in 1, 3, 4) uint8 or float-in-[0, 1] array to a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise MediaError(f"image array must have shape [H, W] or [H, W, C] with C in 1, 3, 4; got {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MediaError(f"image array is empty: shape {tuple(array.shape)}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise MediaError(f"image array must be uint8 or floating point in [0, 1]; got dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB.

    16-bit greyscale (modes ``I;16*``) is scaled from the 16-bit range, as is 32-bit integer greyscale
    (mode ``I``, which PIL uses for some 16-bit PNGs) whose values exceed 255; float greyscale (mode
    ``F``) in [0, 1] is scaled to 0-255, other floats are clipped. PIL's own ``convert("RGB")`` clips
    all of these to 255, which turns most 16-bit pictures white.
    """
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0.0)
        if image.mode.startswith("I;16") or (image.mode == "I" and peak > 255):
            values = values / 257.0
        elif image.mode == "F" and peak <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_image(src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image as RGB.

    Args:
        src: a file path, encoded file bytes, a PIL image, or a numpy array (``[H, W]`` or
            ``[H, W, C]``, uint8 or float in [0, 1]).
        max_pixels: largest accepted ``width * height``; checked from the file header before decoding.

    Raises:
        MediaError: missing file, undecodable/corrupt data, too many pixels, or a bad array shape/dtype.
    """
    if isinstance(src, Image.Image):
        _check_pixels(src.width, src.height, max_pixels, "image")
        return to_rgb(src)
    if isinstance(src, np.ndarray):
        image = _array_to_image(src)
        _check_pixels(image.width, image.height, max_pixels, "image array")
        return image.convert("RGB")
    if isinstance(src, (bytes, bytearray)):
        name, fp = "<bytes>", io.BytesIO(src)
    elif isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"image file not found: {path}")
        name, fp = str(path), path
    else:
        raise MediaError(f"unsupported image source type {type(src).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                _check_pixels(image.width, image.height, max_pixels, name)
                image.load()
                return to_rgb(image)
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large: {name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise MediaError(f"cannot decode image {name}: not a file in an image format PIL reads") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"cannot decode image {name}: {exc}") from exc


def _iou_at_origin(a_w: int, a_h: int, b_w: int, b_h: int) -> np.float32:
    """IoU of the integer boxes ``(0, 0, a_w, a_h)`` and ``(0, 0, b_w, b_h)`` in the official arithmetic.

    Areas, intersection and union are exact integers (int64 tensors in the official code); the union
    plus epsilon and the division are float32.
    """
    inter = min(a_w, b_w) * min(a_h, b_h)
    union = a_w * a_h + b_w * b_h - inter
    return np.float32(inter) / (np.float32(union) + _IOU_EPS)


def select_cut_anchor(
    width: int, height: int, cell: int, anchors: Sequence[tuple[int, int]] = GRID_SQU_6
) -> tuple[int, int]:
    """Choose the cut grid ``(rows, cols)`` for a ``width x height`` image: shape first, resolution second.

    score = 100 * IoU(anchor box, shape box) + IoU(anchor box, image box) in float32, with the anchor
    box ``(0, 0, cols * cell, rows * cell)``, the image box ``(0, 0, width, height)`` and the shape box
    ``(0, 0, cols * cell, trunc(float32(height / width) * cols * cell))``: the official ``anchor_rank``
    writes the rescaled height into an int64 tensor, which truncates it to a whole number (SPEC §4;
    keeping the fraction picks another grid for about 0.1% of sizes). The first anchor with the
    highest score wins. ``tests/fixtures/cut_grids.txt`` holds the official grids of 85,849 sizes.
    """
    if width <= 0 or height <= 0:
        raise MediaError(f"image has no pixels: {width} x {height}")
    ratio = np.float32(height / width)
    best, best_score = anchors[0], np.float32(-np.inf)
    for rows, cols in anchors:
        anchor_w, anchor_h = cols * cell, rows * cell
        shape_h = int(ratio * np.float32(anchor_w))  # float32 product, truncated toward zero
        shape_iou = _iou_at_origin(anchor_w, anchor_h, anchor_w, shape_h)
        image_iou = _iou_at_origin(anchor_w, anchor_h, width, height)
        score = shape_iou * np.float32(100.0) + image_iou
        if score > best_score:
            best, best_score = (rows, cols), score
    return best


def cut_image(image: Image.Image, cell: int) -> tuple[list[Image.Image], tuple[int, int]]:
    """Cut an image into tiles plus a global view.

    The image is resized (bicubic) to ``rows*cell`` high by ``cols*cell`` wide for the anchor of
    :func:`select_cut_anchor` and cut row-major into ``cell x cell`` tiles.

    Returns:
        ``(views, (rows, cols))`` where ``views`` holds ``rows * cols`` tiles (tile ``(i, j)`` at
        index ``i * cols + j``) followed by the global view (the whole image resized to ``cell x cell``).
    """
    rows, cols = select_cut_anchor(image.width, image.height, cell)
    resized = image.resize((cols * cell, rows * cell), Image.Resampling.BICUBIC)
    views = [
        resized.crop((j * cell, i * cell, (j + 1) * cell, (i + 1) * cell)) for i in range(rows) for j in range(cols)
    ]
    views.append(image.resize((cell, cell), Image.Resampling.BICUBIC))
    return views, (rows, cols)


def cut_placeholder(rows: int, cols: int, prompt_format: str = "240728") -> str:
    """Text that replaces a cut image's ``<|image|>``: one ``<|image|>`` per tile, then the global view's.

    ``"240728"`` (the official ``v2_global`` template): ``Cut to {rows} rows {cols} columns with a
    global view`` and 0-based ``subimg(i,j)`` labels. ``"241101"`` (``v3_global``, SPEC §4b):
    ``<|start_cut|>{rows}*{cols}``, the rows of bare ``<|image|>``, the global view's ``<|image|>``
    and ``<|end_cut|>``.
    """
    if prompt_format == "241101":
        grid = "\n".join(" ".join([IMAGE_TOKEN] * cols) for _ in range(rows))
        return f"{START_CUT}{rows}*{cols}\n{grid}\n{IMAGE_TOKEN}{END_CUT}"
    grid = "\n".join(" ".join(f"subimg({i},{j}){IMAGE_TOKEN}" for j in range(cols)) for i in range(rows))
    return f"Cut to {rows} rows {cols} columns with a global view\n{grid}\nglobal_view{IMAGE_TOKEN}"


def image_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Resize (bicubic, skipped when already ``size x size``) and normalise RGB images.

    Returns:
        float32 tensor ``[n, 3, size, size]`` with values ``(x / 255 - 0.5) / 0.5`` in [-1, 1].
    """
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.float32)
    arrays = []
    for image in images:
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (pixels - IMAGE_MEAN) / IMAGE_STD
