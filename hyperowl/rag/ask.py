"""Retrieval-augmented answers: retrieve, lay the items out as numbered pictures, answer, cite."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.engine.sampling import SamplingParams
from hyperowl.processing.image import load_image
from hyperowl.processing.processor import Owl3Processor
from hyperowl.processing.retrieval import RAG_MAX_NEW_TOKENS, RAG_QUESTION, PromptItem, cited_pictures, rag_prompt
from hyperowl.processing.video import load_video
from hyperowl.rag.embed import PictureEmbedder
from hyperowl.rag.index import RagIndex, Retrieved


@dataclass
class Citation:
    """A retrieved item the answer refers to as "picture N"."""

    picture: int
    item: Retrieved

    def as_dict(self) -> dict:
        return {"id": self.item.id, "picture": self.picture, "image": self.item.image or self.item.video or None,
                "text": self.item.text, "score": round(self.item.score, 6)}


@dataclass
class RagAnswer:
    """`answer` text, the `citations` it makes and everything `retrieved` (picture i = retrieved[i - 1])."""

    answer: str
    citations: list[Citation] = field(default_factory=list)
    retrieved: list[Retrieved] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "answer": self.answer,
            "citations": [c.as_dict() for c in self.citations],
            "retrieved": [{"picture": n, **r.as_dict()} for n, r in enumerate(self.retrieved, 1)],
        }


def cite(answer: str, retrieved: list[Retrieved]) -> list[Citation]:
    """The citations of `answer`: the items it names as "picture N", in the order it names them."""
    return [Citation(n, retrieved[n - 1]) for n in cited_pictures(answer, len(retrieved))]


def rag_messages(retrieved: list[Retrieved], question: str, has_query_image: bool) -> list[dict[str, str]]:
    """The user turn that shows `retrieved` as numbered pictures, then the query picture and `question`."""
    items = [PromptItem(r.text, r.media) for r in retrieved]
    return [{"role": "user", "content": rag_prompt(items, question, "image" if has_query_image else "")}]


class RagAnswerer:
    """Answers questions about a query picture from an index built with `model`'s vision tower.

    `model_name` names the checkpoint in error messages (e.g. its directory)."""

    def __init__(self, model: Owl3ForCausalLM, processor: Owl3Processor, index_dir: str | Path, model_name: str) -> None:
        self.model = model
        self.processor = processor
        self.embedder = PictureEmbedder(model, processor.image_size)
        self.index = RagIndex(index_dir, self.embedder, model_name)

    def retrieve(self, question: str, image=None, k: int = 4) -> list[Retrieved]:
        return self.index.search(image=image, text=question, k=k)

    @torch.inference_mode()
    def ask(self, question: str = RAG_QUESTION, image=None, k: int = 4, params: SamplingParams | None = None) -> RagAnswer:
        """Retrieve `k` items for `image` (path, bytes or PIL image; optional) and `question`, answer, cite.

        Pictures are never cut into tiles here (one global view each, as the retrieval task is trained)."""
        query = load_image(image) if image is not None else None
        retrieved = self.retrieve(question, query, k)
        messages = rag_messages(retrieved, question, query is not None)
        images = [load_image(r.image) for r in retrieved if r.image] + ([query] if query is not None else [])
        videos = [load_video(r.video, fps=self.processor.video_fps, max_frames=self.processor.max_frames)
                  for r in retrieved if r.video and not r.image]
        batch = self.processor(messages, images=images or None, videos=videos or None, cut_enable=False)
        params = params or SamplingParams(max_new_tokens=RAG_MAX_NEW_TOKENS)
        out = self.model.generate(**batch.to(self.model.device, self.model.dtype), params=params,
                                  stop_token_ids=self.processor.stop_token_ids)
        answer = out.answers(self.processor)[0]
        return RagAnswer(answer, cite(answer, retrieved), retrieved)
