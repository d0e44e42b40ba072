"""Prompt layout of retrieval-augmented questions: retrieved items as numbered pictures with their
descriptions, then the query picture and the question.

Each retrieved item is one line, `<|image|> {i}: {text}` (the placeholder only when the item has a
picture, `<|video|>` for a video): the picture, its number, its description, as the pictures of a
numbered set are listed (`<|image|> 3`). Answers cite items as "picture N" (`cited_pictures`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN

#: The question of the synthetic retrieval task, and the default one of `hyperowl rag ask`.
RAG_QUESTION = "What is this called? Say which picture told you."

#: Answer tokens of `hyperowl rag ask` unless said otherwise: room for the bundled model to walk 8
#: retrieved descriptions (about 90 tokens).
RAG_MAX_NEW_TOKENS = 128

_CITATION = re.compile(r"\bpicture (\d+)\b", re.IGNORECASE)


@dataclass(frozen=True)
class PromptItem:
    """One retrieved item as the prompt shows it: its `text` ("" when it has none) and which media
    placeholder it gets (`media` = "image", "video" or "" for a text-only item)."""

    text: str
    media: str = "image"


def item_line(number: int, item: PromptItem) -> str:
    """The prompt line of retrieved item `number` (1-based)."""
    placeholder = {"image": IMAGE_TOKEN + " ", "video": VIDEO_TOKEN + " ", "": ""}[item.media]
    text = item.text.strip()
    return f"{placeholder}{number}{': ' + text if text else ''}\n"


def rag_prompt(items: list[PromptItem], question: str = RAG_QUESTION, query_media: str = "image") -> str:
    """The user message: one `item_line` per retrieved item, then the query's placeholder (`query_media`
    = "image", "video" or "" for a text-only question) and `question`."""
    placeholder = {"image": IMAGE_TOKEN + "\n", "video": VIDEO_TOKEN + "\n", "": ""}[query_media]
    return "".join(item_line(i, item) for i, item in enumerate(items, 1)) + placeholder + question


def cited_pictures(answer: str, count: int) -> list[int]:
    """The picture numbers (1..count) that `answer` cites as "picture N", in order, without repeats."""
    numbers = [int(m) for m in _CITATION.findall(answer)]
    return list(dict.fromkeys(n for n in numbers if 1 <= n <= count))
