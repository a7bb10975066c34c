"""Loss modules; each returns a dict of named terms (``"loss/<name>"``)."""

from losses.contrastive import (
    NearestNeighbourContrastiveLoss,
    NeighbourIndex,
    NeighbourSearchResult,
    gather_neighbours,
)
from losses.diffusion import (
    PREDICTION_TYPES,
    DiffusionLoss,
    NoisedLatents,
    add_noise,
    check_finite,
    diffusion_target,
)
from losses.penalties import CorePenalty, EmbeddingNormPenalty

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
    "gather_neighbours",
]
