"""Shared by every room: asset paths, the tokenizer, the base pipeline and seeded sampling."""
