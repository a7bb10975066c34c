"""Phase 2: inference-time tuning of one concept in a few steps, and its export.

docs/method.md, "Inference-time tuning", describes the method.

Also runs the baselines as configs (``configs/tune/*_<baseline>.yaml``): textual inversion (diffusers'
``textual_inversion.py``: embedding only, initialised from the class noun), one-shot LoRA (diffusers'
``train_dreambooth_lora.py``: a peft LoRA on the UNet, instance prompt "a photo of sks <class noun>"), encoder only
(0 steps) and no regulariser (an encoder pretrained with ``nn_weight: 0``, tuned without it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from datamodules.concept import TuningConcept
from datamodules.transforms import check_image_size
from lightning_modules.base import PersonalizationModule
from lightning_modules.checkpoint import load_pretraining_checkpoint
from lightning_modules.export import concept_views, encoder_prediction
from lightning_modules.multi_concept import ConceptSlots, check_concepts, multi_concept_step, with_rows
from lightning_modules.prior import ClassPrior
from lightning_modules.tuning_export import ConceptExport
from lightning_modules.tuning_rates import rate_groups
from lightning_modules.tuning_slots import ConceptSlotState
from lightning_modules.tuning_words import TuningWords, check_tuning_options
from losses.diffusion import check_finite
from models.attention import LoraDelta
from models.errors import ConfigurationError
from models.personalizer import Personalizer, PersonalizerConfig
from models.unet_lora import add_unet_lora, lora_parameters, lora_snapshot, restore_lora
from models.unet_offsets import FullFineTuning

Tunable = Literal["embedding", "cores", "factors", "encoder", "unet_lora", "unet"]


class ConceptTuning(ConceptSlotState, ConceptExport, TuningWords, PersonalizationModule):
    """Predicts v* and the LoRA cores from one image, tunes them for a few steps, and exports the concept.

    Concepts (:class:`~datamodules.concept.TuningConcept`) come in through :meth:`set_concepts`, or else from the
    ``concepts`` of the datamodule given to ``fit`` (one: ``ConceptDataModule``; many: ``ConceptSetDataModule``).
    With K per batch, v* is (K, D), the cores (K, T, r, r), and each row's concept is tuned as it would be alone
    (:mod:`lightning_modules.multi_concept`). :meth:`export` writes one; ``on_fit_end`` writes those not yet written.

    Args:
        encoder_checkpoint: pretraining checkpoint (``EncoderPretraining``'s ``.ckpt``, or the shareable encoder
            folder or hub id ``python -m lightning_modules.checkpoint`` writes); None = untrained modules (only
            sensible with ``init: zero`` or ``token``, i.e. the textual-inversion / LoRA baselines).
        optimizer: optimizer factory over the tuned parameters (default AdamW, lr 1e-3, no weight decay).
        tune: what is optimised: ``embedding`` (v*), ``cores`` (M_l), ``factors`` (A_l, B_l), ``encoder`` (E4T-style:
            the encoder weights, predicting v* and cores every step), ``unet_lora`` (a static peft LoRA added to
            the UNet as diffusers' ``train_dreambooth_lora.py`` does: the one-shot LoRA baseline), ``unet`` (every
            UNet weight, as diffusers' ``train_dreambooth.py`` does: the DreamBooth baseline; the artefact carries
            the dense offsets, :mod:`models.unet_offsets`).
        init: start from the ``encoder``'s prediction, from ``zero`` (v* = 0, cores = 0), from the embedding of
            ``init_token`` (cores = 0), or from the embedding of the concept's ``class_noun`` (the datamodule's;
            textual inversion's ``initializer_token``; a multi-word noun uses its last token, the head noun).
        init_token: word used by ``init: token``.
        instance_prompt: if set, every training prompt is this template instead of the datamodule's random ones:
            ``{identifier}`` is filled with the placeholder, whose embedding stays ``init_token``'s (so
            ``"a photo of {identifier} {class_noun}"`` with ``init_token: sks`` is exactly the text
            "a photo of sks dog"), ``{class_noun}`` with the concept's class noun. Needs ``init: token``.
            The special value ``"{caption}"`` keeps the datamodule's prompts (e.g. the image's own caption) and
            writes ``"{identifier} {class_noun}"`` where they say the placeholder: for worlds whose captions are
            not "a photo of ..." (the toy world's text encoder never saw the word "photo").
        unet_lora_rank: rank (and lora_alpha) of the ``unet_lora`` adapter.
        init_noise_draws: the encoder's initial prediction is averaged over this many noise draws.
        export_dir: folder the artefact ``<concept>.safetensors`` (and ``<concept>_diffusers/``) is written to.
        concept_name: artefact name of a single concept; None = the concept's own name.
        export_diffusers: also write the LoRA + textual-inversion pair plain diffusers loads.
        export_kohya: also write ``<concept>_kohya/``: the LoRA in kohya's key layout with its alpha
            (``<concept>_lora.safetensors``, for Automatic1111 / Forge ``models/Lora`` and ComfyUI ``models/loras``)
            and v* as ``<concept>.safetensors`` (``emb_params``) and ``<concept>.pt`` (A1111 ``string_to_param``)
            for their ``embeddings`` folders; the prompt word there is ``<concept>``.
        method: name recorded in the artefact (e.g. ``date``, ``textual_inversion``).
        unet_lr: with ``unet`` in ``tune``, the UNet weights' own learning rate (None: the optimizer's, as
            DreamBooth has it); lets DATE's v* and cores keep their rate while the UNet is tuned too.
        embedding_lr: with ``embedding`` in ``tune``, v*'s own learning rate (None: the optimizer's); the cores
            and the rest keep the optimizer's (:mod:`lightning_modules.tuning_rates`).
        hard_word: the word the dual path's vanilla branch reads in place of S* (the "hard prompt"), in tuning
            and in the artefact for sampling: ``nearest`` (v*'s nearest real token, the paper's) or ``class_noun``
            (the concept's class noun, the semantic word the regulariser is meant to find; needs the datamodule's
            ``class_noun``). Single-path exports (alpha 1) read no hard prompt.
        prior_class_images: DreamBooth's prior preservation (needs ``unet`` or ``unet_lora`` in ``tune``): this
            many class images are sampled from the base model before the concept's first step and each step adds
            a class row per instance row (:mod:`lightning_modules.prior`); 0 = off (the script's default).
        prior_loss_weight: weight of the class rows' loss (``--prior_loss_weight``).
        prior_class_prompt: the class images' prompt (``{class_noun}`` is filled in); None = each of the concept's
            caption templates with its class noun.
        prior_guidance: classifier-free guidance of the class images (diffusers' pipeline default 7.5).
        prior_inference_steps: their denoising steps (diffusers' pipeline default 50).
        **kwargs: the arguments shared with pretraining (weights, placeholder, module sizes, alpha, regulariser,
            seed, sample logging): see :class:`~lightning_modules.base.PersonalizationModule`. Here ``alpha`` is
            also written to the artefact for sampling, and with one concept per batch the regulariser is a pull
            toward the nearest tokens.
    """

    phase = "tune"
    one_concept_per_batch = True  # model_step sees one concept; several go through multi_concept_step

    def __init__(
        self,
        encoder_checkpoint: str | None = None,
        optimizer: OptimizerCallable | None = None,
        tune: list[Tunable] | None = None,
        init: Literal["encoder", "zero", "token", "class_noun"] = "encoder",
        init_token: str = "object",
        instance_prompt: str | None = None,
        unet_lora_rank: int = 4,
        init_noise_draws: int = 4,
        export_dir: str = "outputs/concepts",
        concept_name: str | None = None,
        export_diffusers: bool = True,
        export_kohya: bool = False,
        method: str = "date",
        unet_lr: float | None = None,
        embedding_lr: float | None = None,
        hard_word: Literal["nearest", "class_noun"] = "nearest",
        prior_class_images: int = 0,
        prior_loss_weight: float = 1.0,
        prior_class_prompt: str | None = None,
        prior_guidance: float = 7.5,
        prior_inference_steps: int = 50,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer"])
        self.tune = list(tune) if tune is not None else ["embedding", "cores"]
        check_tuning_options(self.tune, init, encoder_checkpoint, instance_prompt, export_kohya)
        if hard_word not in ("nearest", "class_noun"):
            raise ValueError(f"hard_word must be 'nearest' or 'class_noun', got {hard_word!r}")
        self.hard_word = hard_word
        self.prior: ClassPrior | None = None
        if prior_class_images:
            if not {"unet", "unet_lora"} & set(self.tune):
                raise ValueError(
                    "prior preservation (prior_class_images > 0) needs 'unet' or 'unet_lora' in tune"
                )
            self.prior = ClassPrior(
                prior_class_images,
                prior_loss_weight,
                prior_class_prompt,
                prior_guidance,
                prior_inference_steps,
                self.seed,
            )
        state = None
        if encoder_checkpoint is not None:
            meta, state = load_pretraining_checkpoint(encoder_checkpoint, self.backbone)
            self.personalizer_config = PersonalizerConfig(**meta["personalizer"])
        torch.manual_seed(self.seed)
        self.personalizer = Personalizer(self.backbone, self.personalizer_config)
        if state is not None:
            self.personalizer.load_state_dict(state)
        self.personalizer.requires_grad_(False)
        if "factors" in self.tune:
            self.personalizer.hypernetwork.down.requires_grad_(True)
            self.personalizer.hypernetwork.up.requires_grad_(True)
        if "encoder" in self.tune:
            self.personalizer.requires_grad_(True)
        self._initial_unet_lora: dict[str, torch.Tensor] | None = None
        if "unet_lora" in self.tune:
            # After the backbone is frozen: only the adapter's parameters are trainable.
            add_unet_lora(self.backbone.unet, unet_lora_rank)
            self._initial_unet_lora = lora_snapshot(self.backbone.unet)
        self._full: FullFineTuning | None = None  # DreamBooth
        if "unet" in self.tune:
            self._full = FullFineTuning(self.backbone.unet, self.backbone.fingerprint())
        n_targets = len(self.personalizer.hypernetwork.names)
        rank = self.personalizer.hypernetwork.rank
        self.v_star = nn.Parameter(
            torch.zeros(1, self.backbone.token_dim), requires_grad="embedding" in self.tune
        )
        self.cores = nn.Parameter(torch.zeros(1, n_targets, rank, rank), requires_grad="cores" in self.tune)
        self.register_buffer("initialised", torch.tensor(False))
        # Kept to tune several concepts with one module (evaluation): see reset_concept.
        self._initial_personalizer = {
            k: v.detach().clone() for k, v in self.personalizer.state_dict().items()
        }
        self.optimizer_factory = optimizer
        self.init = init
        self.init_token = init_token
        self.init_noise_draws = init_noise_draws
        self.instance_prompt = instance_prompt
        self.export_dir = export_dir
        self.concept_name = concept_name
        self.export_diffusers = export_diffusers
        self.export_kohya = export_kohya
        self.method = method
        self.artifact_path: Path | None = None
        self.concepts: list[TuningConcept] | None = None
        self.slots = ConceptSlots(1, 1)
        # The LoRA factors of a run of several concepts that tune them: a copy per slot (models/slot_factors.py).
        self.slot_factors = None
        self.exported: dict[str, Path] = {}

    # ----- the concepts, given explicitly -----
    def set_concepts(
        self,
        concepts: Sequence[TuningConcept],
        per_batch: int = 1,
        checked_resolution: int | None = None,
    ) -> None:
        """The concepts the next ``fit`` tunes, ``per_batch`` (K) at a time.

        Args:
            concepts: in the order of the data's groups (concept ``g * K + j`` is slot ``j`` of group ``g``).
            per_batch: K, the concepts sharing one batch; v* and the cores get K rows, and with ``factors`` in
                ``tune`` and several concepts each slot tunes its own copy of the LoRA factors
                (:class:`~models.slot_factors.SlotFactors`).
            checked_resolution: the resolution the images were already size-checked at (by the datamodule);
                they are checked again when the backbone's differs.

        Raises:
            ConfigurationError: no concepts, several with a method that trains weights every concept shares, or
                one without a class noun under ``hard_word: class_noun``.
            ImageTooSmallError: an image is smaller than the backbone's resolution allows.
        """
        self.concepts = check_concepts(concepts, per_batch, self.tune)
        self.check_hard_words(self.concepts)
        if checked_resolution != self.backbone.resolution:
            for c in self.concepts:
                check_image_size(c.image.size, self.backbone.resolution, repr(c.name))
        self.slots = ConceptSlots(len(self.concepts), per_batch)
        # Before configure_optimizers: the optimizer sees the K-row tensors.
        self.v_star = with_rows(self.v_star, self.slots.per_batch)
        self.cores = with_rows(self.cores, self.slots.per_batch)
        self.set_slot_factors()
        self.exported = {}

    def reset_concept(self, concept_name: str | None = None) -> None:
        """Forgets the concepts and restores the initial personalizer: the module can tune others (no reload)."""
        self.personalizer.load_state_dict(self._initial_personalizer)
        if self._initial_unet_lora is not None:
            restore_lora(self.backbone.unet, self._initial_unet_lora)
        if self._full is not None:
            self._full.reset()
        self.initialised.fill_(False)
        self.concept_name = concept_name
        self.concepts = None
        self.slots = ConceptSlots(1, 1)
        self.set_slot_factors()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.concepts is None:
            dm = self.trainer.datamodule
            if dm is None or not hasattr(dm, "concepts"):
                raise ConfigurationError(
                    "no concepts: call set_concepts() or fit on a Concept(Set)DataModule"
                )
            self.set_concepts(dm.concepts, getattr(dm, "concepts_per_batch", 1), dm.resolution)

    def concept(self, slot: int = 0) -> TuningConcept:
        """The concept in ``slot`` of the current group."""
        if self.concepts is None:
            raise ConfigurationError("no concepts set: call set_concepts() first")
        return self.concepts[self.slots.index(slot)]

    # ----- initial prediction from the one image -----
    def on_fit_start(self) -> None:
        if bool(self.initialised):
            if self.prior is not None:
                raise ConfigurationError(
                    "a tuning run with prior preservation cannot resume: its class images come from the base model"
                )
            return  # resumed: the tuned values come from the checkpoint
        self.start_group(0)

    def start_group(self, group: int) -> None:
        """Initialises v* and the cores of every slot from its concept (the encoder's prediction or a word)."""
        self.slots.group = group
        self.slots.started_at = int(self.global_step)
        with torch.no_grad():
            for j in range(self.slots.size(group)):
                v, cores = self.initial_values(self.concept(j))
                self.v_star[j].copy_(v[0])
                self.cores[j].copy_(cores[0])
                if self.slot_factors is not None:
                    self.slot_factors.reset(j)
            self.initialised.fill_(True)
        if self.prior is not None:  # one concept per run (the UNet is shared), still the base model here
            self.prior.prepare(self.backbone, self.concept(0))

    def initial_values(self, concept: TuningConcept) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, D) v* and (1, T, r, r) cores a concept's tuning starts from (``init``)."""
        if self.init == "encoder":
            return self.encoder_prediction(concept)
        if self.init in ("token", "class_noun"):
            v = self.backbone.token_embedding_table()[self.init_token_id(concept)].float().unsqueeze(0)
            return v, torch.zeros_like(self.cores[:1])
        return torch.zeros_like(self.v_star[:1]), torch.zeros_like(self.cores[:1])

    def encoder_prediction(self, concept: TuningConcept | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's (1, D) v* and (1, T, r, r) cores for a concept, averaged over ``init_noise_draws``."""
        pixels, clip_pixels = concept_views(self.backbone, concept or self.concept(), self.device)
        return encoder_prediction(
            self.personalizer,
            self.backbone,
            pixels,
            clip_pixels,
            self.empty_context(),
            self.seed,
            self.init_noise_draws,
        )

    # ----- the step -----
    def predict_concepts(self, batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor):
        b = noisy.shape[0]
        if "encoder" in self.tune:
            pred = self.personalizer.predict(
                self.backbone, batch["clip_pixel_values"], noisy, timesteps, self.empty_context()
            )
            return pred.v_star, pred.cores
        if "slot" in batch:  # several concepts: each row takes its concept's values
            slots = torch.as_tensor(batch["slot"], device=self.v_star.device)
            return self.v_star[slots], self.cores[slots]
        return self.v_star.expand(b, -1), self.cores.expand(b, -1, -1, -1)

    def lora_deltas(self, cores: torch.Tensor, slots: torch.Tensor | None = None) -> dict[str, LoraDelta]:
        if not self.lora_active:
            return {}  # cores stay exactly zero (e.g. textual inversion): skip the zero LoRA work
        # Several concepts with their own factors: each row reads its slot's copy.
        if self.slot_factors is not None:
            if slots is None:
                raise ValueError("each concept tunes its own LoRA factors: the rows' slots are needed")
            return self.slot_factors.deltas(cores, slots)
        return self.personalizer.deltas(cores)

    @property
    def modifies_backbone(self) -> bool:
        """Whether this module added a trainable adapter to its backbone's UNet (so it is not the base model)."""
        return self._initial_unet_lora is not None or self._full is not None

    @property
    def lora_active(self) -> bool:
        """Whether the LoRA offsets can be non-zero: tuned, or predicted by the encoder."""
        return self.init == "encoder" or bool({"cores", "factors", "encoder"} & set(self.tune))

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        group = int(batch["group"][0]) if "group" in batch else 0
        if group != self.slots.group:  # the previous group's concepts are done: write them, start the next
            self.export_group()
            self.start_group(group)
            own = [self.v_star, self.cores, *(self.slot_factors.parameters() if self.slot_factors else ())]
            for p in own:  # each concept starts with a fresh optimizer state
                self.optimizers().optimizer.state.pop(p, None)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch = {**batch, "prompt": self.training_prompts(list(batch["prompt"]), batch.get("slot"))}
        losses, extras = multi_concept_step(self, batch) if "slot" in batch else self.model_step(batch)
        if self.prior is not None:
            losses["loss/prior"] = self.prior.loss(self, len(batch["prompt"]))
            check_finite({"loss/prior": losses["loss/prior"]})
            losses["loss"] = losses["loss"] + self.prior.weight * losses["loss/prior"]
        self.log_step(losses, extras, batch_size=len(batch["prompt"]))
        prompts = list(batch["prompt"][:1])
        slots = [int(batch["slot"][0])] if "slot" in batch else None
        draw = lambda step, v, c: self.log_samples(prompts, v, c, tag="concept", step=step, slots=slots)  # noqa: E731
        self.queue_samples(draw, extras["v_star"][:1], extras["cores"][:1])
        return losses["loss"]

    def state_dict(self, *args, **kwargs):
        """Trainable weights only; with ``unet_lora`` these include the adapter inside the frozen UNet."""
        state = super().state_dict(*args, **kwargs)
        if self._initial_unet_lora is not None:
            for name, param in lora_parameters(self.backbone.unet).items():
                state[f"backbone.unet.{name}"] = param.detach()
        return state

    def configure_optimizers(self):
        unet = self._full.unet.parameters() if self._full is not None else ()
        own = [([self.v_star], self.hparams.get("embedding_lr")), (unet, self.hparams.get("unet_lr"))]
        params = rate_groups([p for p in self.parameters() if p.requires_grad], own)
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        return self.optimizer_factory(params)
