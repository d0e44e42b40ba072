"""Answer extraction for multiple-choice prompts (``hyperowl.processing.choices``): which option does a
free-form answer pick?

:func:`extract_choice` accepts the forms models actually produce: a bare letter (``B``, ``b``),
a labelled letter (``B.``, ``(B)``, ``B) blue``), a phrase (``The answer is (B)``,
``answer: c``, ``Option C is correct``), or the option's own text (``blue circle``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hyperowl.processing.choices import LETTERS


def _normalize(text: str) -> str:
    """Lowercase, markdown emphasis removed, whitespace collapsed, outer punctuation stripped."""
    text = re.sub(r"[*_`]", "", text.lower())
    return " ".join(text.split()).strip(" .,:;!?\"'()[]")


def _letter_index(letter: str, count: int) -> int | None:
    index = LETTERS.find(letter.upper())
    return index if 0 <= index < count else None


# "B" / "b" / "B." / "(B)" / "B) blue" / "b: blue" at the very start.
_LEADING = re.compile(r"^[(\[]?([A-Za-z])(?:[)\]]|[.:,](?!\w)|\s*$)")
# "answer is (B)", "answer: c", "option C", "choice is B".
_PHRASE = re.compile(
    r"\b(?:answer|option|choice)\s*(?:is|would be|should be)?\s*[:：]?\s*[(\[]?([A-Za-z])(?![A-Za-z])(.*)", re.IGNORECASE
)
# "(B)" anywhere.
_PARENS = re.compile(r"\(([A-Z])\)")
# A lone capital letter word.
_LONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")


def _phrase_choice(text: str, count: int) -> int | None:
    """The letter after "answer/option/choice (is)": a capital, or a lowercase one that ends the sentence."""
    for match in _PHRASE.finditer(text):
        letter, rest = match.group(1), match.group(2)
        if letter.islower() and not re.match(r"^\s*(?:[)\].,;:!]|$)", rest):
            continue  # "the answer is a red square": an article, not option a
        index = _letter_index(letter, count)
        if index is not None:
            return index
    return None


def _unique(indices: Sequence[int]) -> int | None:
    distinct = set(indices)
    return distinct.pop() if len(distinct) == 1 else None


def _text_choice(text: str, options: Sequence[str]) -> int | None:
    """The one option whose text occurs in the answer (ignoring options contained in a longer match)."""
    norm = _normalize(text)
    hits = []
    for i, option in enumerate(options):
        opt = _normalize(option)
        if opt and re.search(rf"(?<!\w){re.escape(opt)}(?!\w)", norm):
            hits.append((i, opt))
    kept = [i for i, opt in hits if not any(opt != other and opt in other for _, other in hits)]
    return _unique(kept)


def _lone_letter_choice(text: str, count: int) -> int | None:
    """The one capital letter standing alone as a word (the article "A" before a word is skipped)."""
    indices = []
    for match in _LONE.finditer(text):
        letter = match.group(1)
        if letter == "A" and re.match(r"\s+(?!(?:or|and|nor)\b)[a-z]", text[match.end() :]):
            continue
        index = _letter_index(letter, count)
        if index is not None:
            indices.append(index)
    return _unique(indices)


def extract_choice(response: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-form ``response`` chooses, or None when it names none (or several).

    Rules, first match wins: the whole answer is an option's text; a leading letter label (``B``,
    ``b.``, ``(B)``, ``B) text``); a phrase (``answer is (B)``, ``Answer: c``, ``option C``); one
    distinct ``(X)``; one option's text inside the answer; one distinct lone capital letter.
    Letters beyond the number of options never count.
    """
    count = len(options)
    text = response.strip()
    if not text or count == 0:
        return None
    norm = _normalize(text)
    exact = [i for i, option in enumerate(options) if _normalize(option) == norm and norm]
    if len(exact) == 1:
        return exact[0]
    stripped = re.sub(r"[*_`]", "", text).strip()
    leading = _LEADING.match(stripped)
    if leading and (index := _letter_index(leading.group(1), count)) is not None:
        return index
    for finder in (
        lambda: _phrase_choice(stripped, count),
        lambda: _unique([i for m in _PARENS.finditer(stripped) if (i := _letter_index(m.group(1), count)) is not None]),
        lambda: _text_choice(stripped, options),
        lambda: _lone_letter_choice(stripped, count),
    ):
        index = finder()
        if index is not None:
            return index
    return None


def is_open_answer_correct(response: str, answer: str) -> bool:
    """Open (no options) questions: the normalised response equals, or starts with, the normalised answer."""
    got, want = _normalize(response), _normalize(answer)
    return bool(want) and (got == want or got.startswith(want + " "))
