"""The tuning methods timed by ``benchmarks.bench_tuning``: one optimisation step each, built from ConceptTuning."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import default_collate

from datamodules.concept import SingleConceptDataset, TuningConcept
from lightning_modules.cli import resolve_config
from lightning_modules.tuning import ConceptTuning
from losses import add_noise, gather_neighbours
from models.attention import lora_targets

ROOT = Path(__file__).resolve().parents[1]
PERSONALIZER_CONFIG = ROOT / "configs" / "pretrain" / "tiny.yaml"  # module sizes of the tiny recipe
CACHE_DIR = ROOT / ".cache" / "bench"


@dataclass(frozen=True)
class MethodSpec:
    """One tuning method: ``ConceptTuning`` arguments plus how the benchmark drives it."""

    label: str
    tune: tuple[str, ...]
    alpha: float
    nn_weight: float
    lora: bool  # pass the hypernetwork's LoRA deltas (from the cores) to the UNet
    encoder_init: bool = False  # v* and cores from the encoder (DATE); else ConceptTuning's `init: token`
    peft: bool = False  # a static peft LoRA inside the UNet instead of the project's deltas


METHODS = {
    "date": MethodSpec(
        "DATE (dual path, alpha 0.5; v* + cores)", ("embedding", "cores"), 0.5, 0.01, True, True
    ),
    "lora": MethodSpec("one-shot LoRA (single path; cores + factors)", ("cores", "factors"), 1.0, 0.0, True),
    "ti": MethodSpec("textual inversion (single path; v* only)", ("embedding",), 1.0, 0.0, False),
    "lora_peft": MethodSpec(
        "one-shot LoRA, static peft rank 4 (single path)", ("embedding",), 1.0, 0.0, False, peft=True
    ),
}
BASELINE = "lora"


class Tuner:
    """One method's module, batch and optimizer; :meth:`step` is the measured unit."""

    def __init__(self, key: str, sd_dir: Path, args: argparse.Namespace, image: Image.Image) -> None:
        self.key, self.spec, self.device = key, METHODS[key], torch.device(args.device)
        personalizer = resolve_config([PERSONALIZER_CONFIG]).model_kwargs["personalizer"]
        self.module = m = ConceptTuning(
            pretrained_model_name_or_path=str(sd_dir),
            image_encoder_name_or_path=str(sd_dir),
            personalizer=personalizer,
            tune=list(self.spec.tune),
            init="zero" if self.spec.encoder_init else "token",
            init_noise_draws=4,
            alpha=self.spec.alpha,
            nn_weight=self.spec.nn_weight,
            token_index_mode="exact",
            token_index_cache=str(CACHE_DIR / "token_index"),
            seed=args.seed,
            method=key,
        )
        if self.spec.peft:
            from peft import LoraConfig

            rank = personalizer.lora_rank
            names = lora_targets(m.backbone.unet, personalizer.lora_projections, personalizer.lora_attention)
            m.backbone.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(names)))
            m.v_star.requires_grad_(False)
        self.concept = TuningConcept(name="bench", image=image)
        m.set_concepts([self.concept])
        m.to(self.device)
        m.setup("fit")
        self.init_concept()
        bb = m.backbone
        data = SingleConceptDataset(
            image,
            resolution=bb.resolution,
            clip_size=bb.clip_image_size,
            num_samples=args.batch_size,
            seed=args.seed,
            placeholder=bb.placeholder,
        )
        batch = default_collate([data[i] for i in range(args.batch_size)])
        self.batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        self.reset_optimizer()

    def init_concept(self) -> None:
        """v* and cores as tuning starts: the encoder's prediction (DATE) or ConceptTuning's own init."""
        m = self.module
        m.reset_concept()  # a new concept: personalizer weights (the LoRA factors too) as built
        m.set_concepts([self.concept])
        if not self.spec.encoder_init:
            m.start_group(0)  # ConceptTuning's own init (a word's embedding, zero cores)
            return
        # ConceptTuning's `init: encoder` needs a pretraining checkpoint; the random-weight encoder predicts here.
        v, cores = m.encoder_prediction()
        with torch.no_grad():
            m.v_star.copy_(v)
            m.cores.copy_(cores)

    def reset_optimizer(self) -> None:
        self.optimizer = self.module.configure_optimizers()  # AdamW over every parameter that requires grad

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.module.seed * 1_000_003 + step) % (2**63))

    def loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """``ConceptTuning.model_step``'s loss for one concept; the nearest-token lookup only where it is used."""
        m, bb = self.module, self.module.backbone
        with torch.no_grad():
            latents = bb.encode_images(batch["pixel_values"]).float()
        noised = add_noise(bb.scheduler, latents, generator=generator)
        v_star, cores = m.predict_concepts(batch, noised.noisy, noised.timesteps)
        neighbours = hard_ids = None
        if m.alpha < 1.0 or m.nn_weight > 0:
            neighbours, ids = gather_neighbours(
                m.token_index, bb.token_embedding_table(), v_star, max(m.nn_k, 1)
            )
            hard_ids = ids[:, 0]
        ids = bb.tokenize(list(batch["prompt"]), require_placeholder=True)
        lora = m.lora_deltas(cores) if self.spec.lora else None
        pred = bb.personalized_unet(noised.noisy, noised.timesteps, ids, v_star, lora, m.alpha, hard_ids)
        loss = m.diffusion_loss(pred.float(), noised.target.float())["loss/diffusion"]
        if m.nn_weight > 0:  # one concept: model_step's pull toward the nearest token
            cos = torch.nn.functional.cosine_similarity(v_star.unsqueeze(1), neighbours, dim=-1)
            loss = loss + m.nn_weight * (1 - cos.mean())
        return loss

    def step(self, step: int) -> None:
        self.loss(self.batch, self.generator(step)).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def parity_gap(self) -> float:
        """|loss - ConceptTuning.model_step's loss| on the same batch and noise: guards the mirror above."""
        with torch.no_grad():
            ours = self.loss(self.batch, self.module.step_generator())
            theirs = self.module.model_step(self.batch)[0]["loss"]
        return float((ours - theirs).abs())
