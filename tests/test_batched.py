"""Several concepts tuned in one run (``ConceptSetDataModule`` + ``ConceptTuning``) on the committed toy world.

Tolerance of "batched equals sequential": each concept's tuned v* and cores match its single-concept run (same
seeds) to ``atol 1e-5`` (v* entries are about 0.1, cores about 1e-2). The math is the same (its own noise, loss
mean, pull and AdamW state rows); what differs is only float32 rounding of a 12-row batch against a 4-row one.
The cores and, when tuned, the LoRA factors get ``atol 1e-4``: Adam divides by the root of the squared gradient,
so an entry whose gradient is near zero moves by a step-sized amount either way; measured up to 4.5e-5 on a core
entry and 4.3e-5 on 1 of 256 entries of one factor after 3 steps (each concept's own copy against its single run).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import train
from datamodules import ConceptSetDataModule
from lightning_modules.cli import resolve_config
from models.artifact import ConceptArtifact

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "configs" / "tune" / "toyworld.yaml"
BATCH = REPO / "configs" / "tune" / "toyworld_batch.yaml"
CONCEPTS = REPO / "assets" / "toyworld" / "concepts"
NAMES = ["red_striped_star", "blue_checkered_diamond", "yellow_plain_moon"]
STEPS = 3


def _entries() -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((CONCEPTS / "concepts.json").read_text())}


def _list_file(path: Path, names: list[str]) -> Path:
    entries = _entries()
    lines = [
        f"{CONCEPTS / entries[n]['image']}\t{entries[n]['class_noun']}\t{entries[n]['template']}"
        for n in names
    ]
    path.write_text("# image<TAB>class noun<TAB>template\n" + "\n".join(lines) + "\n")
    return path


def _view_kwargs(cfg) -> dict:
    """The data options a ConceptSetDataModule shares with the tuning config's ConceptDataModule."""
    return {
        k: v
        for k, v in cfg.data_kwargs.items()
        if k in ("resolution", "clip_size", "scale", "flip_p", "seed")
    }


def _tune_alone(cfg, module, export_dir: Path, name: str) -> None:
    """One concept's own run (its artefact in ``export_dir``), the reference a batched concept must equal."""
    e = _entries()[name]
    module.reset_concept()
    module.export_dir = str(export_dir)
    data = cfg.build_data(
        image=str(CONCEPTS / e["image"]), templates=[e["template"]], class_noun=e["class_noun"], steps=STEPS
    )
    _trainer(STEPS).fit(module, data)


def _trainer(max_steps: int) -> Trainer:
    return Trainer(
        accelerator="cpu", max_steps=max_steps, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("batched")
    # v* and the cores (METHOD.md's set); the LoRA factors configs/tune/toyworld.yaml tunes too: toy_factors
    overrides = {
        "model.init_args.token_index_cache": str(root / "index"),
        "model.init_args.tune": ["embedding", "cores"],
    }
    cfg = resolve_config([TOY], overrides)
    module = cfg.build_model(export_dir=str(root / "single"), export_diffusers=False)
    return cfg, module, root


@pytest.fixture(scope="module")
def toy_factors(tmp_path_factory):
    """configs/tune/toyworld.yaml as it is: v*, the cores and the LoRA factors."""
    root = tmp_path_factory.mktemp("batched_factors")
    cfg = resolve_config([TOY], {"model.init_args.token_index_cache": str(root / "index")})
    assert cfg.model_kwargs["tune"] == ["embedding", "cores", "factors"]
    module = cfg.build_model(export_dir=str(root / "single"), export_diffusers=False)
    return cfg, module, root


@pytest.mark.parametrize("vae_latents", ["mean", "sample"])
def test_batched_equals_sequential_per_concept(toy, vae_latents):
    cfg, module, root = toy
    module.vae_latents = vae_latents  # with "sample" each concept draws its targets as its single run does
    try:
        _batched_equals_sequential(cfg, module, root / vae_latents)
    finally:
        module.vae_latents = "mean"


def _batched_equals_sequential(cfg, module, root: Path) -> None:
    entries = _entries()
    single = {}
    for name in NAMES:
        _tune_alone(cfg, module, root / "single", name)
        single[name] = (module.v_star.detach().clone(), module.cores.detach().clone())
        assert ConceptArtifact.load(root / "single" / f"{name}.safetensors").steps == STEPS

    module.reset_concept()
    module.export_dir = str(root / "batched")
    kwargs = _view_kwargs(cfg)
    root.mkdir(parents=True, exist_ok=True)
    data = ConceptSetDataModule(
        images=str(_list_file(root / "three.txt", NAMES)), concepts_per_batch=3, steps=STEPS, **kwargs
    )
    assert [c.name for c in data.concepts] == NAMES
    _trainer(-1).fit(module, data)
    assert module.v_star.shape[0] == 3
    for j, name in enumerate(NAMES):
        v, cores = single[name]
        assert not torch.allclose(v[0], module.v_star[(j + 1) % 3])  # the concepts differ
        torch.testing.assert_close(module.v_star[j], v[0], atol=1e-5, rtol=0)
        # The ResNet / feed-forward offsets of the default encoder sum in another order for K concepts than for one:
        # measured up to 4.5e-5 on 1 of 1,472 core entries after 3 Adam steps (v* within 1e-5).
        torch.testing.assert_close(module.cores[j], cores[0], atol=1e-4, rtol=0)
        artifact = ConceptArtifact.load(root / "batched" / f"{name}.safetensors")
        assert artifact.steps == STEPS and artifact.extra["class_noun"] == entries[name]["class_noun"]
        torch.testing.assert_close(artifact.v_star, v[0], atol=1e-5, rtol=0)


def _factors(hyper_or_slots, slot: int | None = None) -> list[torch.Tensor]:
    """Every LoRA factor (A_l then B_l), of the hypernetwork or of one slot's copy."""
    params = [*hyper_or_slots.down, *hyper_or_slots.up]
    return [p.detach().clone() if slot is None else p[slot].detach().clone() for p in params]


def test_batched_factors_equal_sequential_per_concept(toy_factors):
    """With the LoRA factors tuned (the named world's default), each concept of a batch tunes its own copy and
    ends where its single run ends: v*, cores, every factor and the written LoRA."""
    cfg, module, root = toy_factors
    single = {}
    pretrained = _factors(module.personalizer.hypernetwork)
    for name in NAMES:
        _tune_alone(cfg, module, root / "single", name)
        assert module.slot_factors is None  # one concept tunes the hypernetwork's factors themselves
        single[name] = (module.v_star.detach().clone(), module.cores.detach().clone())
        single[name] += (_factors(module.personalizer.hypernetwork),)
    module.reset_concept()
    module.export_dir = str(root / "batched")
    kwargs = _view_kwargs(cfg)
    data = ConceptSetDataModule(
        images=str(_list_file(root / "three.txt", NAMES)), concepts_per_batch=3, steps=STEPS, **kwargs
    )
    _trainer(-1).fit(module, data)
    for ours, start in zip(_factors(module.personalizer.hypernetwork), pretrained):
        torch.testing.assert_close(
            ours, start, rtol=0, atol=0
        )  # the copies moved, the pretrained ones did not
    for j, name in enumerate(NAMES):
        v, cores, factors = single[name]
        torch.testing.assert_close(module.v_star[j], v[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(module.cores[j], cores[0], atol=1e-4, rtol=0)
        moved = 0
        for ours, ref, start in zip(_factors(module.slot_factors, j), factors, pretrained):
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # the cores' tolerance, and why (above)
            moved += int(not torch.allclose(ours, start, atol=1e-6))
        assert (
            moved > len(factors) // 2
        )  # tuning moved most factors (a frozen copy would pass the test above)
        ours = ConceptArtifact.load(root / "batched" / f"{name}.safetensors")
        ref = ConceptArtifact.load(root / "single" / f"{name}.safetensors")
        assert ours.extra["tuned"] == "embedding,cores,factors" and ours.steps == ref.steps == STEPS
        assert ours.lora.keys() == ref.lora.keys()
        for key, (down, up) in ref.lora.items():  # M A and B: the tuned tensors' 1e-4 (measured up to 3.4e-5)
            torch.testing.assert_close(ours.lora[key][0], down, atol=1e-4, rtol=0, msg=key)
            torch.testing.assert_close(ours.lora[key][1], up, atol=1e-4, rtol=0, msg=key)


def test_resumed_run_goes_on_with_its_group_and_ends_where_an_uninterrupted_one_ends(toy_factors):
    """K = 2 over 3 concepts (two groups), stopped one step into the second group and resumed from its checkpoint:
    the resumed run tunes the rest of that group only (the first group's artefacts stay as written) and every
    tuned value, the factor copies included, equals the uninterrupted run's."""
    cfg, _, root = toy_factors
    root = root / "resume"
    kwargs = _view_kwargs(cfg)
    names = _list_file(root.parent / "three.txt", NAMES)

    def run(out: str, max_steps: int = -1, ckpt: Path | None = None, save: bool = False):
        module = cfg.build_model(export_dir=str(root / out), export_diffusers=False)
        data = ConceptSetDataModule(images=str(names), concepts_per_batch=2, steps=STEPS, **kwargs)
        callbacks = (
            [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)] if save else []
        )
        trainer = Trainer(
            accelerator="cpu", max_steps=max_steps, max_epochs=1, logger=False, callbacks=callbacks,
            enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, data, ckpt_path=ckpt, weights_only=True)
        return module, trainer

    whole, _ = run("whole")
    run("resumed", max_steps=STEPS + 1, save=True)  # stopped after the second group's first step
    first = {n: (root / "resumed" / f"{n}.safetensors").read_bytes() for n in NAMES[:2]}
    resumed, trainer = run("resumed", ckpt=root / "ckpt" / "last.ckpt")
    assert trainer.global_step == 2 * STEPS and resumed.slots.group == 1
    assert all((root / "resumed" / f"{n}.safetensors").read_bytes() == b for n, b in first.items())
    for ours, ref in zip(resumed.parameters(), whole.parameters()):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    ours, ref = (ConceptArtifact.load(root / d / f"{NAMES[2]}.safetensors") for d in ("resumed", "whole"))
    assert ours.steps == ref.steps == STEPS
    torch.testing.assert_close(ours.v_star, ref.v_star, rtol=0, atol=0)


def test_groups_of_k_restart_each_concept(toy):
    """K = 2 over 3 concepts: two groups in one run; the second group's concept equals its K = 3 result."""
    cfg, module, root = toy
    module.reset_concept()
    module.export_dir = str(root / "groups")
    kwargs = _view_kwargs(cfg)
    data = ConceptSetDataModule(
        images=str(_list_file(root / "three.txt", NAMES)), concepts_per_batch=2, steps=STEPS, **kwargs
    )
    trainer = _trainer(-1)
    trainer.fit(module, data)
    assert trainer.global_step == 2 * STEPS
    for name in NAMES:
        a = ConceptArtifact.load(root / "groups" / f"{name}.safetensors")
        b = ConceptArtifact.load(root / "mean" / "batched" / f"{name}.safetensors")
        assert a.steps == STEPS
        torch.testing.assert_close(a.v_star, b.v_star, atol=1e-5, rtol=0)


def _bad_folder(root: Path) -> Path:
    folder = root / "images"
    folder.mkdir()
    entries = _entries()
    for name in NAMES[:2]:
        (folder / f"{name}.png").write_bytes((CONCEPTS / entries[name]["image"]).read_bytes())
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


def test_bad_image_is_skipped_and_named_the_others_are_written(tmp_path, index_dir, recwarn):
    folder = _bad_folder(tmp_path)
    out = tmp_path / "out"
    cli = train.main(
        ["--config", str(TOY), "--config", str(BATCH), "--data.init_args.images", str(folder),
         "--data.init_args.concepts_per_batch", "2", "--data.init_args.steps", "1",
         "--model.init_args.export_dir", str(out), "--model.init_args.token_index_cache", str(index_dir),
         "--trainer.logger", "false", "--trainer.callbacks", "[]", "--model.init_args.hard_word", "nearest"],
        run=False,
    )  # fmt: skip
    assert [Path(p).name for p, _ in cli.datamodule.skipped] == ["broken.png"]
    reason = cli.datamodule.skipped[0][1]
    assert "\n" not in reason and "broken.png" in reason
    assert any("skipping" in str(w.message) and "broken.png" in str(w.message) for w in recwarn)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(f"{n}.safetensors" for n in NAMES[:2])
    # The folder run tunes what configs/tune/toyworld.yaml tunes, the factors as a copy per concept.
    assert cli.model.slot_factors is not None and cli.model.slot_factors.slots == 2
    arts = [ConceptArtifact.load(out / f"{n}.safetensors") for n in NAMES[:2]]
    assert all(a.extra["tuned"] == "embedding,cores,factors" for a in arts)


def test_class_noun_word_without_class_nouns_is_one_line_error(tmp_path, index_dir, capsys):
    folder = _bad_folder(tmp_path)  # no concepts.json: no class nouns
    code = train.cli(
        ["fit", "--config", str(TOY), "--config", str(BATCH), "--data.init_args.images", str(folder),
         "--data.init_args.concepts_per_batch", "2", "--model.init_args.token_index_cache", str(index_dir),
         "--model.init_args.export_dir", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        "train.py: error: hard_word='class_noun' (concept 'blue_checkered_diamond') needs the concept's class noun:"
        " set data.init_args.class_noun"
    )
    assert not (tmp_path / "out").exists()  # refused before any step


def test_more_concepts_per_batch_than_images_is_one_line_error(tmp_path, capsys):
    folder = _bad_folder(tmp_path)
    code = train.cli(
        ["fit", "--config", str(TOY), "--config", str(BATCH), "--data.init_args.images", str(folder),
         "--data.init_args.concepts_per_batch", "3"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == f"train.py: error: concepts_per_batch=3 exceeds the 2 usable images in {folder}"


def test_export_is_a_public_step_without_a_trainer(toy, tmp_path):
    """set_concepts + start_group + export: the encoder's prediction written, no Trainer involved."""
    from datamodules import TuningConcept, load_rgb

    _, module, _ = toy
    module.reset_concept()
    e = _entries()[NAMES[0]]
    concept = TuningConcept("alone", load_rgb(CONCEPTS / e["image"]), e["class_noun"], (e["template"],))
    module.set_concepts([concept])
    module.setup("fit")
    module.start_group(0)
    path = module.export(export_dir=tmp_path)
    artifact = ConceptArtifact.load(path)
    assert path == tmp_path / "alone.safetensors" and artifact.steps == 0
    v_star, _ = module.encoder_prediction(concept)
    assert torch.equal(artifact.v_star, v_star[0]) and artifact.extra["class_noun"] == e["class_noun"]


def test_the_sd15_batch_configs_checkpoint_resumes_a_folder_run_through_the_cli(tmp_path, index_dir, capsys):
    """configs/tune/sd15_batch.yaml's trainer section (a checkpoint after every group) on the toy world: a run stopped
    in its second group and resumed with --ckpt_path writes what an uninterrupted run writes; a checkpoint of other
    concepts, or of the same concepts at another K, is refused in one line before any step."""
    trainer = yaml.safe_load((REPO / "configs" / "tune" / "sd15_batch.yaml").read_text())["trainer"]
    ckpt = tmp_path / "ckpt" / "last.ckpt"

    def fit(
        out: str, *extra: str, images: list[str] = NAMES, k: int = 2, checkpoints: Path = ckpt.parent
    ) -> int:
        trainer["callbacks"][1]["init_args"]["dirpath"] = str(checkpoints)
        overlay = tmp_path / "checkpointing.yaml"
        overlay.write_text(yaml.safe_dump({"trainer": trainer}))
        return train.cli(
            ["fit", "--config", str(TOY), "--config", str(BATCH), "--config", str(overlay),
             "--data.init_args.images", str(_list_file(tmp_path / "list.txt", images)),
             "--data.init_args.concepts_per_batch", str(k), "--data.init_args.steps", str(STEPS),
             "--model.init_args.export_dir", str(tmp_path / out), "--model.init_args.export_diffusers", "false",
             "--model.init_args.token_index_cache", str(index_dir), "--trainer.logger", "false", *extra]
        )  # fmt: skip

    assert fit("whole", checkpoints=tmp_path / "other") == 0
    assert fit("resumed", "--trainer.max_steps", str(STEPS + 1)) == 0  # into the second group
    assert ckpt.is_file()
    saved = ckpt.read_bytes()
    assert fit("refused", "--ckpt_path", str(ckpt), images=NAMES[:2]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"train.py: error: --ckpt_path tuned 3 other concepts ({', '.join(NAMES)}), not the 2 of this run"
    )
    assert fit("refused", "--ckpt_path", str(ckpt), k=3) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "train.py: error: --ckpt_path tuned these concepts 2 per batch, this run 3 (data.init_args.concepts_per_batch)"
    )
    assert ckpt.read_bytes() == saved and not (tmp_path / "refused").exists()  # nothing written
    assert fit("resumed", "--ckpt_path", str(ckpt)) == 0
    for name in NAMES:
        ours, ref = (ConceptArtifact.load(tmp_path / d / f"{name}.safetensors") for d in ("resumed", "whole"))
        assert ours.steps == ref.steps == STEPS
        torch.testing.assert_close(ours.v_star, ref.v_star, rtol=0, atol=0)
