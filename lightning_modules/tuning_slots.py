"""The state of a tuning run's concept slots beyond v* and the cores: each slot's copy of the LoRA factors when
several concepts tune them (:mod:`models.slot_factors`), and the group being tuned, written into checkpoints so a
run of K concepts per batch resumes with it. A mixin of :class:`~lightning_modules.tuning.ConceptTuning`, which
holds the ``tune`` list, the personalizer, ``concepts`` and ``slots`` these methods read."""

from __future__ import annotations

from models.errors import CheckpointMismatchError
from models.slot_factors import SlotFactors


class ConceptSlotState:
    """The slot half of ``ConceptTuning``: the factor copies and the slots' checkpoint entry."""

    # Set by ConceptTuning; a submodule once set, so no class default (it would shadow the registered module).
    slot_factors: SlotFactors | None

    def set_slot_factors(self) -> None:
        """With ``factors`` in ``tune``: one concept tunes the hypernetwork's factors themselves (as always); several
        tune a copy per slot and leave the hypernetwork's as the pretrained values every concept starts from."""
        several = "factors" in self.tune and self.slots.total > 1
        self.slot_factors = (
            SlotFactors(self.personalizer.hypernetwork, self.slots.per_batch) if several else None
        )
        if "factors" in self.tune:
            self.personalizer.hypernetwork.down.requires_grad_(not several)
            self.personalizer.hypernetwork.up.requires_grad_(not several)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["concept_slots"] = {
            "group": self.slots.group,
            "started_at": self.slots.started_at,
            "concepts": [c.name for c in self.concepts or ()],
            "per_batch": self.slots.per_batch,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run goes on with the group it was tuning (its concepts' values come with the weights).

        Raises:
            CheckpointMismatchError: the checkpoint was tuning other concepts (or the same in another order or
                another number per batch).
        """
        super().on_load_checkpoint(checkpoint)
        slots = checkpoint.get("concept_slots")
        if slots is not None:
            theirs, ours = slots.get("concepts"), [c.name for c in self.concepts or ()]
            if theirs is not None and list(theirs) != ours:
                raise CheckpointMismatchError(
                    f"--ckpt_path tuned {len(theirs)} other concepts ({', '.join(theirs[:3])}"
                    f"{', ...' if len(theirs) > 3 else ''}), not the {len(ours)} of this run"
                )
            k = int(slots.get("per_batch", self.slots.per_batch))
            if k != self.slots.per_batch:
                raise CheckpointMismatchError(
                    f"--ckpt_path tuned these concepts {k} per batch, this run {self.slots.per_batch}"
                    " (data.init_args.concepts_per_batch)"
                )
            self.slots.group, self.slots.started_at = int(slots["group"]), int(slots["started_at"])
