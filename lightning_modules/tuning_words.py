"""The words a tuning run starts from and trains on, for the baselines that run as configs.

``init: token`` and ``init: class_noun`` start v* from a word's embedding (textual inversion's
``initializer_token``); ``instance_prompt`` replaces the data's prompts by one template (the one-shot LoRA baseline:
diffusers' ``train_dreambooth_lora.py``, "a photo of sks <class noun>"); ``hard_word`` picks the vanilla path's word.
:class:`TuningWords` is a mixin of :class:`~lightning_modules.tuning.ConceptTuning`, which holds the state its methods
read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from datamodules.concept import TuningConcept
from models.errors import ConfigurationError

CAPTION = "{caption}"  # the instance prompt that keeps the data's own prompts


def check_tuning_options(
    tune: Sequence[str],
    init: str,
    encoder_checkpoint: str | None,
    instance_prompt: str | None,
    export_kohya: bool = False,
) -> None:
    """Refuses options that do not go together.

    Raises:
        ValueError: nothing to tune, ``init: encoder`` without an encoder checkpoint, an instance prompt with
            another ``init`` than ``token`` or with a tuned embedding, or a kohya export of full fine-tuning.
    """
    if "unet" in tune and export_kohya:
        raise ValueError(
            "tune: [unet] (full fine-tuning, DreamBooth) has no LoRA to export in kohya's format"
        )
    if not tune:
        raise ValueError("tune must name at least one of embedding, cores, factors, encoder")
    if init == "encoder" and encoder_checkpoint is None:
        raise ValueError("init='encoder' needs encoder_checkpoint (a pretraining checkpoint)")
    if instance_prompt is not None and (init != "token" or "embedding" in tune):
        raise ValueError("instance_prompt needs init='token' and a fixed embedding (no 'embedding' in tune)")


def class_noun(concept: TuningConcept, option: str) -> str:
    """The concept's class noun.

    Args:
        option: the setting that asks for it, named in the error (e.g. ``"init='class_noun'"``).

    Raises:
        ConfigurationError: the concept has none.
    """
    if not concept.class_noun:
        raise ConfigurationError(f"{option} needs the concept's class noun: set data.init_args.class_noun")
    return str(concept.class_noun)


def word_token_id(tokenizer, word: str, one_token: bool) -> int:
    """Id of ``word``'s last token (a multi-word class noun's head noun).

    Raises:
        ValueError: ``word`` has no token, or more than one where ``one_token`` (``init: token``) asks for one.
    """
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids or (one_token and len(ids) != 1):
        raise ValueError(f"init_token {word!r} must be one token, got {len(ids)}")
    return int(ids[-1])


def instance_prompts(template: str, prompts: list[str], nouns: list[str], placeholder: str) -> list[str]:
    """The training prompts of a run with an instance prompt, one per prompt of the batch.

    ``template`` is filled with ``identifier`` (the placeholder) and ``class_noun``; :data:`CAPTION` keeps the
    batch's prompts and writes ``"<placeholder> <class noun>"`` where they say the placeholder.
    """
    if template == CAPTION:
        return [p.replace(placeholder, f"{placeholder} {noun}") for p, noun in zip(prompts, nouns)]
    return [template.format(identifier=placeholder, class_noun=noun) for noun in nouns]


class TuningWords:
    """The words half of ``ConceptTuning``: the word v* starts from, the hard prompt's word, the training prompts."""

    def check_hard_words(self, concepts: Sequence[TuningConcept]) -> None:
        """Refuses, in one line naming it, a concept without a class noun under ``hard_word: class_noun``.

        Raises:
            ConfigurationError: such a concept (before any step).
        """
        if self.hard_word == "class_noun":
            for c in concepts:
                class_noun(c, f"hard_word='class_noun' (concept {c.name!r})")

    def init_token_id(self, concept: TuningConcept | None = None) -> int:
        """Id of the word v* starts from: ``init_token``, or the class noun's (last) token for ``class_noun``."""
        if self.init == "class_noun":
            word = class_noun(concept or self.concept(), f"init={self.init!r}")
        else:
            word = self.init_token
        return word_token_id(self.backbone.tokenizer, word, one_token=self.init == "token")

    def class_noun_token_id(self, concept: TuningConcept) -> int:
        """Id of a concept's class noun (its last token, the head noun): the hard prompt's word with
        ``hard_word: class_noun``."""
        word = class_noun(concept, "hard_word='class_noun'")
        return word_token_id(self.backbone.tokenizer, word, one_token=False)

    def hard_prompt_ids(self, batch: dict, neighbour_ids: torch.Tensor) -> torch.Tensor:
        """(B,) each row's hard-prompt word: the nearest token, or its concept's class noun (``hard_word``)."""
        if self.hard_word == "nearest":
            return neighbour_ids[:, 0]
        rows = batch["slot"] if "slot" in batch else [0] * neighbour_ids.shape[0]
        ids = [self.class_noun_token_id(self.concept(int(j))) for j in rows]
        return torch.tensor(ids, device=neighbour_ids.device, dtype=neighbour_ids.dtype)

    def training_prompts(self, prompts: list[str], slots: Sequence[int] | None = None) -> list[str]:
        """The batch's prompts, or the fixed instance prompt (one-shot LoRA) for each of them."""
        if self.instance_prompt is None:
            return prompts
        rows = slots if slots is not None else [0] * len(prompts)
        nouns = [class_noun(self.concept(int(j)), "instance_prompt") for j in rows]
        return instance_prompts(self.instance_prompt, prompts, nouns, self.backbone.placeholder)
