"""Errors hyperowl raises for bad input. Each names the problem in words a user can act on."""


class HyperowlError(Exception):
    """Base class of every error hyperowl raises on purpose."""


class CheckpointError(HyperowlError, ValueError):
    """A checkpoint directory is missing files, has unknown/missing tensors, wrong shapes or config."""


class MediaError(HyperowlError, ValueError):
    """An image or video could not be read, is corrupt, empty or too large."""


class PromptError(HyperowlError, ValueError):
    """Messages and media do not fit together (placeholder count mismatch, bad roles, ...)."""


class RecipeError(HyperowlError, ValueError):
    """A training recipe has unknown keys, wrong types or contradictory settings."""


class ResourceLimitError(HyperowlError, RuntimeError):
    """A request would not fit in memory or exceeds a configured limit."""
