"""The toy-world evaluation: checker metrics against hand-made readings, nearest words, the concept set, and one
end-to-end run (one concept, DATE at one setting, the plain words and the diffusers export) on the tiny backbone
with a random checker (the numbers are not the point; that every row carries them is)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from omegaconf import OmegaConf
from PIL import Image

import evaluate
from datamodules import PretrainDataModule
from evaluation.config import EvaluationConfigError
from evaluation.generate.images import load_png
from evaluation.metrics.nearest_word import NearestWords
from evaluation.metrics.tiny_models import write_tiny_eval_models
from evaluation.report.words import nearest_word_table
from evaluation.store.results import read_results
from lightning_modules import EncoderPretraining
from models.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer
from models.personalizer import PersonalizerConfig
from toyworld.named.checker import CHECKER_COLUMNS, AttributeChecker, checker_scores
from toyworld.named.concepts import ToyWorldConcepts
from toyworld.named.world import VALUES, Scene, caption, render

CHECKER_NAMES = [c.name for c in CHECKER_COLUMNS]


def _wanted(**kw: str) -> dict[str, str]:
    base = dict(
        shape="heart", colour="red", pattern="plain", background="white", position="left", size="small"
    )
    return {**base, **kw}


def test_checker_scores_against_hand_made_readings():
    wanted = [_wanted(), _wanted(background="blue", position="right", size="large"), _wanted()]
    readings = {  # image 0: all right; 1: shape wrong, background wrong; 2: pattern and size wrong
        "shape": ["heart", "circle", "heart"],
        "colour": ["red", "red", "red"],
        "pattern": ["plain", "plain", "striped"],
        "background": ["white", "green", "white"],
        "position": ["left", "right", "left"],
        "size": ["small", "large", "large"],
    }
    s = checker_scores(readings, wanted)
    assert list(s) == CHECKER_NAMES
    assert s["identity_acc"] == [1.0, 0.0, 0.0]
    assert s["shape_acc"] == [1.0, 0.0, 1.0] and s["colour_acc"] == [1.0, 1.0, 1.0]
    assert s["pattern_acc"] == [1.0, 1.0, 0.0]
    assert s["prompt_acc"] == [1.0, 0.0, 0.0]
    assert s["background_acc"] == [1.0, 0.0, 1.0] and s["position_acc"] == [1.0, 1.0, 1.0]
    assert s["size_acc"] == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="length"):
        checker_scores({k: v[:2] for k, v in readings.items()}, wanted)


def test_nearest_words_and_semantic_share(tmp_path):
    tokenizer = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "tok"))
    table = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    words = NearestWords(table, tokenizer, ["red", "checkered", "star"])
    red = tokenizer("red", add_special_tokens=False).input_ids[0]
    pieces = tokenizer("checkered", add_special_tokens=False).input_ids
    assert len(pieces) == 2  # found through either BPE piece
    assert words(2.5 * table[red]) == "red"
    assert words(table[pieces[1]] + 1e-3 * table[red]) == "checkered"
    rows = [
        {
            "method": "date",
            "setting": "s12",
            "concept": "a",
            "nearest_word": "red",
            "concept_words": "red plain heart",
        },
        {
            "method": "date",
            "setting": "s12",
            "concept": "b",
            "nearest_word": "star",
            "concept_words": "blue plain moon",
        },
        {
            "method": "lora",
            "setting": "s500",
            "concept": "a",
            "nearest_word": "",
            "concept_words": "red plain heart",
        },
    ]
    table_ = nearest_word_table(rows)
    assert table_["words"] == {"date/s12": {"a": "red", "b": "star"}}  # no learned v*: left out
    assert table_["semantic_share"] == {"date/s12": 0.5}


def write_concepts(folder: Path, scenes: dict[str, Scene]) -> Path:
    """A concepts folder in the format of ``python -m toyworld write-concepts``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, s in scenes.items():
        Image.fromarray(render(s)).save(folder / f"{name}.png")
        novel = s.shape in ("heart", "moon")
        rows.append(
            {
                "name": name,
                "image": f"{name}.png",
                "kind": "novel_shape" if novel else "held_out_combination",
                "class_noun": "object" if novel else s.shape,
                "words": f"{s.colour} {s.pattern} {s.shape}",
                "template": caption(s, identity="{}"),
                "attributes": {a: getattr(s, a) for a in VALUES},
            }
        )
    (folder / "concepts.json").write_text(json.dumps(rows))
    return folder


HEART = Scene("heart", "red", "plain", "white", "center", "large")


def test_toyworld_concepts_prompts_change_the_context(tmp_path):
    folder = write_concepts(tmp_path / "c", {"red_plain_heart": HEART})
    spec = ToyWorldConcepts(concepts_dir=str(folder), num_prompts=6, seed=0, num_references=3)
    (c,) = spec.load(placeholder="<s*>")
    assert c.class_noun == "object" and c.plain_words == "red plain heart" and c.kind == "novel_shape"
    assert c.data_args["templates"] == ["a large {} in the center on a white background"]
    assert len(c.prompts) == len(c.attributes) == 6
    contexts = {(a["background"], a["position"], a["size"]) for a in c.attributes}
    assert len(contexts) == 6 and ("white", "center", "large") not in contexts
    for prompt, a in zip(c.prompts, c.attributes):
        assert (a["shape"], a["colour"], a["pattern"]) == ("heart", "red", "plain")
        assert a["background"] != "red" and "<s*>" in prompt
        assert prompt == caption(Scene(**a), identity="<s*>")  # the prompt says exactly the checked scene
    refs = c.load_references()
    assert refs.shape == (3, 3, 32, 32) and c.input_reference_index == 0
    assert torch.equal(refs[0], torch.from_numpy(render(HEART)).permute(2, 0, 1).float() / 255)
    again = spec.load(placeholder="<s*>")[0]
    assert again.prompts == c.prompts  # seeded
    other = ToyWorldConcepts(str(folder), seed=1, num_references=3).load("<s*>")[0]
    assert other.prompts != c.prompts


def test_toyworld_concepts_refuse_base_distribution_and_unknown_names(tmp_path):
    base = write_concepts(
        tmp_path / "b", {"red_plain_star": Scene("star", "red", "plain", "white", "center", "large")}
    )
    with pytest.raises(EvaluationConfigError, match="base training distribution"):
        ToyWorldConcepts(str(base), num_references=2).load("<s*>")
    good = write_concepts(tmp_path / "g", {"red_plain_heart": HEART})
    with pytest.raises(EvaluationConfigError, match="not in"):
        ToyWorldConcepts(str(good), names=["blue_plain_moon"], num_references=2).load("<s*>")
    with pytest.raises(EvaluationConfigError, match="does not exist"):
        ToyWorldConcepts(str(tmp_path / "none"), num_references=2).load("<s*>")


# ----- one end-to-end run on the tiny backbone -----
@pytest.fixture(scope="module")
def toy_inputs(tmp_path_factory, tiny_sd_dir):
    """Concepts folder, random checker, tiny CLIP, vocabulary and a one-step pretraining checkpoint."""
    root = tmp_path_factory.mktemp("toy_eval")
    concepts = write_concepts(root / "concepts", {"red_plain_heart": HEART})
    torch.manual_seed(0)
    checker = AttributeChecker({k: list(v) for k, v in VALUES.items()}, width=8).save_pretrained(
        root / "checker"
    )
    clip = write_tiny_eval_models(root / "eval")["clip"]
    vocabulary = root / "vocabulary.txt"
    vocabulary.write_text("# words\nred\nplain\ncheckered\nstar\nobject\n")
    cfg = OmegaConf.load("configs/pretrain/tiny.yaml")
    model = EncoderPretraining(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        image_encoder_name_or_path=str(tiny_sd_dir),
        personalizer=PersonalizerConfig(**OmegaConf.to_container(cfg.model.init_args.personalizer)),
        token_index_cache=None,
    )
    data = PretrainDataModule(synthetic_concepts=4, synthetic_holdout=1, samples_per_concept=1, batch_size=2)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eval mode.*")
        trainer.fit(model, data)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"concepts": concepts, "checker": checker, "clip": clip, "vocabulary": vocabulary, "ckpt": ckpt}


def test_one_concept_run_has_checker_metrics_plain_words_and_export(toy_inputs, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    methods = [
        {"name": "date", "steps": [1], "alphas": [0.5, 1.0]},
        {"name": "plain_words", "plain_words": True},
        {"name": "date_export", "export_of": "date"},
    ]
    overrides = {
        "model.init_args.pretrained_model_name_or_path": str(tiny_sd_dir),
        "model.init_args.image_encoder_name_or_path": str(tiny_sd_dir),
        "data.init_args.clip_size": 32,  # the tiny backbone's CLIP tower (the toy world's reads 64 px)
        "model.init_args.encoder_checkpoint": str(toy_inputs["ckpt"]),
        "model.init_args.token_index_cache": None,
        "model.init_args.token_vocabulary": None,
        "model.init_args.torch_dtype": None,
        "data.init_args.batch_size": 2,
    }
    result = evaluate.main(
        [
            "run",
            "--config",
            "configs/evaluate/toyworld.yaml",
            "--out_dir",
            str(out),
            "--tune_overrides",
            json.dumps(overrides),
            "--methods",
            json.dumps(methods),
            "--concepts.concepts_dir",
            str(toy_inputs["concepts"]),
            "--concepts.num_prompts",
            "2",
            "--concepts.num_references",
            "3",
            "--sampling.num_inference_steps",
            "3",
            "--sampling.samples_per_prompt",
            "1",
            "--sampling.batch_size",
            "2",
            "--metrics.clip",
            str(toy_inputs["clip"]),
            "--metrics.clip_tokenizer",
            "null",
            "--metrics.clip_processor",
            "null",
            "--metrics.plugins",
            json.dumps(
                [
                    {
                        "class_path": "toyworld.CheckerMetric",
                        "init_args": {"path": str(toy_inputs["checker"])},
                    }
                ]
            ),
            "--metrics.vocabulary",
            str(toy_inputs["vocabulary"]),
            "--bootstrap_samples",
            "50",
            "--progress",
            "false",
        ]
    )
    rows = {(r["method"], r["alpha"], r["prompt_idx"]): r for r in read_results(out / "results.csv")}
    assert result.n_rows == 4 * 2 and set(m for m, _, _ in rows) == {"date", "plain_words", "date_export"}
    for r in rows.values():
        assert all(r[c] in (0.0, 1.0) for c in CHECKER_NAMES)
        assert r["identity_acc"] == r["shape_acc"] * r["colour_acc"] * r["pattern_acc"]
        assert r["prompt_acc"] == r["background_acc"] * r["position_acc"] * r["size_acc"]
        assert r["clip_i"] is not None and r["clip_i_no_input"] is not None and r["clip_t"] is not None
        assert r["concept_words"] == "red plain heart" and r["concept_kind"] == "novel_shape"
    assert rows[("date", 0.5, 0)]["nearest_word"] in {"red", "plain", "checkered", "star", "object"}
    assert (
        rows[("plain_words", 1.0, 0)]["nearest_word"] == ""
        and rows[("plain_words", 1.0, 0)]["tune_seconds"] is None
    )
    assert rows[("date_export", 1.0, 0)]["steps"] == 1
    # The export in plain diffusers is DATE's single path: the same images as dual-path sampling at alpha 1.
    for i in range(2):
        dual = load_png(out / rows[("date", 1.0, i)]["image"]).astype(int)
        exported = load_png(out / rows[("date_export", 1.0, i)]["image"]).astype(int)
        assert abs(dual - exported).max() <= 2
    plain = load_png(out / rows[("plain_words", 1.0, 1)]["image"]).astype(int)
    assert abs(plain - exported).max() > 2  # same noise, but v* and the LoRA are not the plain words
    assert (
        out / "exports" / "date_export" / "red_plain_heart" / "s1" / "pytorch_lora_weights.safetensors"
    ).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["aggregates_by_concept_kind"]) == {"novel_shape"}
    assert summary["nearest_words"]["words"]["date/s1_a0.5_g3"]["red_plain_heart"]
    assert all((out / f).is_file() for f in ("tradeoff.png", "tradeoff_clip.png", "nearest_words.md"))


def test_committed_toyworld_config_plans_every_method(tmp_path):
    from evaluation.config import MethodSpec, SweepSpec
    from evaluation.plan import make_plans

    cfg = OmegaConf.to_container(OmegaConf.load("configs/evaluate/toyworld.yaml"))
    folder = write_concepts(tmp_path / "c", {"red_plain_heart": HEART})
    concepts = ToyWorldConcepts(concepts_dir=str(folder), num_prompts=6, num_references=5)
    ckpt = "assets/toyworld/encoder/date.ckpt"  # planning reads and phase-checks each encoder (weights only)
    run_wide = {"model.init_args.encoder_checkpoint": str(ckpt)}
    methods = [MethodSpec(**m) for m in cfg["methods"]]
    for m in methods:
        if m.overlay and "no_regularizer" in m.overlay:
            m.overrides = {**m.overrides, **run_wide}  # the overlay names its own encoder
    sweep = SweepSpec(**cfg["sweep"])
    _, (concept,), plans = make_plans(tmp_path / "o", cfg["tune_config"], methods, concepts, sweep, run_wide)
    by = {p.spec.name: p for p in plans}
    assert {p.kind for p in plans} == {"tuned", "plain_words", "export"}
    assert [s.alpha for s in by["date"].settings] == [0.3, 0.5, 0.7, 1.0]
    assert by["textual_inversion"].steps == [100, 500, 3000] and by["lora"].steps == [500]
    assert [(s.steps, s.alpha, s.guidance) for s in by["date_export"].settings] == [(12, 1.0, 3.0)]
    assert [(s.steps, s.alpha) for s in by["plain_words"].settings] == [(0, 1.0)]
    assert len(concept.prompts) == 6 and concept.data_args["class_noun"] == "object"
    later = [MethodSpec(name="x", export_of="date"), MethodSpec(name="date")]
    with pytest.raises(EvaluationConfigError, match="earlier tuned method"):
        make_plans(tmp_path / "o2", cfg["tune_config"], later, concepts, sweep, run_wide)
    both = [MethodSpec(name="p", plain_words=True, overlay="configs/tune/methods/lora.yaml")]
    with pytest.raises(EvaluationConfigError, match="plain_words / export_of take no"):
        make_plans(tmp_path / "o3", cfg["tune_config"], both, concepts, sweep, run_wide)
