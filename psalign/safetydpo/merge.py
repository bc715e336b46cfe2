"""Merging per-category LoRA safety experts into one: Co-Merge, plain averaging and TIES.

All merges work on weight deltas ``dW_k`` (float32, (out, in)) keyed by module name, one dict per
expert, and return the merged deltas in the same form. :func:`refactor_to_lora` turns merged
deltas back into a LoRA of a chosen rank; :func:`fuse_into_unet` adds them to the UNet's weights.

**Co-Merge** (as the SafetyDPO paper describes it: each weight comes from the expert that is most
active for it). For module ``m`` and expert ``k`` with calibration activations ``x`` recorded on
prompts of expert ``k``'s category, weight element ``(i, j)`` scores
``|dW_k[i, j]| * mean|x_j|``; the merged delta takes each element from the expert with the highest
score (ties go to the lower expert index).

**Calibration** (:func:`record_input_activations`): by default all of a call's batch is recorded,
which under classifier-free guidance includes the empty prompt's half; ``conditional_only`` keeps
only the second (conditional) half of each batch, the order diffusers' pipelines stack them in.

**Rank truncation**: a Co-Merge of rank-``r`` experts is in general of full rank, so re-factoring it
into a LoRA loses part of it; :func:`refactor_to_lora` reports the relative Frobenius error per
module and :func:`truncation_rank` finds the smallest rank keeping every module's error within
:data:`MAX_TRUNCATION_ERROR`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Deltas = dict[str, torch.Tensor]

#: Largest relative Frobenius error ``||dW - B A|| / ||dW||`` of any module that the automatically
#: chosen rank of a merged LoRA allows (5%: the update keeps about 99.75% of its energy).
MAX_TRUNCATION_ERROR = 0.05


def _check_same_modules(experts: Sequence[Deltas]) -> list[str]:
    if not experts:
        raise ValueError("no experts to merge")
    names = sorted(experts[0])
    for k, expert in enumerate(experts[1:], start=1):
        if sorted(expert) != names:
            missing = sorted(set(names) ^ set(expert))[:5]
            raise ValueError(f"expert {k} adapts different modules than expert 0 (e.g. {missing})")
        for name in names:
            if expert[name].shape != experts[0][name].shape:
                raise ValueError(f"expert {k}, module {name}: shape {tuple(expert[name].shape)} "
                                 f"vs {tuple(experts[0][name].shape)} in expert 0")
    return names


def co_merge(experts: Sequence[Deltas], activations: Sequence[dict[str, torch.Tensor]]) -> Deltas:
    """Element-wise Co-Merge. ``activations[k][m]``: mean |input| per input column (in,) of module
    ``m`` on expert ``k``'s calibration prompts (see :func:`record_input_activations`)."""
    names = _check_same_modules(experts)
    if len(activations) != len(experts):
        raise ValueError(f"{len(activations)} activation sets for {len(experts)} experts")
    merged = {}
    for name in names:
        deltas = torch.stack([e[name].float() for e in experts])  # (K, out, in)
        try:
            act = torch.stack([a[name].float().reshape(-1) for a in activations])  # (K, in)
        except KeyError:
            raise ValueError(f"no calibration activations recorded for module {name}") from None
        if act.shape[1] != deltas.shape[2]:
            raise ValueError(f"module {name}: activations have {act.shape[1]} columns, weights {deltas.shape[2]}")
        scores = deltas.abs() * act[:, None, :]
        winner = scores.argmax(dim=0, keepdim=True)  # (1, out, in)
        merged[name] = deltas.gather(0, winner)[0]
    return merged


def average_merge(experts: Sequence[Deltas]) -> Deltas:
    """The plain mean of the experts' deltas."""
    names = _check_same_modules(experts)
    return {name: torch.stack([e[name].float() for e in experts]).mean(dim=0) for name in names}


def ties_merge(experts: Sequence[Deltas], density: float = 0.2) -> Deltas:
    """TIES merging: keep each expert's top ``density`` fraction of entries by magnitude (per
    module), elect each entry's sign by the sign of the kept entries' sum, and average the kept
    entries that agree with it."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    names = _check_same_modules(experts)
    merged = {}
    for name in names:
        deltas = torch.stack([e[name].float() for e in experts])  # (K, out, in)
        flat = deltas.reshape(len(experts), -1)
        keep = max(1, int(round(density * flat.shape[1])))
        threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
        trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
        sign = torch.sign(trimmed.sum(dim=0, keepdim=True))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        total = (trimmed * agree).sum(dim=0)
        count = agree.sum(dim=0).clamp(min=1)
        merged[name] = (total / count).reshape(deltas.shape[1:])
    return merged


def refactor_to_lora(deltas: Deltas, rank: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """Truncated SVD of each delta: ``dW ~ B @ A`` with ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``.

    Returns ``(factors, errors)``: ``factors[m] = (A (r, in), B (out, r))`` and the relative
    Frobenius error ``||dW - B A|| / ||dW||`` per module (0 for an all-zero delta).
    """
    if rank < 1:
        raise ValueError("rank must be >= 1")
    factors, errors = {}, {}
    for name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b = (u[:, :r] * root).float()
        a = (root[:, None] * vh[:r]).float()
        if r < rank:  # pad to the requested rank so every module has the same rank
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        norm = delta.norm().item()
        errors[name] = (delta - b @ a).norm().item() / norm if norm > 0 else 0.0
        factors[name] = (a, b)
    return factors, errors


def truncation_rank(deltas: Deltas, max_error: float = MAX_TRUNCATION_ERROR) -> int:
    """The smallest rank at which every delta's truncated SVD has a relative Frobenius error
    ``sqrt(sum_{i > r} s_i^2 / sum_i s_i^2)`` of at most ``max_error`` (1 for all-zero deltas)."""
    if not 0 <= max_error < 1:
        raise ValueError(f"max_error must be in [0, 1), got {max_error}")
    rank = 1
    for delta in deltas.values():
        energy = torch.linalg.svdvals(delta.double()).square()
        total = energy.sum()
        if total == 0:
            continue
        tail = (total - energy.cumsum(0)).clamp(min=0) / total  # tail[r - 1]: error^2 at rank r
        within = (tail <= max_error**2).nonzero()
        rank = max(rank, int(within[0]) + 1 if len(within) else energy.numel())
    return rank


@torch.no_grad()
def fuse_into_unet(unet: torch.nn.Module, deltas: Deltas) -> None:
    """Add each delta to its module's weight (the merged model without any LoRA layer)."""
    for name, delta in deltas.items():
        weight = unet.get_submodule(name).weight
        if weight.shape != delta.shape:
            raise ValueError(f"module {name}: delta {tuple(delta.shape)} vs weight {tuple(weight.shape)}")
        weight += delta.to(weight.device, weight.dtype)


@torch.no_grad()
def record_input_activations(
    unet: torch.nn.Module, module_names: Sequence[str], run: Callable[[], None], conditional_only: bool = False
) -> dict[str, torch.Tensor]:
    """Mean absolute input per input column (in,) of each module, over every token of every call
    made while ``run()`` drives the UNet (e.g. denoising calibration prompts). With
    ``conditional_only`` only the second half of each call's batch counts (the conditional half
    of a classifier-free-guidance batch ``[unconditional, conditional]``)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().float()
            if conditional_only:
                if x.shape[0] % 2:
                    raise RuntimeError(f"module {name}: batch of {x.shape[0]} has no conditional half "
                                       "(calibrate with classifier-free guidance on)")
                x = x[x.shape[0] // 2:]
            flat = x.reshape(-1, x.shape[-1]).abs()
            sums[name] = sums.get(name, 0) + flat.sum(dim=0).cpu()
            counts[name] = counts.get(name, 0) + flat.shape[0]

        return hook

    try:
        for name in module_names:
            hooks.append(unet.get_submodule(name).register_forward_pre_hook(hook_for(name)))
        run()
    finally:
        for handle in hooks:
            handle.remove()
    missing = [n for n in module_names if n not in sums]
    if missing:
        raise RuntimeError(f"{len(missing)} module(s) saw no input during calibration, e.g. {missing[:3]}")
    return {name: sums[name] / counts[name] for name in module_names}
