"""Generation: prefill once (text KV cache + visual K/V of every hyper layer), then decode token by token.

The visual K/V are computed once per request in the prefill and reused for every generated token;
the official code recomputes `input_layernorm(V)` and `v_kv_proj` at every step.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hyperowl.config import GenerationConfig
from hyperowl.engine.memory import plan_visual_memory
from hyperowl.engine.sampling import SamplingParams, pick_tokens
from hyperowl.errors import PromptError
from hyperowl.model.cache import TextKVCache, VisualKV
from hyperowl.model.owl3 import Owl3Model, PixelStream, prompt_positions

if TYPE_CHECKING:
    from hyperowl.processing.processor import Owl3Processor


@dataclass
class GenerationOutput:
    """`sequences` `[B, L]`: generated ids per row (rows that stopped early are filled with their stop id);
    `num_generated[b]` counts row b's tokens including its stop token; timings in seconds."""

    sequences: torch.Tensor
    num_generated: list[int]
    prompt_tokens: int
    first_token_s: float
    total_s: float
    cache: TextKVCache | None = field(default=None, repr=False)
    visual: VisualKV | None = field(default=None, repr=False)

    def answers(self, processor: Owl3Processor) -> list[str]:
        """Each row's generated text without its closing stop token (`processor.stop_token_ids`),
        decoded and stripped."""
        texts = []
        for row, n in zip(self.sequences.tolist(), self.num_generated):
            if n and row[n - 1] in processor.stop_token_ids:
                n -= 1
            texts.append(processor.decode(row[:n]).strip())
        return texts


def default_stop_ids(model: Owl3Model) -> list[int]:
    eos = model.config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def make_params(params: SamplingParams | None, defaults: GenerationConfig | None = None, **kwargs: Any) -> SamplingParams:
    """`SamplingParams` from an object, or from transformers-style keyword arguments over `defaults`
    (the model's generation config): each keyword given (not None) replaces its default, as in
    transformers' `generate` (so `temperature=0.5` alone does not turn sampling on)."""
    if params is not None:
        return params
    known = {k: v for k, v in kwargs.items() if k in SamplingParams.__dataclass_fields__ and v is not None}
    return SamplingParams(**{**(defaults or GenerationConfig()).sampling_kwargs(), **known})


def visual_offload(model: Owl3Model, input_ids: torch.Tensor, pixel_values: torch.Tensor | PixelStream | None) -> bool:
    """Whether the visual K/V of `pixel_values` go to pinned CPU memory (`plan_visual_memory`).

    Raises:
        ResourceLimitError: the images would not fit in the memory budget (before any is encoded).
    """
    if pixel_values is None:
        return False
    num_images = pixel_values.total if isinstance(pixel_values, PixelStream) else pixel_values.shape[0]
    return plan_visual_memory(model.config, num_images, input_ids.numel(), model.dtype, model.device, model.visual_options).offload


#: The keys of a processor batch that `prefill` and the model take.
MODEL_INPUTS = ("input_ids", "attention_mask", "media_offset", "pixel_values")


@torch.no_grad()
def prefill(
    model: Owl3Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    media_offset: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    cache: TextKVCache | None = None,
    visual: VisualKV | None = None,
    extra_tokens: int = 1,
    vision_chunk_size: int | None = None,
) -> tuple[torch.Tensor, TextKVCache, VisualKV | None]:
    """Run a prompt `[B, T]` (or, with `cache`/`visual`, the continuation of cached conversations) into a
    text KV cache with room for `extra_tokens` more; return the next-token logits `[B, vocab]`, the cache
    and the visual K/V (encoded here, once, for the new `pixel_values`).

    Raises:
        ResourceLimitError: before any image is encoded, when the images would not fit in the memory
            budget (`hyperowl.engine.memory.plan_visual_memory`).
    """
    input_ids = input_ids.to(model.device)
    offload = visual_offload(model, input_ids, pixel_values)
    if cache is None:
        cache = model.new_cache(input_ids.shape[0], input_ids.shape[1] + extra_tokens)
    else:
        cache.reserve(input_ids.shape[1] + extra_tokens)
    out = model(
        input_ids,
        attention_mask=None if attention_mask is None else attention_mask.to(model.device),
        media_offset=None if media_offset is None else media_offset.to(model.device),
        pixel_values=pixel_values,
        cache=cache,
        visual=visual,
        logits_to_keep=1,
        vision_chunk_size=vision_chunk_size,
        offload_visual=offload,
    )
    return out.logits[:, -1], cache, out.visual


class StagedPrefill:
    """`prefill` of a new prompt in steps, so a server can decode other requests in between: `advance()`
    encodes one chunk of the images (video frames may still be decoding in a background thread; `ready()`
    says whether the next chunk is there), `finish()` runs the text once they are all in and returns what
    `prefill` returns. A prompt without images needs no `advance()`. Equal to `prefill` (same chunks,
    same order).

    Raises (at construction, before any image is encoded): `ResourceLimitError`, as `prefill`.
    """

    def __init__(
        self,
        model: Owl3Model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        media_offset: torch.Tensor | None = None,
        pixel_values: torch.Tensor | PixelStream | None = None,
        extra_tokens: int = 1,
        vision_chunk_size: int | None = None,
    ) -> None:
        self.model = model
        self.input_ids = input_ids.to(model.device)
        self.attention_mask = torch.ones_like(self.input_ids) if attention_mask is None else attention_mask.to(model.device)
        self.media_offset = None if media_offset is None else media_offset.to(model.device)
        self.extra_tokens = extra_tokens
        self.visual: VisualKV | None = None
        self._chunks: Iterator[torch.Tensor] | None = None
        self._steps: Iterator[int] | None = None
        if pixel_values is not None:
            if self.media_offset is None:
                raise PromptError("pixel_values were given without media_offset")
            offload = visual_offload(model, self.input_ids, pixel_values)
            stream = pixel_values if isinstance(pixel_values, PixelStream) else PixelStream(pixel_values.shape[0], [pixel_values])
            self._chunks = iter(stream.chunks)
            positions = prompt_positions(self.attention_mask)
            self._steps = model.visual_steps(
                PixelStream(stream.total, self._chunks), self.media_offset, positions, None, vision_chunk_size, offload
            )

    @property
    def encoded(self) -> bool:
        """Whether every image is in the visual K/V (`finish` may run)."""
        return self._steps is None

    def ready(self) -> bool:
        """Whether `advance()` can run without waiting for frames to decode."""
        check = getattr(self._chunks, "ready", None)
        return self.encoded or check is None or bool(check())

    @torch.no_grad()
    def advance(self) -> bool:
        """Encode the next chunk of images; True once all are encoded."""
        if self._steps is not None:
            try:
                next(self._steps)
            except StopIteration as done:
                self.visual, self._steps = done.value, None
        return self.encoded

    @torch.no_grad()
    def finish(self) -> tuple[torch.Tensor, TextKVCache, VisualKV | None]:
        """The text prefill over the encoded images: next-token logits `[B, vocab]`, the text cache (room
        for `extra_tokens` more) and the visual K/V."""
        while not self.advance():
            pass
        return prefill(
            self.model, self.input_ids, self.attention_mask, self.media_offset, visual=self.visual, extra_tokens=self.extra_tokens
        )

    def close(self) -> None:
        """Stop decoding frames that will not be used (a cancelled request)."""
        for part in (self._steps, self._chunks):
            close = getattr(part, "close", None)
            if close is not None:
                close()
        self._steps = self._chunks = None


@torch.no_grad()
def stream_tokens(
    model: Owl3Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    media_offset: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    stop_token_ids: list[int] | None = None,
    cache: TextKVCache | None = None,
    visual: VisualKV | None = None,
    vision_chunk_size: int | None = None,
    state: dict[str, Any] | None = None,
    cuda_graph: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row `[B]` at each step until all rows stop or the budget is used.

    With `cache`/`visual` from an earlier turn, `input_ids` continue that conversation. `state`
    (a dict) receives `cache`, `visual`, `first_token_s` so callers can keep them for the next turn.
    A row's stop token is yielded; afterwards the row repeats it (and is ignored by callers).
    Decode steps replay a CUDA graph (`DecodeStep`) when `cuda_graph` is true (None: on a GPU);
    tokens are picked on the device (`pick_tokens`), so a step waits for the GPU once, for the stop check.
    """
    params = params or SamplingParams()
    device = model.device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    stops = torch.tensor(stop_token_ids if stop_token_ids is not None else default_stop_ids(model), device=device)
    state = {} if state is None else state
    start = time.perf_counter()
    logits, cache, visual = prefill(
        model, input_ids, attention_mask, media_offset, pixel_values, cache, visual, params.max_new_tokens, vision_chunk_size
    )
    state.update(cache=cache, visual=visual)
    generator = params.generator(device)
    seen = None
    if params.repetition_penalty != 1.0:  # the prompt's tokens, then every answer token (as transformers does)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for b in range(batch):
            seen[b, input_ids[b][attention_mask[b].bool()]] = True
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    last = torch.zeros(batch, dtype=torch.long, device=device)
    step_fn = DecodeStep(model, cache, visual, graph=device.type == "cuda" if cuda_graph is None else cuda_graph)
    for step in range(params.max_new_tokens):
        token = torch.where(finished, last, pick_tokens(logits, params, seen, generator))
        if step == 0:
            state["first_token_s"] = time.perf_counter() - start
        yield token
        last = token
        finished |= torch.isin(token, stops)
        if bool(finished.all()) or step == params.max_new_tokens - 1:  # the one read-back of the step
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits = step_fn(token)


class DecodeStep:
    """Decode steps of a fixed set of rows over a text cache whose capacity does not change
    (`Owl3Model.decode`): run eagerly, or, with `graph` (a CUDA model), replayed from a CUDA graph
    captured at the first call, so a step costs one launch instead of one per operator.

    Calling it with the tokens `[B]` of the step returns the next-token logits `[B, vocab]` (with a
    graph: a buffer overwritten by the next call) and advances the cache by one column.
    """

    def __init__(self, model: Owl3Model, cache: TextKVCache, visual: VisualKV | None, graph: bool = False) -> None:
        if graph and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, not {model.device}")
        self.model, self.cache, self.visual = model, cache, visual
        self.cross = model.decode_plan(visual)
        self.index = torch.zeros(1, dtype=torch.long, device=model.device)
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, self.cache, self.index, self.visual, self.cross)

    def _capture(self, tokens: torch.Tensor) -> None:
        """Warm up on a side stream (the same column twice: harmless), then record the step."""
        self.tokens = tokens.clone()
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(self.tokens)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run(self.tokens)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if not self.use_graph:
            cache.reserve(1)
        elif cache.length >= cache.capacity:
            raise RuntimeError(f"the text cache is full ({cache.capacity} columns); reserve room before decoding")
        self.index.fill_(cache.length)
        if self.use_graph and self.graph is None:
            try:
                self._capture(tokens)
            except RuntimeError as exc:  # a kernel that cannot be captured: decode eagerly, correctly
                warnings.warn(f"decoding without a CUDA graph: capturing the decode step failed ({exc})", stacklevel=2)
                self.use_graph, self.graph = False, None
        if not self.use_graph:
            logits = self._run(tokens)
        else:
            assert self.graph is not None and self.tokens is not None and self.logits is not None
            self.tokens.copy_(tokens)
            self.graph.replay()
            logits = self.logits
        cache.advance()
        return logits


def generate(
    model: Owl3Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    media_offset: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    stop_token_ids: list[int] | None = None,
    cache: TextKVCache | None = None,
    visual: VisualKV | None = None,
    vision_chunk_size: int | None = None,
    cuda_graph: bool | None = None,
    **sampling: Any,
) -> GenerationOutput:
    """Generate for a processor batch. Sampling options as keywords (`max_new_tokens`, `do_sample`,
    `temperature`, `top_p`, `top_k`, `repetition_penalty`, `seed`) over the model's `generation_config`,
    or as `params`; `cuda_graph` as in `stream_tokens`."""
    params = make_params(params, model.generation_config, **sampling)
    stops = stop_token_ids if stop_token_ids is not None else default_stop_ids(model)
    state: dict[str, Any] = {}
    start = time.perf_counter()
    steps = list(
        stream_tokens(
            model, input_ids, attention_mask, media_offset, pixel_values, params, stops, cache, visual, vision_chunk_size, state, cuda_graph
        )
    )
    sequences = torch.stack(steps, dim=1)
    stop_hits = torch.isin(sequences, torch.tensor(stops, device=sequences.device)).long()
    first_stop = torch.where(stop_hits.any(1), stop_hits.argmax(1) + 1, torch.full_like(stop_hits[:, 0], sequences.shape[1]))
    return GenerationOutput(
        sequences=sequences,
        num_generated=first_stop.tolist(),
        prompt_tokens=input_ids.shape[1],
        first_token_s=state.get("first_token_s", 0.0),
        total_s=time.perf_counter() - start,
        cache=state["cache"],
        visual=state["visual"],
    )


def stream_text(
    model: Owl3Model,
    processor: Any,
    inputs: dict[str, Any],
    params: SamplingParams | None = None,
    state: dict[str, Any] | None = None,
    **stream_options: Any,
) -> Iterator[str]:
    """Text pieces of a one-row answer as they are generated, up to (not including) a stop token.

    `inputs`: processor output (`input_ids`, `media_offset`, `pixel_values`, ...) of batch size 1;
    `stream_options`: `cache`, `visual`, `vision_chunk_size` of `stream_tokens`. `state` receives what
    `stream_tokens` puts there plus `token_ids` (every sampled id, the stop token included) and `text`.
    """
    state = {} if state is None else state
    stops = processor.stop_token_ids
    text = TextStream(lambda ids: processor.decode(ids, skip_special_tokens=True))
    state["token_ids"] = sampled = []
    model_inputs = {k: inputs.get(k) for k in MODEL_INPUTS}
    for token in stream_tokens(model, **model_inputs, params=params, stop_token_ids=stops, state=state, **stream_options):
        sampled.append(int(token[0]))
        if sampled[-1] in stops:
            break
        piece = text.push(sampled[-1])
        if piece:
            yield piece
    tail = text.flush()
    state["text"] = text.emitted
    if tail:
        yield tail


class Owl3ForCausalLM(Owl3Model):
    """mPLUG-Owl3 with generation: `Owl3Model` (forward, checkpoint I/O) plus `generate`."""

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> GenerationOutput:
        """Generate from a processor batch; see `hyperowl.engine.generate.generate` for the options."""
        return generate(self, input_ids=input_ids, **kwargs)


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8 characters."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted) :], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        text = self.decode(self.ids)
        piece, self.emitted = text[len(self.emitted) :], text
        return piece
