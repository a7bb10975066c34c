"""Phase 1: encoder pretraining on unlabeled mixed-domain images (docs/method.md, "Pretraining")."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_modules.base import PersonalizationModule
from losses import add_noise
from models.attention import LoraDelta
from models.personalizer import Personalizer


class EncoderPretraining(PersonalizationModule):
    """Trains the feature encoder, token embedder, hypernetwork and LoRA factors; the backbone stays frozen.

    Each sample: one image, one random prompt template with S*; the same image feeds the encoder and is the
    diffusion target, unless the batch carries ``encoder_pixel_values`` (the encoder's own view of the concept,
    e.g. the same object in another context). That view is noised with its own noise and timestep: an encoder
    that reads the target's own noisy latent learns to carry that noise draw (it lowers the loss, and is of no use
    at inference, where one prediction from the input image serves every denoising step of a new image).
    Loss: diffusion loss under dual-path attention + lambda_nn x nearest-neighbour InfoNCE.

    Args:
        optimizer: optimizer factory over the trainable parameters (default AdamW, lr 1e-4).
        probe_size: number of probe images whose nearest tokens and samples are logged.
        lr_decay_steps: ``[start, end]``: the learning rate falls linearly from its value at optimizer step
            ``start`` to 0 at step ``end`` (constant before; None: constant throughout). A function of the global
            step, so a run resumed from a checkpoint of a constant-rate run (e.g. to cool an encoder down from
            step 4,000 to 6,000) and any resume of this run stay exact.
        **kwargs: the arguments shared with tuning (weights, alpha, regulariser, seed, sample logging): see
            :class:`~lightning_modules.base.PersonalizationModule`.
    """

    phase = "pretrain"

    def __init__(
        self,
        optimizer: OptimizerCallable | None = None,
        probe_size: int = 4,
        lr_decay_steps: tuple[int, int] | None = None,
        **kwargs,
    ) -> None:
        if lr_decay_steps is not None and not 0 <= lr_decay_steps[0] < lr_decay_steps[1]:
            raise ValueError(
                f"lr_decay_steps must be [start, end] with 0 <= start < end, got {list(lr_decay_steps)}"
            )
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer"])
        self.lr_decay_steps = (
            None if lr_decay_steps is None else (int(lr_decay_steps[0]), int(lr_decay_steps[1]))
        )
        torch.manual_seed(self.seed)  # the personalizer's initial weights are a function of the seed
        self.personalizer = Personalizer(self.backbone, self.personalizer_config)
        self.optimizer_factory = optimizer
        self.probe_size = probe_size
        self._probe: dict | None = None

    def predict_concepts(self, batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor):
        pred = self.personalizer.predict(
            self.backbone, batch["clip_pixel_values"], noisy, timesteps, self.empty_context()
        )
        return pred.v_star, pred.cores

    def lora_deltas(self, cores: torch.Tensor, slots: torch.Tensor | None = None) -> dict[str, LoraDelta]:
        return self.personalizer.deltas(cores)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses, extras = self.model_step(batch)
        self.log_step(losses, extras, batch_size=len(batch["prompt"]))
        self.queue_samples(self._log_probe)
        return losses["loss"]

    def _log_probe(self, step: int) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self._probe is None and dm is not None and hasattr(dm, "probe_batch"):
            self._probe = dm.probe_batch(self.probe_size)
        if self._probe is None:
            return
        probe = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self._probe.items()}
        with torch.no_grad():
            latents = self.backbone.encode_images(
                probe.get("encoder_pixel_values", probe["pixel_values"])
            ).float()
            noised = self.probe_noised(latents)
            v_star, cores = self.predict_concepts(probe, noised.noisy, noised.timesteps)
            self.log_samples(list(probe["prompt"]), v_star, cores, tag="probe", step=step)

    def probe_noised(self, latents: torch.Tensor):
        """z_t of the probe latents (B, C, h, w) at t = T/2 with real Gaussian noise, the same draw every time.

        A fixed seed keeps the logged nearest tokens and samples comparable across steps; a zero-noise z_t (the
        scaled clean latent) is no input the encoder ever sees in training.
        """
        return add_noise(
            self.backbone.scheduler,
            latents,
            generator=torch.Generator().manual_seed(self.seed),
            timesteps=self.backbone.scheduler.config.num_train_timesteps // 2,
        )

    def lr_factor(self, step: int | None = None) -> float:
        """The learning rate's multiplier at optimizer step ``step`` (default: the current global step)."""
        if self.lr_decay_steps is None:
            return 1.0
        start, end = self.lr_decay_steps
        step = self.global_step if step is None else step
        return min(1.0, max(0.0, (end - step) / (end - start)))

    def configure_optimizers(self):
        params = [p for p in self.personalizer.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_decay_steps is None:
            return optimizer
        # The lambda reads the global step (restored by a resume), not the scheduler's own count.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: self.lr_factor())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
