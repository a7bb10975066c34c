"""The words a tuning run starts from and trains on, for the baselines that run as configs.

``init: token`` and ``init: class_noun`` start v* from a word's embedding (textual inversion's
``initializer_token``); ``instance_prompt`` replaces the data's prompts by one template (the one-shot LoRA baseline:
diffusers' ``train_dreambooth_lora.py``, "a photo of sks <class noun>"). Used by
:class:`~lightning_modules.tuning.ConceptTuning`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
