"""The instance world (toyworld/instance/world.py), its concepts (toyworld/instance/concepts.py) and the pixel
metric (toyworld/instance/pixels.py): determinism, captions that never name a detail, disjoint held-out
splits, and a metric that tells the same instance from another of its category."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.config import EvaluationConfigError
from toyworld.diagnostics import calibration as cal
from toyworld.instance import concepts as C
from toyworld.instance import pixels as P
from toyworld.instance import render as R
from toyworld.instance import stream as S
from toyworld.instance import world as I
from toyworld.instance.concepts import InstanceConcepts

REPO = Path(__file__).resolve().parents[1]
TEST_DIR = REPO / "assets" / "toyworld" / "instance_concepts"
VAL_DIR = REPO / "assets" / "toyworld" / "instance_validation_concepts"
VAL24_DIR = REPO / "assets" / "toyworld" / "instance_validation_concepts_24"
# Every word a caption may hold: articles, sizes, categories, position phrases, background colour names.
CAPTION_WORDS = {
    "a", "an", "on", "the", "at", "in", "background", "object", "<s*>",
    *I.SIZES, *I.CATEGORIES, *I.POSITIONS, *I.BACKGROUNDS,
}  # fmt: skip


def test_sampling_rendering_and_stream_are_deterministic():
    a = I.sample_instance(I.seeded_rng(3, 1), "train")
    b = I.sample_instance(I.seeded_rng(3, 1), "train")
    assert a == b and a != I.sample_instance(I.seeded_rng(4, 1), "train")
    ctx = I.Context("white", "left", "small")
    assert np.array_equal(R.render(a, ctx, rng=I.seeded_rng(0)), R.render(a, ctx, rng=I.seeded_rng(0)))
    s1, s2 = S.InstanceWorldStream(8, seed=5).batch(7), S.InstanceWorldStream(8, seed=5).batch(7)
    assert torch.equal(s1["pixels"], s2["pixels"]) and s1["captions"] == s2["captions"]
    assert s1["pixels"].shape == (8, 3, 32, 32) and s1["pixels"].min() >= -1 and s1["pixels"].max() <= 1
    assert next(iter(S.InstanceWorldStream(8, seed=5, start_step=7)))["captions"] == s1["captions"]
    assert C.concept_instances("test") == C.concept_instances("test")


def test_committed_concept_folders_are_what_the_writer_writes(tmp_path):
    from PIL import Image

    for split, folder, times in (
        ("test", TEST_DIR, 1),
        ("validation", VAL_DIR, 1),
        ("validation", VAL24_DIR, 3),
    ):
        out = Path(C.write_instance_concepts(tmp_path / f"{split}{times}", split, times))
        assert (out / "concepts.json").read_text() == (folder / "concepts.json").read_text()
        for row in json.loads((folder / "concepts.json").read_text()):
            assert np.array_equal(
                np.asarray(Image.open(out / row["image"])), np.asarray(Image.open(folder / row["image"]))
            )


def test_the_larger_validation_set_holds_the_smaller_one_and_no_test_instance():
    """--times 3: every entry of the plan draws 3 times its count from its own generator, so the 8 come first."""
    small = {name: (kind, inst) for name, kind, inst in C.concept_instances("validation")}
    large = {name: (kind, inst) for name, kind, inst in C.concept_instances("validation", 3)}
    assert len(small) == 8 and len(large) == 24 and all(large[n] == small[n] for n in small)
    test = [inst for _, _, inst in C.concept_instances("test")]
    assert all(inst not in test for _, inst in large.values())
    assert len({inst for _, inst in large.values()}) == 24  # 24 distinct instances
    with pytest.raises(ValueError, match="times must be 1"):
        C.concept_instances("test", 3)


def test_captions_name_category_and_context_never_a_detail():
    detail_words = set(I.PATTERN_KINDS) | {"striped", "checkered", "dotted", "plain"}
    captions = [c for step in range(3) for c in S.InstanceWorldStream(64, seed=1).batch(step)["captions"]]
    assert "" in captions  # the empty caption, for guidance
    for text in captions:
        words = set(text.split())
        assert words <= CAPTION_WORDS, text
        assert not words & detail_words and not re.search(r"\d", text), text
    for folder in (TEST_DIR, VAL_DIR, VAL24_DIR):
        for c in InstanceConcepts(str(folder), num_prompts=6).load("<s*>"):
            for text in [*c.prompts, c.data_args["templates"][0].format("<s*>")]:
                assert set(text.split()) <= CAPTION_WORDS, text
    inst = C.concept_instances("test")[0][2]
    assert I.caption(inst.category, I.Context("green", "top", "large")) == (
        f"a large {inst.category} at the top on a green background"
    )


def test_held_out_splits_are_disjoint_from_each_other_and_from_training():
    split = I.cell_split()
    assert (
        not split["test"] & split["validation"] and not (split["test"] | split["validation"]) & split["train"]
    )
    per_category = len(I.PATTERN_KINDS) * I.HUE_BINS
    assert len(split["train"] | split["test"] | split["validation"]) == per_category * len(I.TRAIN_CATEGORIES)
    assert not set(I.TEST_CATEGORIES) & set(I.VALIDATION_CATEGORIES)
    assert not set(I.HELD_OUT_CATEGORIES) & set(I.TRAIN_CATEGORIES)
    stream = S.InstanceWorldStream(64, seed=2)
    seen = [i for step in range(10) for i in stream.batch(step)["instances"]]
    assert all(I.instance_split(i) == "train" for i in seen)
    assert {i.category for i in seen} == set(I.TRAIN_CATEGORIES)
    assert len({i.cell() for i in seen}) > 100  # many instances per caption
    test, val = C.concept_instances("test"), C.concept_instances("validation")
    assert len(test) >= 24 and len(val) >= 8
    assert {k for _, k, _ in test} == {"held_out_instance", "held_out_category"}
    assert {k for _, k, _ in val} == {"validation_instance", "validation_category"}
    assert all(I.instance_split(i) == "test" for _, _, i in test)
    assert all(I.instance_split(i) == "validation" for _, _, i in val)
    assert not {i.cell() for _, _, i in test} & {i.cell() for _, _, i in val}
    assert not {n for n, _, _ in test} & {n for n, _, _ in val}


def test_same_instance_in_another_context_beats_another_of_its_category():
    """Over 8 seeds x 6 categories: the same instance in a new context (with jitter) scores at least 0.1 above the
    best of 3 random same-category instances in that context (measured: min margin 0.23, mean 0.57)."""
    margins = []
    for seed in range(8):
        rng = I.seeded_rng(seed, 9)
        for category in I.TRAIN_CATEGORIES:
            inst = I.sample_instance(rng, "test", category)
            source = R.render(inst, C.input_context(inst))
            ctx = C.prompt_contexts(inst, 1, seed, "x")[0]
            same = P.identity(R.render(inst, ctx, rng=rng), source)["identity"]
            others = [
                P.identity(R.render(cal.stand_in(rng, inst, ctx, True), ctx, rng=rng), source)["identity"]
                for _ in range(3)
            ]
            margins.append(same - max(others))
    assert min(margins) >= 0.1, margins
    assert float(np.mean(margins)) >= 0.3


def test_pasted_input_has_high_identity_and_the_wrong_context():
    for c in InstanceConcepts(str(TEST_DIR), num_prompts=6).load("<s*>")[::4]:
        source = np.asarray(c.load_input())
        wanted = c.attributes
        s = P.score_images([source] * len(wanted), source, wanted)
        assert min(s["pixel_identity"]) > 0.99 and min(s["pixel_identity_acc"]) == 1.0
        assert max(s["pixel_prompt_acc"]) == 0.0  # a prompt never asks for the input's context


def test_segmentation_recovers_position_and_size():
    rng = I.seeded_rng(1, 2)
    for category in I.CATEGORIES:
        for _ in range(8):
            inst = I.sample_instance(rng, "any", category)
            ctx = I.random_context(rng, inst)
            image = R.render(inst, ctx, rng=rng)
            seg = P.segment(image)
            ax, ay = I.ANCHORS[ctx.position]
            assert abs(seg.centre[0] - ax) <= 0.07 and abs(seg.centre[1] - ay) <= 0.07, (inst, ctx)
            assert 0.8 <= seg.diameter / (2 * I.RADIUS[ctx.size]) <= 1.2, (inst, ctx)
            assert P.read_context(image, seg) == {
                "background": ctx.background,
                "position": ctx.position,
                "size": ctx.size,
            }
            assert np.allclose(seg.background, I.COLOURS[ctx.background], atol=1)
    # A plain circle without jitter: the box is the disc's, to a pixel.
    circle = replace(C.concept_instances("test")[0][2], aspect=1.0, roundness=1 / 3, pattern="plain")
    seg = P.segment(R.render(circle, I.Context("white", "right", "large")))
    x0, y0, x1, y1 = seg.bbox
    r = I.RADIUS["large"] * 32
    assert abs((x0 + x1) / 2 - 0.67 * 32) <= 1 and abs((y0 + y1) / 2 - 16) <= 1
    assert abs((x1 - x0) - 2 * r) <= 1.5 and abs((y1 - y0) - 2 * r) <= 1.5
    empty = P.segment(np.full((32, 32, 3), 200, np.uint8))
    assert not empty.found and P.read_context(np.full((32, 32, 3), 200, np.uint8))["position"] is None


def test_plugin_scores_through_the_metric_interface():
    from evaluation.metrics.registry import REGISTRY

    concepts = InstanceConcepts(str(TEST_DIR), names=["star_test0", "moon_test1"], num_prompts=4).load("<s*>")
    metric = P.PixelIdentityMetric()
    metric.check(concepts)
    metric = metric.load("cpu")
    assert metric.settings() == {"threshold": None} and "pairing" in metric.describe()
    for c in concepts:
        inst = I.Instance.from_json(
            next(e for e in json.loads((TEST_DIR / "concepts.json").read_text()) if e["name"] == c.name)[
                "instance"
            ]
        )
        contexts = [I.Context(a["background"], a["position"], a["size"]) for a in c.attributes]
        images = (
            torch.from_numpy(np.stack([R.render(inst, ctx) for ctx in contexts])).permute(0, 3, 1, 2) / 255
        )
        out = metric.score(images[[2, 0]], c, [2, 0])
        assert set(out) == {col.name for col in P.PIXEL_COLUMNS} <= set(REGISTRY)
        assert all(len(v) == 2 for v in out.values())
        assert out["pixel_identity_acc"] == [1.0, 1.0] and out["pixel_prompt_acc"] == [1.0, 1.0]
        big = torch.nn.functional.interpolate(images[:1], size=64, mode="nearest")  # another resolution
        assert metric.score(big, c, [0])["pixel_prompt_acc"] == [1.0]
        wrong = metric.score(images[:1], c, [1])  # the image made for prompt 0 scored as prompt 1's
        assert wrong["pixel_prompt_acc"] == [0.0] and wrong["pixel_identity_acc"] == [1.0]
    refs = concepts[0].load_references()
    assert refs.shape == (4, 3, 32, 32) and concepts[0].input_reference_index == 0
    assert concepts[0].kind == "held_out_instance" and concepts[1].kind == "held_out_category"
    assert concepts[1].class_noun == "object" and concepts[0].class_noun == "star"
    concepts[0].attributes = None
    with pytest.raises(EvaluationConfigError, match="pixel metric needs"):
        metric.check(concepts)


def test_instance_concepts_refuse_training_instances_and_bad_folders(tmp_path):
    rows = json.loads((VAL_DIR / "concepts.json").read_text())
    bad = dict(rows[0], instance=I.sample_instance(I.seeded_rng(0), "train", rows[0]["words"]).to_json())
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / bad["image"]).write_bytes((VAL_DIR / bad["image"]).read_bytes())
    (folder / "concepts.json").write_text(json.dumps([bad]))
    with pytest.raises(EvaluationConfigError, match="base training distribution"):
        InstanceConcepts(str(folder)).load("<s*>")
    (folder / "concepts.json").write_text(json.dumps([dict(rows[0], split="test")]))
    with pytest.raises(EvaluationConfigError, match="says split"):
        InstanceConcepts(str(folder)).load("<s*>")
    with pytest.raises(EvaluationConfigError, match="does not exist"):
        InstanceConcepts(str(tmp_path / "none")).load("<s*>")


def test_committed_threshold_is_the_validation_calibration():
    threshold, balanced = cal.calibrate_threshold()
    assert abs(threshold - P.IDENTITY_THRESHOLD) < 5e-4 and balanced >= 0.95
    record = json.loads((REPO / "assets" / "toyworld" / "instance_calibration.json").read_text())
    assert abs(record["threshold"] - P.IDENTITY_THRESHOLD) < 5e-4  # docs/research/instance_world.md used it
    assert cal.best_threshold([0.5, 0.6], [0.1, 0.3]) == (pytest.approx(0.4), 1.0)


def test_cli_writes_concepts_and_renders(tmp_path, capsys):
    from toyworld.__main__ import main

    main(["instance-concepts", "--split", "validation", "--out", str(tmp_path / "v")])
    assert (tmp_path / "v" / "concepts.json").read_text() == (VAL_DIR / "concepts.json").read_text()
    main(["instance-render", "--n", "4", "--seed", "0", "--out", str(tmp_path / "g.png")])
    lines = capsys.readouterr().out.strip().split("\n")
    assert (
        (tmp_path / "g.png").is_file()
        and len(lines) == 5
        and all(set(x.split()) <= CAPTION_WORDS for x in lines[1:])
    )
    with pytest.raises(SystemExit):
        main(["instance-calibrate", "--prompts", "0"])


def test_an_evaluation_config_takes_the_instance_concepts_and_the_pixel_metric(tmp_path, capsys):
    """The plug-ins are named by class_path in an ``evaluate.py run`` config, like the world's (the core never
    imports them)."""
    from omegaconf import OmegaConf

    import evaluate

    cfg = OmegaConf.load(REPO / "configs" / "evaluate" / "toyworld_quick.yaml")
    cfg.concepts = {
        "class_path": "toyworld.InstanceConcepts",
        "init_args": {"concepts_dir": str(TEST_DIR), "names": ["star_test0"], "num_prompts": 3},
    }
    cfg.metrics.plugins = [{"class_path": "toyworld.PixelIdentityMetric", "init_args": {"threshold": 0.5}}]
    path = tmp_path / "instance.yaml"
    OmegaConf.save(cfg, path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["run", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "toyworld.PixelIdentityMetric" in out and "toyworld.InstanceConcepts" in out


def test_base_training_on_the_instance_world_runs_and_resumes(tmp_path):
    """The overlay selects the instance stream for the autoencoder and the base model; a rerun resumes."""
    from toyworld.instance.stream import InstanceWorldStream
    from toyworld.training.train import load_config, train_base, world_stream

    overlay = tmp_path / "short.yaml"
    overlay.write_text(
        f"out_dir: {tmp_path / 'run'}\nvae: {{steps: 2, batch_size: 4}}\n"
        "train: {steps: 2, batch_size: 4, warmup: 1, ckpt_every: 1}\n"
    )
    cfg = load_config(["configs/toyworld/base.yaml", "configs/toyworld/instance_base.yaml", str(overlay)])
    assert cfg["world"] == "instance" and cfg["unet"]["sample_size"] == 16 and cfg["train"]["steps"] == 2
    assert isinstance(world_stream(cfg, 2, 0, "base"), InstanceWorldStream)
    train_base(cfg)
    run = tmp_path / "run"
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"vae", "base"}
    cfg["train"]["steps"] = 3
    train_base(cfg)
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 3


def test_unknown_world_is_refused():
    from toyworld.training.train import world_stream

    with pytest.raises(ValueError, match="world must be"):
        world_stream({"world": "other", "resolution": 32}, 2, 0, "base")


@pytest.mark.parametrize(
    "argv", [["--split", "test", "--times", "3"], ["--split", "validation", "--times", "0"]]
)
def test_bad_times_is_one_line_error_before_any_file(argv, tmp_path, capsys):
    from toyworld.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["instance-concepts", *argv, "--out", str(tmp_path / "out")])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m toyworld: error: --times {argv[-1]}: must be >= 1, and more than 1 only with --split validation"
        " (the test set is fixed)"
    )
    assert not (tmp_path / "out").exists()
