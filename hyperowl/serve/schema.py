"""Request bodies of the OpenAI chat completions API (the subset hyperowl serves), as pydantic models.

Unknown fields are ignored, as OpenAI-compatible servers usually do; known OpenAI features that change
the answer and that hyperowl does not have (tools, JSON mode, presence/frequency penalties) are refused
by name instead (`unsupported_features`). Extensions: a `video_url` content part
(`{"url", "max_frames", "sampling"}`; `sampling` is `"exact"`, the default: the sampled frames
themselves, or `"keyframe"`: the keyframe nearest to each, much faster on long files), `top_k` and `repetition_penalty` (as vLLM names them) and `ignore_eos` (keep
generating past the stop tokens, for benchmarks).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hyperowl.engine.sampling import REPETITION_PENALTY_RANGE, SEED_RANGE
from hyperowl.processing.video import DEFAULT_SAMPLING


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageUrl(_Lenient):
    url: str
    detail: str | None = None


class ImageUrlPart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl


class VideoUrl(_Lenient):
    url: str
    max_frames: int | None = Field(default=None, ge=1)
    sampling: Literal["exact", "keyframe"] = DEFAULT_SAMPLING


class VideoUrlPart(_Lenient):
    type: Literal["video_url"]
    video_url: VideoUrl


ContentPart = Annotated[TextPart | ImageUrlPart | VideoUrlPart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(_Lenient):
    include_usage: bool = False


class Retrieval(_Lenient):
    """`"retrieval": {"index": NAME, "k": 4}`: answer from the top-k items of a `--rag-index` (hyperowl.serve.retrieval)."""

    index: str
    k: int = Field(default=4, ge=1, le=16)


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(default=1, ge=1, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    retrieval: Retrieval | None = None

    def unsupported_features(self) -> list[str]:
        """Names of the requested OpenAI features hyperowl does not implement (their neutral values pass)."""
        asked = {
            "presence_penalty": bool(self.presence_penalty),
            "frequency_penalty": bool(self.frequency_penalty),
            "tools": bool(self.tools) or bool(self.functions),
            "response_format": (self.response_format or {}).get("type", "text") != "text",
        }
        return [name for name, wanted in asked.items() if wanted]

    def stop_strings(self) -> list[str]:
        """`stop` as a list of non-empty strings."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]
