"""Picture embeddings from a checkpoint's own vision tower, and the tower's fingerprint."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from hyperowl.model.owl3 import Owl3Model
from hyperowl.processing.image import image_to_tensor, load_image
from hyperowl.processing.video import load_video


def tower_fingerprint(model: Owl3Model) -> str:
    """sha256 (first 16 hex digits) of the vision tower's config and weights rounded to bfloat16: the same
    for one checkpoint loaded in float32 or bfloat16 on any device, different for any other tower."""
    digest = hashlib.sha256(json.dumps(asdict(model.config.vision_config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.vision_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


class PictureEmbedder:
    """Mean-pooled vision-tower features of pictures, L2-normalised: `[n, vision_hidden]` float32.

    A video is the normalised mean of its sampled frames' embeddings (`video_frames` at most, 1 fps).
    """

    def __init__(self, model: Owl3Model, image_size: int, video_frames: int = 8) -> None:
        self.model = model
        self.image_size = image_size
        self.video_frames = video_frames
        self.fingerprint = tower_fingerprint(model)
        self.dim = model.config.vision_config.hidden_size

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> `[n, dim]` unit vectors."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = image_to_tensor(list(images), self.image_size).to(self.model.device, self.model.dtype)
        features = self.model.vision_model(pixels).float().mean(dim=1)  # [n, tokens, dim] -> [n, dim]
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()

    def embed_paths(self, images: Sequence[str], videos: Sequence[str]) -> np.ndarray:
        """Image files and video files -> `[len(images) + len(videos), dim]`, images first."""
        vectors = [self.embed_images([load_image(p) for p in images])]
        for path in videos:
            frames = load_video(path, fps=1.0, max_frames=self.video_frames).frames
            mean = self.embed_images(frames).mean(axis=0, keepdims=True)
            vectors.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        return np.concatenate(vectors).astype(np.float32)
