"""The tuning optimizer's parameter groups: a group of parameters keeps its own learning rate where one is set.

``embedding_lr`` (v*) and ``unet_lr`` (every UNet weight, with ``unet`` in ``tune``) of
:class:`~lightning_modules.tuning.ConceptTuning`; the rest of the trainable parameters (cores, factors, encoder)
train at the optimizer's rate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn


def rate_groups(
    params: Sequence[nn.Parameter], own: Iterable[tuple[Iterable[nn.Parameter], float | None]]
) -> list[nn.Parameter] | list[dict]:
    """``params`` as optimizer groups: each ``(members, lr)`` of ``own`` with ``lr`` set is a group at that rate.

    Args:
        params: the trainable parameters, in the module's order.
        own: parameter sets with their own rate; a rate of None leaves its members at the optimizer's rate.

    Returns:
        ``params`` unchanged when no rate is set, else the groups: first the parameters at the optimizer's rate
        (omitted when none are), then one group per rate that holds a trainable parameter.

    Raises:
        ValueError: a parameter falls in two sets with their own rate.
    """
    claimed: dict[int, int] = {}
    rates: list[float] = []
    for members, lr in own:
        if lr is None:
            continue
        for p in members:
            if id(p) in claimed:
                raise ValueError("a parameter has two learning rates (embedding_lr, unet_lr)")
            claimed[id(p)] = len(rates)
        rates.append(float(lr))
    if not rates:
        return list(params)
    rest = [p for p in params if id(p) not in claimed]
    groups = [{"params": rest}] if rest else []
    for k, lr in enumerate(rates):
        members = [p for p in params if claimed.get(id(p)) == k]
        if members:
            groups.append({"params": members, "lr": lr})
    return groups
