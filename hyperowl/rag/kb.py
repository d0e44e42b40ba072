"""Reading a knowledge base: one JSON object a line, `{"id", "image", "text", "video"}`.

`image` / `video` are paths relative to the KB file (or absolute); each item needs at least one of
image, video and text. The whole file is checked before anything is embedded or written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hyperowl.rag.errors import KnowledgeBaseError

KB_KEYS = ("id", "image", "text", "video")


@dataclass(frozen=True)
class KBItem:
    """One knowledge item: `id`, absolute `image` / `video` paths ("" when absent), `text` ("" when absent)
    and `content_hash` (sha256 of the text and the media files' bytes: an item is re-embedded only when it changes)."""

    id: str
    image: str
    video: str
    text: str
    content_hash: str

    @property
    def media(self) -> str:
        """The picture kind the prompt shows: "image", "video" or "" (text only)."""
        return "image" if self.image else "video" if self.video else ""


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _media_path(base: Path, value: object, key: str, where: str) -> str:
    if value in (None, ""):
        return ""
    if not isinstance(value, str):
        raise KnowledgeBaseError(f"{where}: {key} must be a path string, got {type(value).__name__}")
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise KnowledgeBaseError(f"{where}: {key} file not found: {path}")
    return str(path.resolve())


def read_kb(path: str | Path) -> list[KBItem]:
    """All items of the KB file `path`, in file order (blank lines skipped). Raises `KnowledgeBaseError`
    naming the line for bad JSON, unknown keys, a missing id, an item without image, video and text, a
    missing media file or a duplicate id."""
    path = Path(path)
    if not path.is_file():
        raise KnowledgeBaseError(f"knowledge base not found: {path}")
    items: list[KBItem] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KnowledgeBaseError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise KnowledgeBaseError(f"{where}: expected a JSON object with keys {', '.join(KB_KEYS)}")
        unknown = sorted(set(row) - set(KB_KEYS))
        if unknown:
            raise KnowledgeBaseError(f"{where}: unknown keys {', '.join(unknown)}; expected {', '.join(KB_KEYS)}")
        item_id = row.get("id")
        if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id) == "":
            raise KnowledgeBaseError(f"{where}: every item needs an id (string or integer)")
        item_id = str(item_id)
        if item_id in seen:
            raise KnowledgeBaseError(f"{where}: duplicate id {item_id!r} (first on line {seen[item_id]})")
        seen[item_id] = number
        text = row.get("text") or ""
        if not isinstance(text, str):
            raise KnowledgeBaseError(f"{where}: text must be a string")
        image = _media_path(path.parent, row.get("image"), "image", where)
        video = _media_path(path.parent, row.get("video"), "video", where)
        if not (image or video or text.strip()):
            raise KnowledgeBaseError(f"{where}: item {item_id!r} has no image, video or text")
        digest = hashlib.sha256(json.dumps([text, bool(image), bool(video)]).encode())
        for media in (image, video):
            if media:
                digest.update(_file_digest(Path(media)).encode())
        items.append(KBItem(item_id, image, video, text, digest.hexdigest()))
    return items
