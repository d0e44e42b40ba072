import pytest

from tests.tiny import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random checkpoint (model + tokenizer) in the official layout."""
    path = tmp_path_factory.mktemp("tiny-owl3")
    save_tiny_checkpoint(path)
    return path
