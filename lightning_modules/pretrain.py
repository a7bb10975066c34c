"""Phase 1: encoder pretraining on unlabeled mixed-domain images (METHOD.md, "Pretraining")."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_modules.base import PersonalizationModule
from models.attention import LoraDelta
from models.backbone import DEFAULT_IMAGE_ENCODER
from models.personalizer import Personalizer, PersonalizerConfig


class EncoderPretraining(PersonalizationModule):
    """Trains the feature encoder, token embedder, hypernetwork and LoRA factors; the backbone stays frozen.

    Each sample: one image, one random prompt template with S*; the same image feeds the encoder and is the
    diffusion target. Loss: diffusion loss under dual-path attention + lambda_nn x nearest-neighbour InfoNCE.

    Args:
        pretrained_model_name_or_path: Stable Diffusion folder or hub id (diffusers layout).
        image_encoder_name_or_path: CLIP vision model folder or id for the encoder's image branch.
        placeholder: the pseudo-word S* written in prompts.
        personalizer: sizes of the encoder, token embedder and hypernetwork.
        optimizer: optimizer factory over the trainable parameters (default AdamW, lr 1e-4).
        alpha: dual-path blend of the adapted path during training.
        nn_weight: weight of the nearest-neighbour contrastive loss (0 disables it).
        nn_temperature: InfoNCE temperature.
        nn_k: nearest real tokens used as positives.
        token_index_mode: ``exact`` or ``hnsw`` FAISS index, or ``torch`` brute force.
        token_index_cache: folder caching the built index (None: no cache).
        norm_penalty: weight of the |v*| - mean token norm penalty.
        core_penalty: weight of the L2 penalty on the predicted LoRA cores.
        seed: base seed of the per-step noise and timesteps.
        sample_every_n_steps: log nearest tokens and sample images of a fixed probe batch every n steps (0: never).
        sample_inference_steps: denoising steps of those samples.
        probe_size: number of probe images.
    """

    phase = "pretrain"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        image_encoder_name_or_path: str = DEFAULT_IMAGE_ENCODER,
        placeholder: str = "<s*>",
        personalizer: PersonalizerConfig | None = None,
        optimizer: OptimizerCallable | None = None,
        alpha: float = 0.5,
        nn_weight: float = 0.01,
        nn_temperature: float = 0.07,
        nn_k: int = 1,
        token_index_mode: str = "exact",
        token_index_cache: str | None = ".cache/token_index",
        norm_penalty: float = 0.0,
        core_penalty: float = 0.0,
        seed: int = 0,
        sample_every_n_steps: int = 0,
        sample_inference_steps: int = 10,
        probe_size: int = 4,
    ) -> None:
        super().__init__(
            pretrained_model_name_or_path,
            image_encoder_name_or_path,
            placeholder,
            personalizer,
            alpha,
            nn_weight,
            nn_temperature,
            nn_k,
            token_index_mode,
            token_index_cache,
            norm_penalty,
            core_penalty,
            seed,
            sample_every_n_steps,
            sample_inference_steps,
        )
        self.save_hyperparameters(ignore=["optimizer"])
        torch.manual_seed(seed)  # the personalizer's initial weights are a function of the seed
        self.personalizer = Personalizer(self.backbone, self.personalizer_config)
        self.optimizer_factory = optimizer
        self.probe_size = probe_size
        self._probe: dict | None = None

    def predict_concepts(self, batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor):
        pred = self.personalizer.predict(
            self.backbone, batch["clip_pixel_values"], noisy, timesteps, self.empty_context()
        )
        return pred.v_star, pred.cores

    def lora_deltas(self, cores: torch.Tensor) -> dict[str, LoraDelta]:
        return self.personalizer.deltas(cores)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses, extras = self.model_step(batch)
        self.log_step(losses, extras, batch_size=len(batch["prompt"]))
        if self.sample_every_n_steps and self.global_step % self.sample_every_n_steps == 0:
            self._log_probe()
        return losses["loss"]

    def _log_probe(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self._probe is None and dm is not None and hasattr(dm, "probe_batch"):
            self._probe = dm.probe_batch(self.probe_size)
        if self._probe is None:
            return
        probe = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self._probe.items()}
        with torch.no_grad():
            latents = self.backbone.encode_images(probe["pixel_values"]).float()
            t = torch.full(
                (latents.shape[0],),
                self.backbone.scheduler.config.num_train_timesteps // 2,
                device=self.device,
            )
            noisy = self.backbone.scheduler.add_noise(latents, torch.zeros_like(latents), t)
            v_star, cores = self.predict_concepts(probe, noisy, t)
            self.log_samples(list(probe["prompt"]), v_star, cores, tag="probe")

    def configure_optimizers(self):
        params = [p for p in self.personalizer.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        return self.optimizer_factory(params)
