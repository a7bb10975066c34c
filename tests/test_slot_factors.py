"""Per-concept copies of the LoRA factors (:mod:`models.slot_factors`): with K concepts in one batch, each row's
offsets are exactly those of its own concept's factors (attention, feed-forward and ResNet targets, both paths),
and a concept's copy gets gradient from its own rows only."""

from __future__ import annotations

import pytest
import torch

from models.attention import LoraDelta
from models.personalizer import Personalizer, PersonalizerConfig
from models.slot_factors import SlotFactors

PROMPT = "a photo of a <s*>"
K = 3


@pytest.fixture(scope="module")
def personalizer(backbone, tiny_personalizer_config) -> Personalizer:
    cfg = PersonalizerConfig(**{**tiny_personalizer_config.__dict__, "lora_modules": ("ff", "resnet")})
    torch.manual_seed(0)
    return Personalizer(backbone, cfg)


def _moved(personalizer: Personalizer) -> SlotFactors:
    """K copies, each moved away from the pretrained factors in its own way."""
    factors = SlotFactors(personalizer.hypernetwork, K)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in factors.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))  # half the factors' own spread
    return factors


def _cores(personalizer: Personalizer, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    hyper = personalizer.hypernetwork
    return torch.randn(n, len(hyper.names), hyper.rank, hyper.rank, generator=g) * 0.3


def _inputs(backbone, n: int):
    g = torch.Generator().manual_seed(0)
    cfg = backbone.unet.config
    latents = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    v = backbone.token_embedding_table()[1000 : 1000 + n]
    return latents, torch.full((n,), 500), backbone.tokenize([PROMPT] * n), v


def test_copies_start_at_the_pretrained_factors_and_reset_to_them(personalizer):
    factors = _moved(personalizer)
    hyper = personalizer.hypernetwork
    assert factors.slots == K and factors.names == hyper.names
    assert not any(p is q for p in factors.parameters() for q in hyper.parameters())  # copies, not views
    assert not torch.equal(factors.down[0][1], hyper.down[0])
    factors.reset(1)
    for i in range(len(hyper.names)):
        torch.testing.assert_close(factors.down[i][1], hyper.down[i], rtol=0, atol=0)
        torch.testing.assert_close(factors.up[i][1], hyper.up[i], rtol=0, atol=0)
    assert not torch.equal(factors.down[0][0], hyper.down[0])  # the other slots keep their values


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_each_row_gets_exactly_its_own_concepts_offsets(backbone, personalizer, alpha):
    """A batch of rows from slots [2, 0, 2, 1] equals each row run alone with its slot's factors as the shared
    ones: every target kind (attention projections, feed-forward linears, ResNet convolutions) on both paths."""
    slots = torch.tensor([2, 0, 2, 1])
    n = len(slots)
    factors = _moved(personalizer)
    latents, t, ids, v = _inputs(backbone, n)
    cores = _cores(personalizer, n)
    hard = torch.full((n,), 320) if alpha < 1 else None
    kinds = {n.rsplit(".", 1)[-1] for n in factors.names}
    assert {"to_q", "conv1", "2"} <= kinds  # attention, ResNet and feed-forward targets are all in play
    with torch.no_grad():
        batched = backbone.personalized_unet(latents, t, ids, v, factors.deltas(cores, slots), alpha, hard)
        for row, slot in enumerate(slots.tolist()):
            alone = {
                name: LoraDelta(factors.down[i][slot], cores[row : row + 1, i], factors.up[i][slot])
                for i, name in enumerate(factors.names)
            }
            r = slice(row, row + 1)
            ref = backbone.personalized_unet(
                latents[r], t[r], ids[r], v[r], alone, alpha, hard[r] if hard is not None else None
            )
            torch.testing.assert_close(batched[r], ref, atol=1e-5, rtol=1e-4)
        base = backbone.personalized_unet(latents, t, ids, v, None, alpha, hard)
    assert (batched - base).abs().max() > 1e-3  # the offsets are not negligible


def test_a_copy_learns_from_its_own_rows_only(backbone, personalizer):
    factors = _moved(personalizer)
    slots = torch.tensor([0, 0, 2])
    latents, t, ids, v = _inputs(backbone, 3)
    out = backbone.personalized_unet(latents, t, ids, v, factors.deltas(_cores(personalizer, 3), slots))
    out[2].square().mean().backward()  # a loss on slot 2's row alone
    for p in factors.parameters():
        assert p.grad[2].abs().sum() > 0
        assert p.grad[0].abs().sum() == 0 and p.grad[1].abs().sum() == 0
    assert all(p.grad is None for p in personalizer.hypernetwork.parameters())


def test_repeat_for_guidance_keeps_each_rows_factors(personalizer):
    factors = _moved(personalizer)
    delta = factors.deltas(_cores(personalizer, 2), torch.tensor([1, 2]))[factors.names[0]]
    assert delta.per_sample
    twice = delta.repeat(2)
    torch.testing.assert_close(twice.down, torch.cat([delta.down, delta.down]), rtol=0, atol=0)
    torch.testing.assert_close(twice.up, torch.cat([delta.up, delta.up]), rtol=0, atol=0)
    x = torch.randn(4, 5, delta.down.shape[-1])
    torch.testing.assert_close(twice.apply(x)[2:], delta.apply(x[2:]), rtol=0, atol=0)
    shared = LoraDelta(delta.down[0], delta.core, delta.up[0])
    assert not shared.per_sample and shared.repeat(2).down is shared.down  # shared factors stay one pair


def test_static_lora_is_the_slots_factors_under_its_cores(personalizer):
    factors = SlotFactors(personalizer.hypernetwork, K)
    cores = _cores(personalizer, 1)[0]
    ours = factors.static_lora(cores, 2)
    ref = personalizer.hypernetwork.static_lora(cores)  # the copies still equal the pretrained factors
    assert ours.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(ours[name][0], ref[name][0], rtol=0, atol=0)
        torch.testing.assert_close(ours[name][1], ref[name][1], rtol=0, atol=0)


def test_one_slot_per_row_and_at_least_one_slot(personalizer):
    factors = SlotFactors(personalizer.hypernetwork, K)
    with pytest.raises(ValueError, match="one slot per row"):
        factors.deltas(_cores(personalizer, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slots must be >= 1"):
        SlotFactors(personalizer.hypernetwork, 0)
