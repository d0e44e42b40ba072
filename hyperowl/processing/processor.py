"""``Owl3Processor``: conversations + images/videos -> model inputs (token ids, media offsets, pixels)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hyperowl.errors import CheckpointError, PromptError
from hyperowl.hub import checkpoint_dir
from hyperowl.model.owl3 import DEFAULT_CHUNK_SIZE, PixelStream
from hyperowl.processing.image import DEFAULT_MAX_PIXELS, cut_image, cut_placeholder, image_to_tensor, load_image
from hyperowl.processing.stream import MediumViews, image_views, pixel_stream, video_views
from hyperowl.processing.template import Message, message_text, part_media, render_chat_with_spans
from hyperowl.processing.tokenizer import (
    END_VIDEO_FRAME,
    ENDOFTEXT,
    IM_END,
    IMAGE_TOKEN,
    MARKERS_241101,
    START_VIDEO_FRAME,
    VIDEO_TOKEN,
    Tokenizer,
    load_tokenizer,
    single_token_id,
)
from hyperowl.processing.video import FILE_MAX_FRAMES, VideoClip, VideoPlan, load_video, plan_video

#: One media placeholder (`<|image|>` or `<|video|>`) in message text.
MEDIA_PATTERN = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")

#: Label value ignored by the loss.
IGNORE_INDEX = -100

#: Prompt formats of the official releases. "241101" follows the 241101 model card and a public port of
#: its image processor (templates ``v3_global`` and the video-frame span); unverified against the
#: released 241101 tokenizer (the marker ids) and its remote modeling code, of which no public copy is known.
PROMPT_FORMATS: tuple[str, ...] = ("240728", "241101")


class Owl3Batch(dict):
    """Model inputs; a dict (so ``model(**batch)`` works) with attribute access.

    Keys: ``input_ids`` ``[B, T]`` long, ``attention_mask`` ``[B, T]`` long (0 on left padding),
    ``media_offset`` ``[B, T, 2]`` long, ``pixel_values`` ``[N, 3, S, S]`` float32, a
    :class:`~hyperowl.model.owl3.PixelStream` of them (``stream_video=True``), or None (no images), and
    ``labels`` ``[B, T]`` long (-100 outside assistant answers) when asked for.

    Attribute ``frame_timestamps`` (not a key): per sample, per video, the sampled frames' times in
    seconds (a streamed video file's are filled in as its frames are decoded).
    """

    def __init__(self, data: Mapping[str, Any], frame_timestamps: list[list[list[float]]]) -> None:
        super().__init__(data)
        self.frame_timestamps = frame_timestamps

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Owl3Batch:
        """Copy with every tensor on ``device``; ``dtype`` (if given) applies to ``pixel_values`` only. A
        ``PixelStream`` stays as it is: the model moves each chunk to its device and dtype."""
        moved = {}
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and key == "pixel_values" and value.is_floating_point() else None
                value = value.to(device=device, dtype=cast)
            moved[key] = value
        return Owl3Batch(moved, self.frame_timestamps)


class Owl3Processor:
    """Turns ChatML conversations with images/videos into :class:`Owl3Batch` model inputs.

    Args:
        tokenizer: a tokenizer in which ``<|image|>`` is a single token.
        image_size: side of every image view fed to the vision tower (``vision_config.image_size``).
        cut_enable: cut images into tiles + a global view (video frames are never cut).
        max_pixels: largest accepted image ``width * height``.
        video_fps: frames per second sampled from videos before the ``max_frames`` cap.
        max_frames: most frames kept per video file. A video given as a list of frames keeps all
            its frames (as the official processor does) unless a call passes ``max_frames``.
        prompt_format: ``"240728"`` (cut images as ``Cut to ... subimg(i,j)<|image|> ...``, video
            frames as bare ``<|image|>``) or ``"241101"`` (SPEC §4b: ``<|start_cut|>`` ... ``<|end_cut|>``,
            frames between ``<|start_video_frame|>`` and ``<|end_video_frame|>``; the tokenizer must
            hold those markers as single tokens). Both cut every image of a message, each to its own grid.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int,
        cut_enable: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        video_fps: float = 1.0,
        max_frames: int = FILE_MAX_FRAMES,
        prompt_format: str = "240728",
    ) -> None:
        image_token_id = single_token_id(tokenizer, IMAGE_TOKEN)
        if image_token_id is None:
            raise CheckpointError(f"the tokenizer does not encode {IMAGE_TOKEN} as a single token")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else single_token_id(tokenizer, ENDOFTEXT)
        if pad_id is None or pad_id == image_token_id:
            raise CheckpointError(f"the tokenizer has no usable pad token (nor {ENDOFTEXT} as one token)")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}; got {prompt_format!r}")
        if prompt_format == "241101" and not has_241101_markers(tokenizer):
            raise CheckpointError(f"prompt_format 241101 needs the tokens {', '.join(MARKERS_241101)}; the tokenizer lacks some")
        self.prompt_format = prompt_format
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.cut_enable = cut_enable
        self.max_pixels = max_pixels
        self.video_fps = video_fps
        self.max_frames = max_frames
        self._image_token_id = image_token_id
        self._pad_token_id = pad_id

    @classmethod
    def from_pretrained(cls, path: str | Path, prompt_format: str | None = None, **overrides: Any) -> Owl3Processor:
        """Build from a checkpoint directory (or Hub repository id): its tokenizer files and ``config.json``'s
        ``vision_config.image_size``; keyword ``overrides`` replace constructor arguments.

        ``prompt_format`` None chooses from the checkpoint: ``"241101"`` when the tokenizer holds the
        241101 media markers as single tokens and the model is the fused variant (``config.json``
        says so, or the weights have no hyper-attention ``gate_proj``), else ``"240728"``.
        """
        path = checkpoint_dir(path)
        tokenizer = load_tokenizer(path)
        if prompt_format is None:
            # Imported here: importing hyperowl.processing does not load the model code.
            from hyperowl.model.checkpoint import is_fused_checkpoint

            fused = has_241101_markers(tokenizer) and is_fused_checkpoint(path)
            prompt_format = "241101" if fused else "240728"
        overrides["prompt_format"] = prompt_format
        if "image_size" not in overrides:
            config_file = path / "config.json"
            try:
                config = json.loads(config_file.read_text())
                overrides["image_size"] = int(config["vision_config"]["image_size"])
            except FileNotFoundError as exc:
                raise CheckpointError(f"missing {config_file}") from exc
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{config_file} has no usable vision_config.image_size") from exc
        return cls(tokenizer, **overrides)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer files to ``path`` (image settings live in the model's config.json)."""
        self.tokenizer.save_pretrained(str(path))

    @property
    def image_token_id(self) -> int:
        """Id of ``<|image|>``."""
        return self._image_token_id

    @property
    def pad_token_id(self) -> int:
        """Id used for left padding."""
        return self._pad_token_id

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: ``<|im_end|>`` and ``<|endoftext|>`` (those the tokenizer has)."""
        ids = (single_token_id(self.tokenizer, token) for token in (IM_END, ENDOFTEXT))
        return [i for i in ids if i is not None]

    def decode(self, ids: Sequence[int] | torch.Tensor, **kwargs: Any) -> str:
        """``tokenizer.decode`` passthrough."""
        return self.tokenizer.decode(ids, **kwargs)

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        """``tokenizer.batch_decode`` passthrough."""
        return self.tokenizer.batch_decode(ids, **kwargs)

    def __call__(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        images: Sequence[Any] | None = None,
        videos: Sequence[Any] | None = None,
        *,
        cut_enable: bool | None = None,
        max_frames: int | None = None,
        fps: float | None = None,
        add_generation_prompt: bool = True,
        return_labels: bool = False,
        stream_video: bool = False,
        stream_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> Owl3Batch:
        """Process one conversation or a batch of conversations.

        Args:
            messages: one conversation (list of ``{"role", "content"}`` dicts) or a list of them.
            images: for one conversation, its images in ``<|image|>`` order (paths, bytes, PIL
                images, arrays); for a batch, one such list (or None) per conversation. None takes
                the ``"image"`` values of the messages' image parts.
            videos: like ``images`` for ``<|video|>``; a video is a file (path/bytes), a
                :class:`VideoPlan` (a file planned with :func:`plan_video`, e.g. with another
                ``sampling``), a list of frames, or a :class:`VideoClip`.
            cut_enable, fps: per-call overrides of the processor settings.
            max_frames: cap on the frames of every video of this call, files and frame lists; None:
                files keep the processor's ``max_frames``, frame lists all their frames.
            add_generation_prompt: end with an open assistant turn when the conversation does not
                end with an assistant answer.
            return_labels: add ``labels`` (token ids inside assistant answers, -100 elsewhere).
            stream_video: make ``pixel_values`` a :class:`~hyperowl.model.owl3.PixelStream`: video
                files are only planned here (their packet index gives the frame count) and are decoded
                while the model encodes the frames, ``stream_chunk_size`` views a chunk, at most three
                chunks of pixels at once (one being encoded, two made ahead in a background
                thread). Each model call decodes them anew. Images and frame lists are converted a
                chunk at a time too; the model's results equal those of the whole tensor.

        Returns:
            An :class:`Owl3Batch`; images of sample 0 come first in ``pixel_values``, then those
            of sample 1, ...; a cut image contributes its tiles then its global view, a video its
            frames.

        Raises:
            PromptError: bad messages, or placeholder counts that differ from the media counts.
            MediaError: media that cannot be loaded (a streamed video file that stops decoding:
                while the model consumes ``pixel_values``).
        """
        conversations, is_batch = _split_batch(messages)
        image_lists = _per_sample(images, conversations, is_batch, "image")
        video_lists = _per_sample(videos, conversations, is_batch, "video")
        cut = self.cut_enable if cut_enable is None else cut_enable
        sample_fps = self.video_fps if fps is None else fps

        media: list[MediumViews] = []
        first_image: list[int] = []
        token_lists: list[list[int]] = []
        label_lists: list[list[int]] = []
        frame_timestamps: list[list[list[float]]] = []
        for index, (conversation, sample_images, sample_videos) in enumerate(
            zip(conversations, image_lists, video_lists)
        ):
            texts = [message_text(message) for message in conversation]
            joined = "".join(texts)
            _check_count(joined.count(IMAGE_TOKEN), len(sample_images), "image", index, is_batch)
            _check_count(joined.count(VIDEO_TOKEN), len(sample_videos), "video", index, is_batch)
            first_image.append(sum(medium.count for medium in media))
            expanded_texts, sample_media, timestamps = self.expand_media(
                texts, sample_images, sample_videos, cut, sample_fps, max_frames, stream_video
            )
            media.extend(sample_media)
            frame_timestamps.append(timestamps)
            expanded = [{"role": m["role"], "content": t} for m, t in zip(conversation, expanded_texts)]
            prompt, spans = render_chat_with_spans(expanded, add_generation_prompt)
            encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=return_labels)
            ids = list(encoded["input_ids"])
            token_lists.append(ids)
            if return_labels:
                label_lists.append(
                    [
                        token if any(s <= start < e for s, e in spans) else IGNORE_INDEX
                        for token, (start, _) in zip(ids, encoded["offset_mapping"])
                    ]
                )

        input_ids, attention_mask = left_pad([torch.tensor(ids, dtype=torch.long) for ids in token_lists], self._pad_token_id)
        is_image = input_ids == self._image_token_id
        seen = torch.cumsum(is_image, dim=1) - is_image.long()
        first = torch.tensor(first_image, dtype=torch.long)[:, None].expand_as(seen)
        pixel_values: torch.Tensor | PixelStream | None = None
        if stream_video and media:
            pixel_values = pixel_stream(media, self.image_size, stream_chunk_size)
        elif media:
            views = [view for medium in media for piece in medium.pieces(medium.count) for view in piece]
            pixel_values = image_to_tensor(views, self.image_size)
        data: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "media_offset": torch.stack([first, first + seen], dim=-1),
            "pixel_values": pixel_values,
        }
        if return_labels:
            data["labels"] = left_pad([torch.tensor(labels, dtype=torch.long) for labels in label_lists], IGNORE_INDEX)[0]
        return Owl3Batch(data, frame_timestamps)

    def expand_media(
        self,
        texts: list[str],
        images: list[Any],
        videos: list[Any],
        cut: bool,
        fps: float,
        max_frames: int | None,
        stream: bool = False,
    ) -> tuple[list[str], list[MediumViews], list[list[float]]]:
        """Load one conversation's media and expand its placeholders, in order of appearance.

        A video file is planned with ``fps`` and ``max_frames`` (None: the processor's ``max_frames``)
        and, without ``stream``, decoded now, as is a :class:`VideoPlan`; with ``stream`` their
        frames are decoded only when the returned views are iterated. A frame list keeps at most
        ``max_frames`` frames (None: all).

        Returns:
            ``(texts, media, timestamps)``: the message texts with each cut image's ``<|image|>``
            replaced by :func:`cut_placeholder` and each ``<|video|>`` by one ``<|image|>`` per
            frame; the views of each medium (tiles and global view, frames, uncut image) in token
            order; and the frame times of each video (a streamed file's filled in as it decodes).
        """
        image_iter, video_iter = iter(images), iter(videos)
        media: list[MediumViews] = []
        timestamps: list[list[float]] = []

        def expand(match: re.Match[str]) -> str:
            if match.group(0) == IMAGE_TOKEN:
                image = load_image(next(image_iter), self.max_pixels)
                if not cut:
                    media.append(image_views([image]))
                    return IMAGE_TOKEN
                tiles, (rows, cols) = cut_image(image, self.image_size)
                media.append(image_views(tiles))
                return cut_placeholder(rows, cols, self.prompt_format)
            video = next(video_iter)
            if isinstance(video, (str, Path, bytes, bytearray)):
                cap = self.max_frames if max_frames is None else max_frames
                video = plan_video(video, fps=fps, max_frames=cap, max_pixels=self.max_pixels)
            times: list[float] = []
            if isinstance(video, VideoPlan) and stream:
                medium = video_views(video, self.image_size, times)
            else:
                if isinstance(video, VideoPlan):
                    clip = video.load(frame_size=self.image_size)
                elif isinstance(video, VideoClip):
                    clip = video
                else:
                    clip = load_video(video, fps=fps, max_frames=max_frames)
                times.extend(clip.timestamps)
                medium = image_views(clip.frames)
            media.append(medium)
            timestamps.append(times)
            if self.prompt_format == "241101":
                return START_VIDEO_FRAME + IMAGE_TOKEN * medium.count + END_VIDEO_FRAME
            return IMAGE_TOKEN * medium.count

        return [MEDIA_PATTERN.sub(expand, text) for text in texts], media, timestamps


def has_241101_markers(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer encodes every 241101 media marker (:data:`MARKERS_241101`) as one token."""
    return all(single_token_id(tokenizer, marker) is not None for marker in MARKERS_241101)


def _split_batch(messages: Any) -> tuple[list[Sequence[Message]], bool]:
    """Return ``(conversations, is_batch)`` for one conversation or a list of conversations."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise PromptError("messages must be a non-empty list of message dicts or a list of such lists")
    if all(isinstance(m, Mapping) for m in messages):
        return [messages], False
    if all(isinstance(c, Sequence) and not isinstance(c, (str, Mapping)) for c in messages):
        return list(messages), True
    raise PromptError("messages mixes message dicts and conversations; pass one conversation or a list of them")


def _per_sample(
    media: Any, conversations: list[Sequence[Message]], is_batch: bool, kind: str
) -> list[list[Any]]:
    """One media list per conversation; None takes the sources carried in the content parts."""
    if media is None:
        return [part_media(conversation, kind) for conversation in conversations]
    if not is_batch:
        return [list(media) if isinstance(media, (list, tuple)) else [media]]
    if not isinstance(media, (list, tuple)) or len(media) != len(conversations):
        count = len(media) if isinstance(media, (list, tuple)) else 1
        raise PromptError(f"got {count} {kind} lists for {len(conversations)} conversations; pass one list per conversation")
    return [[] if item is None else list(item) if isinstance(item, (list, tuple)) else [item] for item in media]


def _check_count(placeholders: int, given: int, kind: str, index: int, is_batch: bool) -> None:
    if placeholders != given:
        token = IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN
        where = f" in conversation {index}" if is_batch else ""
        raise PromptError(f"{placeholders} {token} placeholder(s) but {given} {kind}(s) given{where}")


def left_pad(rows: Sequence[torch.Tensor], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D tensors to one length with `fill`: ``(values [B, T], mask [B, T])``.

    `values` has the rows' dtype and device; `mask` is long, 1 on the rows' entries and 0 on the padding.
    """
    length = max(row.shape[0] for row in rows)
    values = torch.full((len(rows), length), fill, dtype=rows[0].dtype, device=rows[0].device)
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=rows[0].device)
    for b, row in enumerate(rows):
        values[b, length - row.shape[0] :] = row
        mask[b, length - row.shape[0] :] = 1
    return values, mask
