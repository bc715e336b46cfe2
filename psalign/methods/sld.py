"""``sld``: Safe Latent Diffusion guidance, through the pipeline the installed diffusers ships.

diffusers keeps SLD as ``StableDiffusionPipelineSafe`` (SD1.x only; there is no SDXL version).
When the installed diffusers no longer ships it, the method reports itself unavailable rather
than run a re-implementation. Presets are the SLD paper's weak / medium / strong / max. The
safety concept (the text whose direction SLD steers away from) is diffusers' own unless
``--sld_concept`` replaces it.
"""

from __future__ import annotations

from psalign.io import InputProblem

from .base import Method, register_method

SLD_PRESETS = ("weak", "medium", "strong", "max")


def _sld():
    """``(StableDiffusionPipelineSafe, SafetyConfig)`` or None when this diffusers lacks them."""
    try:
        from diffusers import StableDiffusionPipelineSafe
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    except ImportError:
        return None
    return StableDiffusionPipelineSafe, SafetyConfig


@register_method
class SLDMethod(Method):
    """Safe Latent Diffusion with one of the paper's presets (``--sld_preset``) and, optionally, a
    safety concept of its own (``--sld_concept``; None: diffusers' default text); SD1.x only."""

    name = "sld"

    def __init__(self, preset: str = "medium", concept: str | None = None):
        if preset not in SLD_PRESETS:
            raise ValueError(f"SLD preset must be one of {SLD_PRESETS}, got {preset!r}")
        if concept is not None and (not isinstance(concept, str) or not concept.strip()):
            raise ValueError(f"SLD concept must be a non-empty text, got {concept!r}")
        self.preset = preset
        self.concept = concept
        self.params: dict = {}

    @classmethod
    def from_config(cls, config) -> "SLDMethod":
        return cls(config.sld_preset, config.sld_concept)

    def check(self) -> list[InputProblem]:
        if _sld() is None:
            return [InputProblem("--method sld", 0, "this diffusers version no longer ships StableDiffusionPipelineSafe")]
        return []

    def prepare(self, pipe, records, device):
        safe_pipeline, safety_config = _sld()
        if "text_encoder_2" in pipe.components:
            raise ValueError("SLD is available for SD1.x pipelines only; this is an SDXL pipeline")
        self.params = dict(getattr(safety_config, self.preset.upper()))
        components = {k: pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        safe = safe_pipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if self.concept is not None:
            safe.safety_concept = self.concept
        safe.set_progress_bar_config(disable=True)
        return safe.to(device)

    def generate(self, pipe, batch, call_kwargs):
        return pipe(**call_kwargs, **self.params).images

    def log_params(self) -> dict:
        # None stands for diffusers' default concept (the same before and after prepare, so that a
        # resumed run compares like with like)
        return {"sld_preset": self.preset, "sld_concept": self.concept, **self.params}
