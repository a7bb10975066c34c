"""``hard_word``: the word the dual path's vanilla branch reads in place of S*, in tuning and in the artefact.

The paper's hard prompt is v*'s nearest real token; ``hard_word: class_noun`` reads the concept's class noun (the
semantic word the regulariser is meant to find) instead, in the tuning steps, in the artefact and at sampling.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import train
from datamodules.concept import TuningConcept
from evaluation.generate.images import generate_images
from evaluation.plan import Setting
from models.artifact import ConceptArtifact
from models.errors import ConfigurationError
from tests.cli_runs import tune_args


class HardIds:
    """Records the hard-prompt ids each UNet call of the tuning steps received (a spy; the call itself runs)."""

    def __init__(self, backbone) -> None:
        self.seen: list[torch.Tensor] = []
        self._call = backbone.personalized_unet

        def spy(*args, **kwargs):
            hard = args[6] if len(args) > 6 else kwargs.get("hard_token_ids")
            self.seen.append(hard.detach().clone())
            return self._call(*args, **kwargs)

        backbone.personalized_unet = spy


def _tuned(tmp_path, tiny_sd_dir, index_dir, ckpt, hard_word: str):
    args = tune_args(tmp_path, tiny_sd_dir, index_dir, ckpt, steps=2, model={"hard_word": hard_word})
    cli = train.main(args, run=False)
    spy = HardIds(cli.model.backbone)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, spy


def test_class_noun_is_the_hard_word_in_tuning_and_in_the_artefact(
    tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path
):
    cli, spy = _tuned(tmp_path / "noun", tiny_sd_dir, index_dir, pretrain_ckpt, "class_noun")
    noun = cli.datamodule.class_noun
    tokenizer = cli.model.backbone.tokenizer
    noun_id = tokenizer(noun, add_special_tokens=False).input_ids[-1]
    assert len(spy.seen) == 2 and all(ids.tolist() == [noun_id] * len(ids) for ids in spy.seen)
    artifact = ConceptArtifact.load(cli.model.artifact_path)
    assert (artifact.hard_token, artifact.hard_token_id, artifact.hard_prompt_token_id) == (
        noun,
        noun_id,
        noun_id,
    )
    # the nearest token is still recorded as the nearest token (what the nearest-word tables report)
    nearest = cli.model.token_index.search(artifact.v_star[None], 1)
    assert artifact.nearest_token_id == int(nearest.ids[0, 0])
    assert artifact.nearest_token_id != noun_id  # so the spy's ids can only have come from the class noun

    default, _ = _tuned(tmp_path / "nearest", tiny_sd_dir, index_dir, pretrain_ckpt, "nearest")
    plain = ConceptArtifact.load(default.model.artifact_path)
    assert plain.hard_token is None and plain.hard_prompt_token_id == plain.nearest_token_id


def test_sampling_reads_the_recorded_hard_word(tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path, backbone):
    cli, _ = _tuned(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, "class_noun")
    artifact = ConceptArtifact.load(cli.model.artifact_path)
    other = tmp_path / "other.safetensors"
    words = [t for t in ("dog", "teapot", "house") if t != cli.datamodule.class_noun]
    artifact.hard_token = words[0]
    artifact.hard_token_id = backbone.tokenizer(words[0], add_special_tokens=False).input_ids[-1]
    artifact.save(other)
    setting = Setting(steps=2, alpha=0.5, guidance=3.0)
    kwargs = dict(prompts=["a photo of <s*>"], seeds=[0], setting=setting, num_inference_steps=2)
    ours = generate_images(cli.model.backbone, ConceptArtifact.load(cli.model.artifact_path), **kwargs)
    again = generate_images(cli.model.backbone, ConceptArtifact.load(cli.model.artifact_path), **kwargs)
    theirs = generate_images(cli.model.backbone, ConceptArtifact.load(other), **kwargs)
    assert (ours[0] == again[0]).all()
    assert (ours[0] != theirs[0]).any()  # alpha 0.5: the vanilla path reads the recorded word


def test_class_noun_hard_word_needs_a_class_noun(tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path):
    args = tune_args(
        tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, steps=1, model={"hard_word": "class_noun"}
    )
    module = train.main(args, run=False).model
    nameless = TuningConcept(name="x", image=Image.new("RGB", (8, 8)), class_noun=None)
    with pytest.raises(ConfigurationError, match="hard_word='class_noun' needs the concept's class noun"):
        module.class_noun_token_id(nameless)


def test_unknown_hard_word_is_refused(tiny_sd_dir):
    from lightning_modules.tuning import ConceptTuning

    with pytest.raises(ValueError, match="hard_word"):
        ConceptTuning(
            pretrained_model_name_or_path=str(tiny_sd_dir),
            image_encoder_name_or_path=str(tiny_sd_dir),
            init="zero",
            hard_word="category",
        )


def test_old_artefacts_keep_the_nearest_token_as_hard_word(tmp_path):
    art = ConceptArtifact(
        v_star=torch.ones(4),
        lora={},
        placeholder="<s*>",
        nearest_token="dog</w>",
        nearest_token_id=7,
        alpha=0.5,
        base_model="m",
        fingerprint="f",
        steps=1,
    )
    loaded = ConceptArtifact.load(art.save(tmp_path / "a.safetensors"))
    assert (loaded.hard_token, loaded.hard_token_id, loaded.hard_prompt_token_id) == (None, None, 7)
