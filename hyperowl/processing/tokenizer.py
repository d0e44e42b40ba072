"""Special tokens of the mPLUG-Owl3 prompt format, the tokenizer used at run time, and a small byte-level BPE trainer.

The released checkpoints ship a Qwen2 tokenizer in which ``<|image|>``, ``<|im_start|>``,
``<|im_end|>`` and ``<|endoftext|>`` are single tokens. Tests and the tiny default model use
:func:`train_tokenizer` instead, which builds a tokenizer with the same special tokens.

:class:`Tokenizer` wraps the ``tokenizers`` library directly (no transformers import at run time) and
reads and writes the same files as transformers' ``AutoTokenizer``: ``tokenizer.json`` (or a Qwen2
``vocab.json`` + ``merges.txt``) and ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

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

#: One of these files marks a directory holding a tokenizer (fast tokenizer file or Qwen2 BPE vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")

#: Qwen2's pre-tokenizer split (the pattern transformers' Qwen2 tokenizer builds from vocab.json + merges.txt).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or a serialized AddedToken (``{"content": ...}``)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def qwen2_backend(vocab_file: Path, merges_file: Path) -> Backend:
    """The byte-level BPE of a Qwen2 checkpoint that ships ``vocab.json`` + ``merges.txt`` (no tokenizer.json):
    NFC normalization, Qwen2's regex split, byte-level mapping without a prefix space, byte-level decoding."""
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = [
        tuple(line.split(" "))
        for line in merges_file.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


class Tokenizer:
    """A ``tokenizers`` tokenizer plus the special tokens named in ``tokenizer_config.json``.

    Encodes and decodes exactly as transformers' ``AutoTokenizer`` does for the same files, with the
    subset of its interface hyperowl uses.

    Args:
        backend: the ``tokenizers.Tokenizer`` (vocabulary, merges, added tokens).
        config: the ``tokenizer_config.json`` contents (``eos_token``, ``pad_token``, ...), written back
            by :meth:`save_pretrained`.
        name_or_path: where it was loaded from ("" when built in memory).
    """

    def __init__(self, backend: Backend, config: dict[str, Any], name_or_path: str = "") -> None:
        self.backend = backend
        self.config = config
        self.name_or_path = name_or_path
        # Tokens the config declares that the backend does not know yet become special added tokens,
        # in id order (as transformers does); their ids must then match the config's.
        declared = sorted((int(i), entry) for i, entry in (config.get("added_tokens_decoder") or {}).items())
        for token_id, entry in declared:
            if backend.token_to_id(entry["content"]) is None:
                backend.add_tokens([_added_token(entry)])
            if backend.token_to_id(entry["content"]) != token_id:
                raise CheckpointError(
                    f"tokenizer_config.json gives {entry['content']!r} id {token_id}, the vocabulary {backend.token_to_id(entry['content'])}"
                )
        named = [_token_text(config.get(key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token")]
        extra = [_token_text(t) for t in (config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])]
        missing = [t for t in dict.fromkeys(named + extra) if t is not None and backend.token_to_id(t) is None]
        backend.add_special_tokens(missing)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Read ``tokenizer.json`` (else ``vocab.json`` + ``merges.txt``) and ``tokenizer_config.json`` from ``path``.

        Raises:
            CheckpointError: the folder is missing, has no tokenizer files, or they cannot be read.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"tokenizer directory not found: {path}")
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise CheckpointError(f"no tokenizer files in {path} (expected tokenizer.json, or vocab.json and merges.txt)")
        try:
            if (path / "tokenizer.json").is_file():
                backend = Backend.from_file(str(path / "tokenizer.json"))
            else:
                backend = qwen2_backend(path / "vocab.json", path / "merges.txt")
            config_file = path / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        except Exception as exc:  # tokenizers raises a plain Exception on a malformed file, json a ValueError
            raise CheckpointError(f"could not load a tokenizer from {path}: {exc}") from exc
        return cls(backend, config, name_or_path=str(path))

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``path`` (readable by ``AutoTokenizer`` too)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def __len__(self) -> int:
        """Vocabulary size including added tokens (what the embedding table needs)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> dict[str, list]:
        """Encode one string: ``input_ids`` and ``attention_mask`` (lists of ints), and with
        ``return_offsets_mapping`` the ``offset_mapping`` (one ``(start, end)`` character span per token)."""
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, list] = {"input_ids": encoding.ids, "attention_mask": encoding.attention_mask}
        if return_offsets_mapping:
            out["offset_mapping"] = encoding.offsets
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (an int, a list, or a 0-/1-d tensor); ``skip_special_tokens`` drops special tokens."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]] | Any, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` of each row of ``batch`` (a list of lists or a 2-d tensor)."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return self.backend.decode_batch([list(row) for row in batch], skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """Id of one token (None if the vocabulary has no such token)."""
        return self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``tokenizer_config.json``'s ``eos_token``, if any."""
        token = _token_text(self.config.get("eos_token"))
        return None if token is None else self.backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        """Id of ``tokenizer_config.json``'s ``pad_token``, if any."""
        token = _token_text(self.config.get("pad_token"))
        return None if token is None else self.backend.token_to_id(token)


def _added_token(entry: dict[str, Any]) -> AddedToken:
    """An ``added_tokens_decoder`` entry of tokenizer_config.json as a ``tokenizers.AddedToken``."""
    return AddedToken(
        entry["content"],
        single_word=entry.get("single_word", False),
        lstrip=entry.get("lstrip", False),
        rstrip=entry.get("rstrip", False),
        normalized=entry.get("normalized", False),
        special=entry.get("special", True),
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, extra_special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose special tokens are single tokens.

    Args:
        texts: training corpus, one string per item.
        vocab_size: target vocabulary size, including the 256 byte symbols and the special tokens.
        extra_special_tokens: more single tokens after :data:`SPECIAL_TOKENS` (e.g. :data:`MARKERS_241101`).

    Returns:
        A :class:`Tokenizer` (``<|endoftext|>`` = id 0 is both eos and pad); ``save_pretrained(dir)``
        writes it and both :func:`load_tokenizer` and ``transformers.AutoTokenizer`` read it back.
    """
    special = [*SPECIAL_TOKENS, *extra_special_tokens]
    minimum = 256 + len(special)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size {vocab_size} is below the minimum {minimum} (256 bytes + special tokens)")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "additional_special_tokens": special[1:],
    }
    return Tokenizer(backend, config)


def single_token_id(tokenizer: Tokenizer, token: str) -> int | None:
    """Return the id of ``token`` if the tokenizer encodes it as exactly one token, else None."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a :class:`Tokenizer` from a folder and check it fits the Owl3 prompt format.

    Raises:
        CheckpointError: the directory is missing, has no tokenizer files, or ``<|image|>`` is not
            a single token.
    """
    tokenizer = Tokenizer.from_pretrained(path)
    if single_token_id(tokenizer, IMAGE_TOKEN) is None:
        raise CheckpointError(f"tokenizer in {path} does not encode {IMAGE_TOKEN} as a single token")
    return tokenizer
