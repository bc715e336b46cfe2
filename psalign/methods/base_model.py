"""``base``: the unmodified pipeline."""

from .base import Method, register_method


@register_method
class BaseModel(Method):
    """The stock pipeline as loaded: the reference every other method is compared with."""

    name = "base"
