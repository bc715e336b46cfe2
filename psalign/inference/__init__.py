"""Personalized generation: prompt records, stock pipelines with the PSA adapter, resumable output."""

from .generate import GenerationSettings, generate_images, sample_seed, user_embeddings
from .pipeline import is_sdxl_model, load_pipeline
from .records import PromptRecord, read_prompt_records, resolve_user
from .run import InferenceConfig, run_inference, with_toy_defaults

__all__ = [
    "GenerationSettings",
    "InferenceConfig",
    "PromptRecord",
    "generate_images",
    "is_sdxl_model",
    "load_pipeline",
    "read_prompt_records",
    "resolve_user",
    "run_inference",
    "sample_seed",
    "user_embeddings",
    "with_toy_defaults",
]
