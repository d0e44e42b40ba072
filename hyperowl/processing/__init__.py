"""Turning conversations, images and videos into mPLUG-Owl3 model inputs."""

from hyperowl.processing.image import cut_image, cut_placeholder, image_to_tensor, load_image, select_cut_anchor
from hyperowl.processing.processor import IGNORE_INDEX, Owl3Batch, Owl3Processor
from hyperowl.processing.template import render_chat, render_chat_with_spans
from hyperowl.processing.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from hyperowl.processing.video import VideoClip, iter_video_chunks, load_video, sample_frame_indices

__all__ = [
    "ENDOFTEXT",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IM_END",
    "IM_START",
    "VIDEO_TOKEN",
    "Owl3Batch",
    "Owl3Processor",
    "Tokenizer",
    "VideoClip",
    "cut_image",
    "cut_placeholder",
    "image_to_tensor",
    "iter_video_chunks",
    "load_image",
    "load_tokenizer",
    "load_video",
    "render_chat",
    "render_chat_with_spans",
    "sample_frame_indices",
    "select_cut_anchor",
    "train_tokenizer",
]
