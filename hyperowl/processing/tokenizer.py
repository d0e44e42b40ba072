"""Special tokens of the mPLUG-Owl3 prompt format, a small byte-level BPE trainer, and tokenizer loading.

The released checkpoints ship a Qwen2 tokenizer in which ``<|image|>``, ``<|im_start|>``,
``<|im_end|>`` and ``<|endoftext|>`` are single tokens. Tests and the tiny default model use
:func:`train_tokenizer` instead, which builds a tokenizer with the same special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from hyperowl.errors import CheckpointError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<|image|>"
VIDEO_TOKEN = "<|video|>"

#: Media markers of the 241101 prompt format (SPEC §4b): a cut image between START_CUT and END_CUT,
#: the frames of a video between START_VIDEO_FRAME and END_VIDEO_FRAME.
START_CUT = "<|start_cut|>"
END_CUT = "<|end_cut|>"
START_VIDEO_FRAME = "<|start_video_frame|>"
END_VIDEO_FRAME = "<|end_video_frame|>"
MARKERS_241101: tuple[str, ...] = (START_CUT, END_CUT, START_VIDEO_FRAME, END_VIDEO_FRAME)

#: In id order for :func:`train_tokenizer` (``<|endoftext|>`` gets id 0).
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN, VIDEO_TOKEN)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, extra_special_tokens: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer whose special tokens are single tokens.

    Args:
        texts: training corpus, one string per item.
        vocab_size: target vocabulary size, including the 256 byte symbols and the special tokens.
        extra_special_tokens: more single tokens after :data:`SPECIAL_TOKENS` (e.g. :data:`MARKERS_241101`).

    Returns:
        A fast tokenizer (``<|endoftext|>`` = id 0 is both eos and pad); ``save_pretrained(dir)``
        writes it and ``transformers.AutoTokenizer.from_pretrained(dir)`` reads it back.
    """
    special = [*SPECIAL_TOKENS, *extra_special_tokens]
    minimum = 256 + len(special)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below the minimum {minimum} (256 bytes + special tokens)")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=special[1:],
    )


#: One of these files marks a directory holding a tokenizer (fast tokenizer file or Qwen2 BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """Return the id of ``token`` if the tokenizer encodes it as exactly one token, else None."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer with ``AutoTokenizer.from_pretrained`` and check it fits the Owl3 prompt format.

    Raises:
        CheckpointError: the directory is missing, has no tokenizer files, or ``<|image|>`` is not
            a single token.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer directory not found: {path}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"no tokenizer files in {path} (expected tokenizer.json, or vocab.json and merges.txt)")
    # AutoTokenizer also reads config.json and warns that it does not know `mplugowl3`: silence that.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not load a tokenizer from {path}: {exc}") from exc
    finally:
        transformers_logging.set_verbosity(verbosity)
    if single_token_id(tokenizer, IMAGE_TOKEN) is None:
        raise CheckpointError(f"tokenizer in {path} does not encode {IMAGE_TOKEN} as a single token")
    return tokenizer
