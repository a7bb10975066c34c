"""Loss modules; each returns a dict of named terms (``"loss/<name>"``), computed in float32 with autocast off."""

from losses.contrastive import (
    NearestNeighbourContrastiveLoss,
    NeighbourIndex,
    NeighbourSearchResult,
    gather_neighbours,
    nearest_pull,
)
from losses.diffusion import (
    PREDICTION_TYPES,
    DiffusionLoss,
    NoisedLatents,
    add_noise,
    check_finite,
    diffusion_target,
)
from losses.distributed import gather_rows, world_and_rank
from losses.penalties import CorePenalty, EmbeddingNormPenalty
from losses.precision import full_precision, loss_dtype

__all__ = [
    "PREDICTION_TYPES",
    "CorePenalty",
    "DiffusionLoss",
    "EmbeddingNormPenalty",
    "NearestNeighbourContrastiveLoss",
    "NeighbourIndex",
    "NeighbourSearchResult",
    "NoisedLatents",
    "add_noise",
    "check_finite",
    "diffusion_target",
    "full_precision",
    "gather_neighbours",
    "gather_rows",
    "loss_dtype",
    "nearest_pull",
    "world_and_rank",
]
