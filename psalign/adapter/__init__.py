"""The PSA user cross-attention adapter: processor, adapter module, saving and loading."""

from .adapter import (
    SDXL_MICRO_CONDITIONINGS,
    PSAAdapter,
    PSAAdapterConfig,
    UserConditioning,
    UserProjection,
    cross_attention_layers,
    micro_conditioning_warning,
)
from .processor import UserCrossAttnProcessor
from .serialization import AdapterSummary, convert_published_checkpoint, inspect_adapter, load_adapter
from .text_edit import UserTextEdit

__all__ = [
    "SDXL_MICRO_CONDITIONINGS",
    "AdapterSummary",
    "PSAAdapter",
    "PSAAdapterConfig",
    "UserConditioning",
    "UserCrossAttnProcessor",
    "UserProjection",
    "UserTextEdit",
    "convert_published_checkpoint",
    "cross_attention_layers",
    "inspect_adapter",
    "load_adapter",
    "micro_conditioning_warning",
]
