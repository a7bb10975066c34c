"""Training the world's own models (seeded): ``train`` (the autoencoder, the base text-to-image model and the
attribute checker; config loading), ``clip`` (the tiny CLIP), ``image_encoder`` (the image encoder that DATE's
image branch reads)."""
