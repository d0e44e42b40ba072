"""Where a checkpoint comes from: a local directory, or a Hugging Face Hub repository id (`org/name`)
whose files are fetched once into the Hub cache (`huggingface_hub.snapshot_download`) and read from there."""

from __future__ import annotations

import re
from pathlib import Path

from hyperowl.errors import CheckpointError

#: The bundled small model (trained on synthetic data) that every command uses without `--model`.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default-model"

#: A Hub repository id: `owner/name`.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: The files of a checkpoint that hyperowl reads; pickled `*.bin` weights and remote code are not fetched.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def checkpoint_dir(path: str | Path) -> Path:
    """`path` when it exists locally (or does not look like a repository id); otherwise the local
    snapshot of the Hub repository `path` (downloaded on first use, then taken from the cache).

    Raises:
        CheckpointError: the repository could not be fetched (offline, unknown, gated), naming it.
    """
    local = Path(path)
    if local.exists() or not REPO_ID.match(str(path)):
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=CHECKPOINT_FILES))
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a local directory, and fetching it from the Hugging Face Hub failed ({reason}); "
            "download it first (huggingface-cli download) and pass its directory"
        ) from exc
