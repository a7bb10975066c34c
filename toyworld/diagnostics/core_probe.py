"""What an instance-world encoder's predictions carry, in diffusion-loss terms (docs/research/instance_world.md,
"Pretraining on another context").

For ``n`` training-distribution instances, the target is the instance rendered in another context (its caption
with ``<s*>``); the encoder reads the instance's first render. The loss on the target (alpha 1, v-prediction MSE,
averaged over ``draws`` noise draws) is measured with:

- ``own_timestep``: (v*, cores) predicted from the encoder's view at the TARGET's timestep with the target's noise
  (what an E4T-style pretraining step shows the encoder when its input is its target);
- ``own_timestep_same_category_cores``: the same, but the cores of another instance of the same category;
- ``inference``: one prediction per concept, the mean of ``draws`` predictions at random timesteps and noise (what
  ``encoder_prediction`` exports and every denoising step of a new image uses);
- ``inference_same_category``: the inference prediction of another instance of the same category;
- ``zero_cores``: the own-timestep v* with zero cores.

Read: identity lives in the cores when ``inference`` < ``inference_same_category``; ``own_timestep`` far below
``own_timestep_same_category_cores`` while the inference pair is equal means the cores carry the noise draw.

    python -m toyworld core-probe assets/toyworld/instance_encoder/date.ckpt \
        --pretrain-config configs/pretrain/instance.yaml
"""

from __future__ import annotations

import torch
from torch.utils.data import default_collate

from losses import add_noise


def core_probe(
    ckpt: str, config: str | list[str], n: int = 64, draws: int = 8, seed: int = 12345
) -> dict[str, float]:
    """The losses described in the module docstring (mean over ``draws`` noise draws), and ``n``."""
    from toyworld.instance.data import InstanceConceptDataset
    from toyworld.named.validation import load_pretrained

    module = load_pretrained(ckpt, config).model
    module.eval()
    bb = module.backbone
    data = InstanceConceptDataset(length=n, seed=seed, clip_size=bb.clip_image_size, target_context="other")
    batch = default_collate([data[(0, k)] for k in range(n)])
    categories = [data.scene(0, k)[0].category for k in range(n)]
    partner = torch.tensor(
        [next((j for j in range(n) if j != k and categories[j] == categories[k]), k) for k in range(n)]
    )
    sums: dict[str, float] = {}
    with torch.no_grad():
        target = bb.encode_images(batch["pixel_values"]).float()
        view = bb.encode_images(batch["encoder_pixel_values"]).float()
        ids = bb.tokenize(list(batch["prompt"]), require_placeholder=True)
        g = torch.Generator().manual_seed(seed)
        predictions = []
        for _ in range(draws):
            noised = add_noise(bb.scheduler, view, generator=g)
            predictions.append(module.predict_concepts(batch, noised.noisy, noised.timesteps))
        v_inf = module.personalizer.token_embedder.renormalize(
            torch.stack([p[0] for p in predictions]).mean(0)
        )
        c_inf = torch.stack([p[1] for p in predictions]).mean(0)
        for _ in range(draws):
            noised = add_noise(bb.scheduler, target, generator=g)
            v, cores = module.predict_concepts(
                batch, bb.scheduler.add_noise(view, noised.noise, noised.timesteps), noised.timesteps
            )
            cases = {
                "own_timestep": (v, cores),
                "own_timestep_same_category_cores": (v, cores[partner]),
                "inference": (v_inf, c_inf),
                "inference_same_category": (v_inf[partner], c_inf[partner]),
                "zero_cores": (v, torch.zeros_like(cores)),
            }
            for name, (vv, cc) in cases.items():
                pred = bb.personalized_unet(
                    noised.noisy, noised.timesteps, ids, vv, module.lora_deltas(cc), 1.0, None
                )
                loss = ((pred.float() - noised.target.float()) ** 2).mean().item()
                sums[name] = sums.get(name, 0.0) + loss / draws
    return {**{k: round(v, 5) for k, v in sums.items()}, "n": n, "draws": draws}
