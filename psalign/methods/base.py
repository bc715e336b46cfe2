"""The alignment-method interface and its registry.

A method says how to prepare a loaded pipeline and how to generate one batch of prompt records.
Adding a method means adding one module that defines a :class:`Method` subclass decorated with
:func:`register_method`; ``infer.py --method NAME`` then finds it. A method outside this package
is named ``package.module:NAME`` (the module is imported, and registers itself).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from psalign.io import InputProblem

if TYPE_CHECKING:
    from PIL import Image

    from psalign.inference.records import PromptRecord
    from psalign.inference.run import InferenceConfig

_REGISTRY: dict[str, type["Method"]] = {}


class Method:
    """One way to generate images: the base model, PSA, a LoRA, prompt engineering, ...

    Subclasses set :attr:`name`, and override what they need:

    * :meth:`from_config` reads the method's options from the run's ``InferenceConfig``;
    * :meth:`check` finds problems cheaply, before any model is loaded;
    * :meth:`prepare` changes the loaded pipeline (load weights, wrap it) and readies per-user state;
    * :meth:`generate` runs one batch (``call_kwargs`` are the stock pipeline's keyword arguments:
      prompts, seeds' generators, sampling settings);
    * :meth:`log_params` is what the generation log records, beside the method's name.
    """

    name: ClassVar[str] = ""
    #: Every record must name a user whose embedding can be had (stored or computed).
    needs_user_embeddings: ClassVar[bool] = False
    #: Every record's user must have a profile with banned categories (a level or profile fields).
    needs_user_profiles: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: "InferenceConfig") -> "Method":
        return cls()

    def check(self) -> list[InputProblem]:
        return []

    def prepare(self, pipe, records: Sequence["PromptRecord"], device: str) -> Any:
        """Returns the pipeline to generate with (the same one, changed, or a new one around its components)."""
        return pipe

    def generate(self, pipe, batch: Sequence["PromptRecord"], call_kwargs: dict) -> list["Image.Image"]:
        return pipe(**call_kwargs).images

    def log_params(self) -> dict:
        return {}

    def sdxl_training_conditioning(self) -> tuple[str | None, int | None]:
        """The SDXL micro-conditioning (one of :data:`psalign.adapter.SDXL_MICRO_CONDITIONINGS`) and
        the resolution (px) this method's trained weights saw; ``(None, None)`` when it has no
        trained weights or they record neither. Asked after :meth:`prepare`."""
        return None, None


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The registered method ``name``, or ``package.module:name`` after importing that module."""
    if ":" in name:
        module, _, name = name.partition(":")
        importlib.import_module(module)
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _REGISTRY[name]
