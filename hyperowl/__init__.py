"""hyperowl: a fast, dependable PyTorch implementation of mPLUG-Owl3."""

from hyperowl.config import Owl3Config, VisionConfig
from hyperowl.engine.generate import Owl3ForCausalLM
from hyperowl.engine.sampling import SamplingParams
from hyperowl.errors import CheckpointError, HyperowlError, MediaError, PromptError, ResourceLimitError
from hyperowl.model.owl3 import Owl3Model, Owl3Output
from hyperowl.processing.processor import Owl3Processor

__all__ = [
    "CheckpointError",
    "HyperowlError",
    "MediaError",
    "Owl3Config",
    "Owl3ForCausalLM",
    "Owl3Model",
    "Owl3Output",
    "Owl3Processor",
    "PromptError",
    "ResourceLimitError",
    "SamplingParams",
    "VisionConfig",
]
__version__ = "0.1.0"
