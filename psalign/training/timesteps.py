"""Which diffusion timesteps training draws: uniformly, or biased the way diffusers' SDXL training
script does it (``--timestep_bias_strategy`` and its ``multiplier``, ``portion``, ``begin``, ``end``).

Timestep 0 is the least noise and ``num_train_timesteps - 1`` the most. A bias multiplies the
sampling weight of a block of timesteps: ``earlier`` the first ``portion`` of them, ``later`` the
last ``portion``, ``range`` those in ``[begin, end)``. A multiplier above 1 draws the block more
often, below 1 less often, and 0 never.
"""

from __future__ import annotations

import torch

TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")


def timestep_weights(
    num_train_timesteps: int,
    strategy: str = "none",
    multiplier: float = 1.0,
    portion: float = 0.25,
    begin: int = 0,
    end: int | None = None,
) -> torch.Tensor | None:
    """Unnormalised float64 (num_train_timesteps,) sampling weights, or None for uniform (``"none"``).

    ``end`` defaults to ``num_train_timesteps``. ``ValueError`` for an unknown strategy, a range
    outside ``[0, num_train_timesteps]``, or a bias that leaves no timestep to draw.
    """
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ValueError(f"timestep_bias_strategy: {strategy!r} is not one of {', '.join(TIMESTEP_BIAS_STRATEGIES)}")
    if strategy == "none":
        return None
    if multiplier < 0:
        raise ValueError(f"timestep_bias_multiplier: must be >= 0, got {multiplier}")
    total = num_train_timesteps
    if strategy == "range":
        end = total if end is None else end
        if not 0 <= begin < end <= total:
            raise ValueError(f"timestep_bias_begin/end: need 0 <= begin < end <= {total}, got [{begin}, {end})")
        block = slice(begin, end)
    else:
        if not 0 < portion <= 1:
            raise ValueError(f"timestep_bias_portion: must be in (0, 1], got {portion}")
        count = max(1, round(portion * total))
        block = slice(0, count) if strategy == "earlier" else slice(total - count, total)
    weights = torch.ones(total, dtype=torch.float64)
    weights[block] *= multiplier
    if not weights.sum() > 0:
        raise ValueError(f"timestep_bias_multiplier: 0 on every timestep ({strategy}) leaves none to draw")
    return weights


def sample_timesteps(count: int, num_train_timesteps: int, weights: torch.Tensor | None, device=None) -> torch.Tensor:
    """``count`` int64 timesteps from the global RNG: uniform without ``weights`` (exactly
    ``torch.randint``), else drawn with replacement in proportion to them."""
    if weights is None:
        return torch.randint(0, num_train_timesteps, (count,), device=device)
    return torch.multinomial(weights, count, replacement=True).to(device)
