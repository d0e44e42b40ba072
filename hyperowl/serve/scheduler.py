"""The scheduler: one background thread owns the model and decodes all running requests in one batch.

Continuous batching: at every step the thread first takes waiting requests while the batch has room and
starts their prefills (`StagedPrefill`: each on its own, its own text cache and visual K/V), does one
piece of prefill work, then runs one decode step for every running row. A piece is one chunk of a
request's images, or its text once they are all in; while rows are decoding, a chunk whose video frames
are still being decoded is not waited for, so a long video stalls the running rows by at most one chunk
of vision work at a time. A prefilled request samples its first token and joins the batch. Rows leave
when they hit a stop token, a stop string, their `max_tokens`, their deadline, or when the client went away.

Each request samples with its own `SamplingParams` and seeded generator (`pick_row`), so its answer
does not depend on the other rows. Every row's token (and its logprobs) is picked on the device and
read back together, once per step (`pick_step`). Events reach the request's asyncio queue thread-safely.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hyperowl.engine.batching import DecodeBatch
from hyperowl.engine.generate import MODEL_INPUTS, StagedPrefill
from hyperowl.engine.sampling import SamplingParams, pick_row
from hyperowl.errors import MediaError
from hyperowl.serve.errors import ApiError, overloaded
from hyperowl.serve.media import media_error
from hyperowl.serve.media_cache import MediaCache
from hyperowl.serve.metrics import ServerMetrics

if TYPE_CHECKING:
    from hyperowl.model.owl3 import Owl3Model

log = logging.getLogger("hyperowl.serve")


#: One answer token's OpenAI `logprobs.content` entry: `token`, `logprob`, `bytes`, `top_logprobs`.
TokenLogprob = dict[str, Any]


@dataclass
class Prefilled:
    """The prompt and its media are in the model (video frames decoded and encoded); the answer follows."""


@dataclass
class TextDelta:
    """New answer text, with the logprob entries of the tokens taken since the last event (when requested)."""

    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finished:
    """The answer is complete. `finish_reason`: "stop" (stop token or string) or "length". `logprobs`:
    the entries no `TextDelta` carried (tokens whose text was held back and never sent)."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Failed:
    """The request ended with an error (timeout, server error)."""

    error: ApiError


Event = Prefilled | TextDelta | Finished | Failed


class Job:
    """One chat completion as the scheduler sees it: the processed prompt, how to sample, where events go.

    Created on the event loop of the HTTP request; `events` receives `Prefilled`, `TextDelta`s, then one
    `Finished`, or a `Failed` at any point. `cancel()` (client gone) makes the scheduler drop it at its next step. `top_logprobs`:
    None for no logprobs, else how many alternatives each token's logprob entry lists (0-20).
    """

    def __init__(
        self,
        batch: dict[str, Any],
        params: SamplingParams,
        stop_strings: list[str],
        ignore_eos: bool,
        timeout_s: float,
        top_logprobs: int | None = None,
    ) -> None:
        self.batch = batch
        self.top_logprobs = top_logprobs
        self.params = params
        self.stop_strings = stop_strings
        self.ignore_eos = ignore_eos
        self.prompt_tokens = int(batch["attention_mask"].sum())
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self.timeout_s = timeout_s
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        """Deliver `event` from any thread; a request whose loop is gone is cancelled instead."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            self.cancel()

    def expired(self, now: float) -> bool:
        """Whether the job ends before it runs on: cancelled, or past its deadline (then told so)."""
        if self.cancelled:
            return True
        if now > self.deadline:
            self.emit(self.timed_out())
            return True
        return False

    def timed_out(self) -> Failed:
        return Failed(
            ApiError(
                408,
                f"the request did not finish within {self.timeout_s:g} s (limit request_timeout_s)",
                type="timeout",
                code="request_timeout_s",
            )
        )


class StopStrings:
    """Finds stop strings in a growing answer, looking only at its end: each check costs
    O(longest stop string + new text), however long the answer grows."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.longest = max(map(len, stops), default=0)

    def find(self, text: str, searched: int) -> int:
        """Where the first stop string in `text` begins, or -1; `text[:searched]` held none."""
        start = max(0, searched - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits, default=-1)

    def held(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of a stop string (and so may become one)."""
        longest = 0
        for stop in self.stops:
            tail = text[len(text) - min(len(text), len(stop) - 1) :]
            i = tail.find(stop[0])
            while i >= 0 and len(tail) - i > longest:
                if stop.startswith(tail[i:]):
                    longest = len(tail) - i
                    break
                i = tail.find(stop[0], i + 1)
        return longest


class Row:
    """A running request: its sampler state and the answer text streamed so far."""

    def __init__(self, job: Job, decode: Callable[[list[int]], str], stop_ids: set[int], device: torch.device) -> None:
        self.job = job
        self.decode = decode
        self.stop_ids = set() if job.ignore_eos else stop_ids
        self.stops = StopStrings(job.stop_strings)
        self.searched = 0  # characters of the answer searched for stop strings
        self.generator = job.params.generator(device)
        # the repetition penalty's history: the prompt, then every answer token (as `generate` keeps it)
        self.history: torch.Tensor | None = None
        if job.params.repetition_penalty != 1.0:
            self.history = job.batch["input_ids"][0][job.batch["attention_mask"][0].bool()].to(device)
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # entries not sent yet
        self.sent = 0
        self.count = 0
        self.last = 0

    @property
    def plain_greedy(self) -> bool:
        """Greedy without a repetition penalty or logprobs: the token is the argmax, nothing else to keep."""
        params = self.job.params
        return params.greedy and params.repetition_penalty == 1.0 and self.job.top_logprobs is None

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token from this row's `logits` `[vocab]`, as a 0-d tensor on their device (nothing is
        read back)."""
        token = pick_row(logits, self.job.params, self.history, self.generator)
        if self.history is not None:
            self.history = torch.cat([self.history, token[None]])
        return token

    def logprob_figures(self, logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor | None:
        """What the logprobs entry of `token` needs, on the device, float64 `[1 + 2 n]`: the token's logprob
        under the model's own distribution (before temperature, top-k/p and penalty), then the `n =
        top_logprobs` largest logprobs and their ids. None when the request did not ask for logprobs."""
        if self.job.top_logprobs is None:
            return None
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, self.job.top_logprobs)
        return torch.cat([logprobs[token][None], top.values, top.indices.float()]).double()

    def _logprob_entry(self, token: int, figures: list[float]) -> TokenLogprob:
        """The OpenAI entry of `token` from its `logprob_figures`, read back."""
        n = self.job.top_logprobs or 0

        def item(token_id: int, value: float) -> TokenLogprob:
            text = self.decode([token_id])
            return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

        entry = item(token, figures[0])
        entry["top_logprobs"] = [item(int(i), v) for v, i in zip(figures[1 : 1 + n], figures[1 + n :])]
        return entry

    def accept(self, token: int, figures: list[float] | None = None) -> str | None:
        """Take the next token (with its `logprob_figures` read back, when the request asked for logprobs),
        emit the text that is now certain; return a finish reason when done."""
        self.count += 1
        self.last = token
        if token in self.stop_ids:
            self._send(self.decode(self.ids))
            return "stop"
        if figures is not None:
            self.logprobs.append(self._logprob_entry(token, figures))
        self.ids.append(token)
        text = self.decode(self.ids)
        hit = self.stops.find(text, self.searched)
        if hit >= 0:
            self._send(text[:hit])
            return "stop"
        self.searched = len(text.rstrip("\ufffd"))  # an incomplete character at the end may still change
        if self.count >= self.job.params.max_new_tokens:
            self._send(text)
            return "length"
        self._send(self._certain(text))
        return None

    def _certain(self, text: str) -> str:
        """`text` without what may still change: an incomplete UTF-8 character at the end, and an end
        that could be the beginning of a stop string."""
        text = text.rstrip("\ufffd")
        return text[: len(text) - self.stops.held(text)]

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.job.emit(TextDelta(text[self.sent :], self.take_logprobs()))
            self.sent = len(text)

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """The unsent logprob entries (None when the request did not ask for logprobs)."""
        if self.job.top_logprobs is None:
            return None
        taken, self.logprobs = self.logprobs, []
        return taken


def pick_step(rows: list[Row], logits: torch.Tensor) -> list[tuple[int, list[float] | None] | Exception]:
    """Every row's next token from its row of `logits` `[B, vocab]`, with its logprob figures when the row
    asked for them (`Row.logprob_figures`), or the exception that row's own picking raised. Plain greedy
    rows take the argmax, the others pick with their own settings and generator; all on the device, read
    back together once."""
    tokens = logits.argmax(-1)
    figures: dict[int, torch.Tensor] = {}
    failed: dict[int, Exception] = {}
    for i, row in enumerate(rows):
        if row.plain_greedy:
            continue
        try:
            token = row.pick(logits[i])
            tokens[i] = token
            row_figures = row.logprob_figures(logits[i], token)
            if row_figures is not None:
                figures[i] = row_figures
        except Exception as exc:  # noqa: BLE001 - one row's bad settings must not fail the others
            failed[i] = exc
    values = torch.cat([tokens.double(), *figures.values()]).tolist()  # the one read back
    picks: list[tuple[int, list[float] | None] | Exception] = []
    offset = len(rows)
    for i in range(len(rows)):
        if i in failed:
            picks.append(failed[i])
            continue
        row_figures = None
        if i in figures:
            size = figures[i].numel()
            row_figures, offset = values[offset : offset + size], offset + size
        picks.append((int(values[i]), row_figures))
    return picks


@dataclass
class Admission:
    """A request being prefilled: its row (sampler state) and its staged prefill."""

    row: Row
    prefill: StagedPrefill


class Scheduler:
    """Owns the model in a background thread; `submit` jobs from the HTTP side.

    `max_batch_size` rows decode together (1: one request at a time); at most `max_queue` jobs wait.
    An exception while admitting or decoding fails the requests concerned (500) and the thread goes on;
    if the thread dies anyway, every waiting job fails and `on_death(exc)` is called (the server exits).
    """

    def __init__(
        self,
        model: Owl3Model,
        decode: Callable[[list[int]], str],
        stop_ids: list[int],
        metrics: ServerMetrics,
        max_batch_size: int,
        max_queue: int,
        vision_chunk_size: int | None = None,
        on_death: Callable[[BaseException], None] | None = None,
        media_cache: MediaCache | None = None,
    ) -> None:
        self.model = model
        self.media_cache = media_cache
        self.on_death = on_death
        self.decode = decode
        self.stop_ids = set(stop_ids)
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.vision_chunk_size = vision_chunk_size
        self.batch = DecodeBatch(model)
        self.rows: list[Row] = []
        self.prefilling: deque[Admission] = deque()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hyperowl-scheduler", daemon=True)

    @property
    def queued(self) -> int:
        """Jobs waiting for a batch slot."""
        return len(self._pending)

    @property
    def active(self) -> int:
        """Rows being decoded."""
        return len(self.rows)

    @property
    def occupied(self) -> int:
        """Batch slots taken: rows being decoded and requests being prefilled."""
        return len(self.rows) + len(self.prefilling)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail every job and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def check_room(self) -> None:
        """503 unless one more job may queue now (`submit` checks again)."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        if self._stopping or not self.alive:
            raise overloaded("the server is shutting down", "shutting_down")
        waiting = len(self._pending) + self.occupied - self.max_batch_size  # beyond the free batch slots
        if waiting >= self.max_queue:
            raise overloaded(f"too many requests waiting ({max(waiting, 0)}) (limit max_queue)", "max_queue")

    def submit(self, job: Job) -> None:
        """Queue `job`; 503 when the queue is full or the scheduler has stopped."""
        with self._cond:
            self._check_room()
            self._pending.append(job)
            self._cond.notify()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            log.critical("the scheduler thread died", exc_info=exc)
            with self._cond:
                self._stopping = True
                died = ApiError(500, f"the scheduler stopped: {type(exc).__name__}", type="server_error", code="internal_error")
                for job in self._all_jobs():
                    job.emit(Failed(died))
                self._pending.clear()
                self.rows = []
                self._drop_prefills()
            if self.on_death is not None:
                self.on_death(exc)

    def _all_jobs(self) -> list[Job]:
        return [*self._pending, *(a.row.job for a in self.prefilling), *(row.job for row in self.rows)]

    def _drop_prefills(self) -> None:
        for admission in self.prefilling:
            admission.prefill.close()
        self.prefilling.clear()

    def _serve(self) -> None:
        with torch.inference_mode():
            while True:
                jobs = self._take()
                if self._stopping:
                    break
                for job in jobs:
                    self._admit(job)
                self._prefill_piece()
                if self.rows:
                    self._step()
        stopped = overloaded("the server is shutting down", "shutting_down")
        for job in self._all_jobs():
            job.emit(Failed(stopped))
        self._drop_prefills()

    def _take(self) -> list[Job]:
        """Wait until there is work; return the waiting jobs that fit in the batch now."""
        with self._cond:
            while not self._stopping and not self._pending and not self.rows and not self.prefilling:
                self._cond.wait()
            now = time.monotonic()
            for job in [j for j in self._pending if j.expired(now)]:
                self._pending.remove(job)
            taken = []
            while self._pending and self.occupied + len(taken) < self.max_batch_size:
                taken.append(self._pending.popleft())
            return taken

    def _admit(self, job: Job) -> None:
        """Start `job`'s prefill (its memory is checked here, before any image is encoded)."""
        try:
            row = Row(job, self.decode, self.stop_ids, self.model.device)
            inputs = {k: job.batch.get(k) for k in MODEL_INPUTS}
            if job.batch.get("media") and self.media_cache is not None:  # kept features, or pixels to encode and keep
                inputs["pixel_values"] = self.media_cache.feature_stream(self.model, job.batch["media"], self.vision_chunk_size)
            self.prefilling.append(Admission(row, StagedPrefill(self.model, **inputs, vision_chunk_size=self.vision_chunk_size)))
        except Exception as exc:  # noqa: BLE001 - a bad request must not stop the server; logged there
            self._prefill_failed(job, exc)

    def _prefill_piece(self) -> None:
        """One piece of prefill work: the next image chunk or the text of the oldest request that can go
        on without waiting for frames to decode (with no rows running, the oldest, waiting if it must).
        Cancelled and timed-out requests are dropped first."""
        now = time.monotonic()
        for admission in [a for a in self.prefilling if a.row.job.expired(now)]:
            self.prefilling.remove(admission)
            admission.prefill.close()
        if not self.prefilling:
            return
        admission = next((a for a in self.prefilling if a.prefill.ready()), None) if self.rows else self.prefilling[0]
        if admission is None:
            return
        job = admission.row.job
        try:
            if not admission.prefill.encoded:
                admission.prefill.advance()
                return
            self.prefilling.remove(admission)
            logits, cache, visual = admission.prefill.finish()
            job.emit(Prefilled())
            pick = pick_step([admission.row], logits)[0]
            if isinstance(pick, Exception):
                raise pick
            finish = admission.row.accept(*pick)
        except Exception as exc:  # noqa: BLE001 - a bad request must not stop the server; logged there
            if admission in self.prefilling:
                self.prefilling.remove(admission)
            admission.prefill.close()
            self._prefill_failed(job, exc)
            return
        self.metrics.first_token.observe(time.monotonic() - job.submitted)
        self.metrics.count_tokens(1)
        if finish is not None:
            self._finish(admission.row, finish)
            return
        self.batch.join(cache, visual)
        self.rows.append(admission.row)

    def _prefill_failed(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, MediaError):  # a video that stops decoding while its frames are encoded
            job.emit(Failed(media_error(str(exc))))
            return
        log.exception("prefill failed", exc_info=exc)
        job.emit(Failed(ApiError(500, f"prefill failed: {exc}", type="server_error", code="internal_error")))

    def _step(self) -> None:
        """One decode step for every row, then drop the rows that are done. A failing batch forward fails
        every row; a row whose own sampling or text handling fails is dropped alone."""
        try:
            tokens = torch.tensor([row.last for row in self.rows], dtype=torch.long)
            logits = self.batch.step(tokens, room=max(row.job.params.max_new_tokens - row.count for row in self.rows))
        except Exception as exc:
            log.exception("decode step failed")
            error = ApiError(500, f"decode step failed: {exc}", type="server_error", code="internal_error")
            for row in self.rows:
                row.job.emit(Failed(error))
            self.rows, self.batch = [], DecodeBatch(self.model)
            return
        reasons: list[str | None | Exception] = []
        for row, pick in zip(self.rows, pick_step(self.rows, logits)):
            try:
                if isinstance(pick, Exception):
                    raise pick
                reasons.append(row.accept(*pick))
            except Exception as exc:
                log.exception("sampling a row failed")
                reasons.append(exc)
        self.metrics.count_tokens(len(self.rows))
        self.metrics.decode_batch.observe(len(self.rows))
        now = time.monotonic()
        keep = []
        for i, (row, reason) in enumerate(zip(self.rows, reasons)):
            if isinstance(reason, Exception):
                row.job.emit(Failed(ApiError(500, f"decode step failed: {reason}", type="server_error", code="internal_error")))
            elif reason is not None:
                self._finish(row, reason)
            elif row.job.cancelled:
                continue
            elif now > row.job.deadline:
                row.job.emit(row.job.timed_out())
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            self.batch.keep(keep)
            self.rows = [self.rows[i] for i in keep]

    def _finish(self, row: Row, reason: str) -> None:
        self.metrics.request_seconds.observe(time.monotonic() - row.job.submitted)
        row.job.emit(Finished(reason, row.job.prompt_tokens, row.count, row.take_logprobs()))
