"""Write synthetic samples as a JSONL data set with media files (the layout `hyperowl train` reads)."""

from __future__ import annotations

import json
from pathlib import Path

from hyperowl.synthetic.tasks import TaskOptions, make_sample


def write_dataset(
    out_dir: str | Path, tasks: list[str], n: int, seed: int, opts: TaskOptions | None = None
) -> Path:
    """Write `n` samples of each task to `out_dir/data.jsonl` and their media to `out_dir/media/`.

    Each line: `{"messages": [...], "images": ["media/..png"], "videos": ["media/..mp4"], "task", "answer"}`,
    media paths relative to the JSONL's folder. Returns the JSONL path.
    """
    out_dir = Path(out_dir)
    media = out_dir / "media"
    media.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "data.jsonl"
    with jsonl.open("w") as f:
        for task in tasks:
            for i in range(n):
                sample = make_sample(task, seed, i, opts)
                images, videos = [], []
                for k, image in enumerate(sample.images):
                    name = f"media/{task}-{i}-{k}.png"
                    image.save(out_dir / name)
                    images.append(name)
                for k, video in enumerate(sample.videos):
                    name = f"media/{task}-{i}-{k}.mp4"
                    video.write_mp4(out_dir / name)
                    videos.append(name)
                row = {"messages": sample.messages, "images": images, "videos": videos, "task": task, "answer": sample.answer}
                f.write(json.dumps(row) + "\n")
    return jsonl
