"""Every GPU preset loads its frozen backbone in the autocast dtype, and its trainable parameters stay float32.

A frozen backbone left float32 under bf16 autocast costs twice the memory and a cast of every weight at every
matmul; each GPU preset (trainer on ``gpu`` or mixed precision, overlays included) names ``torch_dtype`` to match.
The presets name hub ids, so the parse checks the values and the tiny backbone stands in for the weights when a
model is built (same code path: ``load_backbone(..., torch_dtype=...)``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import resolve_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AUTOCAST_DTYPE = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def _base_of(path: Path) -> Path | None:
    """``<base>_<variant>.yaml`` overlays sit on ``<base>.yaml`` of the same folder (longest such prefix)."""
    parts = path.stem.split("_")
    for i in range(len(parts) - 1, 0, -1):
        base = path.with_name("_".join(parts[:i]) + ".yaml")
        if base.is_file():
            return base
    return None


def _gpu_presets() -> list[tuple[Path, ...]]:
    sets = []
    for phase in ("pretrain", "tune"):
        for path in sorted((CONFIGS / phase).glob("*.yaml")):
            base = _base_of(path)
            paths = (base, path) if base is not None else (path,)
            trainer: dict = {}
            for p in paths:
                trainer |= (yaml.safe_load(p.read_text()) or {}).get("trainer") or {}
            if trainer.get("accelerator") == "gpu" or trainer.get("precision") in AUTOCAST_DTYPE:
                sets.append(paths)
    return sets


GPU_PRESETS = _gpu_presets()


def _ids(sets: list[tuple[Path, ...]]) -> list[str]:
    return ["+".join(f"{p.parent.name}/{p.stem}" for p in s) for s in sets]


IDS = _ids(GPU_PRESETS)


def test_gpu_presets_are_found():
    names = {s[-1].relative_to(CONFIGS).as_posix() for s in GPU_PRESETS}
    wanted = {
        "tune/sd15.yaml",
        "tune/sdxl.yaml",
        "pretrain/sdxl.yaml",
        "pretrain/sd15.yaml",
        "tune/sd21.yaml",
    }
    assert wanted <= names, wanted - names


@pytest.mark.parametrize("paths", GPU_PRESETS, ids=IDS)
def test_gpu_preset_loads_the_frozen_backbone_in_the_autocast_dtype(paths):
    cfg = resolve_config(list(paths))
    precision = str(cfg.trainer.get("precision"))
    assert precision in AUTOCAST_DTYPE, f"{paths[-1]}: a GPU preset runs mixed precision, got {precision}"
    assert cfg.model_kwargs.get("torch_dtype") == AUTOCAST_DTYPE[precision], paths[-1]


def _tiny_overrides(cfg, tiny_sd_dir: Path, ckpt: Path, tmp_path: Path) -> dict:
    out = {
        "pretrained_model_name_or_path": str(tiny_sd_dir),
        "image_encoder_name_or_path": str(tiny_sd_dir),
        "token_index_cache": None,
    }
    if cfg.model_class.__name__ == "ConceptTuning":
        out["export_dir"] = str(tmp_path / "concepts")
        if cfg.model_kwargs.get("encoder_checkpoint"):
            out["encoder_checkpoint"] = str(ckpt)
    return out


# One preset per distinct recipe (the sd21 and sdxl files repeat sd15's methods on other weights).
BUILT = [s for s in GPU_PRESETS if s[0].stem == "sd15"]


@pytest.mark.parametrize("paths", BUILT, ids=_ids(BUILT))
def test_gpu_preset_builds_bf16_frozen_and_fp32_trainable(paths, tiny_sd_dir, pretrain_ckpt, tmp_path):
    cfg = resolve_config(list(paths))
    model = cfg.build_model(**_tiny_overrides(cfg, tiny_sd_dir, pretrain_ckpt, tmp_path))
    dtype = getattr(torch, AUTOCAST_DTYPE[str(cfg.trainer["precision"])])
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    backbone_frozen = {n: d for n, d in frozen.items() if n.startswith("backbone.")}
    assert backbone_frozen and set(backbone_frozen.values()) == {dtype}, set(backbone_frozen.values())
