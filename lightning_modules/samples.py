"""TensorBoard samples of a training run, drawn after the optimizer step, once the step's graph is freed.

Sampling inside ``training_step`` would run a full denoising loop while the step's activations are still held for
the backward pass (and, under FSDP, while its gathered parameters are). The step only queues what to draw; the
drawing happens in ``on_train_batch_end`` after the optimizer step (the last micro-batch's, under accumulation), and
is logged at the step that queued it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from models.sampling import sample_personalized


class SampleLogging:
    """Mixin of :class:`~lightning_modules.base.PersonalizationModule`: queued, then logged, sample images."""

    _pending_samples: tuple[int, Callable[..., None], tuple[torch.Tensor, ...]] | None = None

    def queue_samples(self, draw: Callable[..., None], *tensors: torch.Tensor) -> None:
        """Every ``sample_every_n_steps``: ``draw(step, *tensors)`` runs once this step's optimizer step is done.

        ``tensors`` are copied now (detached): the optimizer updates parameters in place, and the samples show
        the values this step used.
        """
        if self.sample_every_n_steps and self.global_step % self.sample_every_n_steps == 0:
            self._pending_samples = (self.global_step, draw, tuple(t.detach().clone() for t in tensors))

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        pending = self._pending_samples
        if pending is not None and self.global_step > pending[0]:  # the optimizer has stepped
            self._pending_samples = None
            step, draw, tensors = pending
            draw(step, *tensors)

    @rank_zero_only
    def log_samples(
        self,
        prompts: list[str],
        v_star: torch.Tensor,
        cores: torch.Tensor,
        tag: str,
        step: int | None = None,
        slots: list[int] | None = None,
    ) -> None:
        """Logs the nearest tokens of v* (B, D) as text and sample images at ``step`` (default: the global step),
        when the logger is TensorBoard. ``slots``: the rows' concepts (for a hard prompt read from them)."""
        if not isinstance(self.logger, TensorBoardLogger):
            return
        step = self.global_step if step is None else step
        writer = self.logger.experiment
        result = self.token_index.search(v_star.detach(), max(self.nn_k, 1))
        lines = [
            f"{p} -> {', '.join(toks)} ({s.tolist()})"
            for p, toks, s in zip(prompts, result.tokens, result.scores)
        ]
        writer.add_text(f"{tag}/nearest_tokens", "\n\n".join(lines), step)
        images = sample_personalized(
            self.backbone,
            prompts,
            v_star.detach(),
            self.lora_deltas(cores.detach(), torch.as_tensor(slots) if slots is not None else None),
            self.hard_prompt_ids({"slot": slots} if slots is not None else {}, result.ids),
            alpha=self.alpha,
            num_inference_steps=self.sample_inference_steps,
            generator=torch.Generator().manual_seed(self.seed),
        )
        writer.add_images(f"{tag}/samples", images.cpu(), step)
