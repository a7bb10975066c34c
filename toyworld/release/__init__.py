"""What ships in ``assets/toyworld/``: ``assets`` (export of the named world's models, the probe, the encoders),
``instance_assets`` (the instance world's pipeline, its adherence and autoencoder ceiling), ``card`` (the model
card's encoder and instance lines), ``figures`` (the result figures)."""
