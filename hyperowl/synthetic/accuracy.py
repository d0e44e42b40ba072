"""Held-out exact-match accuracy of a model on the synthetic tasks (greedy decoding)."""

from __future__ import annotations

import torch

from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.processing.processor import Owl3Processor
from hyperowl.synthetic.tasks import Sample, TaskOptions, make_sample

#: Seed of the held-out samples; training recipes must use other seeds.
HELD_OUT_SEED = 1_000_003

SINGLE_PICTURE_TASKS = ("single", "digit", "count")


def answer_samples(
    model: Owl3ForCausalLM,
    processor: Owl3Processor,
    samples: list[Sample],
    cut_enable: bool = False,
    max_new_tokens: int | None = None,
) -> list[str]:
    """Greedy answers (stripped text before the stop token) to the questions of `samples`, one batch.

    `max_new_tokens` defaults to one token more than the longest right answer (at least 8).
    """
    if max_new_tokens is None:
        longest = max(len(processor.tokenizer.encode(s.answer)) for s in samples)
        max_new_tokens = max(8, longest + 1)
    conversations = [sample.messages[:-1] for sample in samples]
    videos = [[v.clip(processor.video_fps, processor.max_frames) for v in sample.videos] for sample in samples]
    batch = processor(conversations, images=[s.images for s in samples], videos=videos, cut_enable=cut_enable)
    out = model.generate(
        **batch.to(model.device, model.dtype), max_new_tokens=max_new_tokens, stop_token_ids=processor.stop_token_ids
    )
    return out.answers(processor)


@torch.inference_mode()
def evaluate_tasks(
    model: Owl3ForCausalLM,
    processor: Owl3Processor,
    tasks: list[str],
    n: int = 200,
    seed: int = HELD_OUT_SEED,
    opts: TaskOptions | None = None,
    batch_size: int = 16,
    cut_enable: bool | None = None,
) -> dict[str, float]:
    """Exact-match accuracy per task over samples `0..n-1` of `seed` (the held-out split by default).

    Each batch may generate one token more than its longest right answer (at least 8; `answer_samples`).

    Pictures of single-picture tasks are cut as `cut_enable` says (None: the processor's setting);
    multi-picture tasks and videos are never cut. Returns `{task: accuracy in [0, 1]}`.
    """
    model.eval()
    accuracy = {}
    for task in tasks:
        cut = (processor.cut_enable if cut_enable is None else cut_enable) and task in SINGLE_PICTURE_TASKS
        correct = 0
        for start in range(0, n, batch_size):
            samples = [make_sample(task, seed, i, opts) for i in range(start, min(n, start + batch_size))]
            answers = answer_samples(model, processor, samples, cut)
            correct += sum(a == s.answer for a, s in zip(answers, samples))
        accuracy[task] = correct / n
    return accuracy


#: Tasks of the precision-parity prompts (`parity_samples`): pictures or a video in every prompt, answers of
#: up to 32 tokens (the rag walks and "which picture" walks are the long ones).
PARITY_TASKS = ("rag", "distractor", "video", "rag", "sequence", "distractor", "compare", "rag", "video", "rag")


def parity_samples(seed: int = 99) -> list[Sample]:
    """One sample of each of `PARITY_TASKS` (4-8 retrieved pictures, 4-16 distractors)."""
    opts = TaskOptions(rag_pictures=(4, 8), distractors=(4, 16))
    return [make_sample(task, seed, i, opts) for i, task in enumerate(PARITY_TASKS)]


@torch.inference_mode()
def greedy_agreement(
    reference: Owl3ForCausalLM, other: Owl3ForCausalLM, processor: Owl3Processor, samples: list[Sample], max_new_tokens: int = 32
) -> list[bool]:
    """Whether `other` (e.g. the bf16 model on a GPU) answers each sample with the same greedy tokens as
    `reference` (e.g. the fp32 model on the CPU), up to `max_new_tokens` or the stop token."""
    answers = [[answer_samples(model, processor, [s], max_new_tokens=max_new_tokens)[0] for s in samples] for model in (reference, other)]
    return [a == b for a, b in zip(*answers)]
