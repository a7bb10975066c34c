"""Shared fixtures: everything runs offline on the tiny backbone built by ``models.tiny``."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread per test process: tiny models gain nothing from more, and under load (2 cores shared with
# other processes) two threads each made steps ~5x slower.
torch.set_num_threads(1)

# Fixtures of the CLI-driven training tests (pretraining checkpoint, tuned module, token-index cache).
pytest_plugins = ["tests.cli_runs"]


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Path of a tiny Stable Diffusion pipeline folder (epsilon prediction), built once per session."""
    from models.tiny import write_tiny_backbone

    return write_tiny_backbone(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory):
    """Like ``tiny_sd_dir`` but with a v-prediction scheduler (Stable Diffusion 2.x style)."""
    from models.tiny import write_tiny_backbone

    return write_tiny_backbone(
        tmp_path_factory.mktemp("tiny_v") / "tiny-sd-v", prediction_type="v_prediction"
    )


@pytest.fixture(scope="session")
def backbone(tiny_sd_dir):
    """The tiny backbone loaded through the real ``from_pretrained`` path (frozen, shared: do not mutate)."""
    from models.backbone import DiffusionBackbone

    return DiffusionBackbone.from_pretrained(str(tiny_sd_dir), str(tiny_sd_dir))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    """Path of a tiny Stable Diffusion XL pipeline folder (``models.tiny_sdxl``), built once per session: read by
    test_sdxl.py and test_sdxl_training.py."""
    from models.tiny_sdxl import write_tiny_sdxl_backbone

    return write_tiny_sdxl_backbone(tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def sdxl(sdxl_dir):
    """The tiny SDXL backbone loaded through ``models.loading.load_backbone`` (frozen, shared: do not mutate)."""
    from models.loading import load_backbone

    return load_backbone(str(sdxl_dir), str(sdxl_dir))


@pytest.fixture(scope="session")
def tiny_personalizer_config():
    """Small trainable modules matching the tiny backbone's scale."""
    from models.personalizer import PersonalizerConfig

    return PersonalizerConfig(feature_dim=32, unet_hidden_dim=64, token_hidden_dim=64, hyper_hidden_dim=32)
