"""The instance world's base model as an asset (toyworld/release/instance_assets.py): a few training steps
with the named world's text encoder frozen, the export that links the shared components instead of copying
them, plain diffusers loading the result, and the pixel read-outs of its samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from toyworld.__main__ import main
from toyworld.release.instance_assets import SHARED, export_instance, instance_adherence
from toyworld.training.train import load_config, train_base

NAMED = Path("assets/toyworld/pipeline")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("instance_base")
    overlay = root / "short.yaml"
    short = {"out_dir": str(root / "ckpt"), "vae": {"steps": 2}, "train": {"steps": 2, "warmup": 1}}
    overlay.write_text(yaml.safe_dump(short))
    configs = ["configs/toyworld/base.yaml", "configs/toyworld/instance_base.yaml", str(overlay)]
    cfg = load_config(configs)
    train_base(cfg)
    return root, cfg


def test_frozen_text_encoder_is_the_named_one_and_the_export_links_it(trained):
    from diffusers import StableDiffusionPipeline

    root, cfg = trained
    assert cfg["text_encoder_from"] == str(NAMED)
    dest = export_instance(cfg, out=root / "assets")
    for comp in SHARED:  # relative links, so a clone anywhere resolves them
        link = dest / comp
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == (NAMED / comp).resolve()
    for comp in ("unet", "vae", "scheduler"):
        assert (dest / comp).is_dir() and not (dest / comp).is_symlink()
    pipe = StableDiffusionPipeline.from_pretrained(str(dest))  # plain diffusers follows the links
    named = StableDiffusionPipeline.from_pretrained(str(NAMED))
    for (k, a), b in zip(pipe.text_encoder.state_dict().items(), named.text_encoder.state_dict().values()):
        assert torch.equal(a, b), k
    trained_unet = torch.load(Path(cfg["out_dir"]) / "last.pt", weights_only=True)["ema_unet"]
    key = "conv_in.weight"
    assert torch.equal(pipe.unet.state_dict()[key], trained_unet[key].half())
    summary = json.loads((dest / "train_summary.json").read_text())
    assert summary["base_steps"] == 2 and summary["text_encoder_from"] == str(NAMED)


def test_export_refuses_a_checkpoint_whose_text_encoder_moved(trained, tmp_path):
    root, cfg = trained
    ckpt = Path(cfg["out_dir"]) / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    moved = {**state, "text_encoder": {k: v + 1.0 for k, v in state["text_encoder"].items()}}
    other = tmp_path / "ckpt"
    other.mkdir()
    torch.save(moved, other / "last.pt")
    for name in ("log.jsonl", "vae"):
        os.symlink((Path(cfg["out_dir"]) / name).resolve(), other / name)
    with pytest.raises(ValueError, match="differs from"):
        export_instance({**cfg, "out_dir": str(other)}, out=tmp_path / "assets")
    assert not (tmp_path / "assets" / "instance_pipeline").exists()


def test_adherence_reads_samples_from_pixels(trained):
    root, cfg = trained
    dest = export_instance(cfg, out=root / "assets2")
    result = instance_adherence(n=3, seed=0, pipeline_dir=dest, steps=2, grid=root / "grid.png")
    from PIL import Image

    assert Image.open(root / "grid.png").size == (3 * 3 * 33 + 3, 3 * 3 * 33 + 3)  # 3 rows x 3, scale 3
    for key, value in result["prompt_accuracy"].items():
        assert 0.0 <= value <= 1.0, key
    # Two renders of one instance score far above two instances of one category: the diversity read-out's scale.
    assert result["renders_same_instance_identity"] > result["renders_same_category_identity"] + 0.2
    assert 0.0 <= result["same_caption_two_seeds_identity"] <= 1.0 and result["n"] == 3


def test_autoencoder_ceiling_of_the_committed_validation_concepts(capsys):
    """The committed instance autoencoder's round trip keeps most of an input (docs/research/instance_world.md: identity
    0.445 on validation); a broken or swapped autoencoder would drop to the words' 0.1."""
    main(["instance-ceiling", "--concepts", "assets/toyworld/instance_validation_concepts"])
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["identity"] == pytest.approx(0.445, abs=0.01)
    assert result["iou"] > 0.8 and result["accuracy"] >= 0.5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "1"], "--n must be >= 2, got 1"),
        (["--pipeline", "nowhere"], "--pipeline nowhere is not a pipeline folder (no model_index.json)"),
    ],
)
def test_adherence_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(["instance-adherence", *argv])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m toyworld: error: {message}"


def test_the_committed_card_carries_the_instance_assets_as_measured():
    from toyworld.release.card import instance_lines

    assets = Path("assets/toyworld")
    lines = instance_lines(assets)
    card = (assets / "README.md").read_text()
    stale = [line for line in lines if line not in card]
    assert not stale, (
        f"assets/toyworld/README.md is stale: run `python -m toyworld card`; missing {stale[:1]}"
    )
    # the numbers come from the JSON files measured with the assets
    cells = json.loads((assets / "instance_image_encoder_hybrid/probe.json").read_text())["rows"][0]["cells"]
    hybrid = next(line for line in lines if line.startswith("- `instance_image_encoder_hybrid/`"))
    assert f"1nn {cells['1nn']:.2f}" in hybrid and f"hue {cells['hue']:.2f}" in hybrid
    adherence = json.loads((assets / "instance_adherence.json").read_text())
    assert f"prompt accuracy {adherence['prompt_accuracy']['all']:.3f}" in card
    assert any(line.startswith("- `instance_encoder/date.ckpt`") for line in lines)
