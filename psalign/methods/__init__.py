"""Plug-and-play alignment methods behind one interface (``infer.py --method NAME``)."""

from . import base_model, erased_unet, prompt, psa, safetydpo, sld  # noqa: F401  (each registers itself)
from .base import Method, get_method, method_names, register_method

__all__ = ["Method", "get_method", "method_names", "register_method"]
