"""The run-time tokenizer against transformers' AutoTokenizer (the oracle) on the same files, and start-up imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

import hyperowl
from hyperowl.errors import CheckpointError
from hyperowl.processing.tokenizer import QWEN2_SPLIT, SPECIAL_TOKENS, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
BUNDLED = Path(hyperowl.__file__).parent / "assets" / "default-model"

TEXTS = [
    "",
    (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|image|> What colour is the square?"
        "<|im_end|>\n<|im_start|>assistant\nThe square is red.<|im_end|><|endoftext|>"
    ),
    "  two leading spaces, trailing  \n\n\ttab, It's 3.14159 and they'll've 12345 items!!",
    "Café naïve e\u0301 (combining accent) 日本語のテキスト 🦉🦉 ‹quotes›",
    "<|video|><|video|>Which picture shows a green triangle?<|image|><|image|>",
    "<|im_end|>text glued<|im_start|>to specials<|endoftext|>",
    "Picture 3.\r\nWindows line end, \u00a0non-breaking space",
]
CORPUS = [
    "The square is red. A blue circle on a white background. Picture 3 of 16. What happened first in the video?",
    "Describe the picture. Which picture shows a green triangle? It's the third one; they'll see.",
] * 30


def assert_same_as_transformers(path: Path) -> None:
    """Ids, offsets, decoded text, vocabulary size and special-token ids equal AutoTokenizer's on `path`."""
    ours = load_tokenizer(path)
    oracle = AutoTokenizer.from_pretrained(str(path))
    assert len(ours) == len(oracle)
    assert ours.pad_token_id == oracle.pad_token_id and ours.eos_token_id == oracle.eos_token_id
    for token in SPECIAL_TOKENS:
        assert ours.convert_tokens_to_ids(token) == oracle.convert_tokens_to_ids(token)
    for text in TEXTS:
        for add_special_tokens in (False, True):
            assert ours.encode(text, add_special_tokens=add_special_tokens) == oracle.encode(
                text, add_special_tokens=add_special_tokens
            )
        mine = ours(text, add_special_tokens=False, return_offsets_mapping=True)
        theirs = oracle(text, add_special_tokens=False, return_offsets_mapping=True)
        assert mine["input_ids"] == theirs["input_ids"]
        assert [tuple(o) for o in mine["offset_mapping"]] == [tuple(o) for o in theirs["offset_mapping"]]
        ids = mine["input_ids"]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == oracle.decode(ids, skip_special_tokens=skip)
    # every id alone (partial UTF-8 bytes included) and the batch form
    single = [[i] for i in range(len(ours))]
    assert ours.batch_decode(single) == oracle.batch_decode(single)
    assert ours.batch_decode(single, skip_special_tokens=True) == oracle.batch_decode(single, skip_special_tokens=True)


def test_bundled_tokenizer_equals_transformers():
    assert_same_as_transformers(BUNDLED)


def qwen2_style_checkpoint(path: Path) -> Path:
    """A Qwen2-layout tokenizer folder: vocab.json + merges.txt from a BPE trained with Qwen2's pre-tokenizer, and
    tokenizer_config.json declaring the special tokens past the vocabulary (`added_tokens_decoder`)."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    path.mkdir()
    backend.model.save(str(path))  # vocab.json, merges.txt
    first = backend.get_vocab_size()
    added = {
        str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:3]),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert not (path / "tokenizer.json").exists()
    return path


def test_qwen2_vocab_and_merges_tokenizer_equals_transformers(tmp_path):
    path = qwen2_style_checkpoint(tmp_path / "qwen2")
    assert_same_as_transformers(path)
    ours = load_tokenizer(path)
    vocabulary = len(json.loads((path / "vocab.json").read_text()))
    assert [ours.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(vocabulary, vocabulary + len(SPECIAL_TOKENS)))
    # saved as tokenizer.json, it reads back (by us and by transformers) the same
    ours.save_pretrained(tmp_path / "saved")
    assert_same_as_transformers(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode(TEXTS[1]) == ours.encode(TEXTS[1])


def test_added_token_id_that_disagrees_with_the_vocabulary_is_refused(tmp_path):
    path = qwen2_style_checkpoint(tmp_path / "qwen2")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {str(int(k) + 5): v for k, v in config["added_tokens_decoder"].items()}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gives '<\|endoftext\|>' id \d+, the vocabulary \d+"):
        load_tokenizer(path)


def test_import_hyperowl_does_not_import_transformers():
    code = (
        "import sys, hyperowl, hyperowl.cli\n"
        "from hyperowl.processing import Owl3Processor\n"
        f"Owl3Processor.from_pretrained({str(BUNDLED)!r}).decode([1, 2])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
