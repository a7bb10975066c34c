"""The probe gate of the image branch on the named world: does an image encoder see what makes an object itself?
Linear probes of shape, colour and pattern on the features DATE's image branch reads, on base renders and on the
held-out combinations, and 1-NN retrieval of the same object across contexts.

    python -m toyworld probe-image-encoder --encoder assets/toyworld/image_encoder --layers 1 2 3
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from toyworld.named.world import HELD_OUT_COMBOS, Scene, random_scene, render, seeded_rng, to_tensor
from toyworld.training.image_encoder import IDENTITY, tower_pixels


def probe_renders(n: int, seed: int, combos: bool) -> tuple[torch.Tensor, list[Scene]]:
    """``n`` renders of base-distribution objects, or of the held-out combinations (``combos``)."""
    rng = seeded_rng(seed, 0x70726F62)
    scenes = []
    for i in range(n):
        if combos:
            s, c, p = HELD_OUT_COMBOS[i % len(HELD_OUT_COMBOS)]
            scenes.append(random_scene(rng, "all", shape=s, colour=c, pattern=p))
        else:
            scenes.append(random_scene(rng, "base"))
    return to_tensor(np.stack([render(s, 32, rng) for s in scenes])), scenes


@torch.no_grad()
def read_features(encoder, pixels: torch.Tensor, features: str, layers: list[int]) -> torch.Tensor:
    """The features DATE's image branch reads (``models.encoder.image_tokens``), concatenated over layers."""
    from models.encoder import image_tokens

    size = int(getattr(encoder.config, "image_size", pixels.shape[-1]))
    states = encoder(pixel_values=tower_pixels(pixels, size), output_hidden_states=True).hidden_states
    return torch.cat([image_tokens(states[i], features) for i in layers], dim=-1)


def linear_probe(x_tr, y_tr, x_te, y_te, steps: int = 300) -> float:
    """Multinomial logistic regression (LBFGS, small L2) on standardised features: test accuracy."""
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    n_cls = int(max(y_tr.max(), y_te.max())) + 1
    lin = torch.nn.Linear(x_tr.shape[1], n_cls)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x_tr), y_tr) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (lin(x_te).argmax(-1) == y_te).float().mean().item()


def probe(encoder_dir: str, features: str = "mean", layers: list[int] | None = None, seed: int = 0) -> dict:
    """Linear-probe accuracy of shape, colour and pattern: trained on 1,000 base renders, tested on 400 new base
    renders and on 120 renders of the held-out combinations; and 1-NN retrieval of the same object across
    contexts among the test renders."""
    from models.image_encoder import load_image_encoder

    enc, _ = load_image_encoder(encoder_dir, dtype=torch.float32)
    enc.eval()
    size = int(getattr(enc.config, "image_size", 32))
    n_layers = (
        len(enc(pixel_values=torch.zeros(1, 3, size, size), output_hidden_states=True).hidden_states) - 1
    )
    layers = layers or list(range(2, n_layers + 1, 2))
    data = {
        "train": probe_renders(1000, seed, False),
        "base": probe_renders(400, seed + 1, False),
        "combos": probe_renders(120, seed + 2, True),
    }
    feats = {k: read_features(enc, px, features, layers) for k, (px, _) in data.items()}
    labels = {
        k: {a: torch.tensor([s.labels()[a] for s in sc]) for a in IDENTITY} for k, (_, sc) in data.items()
    }
    out: dict = {"encoder": encoder_dir, "features": features, "layers": layers}
    for split in ("base", "combos"):
        for a in IDENTITY:
            out[f"{split}/{a}"] = round(
                linear_probe(feats["train"], labels["train"][a], feats[split], labels[split][a]), 3
            )
    # 1-NN: a new render of each combo object must find a render of the same object among the base test set
    z = F.normalize(torch.cat([feats["combos"], feats["base"]]), dim=-1)
    ids = [s.identity for s in data["combos"][1] + data["base"][1]]
    sims = z[:120] @ z.T
    sims[torch.arange(120), torch.arange(120)] = -2
    nn_idx = sims.argmax(-1)
    out["combos/1nn_same_object"] = round(
        float(np.mean([ids[int(j)] == ids[i] for i, j in enumerate(nn_idx)])), 3
    )
    return out
