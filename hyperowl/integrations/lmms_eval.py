"""hyperowl as an lmms-eval model.

Installing ``hyperowl[lmms]`` registers the model ``hyperowl`` in lmms-eval's entry-point group
``lmms_eval.models`` (see ``pyproject.toml``), so that

    python -m lmms_eval --model hyperowl --model_args pretrained=DIR --tasks TASKS --batch_size 8

evaluates an mPLUG-Owl3 checkpoint (a folder or a Hub repository id). ``--model_args`` also takes
``device`` (default: cuda when available), ``dtype`` (``auto``: the checkpoint's own), ``max_frames`` and
``fps`` (video sampling), ``cut`` (``auto``: cut the image of single-image prompts only, as ``hyperowl eval``
does; ``on``; ``off``) and ``max_new_tokens`` (used when a task sets none).

- ``generate_until``: each request's visuals (PIL images, or video file paths) go where the prompt has
  lmms-eval's ``<image>`` / ``<video>`` placeholders (interleaved tasks), else in front of the prompt, one
  ``<|image|>`` per image or ``<|video|>`` per video, then a newline. Consecutive requests with the same
  generation settings and cut setting run as one batch (at most ``batch_size``). Greedy unless the task asks
  for ``do_sample``; the answer ends at the first stop token or ``until`` string.
- ``loglikelihood``: the continuation's negative log-likelihood summed over its tokens (lmms-eval's
  multiple-choice scoring takes the smallest, as its own models return losses), and whether greedy decoding
  from the context gives exactly the continuation's tokens.
- ``generate_until_multi_round`` is not supported.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from hyperowl import Owl3ForCausalLM, Owl3Processor, SamplingParams
from hyperowl.errors import PromptError
from hyperowl.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN

#: lmms-eval's placeholders in interleaved prompts.
LMMS_IMAGE = "<image>"
LMMS_VIDEO = "<video>"

CUT_MODES = ("auto", "on", "off")


def manifest() -> Any:
    """The entry point lmms-eval loads: a ``ModelManifest`` with the model id ``hyperowl`` and where its class
    lives. Imported here: lmms-eval loads entry points while ``lmms_eval.models`` is being imported, which may be
    from this module's own imports."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="hyperowl", simple_class_path=f"{__name__}.Hyperowl")


def user_message(context: str, visuals: Sequence[Any]) -> tuple[dict[str, str], list[Any], list[Any]]:
    """The user turn for an lmms-eval prompt and its visuals: ``(message, images, videos)``.

    Raises:
        PromptError: the prompt's placeholders do not match the visuals' count or kinds.
    """
    images = [v for v in visuals if not isinstance(v, str)]
    videos = [v for v in visuals if isinstance(v, str)]
    if LMMS_IMAGE in context or LMMS_VIDEO in context:
        if context.count(LMMS_IMAGE) != len(images) or context.count(LMMS_VIDEO) != len(videos):
            raise PromptError(
                f"the prompt has {context.count(LMMS_IMAGE)} {LMMS_IMAGE} and {context.count(LMMS_VIDEO)} {LMMS_VIDEO} "
                f"placeholders for {len(images)} images and {len(videos)} videos"
            )
        text = context.replace(LMMS_IMAGE, IMAGE_TOKEN).replace(LMMS_VIDEO, VIDEO_TOKEN)
    else:
        text = IMAGE_TOKEN * len(images) + VIDEO_TOKEN * len(videos) + ("\n" if visuals else "") + context
    return {"role": "user", "content": text}, [_rgb(i) for i in images], videos


def _rgb(image: Any) -> Any:
    return image.convert("RGB") if isinstance(image, Image.Image) and image.mode != "RGB" else image


def _flatten(visuals: Any) -> list[Any]:
    """lmms-eval's ``doc_to_visual`` returns a list (sometimes nested); None for text-only docs."""
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


class Hyperowl(lmms):
    """An mPLUG-Owl3 checkpoint answering lmms-eval requests (see the module docstring for the arguments;
    ``max_batch_size``, which lmms-eval passes to every model, is not used). An unknown argument is an error."""

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_frames: int = 16,
        fps: float = 1.0,
        cut: str = "auto",
        max_new_tokens: int = 64,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if cut not in CUT_MODES:
            raise ValueError(f"cut must be one of {', '.join(CUT_MODES)}; got {cut!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = Owl3ForCausalLM.from_pretrained(pretrained, dtype=dtype, device=device).eval()
        self.processor = Owl3Processor.from_pretrained(pretrained, max_frames=int(max_frames), video_fps=float(fps))
        self.batch_size = int(batch_size)
        self.cut = cut
        self.max_new_tokens = int(max_new_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _visuals(self, request: Instance) -> list[Any]:
        doc_to_visual, doc_id, task, split = request.args[2:6]
        return _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))

    def _cuts(self, images: list[Any], videos: list[Any]) -> bool:
        return self.cut == "on" or (self.cut == "auto" and len(images) == 1 and not videos)

    def _inputs(self, conversations: list[list[dict[str, str]]], images: list[list[Any]], videos: list[list[Any]], cut: bool):
        batch = self.processor(
            conversations,
            images=[i or None for i in images],
            videos=[v or None for v in videos],
            cut_enable=cut,
        )
        return batch.to(self.model.device, self.model.dtype)

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Instance]) -> list[str]:
        prepared = []
        for request in requests:
            context, gen_kwargs = request.args[0], dict(request.args[1])
            message, images, videos = user_message(context, self._visuals(request))
            prepared.append((message, images, videos, gen_kwargs, self._cuts(images, videos)))
        answers: list[str] = []
        for batch in self._batches(prepared):
            gen_kwargs, cut = batch[0][3], batch[0][4]
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            params = SamplingParams(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                do_sample=bool(gen_kwargs.get("do_sample", False)),
                temperature=float(gen_kwargs.get("temperature") or 0.0),
                top_p=float(gen_kwargs.get("top_p") or 1.0),
            )
            inputs = self._inputs([[m] for m, *_ in batch], [i for _, i, *_ in batch], [v for _, _, v, *_ in batch], cut)
            with torch.inference_mode():
                output = self.model.generate(**inputs, params=params, stop_token_ids=self.processor.stop_token_ids)
            for sequence, count in zip(output.sequences, output.num_generated):
                text = self.processor.decode(sequence[:count].tolist(), skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop, 1)[0] if stop else text
                answers.append(text.strip())
        return answers

    def _batches(self, prepared: list[tuple]) -> Iterator[list[tuple]]:
        """Consecutive requests with the same generation settings and cut setting, at most ``batch_size``."""
        batch: list[tuple] = []
        for item in prepared:
            key = (json.dumps(item[3], sort_keys=True, default=str), item[4])
            if batch and (len(batch) == self.batch_size or key != (json.dumps(batch[0][3], sort_keys=True, default=str), batch[0][4])):
                yield batch
                batch = []
            batch.append(item)
        if batch:
            yield batch

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("hyperowl does not support lmms-eval's multi-round generation")

    # ------------------------------------------------------------------ likelihood

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, target, _, doc_id, task, split = request.args[:6]
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            results.append(self.continuation_loss(context, continuation, self._visuals(request)))
        return results

    def continuation_loss(self, context: str, continuation: str, visuals: Sequence[Any]) -> tuple[float, bool]:
        """Negative log-likelihood of ``continuation`` as the start of the assistant's answer to ``context``
        (summed over its tokens), and whether it is the greedy continuation."""
        message, images, videos = user_message(context, list(visuals))
        inputs = self._inputs([[message]], [images], [videos], self._cuts(images, videos))
        answer = self.processor.tokenizer.encode(continuation, add_special_tokens=False)
        if not answer:
            return 0.0, True
        answer_ids = torch.tensor([answer], dtype=torch.long, device=self.model.device)
        input_ids = torch.cat([inputs["input_ids"], answer_ids], dim=1)
        attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(answer_ids)], dim=1)
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                media_offset=_extend_offsets(inputs["media_offset"], len(answer)),
                pixel_values=inputs["pixel_values"],
            ).logits
        predicting = logits[0, -len(answer) - 1 : -1].float().log_softmax(-1)  # positions that predict the answer
        picked = predicting.gather(1, answer_ids[0, :, None])[:, 0]
        return float(-picked.sum()), bool((predicting.argmax(-1) == answer_ids[0]).all())


def _extend_offsets(media_offset: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """``media_offset`` ``[1, T, 2]`` for ``extra`` more text tokens after the prompt (no new images: each
    new token sees what the prompt's last token sees)."""
    if media_offset is None:
        return None
    return torch.cat([media_offset, media_offset[:, -1:].expand(-1, extra, -1)], dim=1)
