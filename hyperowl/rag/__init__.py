"""Retrieval-augmented answers with cited evidence (`hyperowl rag`).

A knowledge base (JSONL of pictures, videos and texts) is indexed with the checkpoint's own vision
tower and a BM25 full-text index in LanceDB (`build_index`); `RagAnswerer.ask` retrieves the top-k
items for a query picture and question (reciprocal-rank fusion), shows them to the model as numbered
pictures with their descriptions and returns the answer with the items it cites. See docs/rag.md.
"""

from hyperowl.rag.ask import Citation, RagAnswer, RagAnswerer, cite
from hyperowl.rag.embed import PictureEmbedder, tower_fingerprint
from hyperowl.rag.errors import KnowledgeBaseError, RagError, RagIndexError
from hyperowl.rag.index import BuildStats, RagIndex, Retrieved, build_index
from hyperowl.rag.kb import KBItem, read_kb

__all__ = [
    "BuildStats", "Citation", "KBItem", "KnowledgeBaseError", "PictureEmbedder", "RagAnswer", "RagAnswerer",
    "RagError", "RagIndex", "RagIndexError", "Retrieved", "build_index", "cite", "read_kb", "tower_fingerprint",
]
