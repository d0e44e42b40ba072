"""Functions of the local lmms-eval tasks over hyperowl's synthetic questions (docs written by
`tests/test_lmms_eval.py`: `question` with lmms-eval's `<image>` / `<video>` placeholders, `image` or `video`
path, `answer`, `choices`, `label`)."""

from PIL import Image


def doc_to_visual(doc):
    if doc["video"]:
        return [doc["video"]]
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
