"""Multiple-choice prompt text: lettered options and the answer instruction (the MMBench / Video-MME
evaluation wording), shared by the evaluation prompts and the synthetic training questions."""

from __future__ import annotations

import string
from collections.abc import Sequence

#: Option labels, in order.
LETTERS = string.ascii_uppercase

#: Instruction appended to multiple-choice prompts (the usual wording of MMBench/Video-MME evaluations).
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def option_letter(index: int) -> str:
    """Label of option ``index`` (0 -> ``A``)."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"option index must be in [0, {len(LETTERS)}), got {index}")
    return LETTERS[index]


def format_question(question: str, options: Sequence[str], hint: str = "") -> str:
    """Prompt text: optional hint, the question, lettered options and the answer instruction.

    Without options (an open question) only the hint and question are returned.
    """
    lines = [f"Hint: {hint}"] if hint else []
    if not options:
        return "\n".join([*lines, question])
    lines += [f"Question: {question}", "Options:"]
    lines += [f"{option_letter(i)}. {text}" for i, text in enumerate(options)]
    lines.append(MC_INSTRUCTION)
    return "\n".join(lines)
