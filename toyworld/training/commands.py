"""Training the world's models (``python -m toyworld train --help``)."""

from __future__ import annotations

from typing import Literal

from toyworld.cli import Repeated, load_checked_config


def train(model: Literal["base", "checker", "clip", "image-encoder"], config: Repeated) -> None:
    """Train one of the world's models (seeded; base resumes, the others restart).

    Args:
        model: which model
        config: YAML config under configs/toyworld/; repeat it to merge an overlay onto a base (later wins)
    """
    cfg = load_checked_config(config)
    if model == "clip":
        from toyworld.training.clip import train_clip

        train_clip(cfg)
    elif model == "image-encoder":
        from toyworld.training.image_encoder import train as train_image_encoder

        print(train_image_encoder(cfg))
    else:
        from toyworld.training.train import train_base, train_checker

        (train_base if model == "base" else train_checker)(cfg)


COMMANDS = {"train": train}
