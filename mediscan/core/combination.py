"""How the out-of-scope detector's parts become one score: their max, or Fisher's method on p-values.

The parts are relative scores, one row per part (Mahalanobis layers, the classifier's energy), higher =
stranger. ``"max"`` takes the largest. ``"fisher"`` turns each part into its p-value among held-out
(validation) scores of the same part and adds ``-log p`` over the parts (Fisher 1925). That flags an image
that is unusual on every part without being extreme on any. :mod:`mediscan.core.ood` says why and where
each is used.
"""
from __future__ import annotations

import torch

__all__ = ["COMBINATIONS", "REFERENCE_SIZE", "combine", "p_values", "reference_sample"]

#: How the parts become one score: the largest relative part, or Fisher's method on their p-values.
COMBINATIONS = ("max", "fisher")
#: At most this many held-out scores per part are kept as the reference of Fisher's p-values: p-values to
#: 1/4096, and the checkpoint and the cost per image stay flat however large the validation set.
REFERENCE_SIZE = 4096


def p_values(reference: torch.Tensor, parts: torch.Tensor, *, leave_one_out: bool = False) -> torch.Tensor:
    """``(P, B)`` float64 p-values of ``parts`` ``(P, B)`` among the sorted rows of ``reference`` ``(P, M)``:
    ``(1 + #reference >= score) / (1 + M)``. ``leave_one_out``: each score is itself one of its row's
    reference values (validation scoring itself) and is left out of it: ``#reference >= score / M`` (the
    count includes the score itself, which takes the place of the 1)."""
    size = reference.shape[1]
    at_least = size - torch.searchsorted(reference, parts.to(torch.float64).contiguous(), right=False)
    at_least = at_least.to(torch.float64)
    return at_least / size if leave_one_out else (1.0 + at_least) / (1.0 + size)


def combine(parts: torch.Tensor, combination: str, reference: torch.Tensor | None, *,
            leave_one_out: bool = False) -> torch.Tensor:
    """The ``(B,)`` float64 score from the ``(P, B)`` relative parts: their max, or Fisher's ``-sum(log p)``."""
    if combination == "max":
        return parts.max(dim=0).values
    return -torch.log(p_values(reference, parts, leave_one_out=leave_one_out)).sum(dim=0)


def reference_sample(held: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(reference, complete)``: the sorted held-out part scores ``(P, N)``, or :data:`REFERENCE_SIZE` evenly
    spaced order statistics of them when N is larger (``complete`` False: no score is then its own reference
    value, so none is left out)."""
    ordered = held.sort(dim=1).values
    if ordered.shape[1] <= REFERENCE_SIZE:
        return ordered, True
    picks = torch.linspace(0, ordered.shape[1] - 1, REFERENCE_SIZE).round().long()
    return ordered[:, picks].contiguous(), False
