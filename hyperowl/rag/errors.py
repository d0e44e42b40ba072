"""Errors of the retrieval package: each names the line, file or index at fault in one sentence."""

from hyperowl.errors import HyperowlError


class RagError(HyperowlError, ValueError):
    """Base class of the retrieval errors."""


class KnowledgeBaseError(RagError):
    """A knowledge-base JSONL line cannot be indexed (bad JSON, no id, no content, a missing file, a duplicate id)."""


class RagIndexError(RagError):
    """An index directory is missing, empty, damaged, or was built with another checkpoint's vision tower."""
