"""Functions of the local lmms-eval tasks over the benchmark files of `hyperowl eval make-synthetic` (docs written by
`tests/test_lmms_eval.py`: `question`, `hint`, `options`, `answer` (the right option's index), `images` (paths)
and `video` (a path or null)). The prompt and the scoring are `hyperowl eval`'s own."""

from PIL import Image

from hyperowl.eval.answers import extract_choice
from hyperowl.processing.choices import format_question


def doc_to_visual(doc):
    if doc["video"]:
        return [doc["video"]]
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return format_question(doc["question"], doc["options"], doc["hint"])


def process_results(doc, results):
    return {"accuracy": float(extract_choice(results[0], doc["options"]) == doc["answer"])}
