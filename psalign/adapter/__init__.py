"""The PSA user cross-attention adapter: processor, adapter module, saving and loading."""

from .adapter import PSAAdapter, PSAAdapterConfig, UserConditioning, UserProjection, cross_attention_layers
from .processor import UserCrossAttnProcessor
from .serialization import AdapterSummary, convert_published_checkpoint, inspect_adapter, load_adapter

__all__ = [
    "AdapterSummary",
    "PSAAdapter",
    "PSAAdapterConfig",
    "UserConditioning",
    "UserCrossAttnProcessor",
    "UserProjection",
    "convert_published_checkpoint",
    "cross_attention_layers",
    "inspect_adapter",
    "load_adapter",
]
