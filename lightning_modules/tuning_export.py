"""Writing the concepts of a tuning run: the artefact (v*, the static LoRA, the hard prompt's word, any UNet offsets)
and the formats other tools load (:mod:`lightning_modules.export`). A mixin of
:class:`~lightning_modules.tuning.ConceptTuning`, which holds the state these methods read."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from lightning_modules.export import concept_artifact, write_concept
from lightning_modules.tuning_words import class_noun
from models.artifact import ConceptArtifact
from models.module_offsets import shaped_factors
from models.unet_lora import static_factors as unet_lora_factors


class ConceptExport:
    """The export half of ``ConceptTuning``: builds and writes each concept's artefact."""

    def concept_prediction(self, slot: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, D) v* and (1, T, r, r) cores of the concept in ``slot``."""
        if "encoder" in self.tune:
            return self.encoder_prediction(self.concept(slot))
        return self.v_star[slot : slot + 1].detach(), self.cores[slot : slot + 1].detach()

    def build_artifact(self, slot: int = 0) -> ConceptArtifact:
        """The artefact of the concept in ``slot`` as it stands (no file written)."""
        v_star, cores = self.concept_prediction(slot)
        extra = {"method": self.method, "tuned": ",".join(self.tune), "init": self.init}
        if self.concepts is not None and self.concept(slot).class_noun:
            extra["class_noun"] = str(self.concept(slot).class_noun)
        if self.instance_prompt is not None:
            # Sampling writes "<s*> <class noun>" where prompts say "<s*>": with v* = the identifier's
            # embedding that is exactly "sks <class noun>" (evaluation/harness.py).
            extra.update(instance_prompt=self.instance_prompt, identifier=self.init_token)
        if self._initial_unet_lora is not None:
            lora = unet_lora_factors(self.backbone.unet)
        else:
            if self.slot_factors is not None:  # several concepts, each with its own tuned factors
                static = self.slot_factors.static_lora(cores[0].float(), slot)
            else:
                static = self.personalizer.hypernetwork.static_lora(cores[0].float())
            # Convolutions' factors in the layout LoRA files hold them (models.module_offsets).
            static = shaped_factors(self.backbone.unet, static)
            lora = {k: (d.cpu(), u.cpu()) for k, (d, u) in static.items()}
        steps = self.slots.steps_done(int(self.global_step))
        art = concept_artifact(self.backbone, self.token_index, v_star, lora, self.alpha, steps, extra)
        if self._full is not None:
            art.unet_offsets, art.fingerprint = self._full.offsets(), self._full.fingerprint
        if self.hard_word == "class_noun":
            concept = self.concept(slot)
            art.hard_token = class_noun(concept, "hard_word='class_noun'")
            art.hard_token_id = self.class_noun_token_id(concept)
        return art

    def export(self, slot: int = 0, export_dir: str | Path | None = None) -> Path:
        """Writes the concept in ``slot`` (``<export_dir>/<name>.safetensors`` + the requested formats).

        Needs no Trainer: after :meth:`set_concepts` and :meth:`start_group` (or a fit) it writes what v* and
        the cores hold. Returns the artefact's path and logs one summary line.
        """
        concept = self.concept(slot)
        name = (self.concept_name if self.slots.total == 1 else None) or concept.name
        path, msg = write_concept(
            self.build_artifact(slot),
            export_dir or self.export_dir,
            name,
            diffusers=self.export_diffusers,
            kohya=self.export_kohya,
            unet_with_adapter=self.backbone.unet if self._initial_unet_lora is not None else None,
            tuned_unet=self.backbone.unet if self._full is not None else None,
            prediction_type=str(self.backbone.scheduler.config.prediction_type),
            resolution=self.backbone.resolution,
        )
        self.exported[concept.name] = self.artifact_path = path
        rank_zero_info(msg)
        return path

    @rank_zero_only
    def export_group(self) -> None:
        """Exports every concept of the current group."""
        for j in range(self.slots.size(self.slots.group)):
            self.export(j)

    def on_fit_end(self) -> None:
        self.export_group()
        # Groups the loop never reached (``max_steps: 0``, encoder only): initialise and export them too.
        for group in range(self.slots.group + 1, self.slots.groups):
            self.start_group(group)
            self.export_group()
