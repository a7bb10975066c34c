"""Behaviour of the loss package: diffusion targets and noising, the contrastive regulariser, penalties."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from losses import (
    CorePenalty,
    DiffusionLoss,
    EmbeddingNormPenalty,
    NearestNeighbourContrastiveLoss,
    add_noise,
    check_finite,
    diffusion_target,
    gather_neighbours,
)

SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(prediction_type=prediction_type, **SD_SCHEDULE)


def _alpha_bar(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t from the scheduler's table, shaped (B, 1, 1, 1) in float64."""
    return scheduler.alphas_cumprod.double()[timesteps.cpu()].view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------- diffusion


def test_epsilon_target_is_the_noise() -> None:
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    target = diffusion_target(_scheduler("epsilon"), latents, noise, torch.tensor([10, 900]))
    assert torch.equal(target, noise)


def test_sample_target_is_the_clean_latents() -> None:
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(diffusion_target(_scheduler("sample"), latents, noise, torch.tensor([3, 4])), latents)


def test_v_target_matches_hand_formula() -> None:
    scheduler = _scheduler("v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8).double(), torch.randn(3, 4, 8, 8).double()
    timesteps = torch.tensor([0, 500, 999])
    ab = _alpha_bar(scheduler, timesteps)
    expected = ab.sqrt() * noise - (1 - ab).sqrt() * latents
    torch.testing.assert_close(diffusion_target(scheduler, latents, noise, timesteps), expected)
    # At t=999 alpha_bar is small: v is dominated by -x0, i.e. genuinely not the noise.
    assert not torch.allclose(expected[2], noise[2], atol=0.1)


def test_unknown_prediction_type_raises_with_its_name() -> None:
    with pytest.raises(ValueError, match="flow_matching") as info:
        diffusion_target(
            _scheduler("flow_matching"), torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1])
        )
    assert "v_prediction" in str(info.value)  # the allowed values are listed too


def test_add_noise_is_reproducible_and_follows_the_forward_process() -> None:
    scheduler = _scheduler("v_prediction")
    latents = torch.randn(64, 4, 4, 4)
    a = add_noise(scheduler, latents, torch.Generator().manual_seed(123))
    b = add_noise(scheduler, latents, torch.Generator().manual_seed(123))
    c = add_noise(scheduler, latents, torch.Generator().manual_seed(124))
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.noise, c.noise) and not torch.equal(a.timesteps, c.timesteps)

    assert a.timesteps.dtype == torch.long and a.timesteps.shape == (64,)
    assert int(a.timesteps.min()) >= 0 and int(a.timesteps.max()) < scheduler.config.num_train_timesteps
    assert int(a.timesteps.min()) < 200 and int(a.timesteps.max()) > 800  # uniform over the whole range

    ab = _alpha_bar(scheduler, a.timesteps)
    x0, eps = latents.double(), a.noise.double()
    torch.testing.assert_close(a.noisy.double(), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        a.target.double(), ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-6, rtol=1e-6
    )


def test_add_noise_fixed_timesteps_and_dtype() -> None:
    scheduler = _scheduler("epsilon")
    latents = torch.randn(3, 4, 4, 4)
    out = add_noise(scheduler, latents, torch.Generator().manual_seed(0), timesteps=torch.tensor(250))
    assert out.timesteps.tolist() == [250, 250, 250]
    assert torch.equal(out.target, out.noise)
    # Noise is drawn in float32, so a bf16 run sees the same noise (rounded) for the same seed.
    half = add_noise(
        scheduler, latents.bfloat16(), torch.Generator().manual_seed(0), timesteps=torch.tensor(250)
    )
    assert half.noisy.dtype == torch.bfloat16
    assert torch.equal(half.noise, out.noise.bfloat16())
    assert add_noise(scheduler, latents).noisy.shape == latents.shape  # global RNG path
    with pytest.raises(ValueError, match="1000"):
        add_noise(scheduler, latents, timesteps=torch.tensor([0, 1, 1000]))


def test_diffusion_loss_is_float32_mse() -> None:
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = DiffusionLoss()(pred.bfloat16(), target)
    assert out["loss/diffusion"].dtype == torch.float32
    expected = ((pred.bfloat16().float() - target) ** 2).sum() / pred.numel()
    torch.testing.assert_close(out["loss/diffusion"], expected)
    with pytest.raises(ValueError, match="shapes differ"):
        DiffusionLoss()(pred, target[:1])


def test_check_finite_names_the_bad_term() -> None:
    good = {"loss": torch.tensor(1.0), "loss/diffusion": torch.tensor(0.5), "loss/x": 2.0}
    check_finite(good)  # no error
    nan_pred = torch.full((1, 4, 2, 2), float("nan"))
    bad = {
        "loss": torch.tensor(1.0),
        "loss/diffusion": DiffusionLoss()(nan_pred, torch.zeros_like(nan_pred))["loss/diffusion"],
        "loss/other": torch.tensor(float("inf")),
        "loss/x": 2.0,
    }
    with pytest.raises(FloatingPointError) as info:
        check_finite(bad)
    message = str(info.value)
    assert "loss/diffusion" in message and "loss/other" in message and "loss/x" not in message


# ------------------------------------------------------------------------------------------- contrastive


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _reference_infonce(
    v: list[list[float]], n: list[list[list[float]]], tau: float, ids: list[list[int]] | None = None
) -> float:
    """Independent pure-Python loop over the documented definition (with optional false-negative masking)."""
    total = 0.0
    for i in range(len(v)):
        negs = [_cos(v[i], v[j]) / tau for j in range(len(v)) if j != i]
        for j in range(len(v)):
            for q in range(len(n[j])):
                if j != i and (ids is None or ids[j][q] not in ids[i]):
                    negs.append(_cos(v[i], n[j][q]) / tau)
        neg_sum = sum(math.exp(s) for s in negs)
        terms = [math.exp(_cos(v[i], p) / tau) for p in n[i]]
        total += -sum(math.log(t / (t + neg_sum)) for t in terms) / len(terms)
    return total / len(v)


def test_contrastive_matches_hand_computed_three_concepts() -> None:
    tau = 0.5
    v = [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]]
    n = [[1.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 1.0]]  # k = 1: one neighbour per concept
    # Cosines written out: |v1|=2, |v2|=3, |v3|=sqrt3, |n1|=sqrt2, |n2|=sqrt5, |n3|=sqrt2.
    r2, r3, r5, r6 = math.sqrt(2), math.sqrt(3), math.sqrt(5), math.sqrt(6)
    c = {
        ("v1", "v2"): 0.0, ("v1", "v3"): 1 / r3, ("v2", "v3"): 1 / r3,
        ("v1", "n1"): 1 / r2, ("v1", "n2"): 0.0, ("v1", "n3"): 1 / r2,
        ("v2", "n1"): 1 / r2, ("v2", "n2"): 1 / r5, ("v2", "n3"): 0.0,
        ("v3", "n1"): 2 / r6, ("v3", "n2"): 3 / (r3 * r5), ("v3", "n3"): 2 / r6,
    }  # fmt: skip
    e = {key: math.exp(val / tau) for key, val in c.items()}
    l1 = -math.log(
        e["v1", "n1"] / (e["v1", "n1"] + e["v1", "v2"] + e["v1", "v3"] + e["v1", "n2"] + e["v1", "n3"])
    )
    l2 = -math.log(
        e["v2", "n2"] / (e["v2", "n2"] + e["v1", "v2"] + e["v2", "v3"] + e["v2", "n1"] + e["v2", "n3"])
    )
    l3 = -math.log(
        e["v3", "n3"] / (e["v3", "n3"] + e["v1", "v3"] + e["v2", "v3"] + e["v3", "n1"] + e["v3", "n2"])
    )
    expected = (l1 + l2 + l3) / 3

    loss = NearestNeighbourContrastiveLoss(temperature=tau, weight=0.01)
    out = loss(torch.tensor(v, dtype=torch.float64), torch.tensor(n, dtype=torch.float64)[:, None, :])
    assert abs(out["loss/nn_contrastive"].item() - expected) < 1e-6
    assert abs(out["loss/nn_contrastive_weighted"].item() - 0.01 * expected) < 1e-8
    assert abs(expected - _reference_infonce(v, [[x] for x in n], tau)) < 1e-12  # the reference agrees


def test_contrastive_k2_and_false_negative_masking_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 5, generator=g, dtype=torch.float64)
    n = torch.randn(4, 2, 5, generator=g, dtype=torch.float64)
    n[1, 0] = n[0, 1]  # concepts 0 and 1 share a neighbour token ...
    ids = torch.tensor([[10, 11], [11, 12], [13, 14], [15, 16]])  # ... id 11
    loss = NearestNeighbourContrastiveLoss(temperature=0.07)
    plain = loss(v, n)["loss/nn_contrastive"].item()
    masked = loss(v, n, neighbour_ids=ids)["loss/nn_contrastive"].item()
    assert abs(plain - _reference_infonce(v.tolist(), n.tolist(), 0.07)) < 1e-9
    assert abs(masked - _reference_infonce(v.tolist(), n.tolist(), 0.07, ids.tolist())) < 1e-9
    assert masked < plain  # a positive no longer also counts as a negative


def test_contrastive_step_pulls_v_star_to_its_neighbour_only_through_v_star() -> None:
    g = torch.Generator().manual_seed(1)
    v_star = torch.randn(4, 16, generator=g, requires_grad=True)
    neighbours = torch.randn(4, 1, 16, generator=g, requires_grad=True)
    loss_fn = NearestNeighbourContrastiveLoss(temperature=0.07, weight=0.01)

    def cos_to_neighbour() -> torch.Tensor:
        return torch.cosine_similarity(v_star.detach(), neighbours.detach()[:, 0], dim=-1)

    before_cos = cos_to_neighbour()
    before = loss_fn(v_star, neighbours)["loss/nn_contrastive"]
    before.backward()
    assert neighbours.grad is None  # frozen anchors
    assert v_star.grad is not None and v_star.grad.abs().sum() > 0
    torch.optim.SGD([v_star], lr=0.05).step()
    after = loss_fn(v_star, neighbours)["loss/nn_contrastive"]
    assert after.item() < before.item()
    assert bool((cos_to_neighbour() > before_cos).all())


def test_contrastive_needs_two_concepts() -> None:
    with pytest.raises(ValueError, match=r">= 2 concepts.*batch size 1"):
        NearestNeighbourContrastiveLoss()(torch.randn(1, 8), torch.randn(1, 1, 8))


class _BruteForceIndex:
    """Duck-typed stand-in for models.token_index.TokenIndex: exact cosine top-k over a table."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = torch.nn.functional.normalize(table, dim=-1)
        self.queries: torch.Tensor | None = None

    def search(self, queries: torch.Tensor, k: int) -> SimpleNamespace:
        self.queries = queries
        scores = torch.nn.functional.normalize(queries, dim=-1) @ self.table.T
        return SimpleNamespace(ids=scores.topk(k, dim=-1).indices)


def test_gather_neighbours_returns_the_nearest_rows_detached() -> None:
    table = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [1.0, 1.0, 0.0],
            [0.0, 1.0, 1.0],
            [-1.0, 0.0, 0.0],
        ],
        requires_grad=True,
    )
    v_star = torch.tensor([[0.1, 2.0, 1.9], [3.0, 0.1, 0.0]], requires_grad=True)
    index = _BruteForceIndex(table.detach())
    neighbours, ids = gather_neighbours(index, table, v_star, k=2)
    # Cosines: v*_0 -> (0,1,1) 0.99, (0,1,0) 0.72, (0,0,1) 0.69; v*_1 -> (1,0,0) 1.0, (1,1,0) 0.73.
    assert ids.tolist() == [[4, 1], [0, 3]]
    assert torch.equal(neighbours, table.detach()[ids])
    assert neighbours.shape == (2, 2, 3) and not neighbours.requires_grad
    assert index.queries is not None and not index.queries.requires_grad  # the search never sees the graph

    class _PaddedIndex:  # FAISS pads with -1 when it runs out of results
        def search(self, queries: torch.Tensor, k: int) -> SimpleNamespace:
            return SimpleNamespace(ids=torch.full((queries.shape[0], k), -1))

    with pytest.raises(ValueError, match="outside"):
        gather_neighbours(_PaddedIndex(), table, v_star, k=1)


# --------------------------------------------------------------------------------------------- penalties


def test_norm_penalty_value_zero_cases_and_gradient_direction() -> None:
    assert EmbeddingNormPenalty(5.0, 1.0)(torch.tensor([[3.0, 4.0]]))["loss/norm_penalty"].item() == 0.0
    off = EmbeddingNormPenalty(5.0, 0.0)(torch.tensor([[float("inf"), 0.0]]))["loss/norm_penalty"]
    assert off.item() == 0.0  # disabled means exactly zero, even for a diverged v*
    value = EmbeddingNormPenalty(5.0, 2.0)(torch.tensor([[3.0, 4.0], [6.0, 8.0]]))["loss/norm_penalty"]
    assert value.item() == pytest.approx(2.0 * (0.0 + 25.0) / 2)

    for start in ([6.0, 8.0], [0.3, 0.4]):  # too long, too short: one step moves the norm toward 5
        v = torch.tensor([start], requires_grad=True)
        EmbeddingNormPenalty(5.0, 1.0)(v)["loss/norm_penalty"].backward()
        torch.optim.SGD([v], lr=0.1).step()
        assert abs(v.detach().norm().item() - 5.0) < abs(math.hypot(*start) - 5.0)


def test_core_penalty_value_zero_cases_and_gradient_direction() -> None:
    cores = {"down.attn1.to_q": torch.ones(2, 4, 4), "up.attn2.to_v": torch.full((2, 4, 4), -2.0)}
    assert CorePenalty(0.5)(cores)["loss/core_penalty"].item() == pytest.approx(0.5 * (1.0 + 4.0) / 2)
    assert CorePenalty(0.5)(list(cores.values()))["loss/core_penalty"].item() == pytest.approx(1.25)
    assert CorePenalty(0.5)([torch.zeros(2, 4, 4)])["loss/core_penalty"].item() == 0.0
    assert CorePenalty(0.0)(cores)["loss/core_penalty"].item() == 0.0
    with pytest.raises(ValueError, match="no cores"):
        CorePenalty(1.0)([])

    m = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]], requires_grad=True)
    CorePenalty(1.0)([m])["loss/core_penalty"].backward()
    assert torch.equal(torch.sign(m.grad), torch.sign(m.detach()))  # descent shrinks every entry toward 0
