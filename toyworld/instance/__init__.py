"""The instance world: "my star", not "a star". A named category plus instance details no caption states.

Modules: ``world`` (categories, instances, contexts, the held-out split, captions), ``render`` (the renderer),
``stream`` (base-training batches), ``concepts`` (its test and validation concept sets), ``data`` (encoder
pretraining items and the validation-identity callback), ``pairs`` (instance pairs for the image encoder),
``pixels`` (identity and prompt read from pixels, an evaluation metric).
"""
