"""evaluate.py end to end on the tiny backbone: rows, summary, plots, resuming, regeneration, and clear errors."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning import Trainer
from omegaconf import OmegaConf
from PIL import Image

import evaluate
from datamodules import PretrainDataModule
from evaluation.concepts.base import load_concepts
from evaluation.concepts.synthetic import SyntheticConcepts
from evaluation.config import EvaluationConfigError, MethodSpec
from evaluation.generate.images import image_seed, load_png
from evaluation.metrics.tiny_models import write_tiny_eval_models
from evaluation.plan import Setting
from evaluation.recipe import resolve_recipe
from evaluation.store.results import COLUMNS, ResultsStore, read_results, row_key
from evaluation.tuning import ConceptTuner
from lightning_modules import EncoderPretraining
from models.personalizer import PersonalizerConfig

DREAMBENCH = "evaluation.concepts.dreambench.DreamBenchConcepts"
PROMPTS = '["a photo of a <s*>", "a <s*> on the beach"]'
# Two of configs/evaluate/tiny.yaml's methods, given explicitly: date (alphas 0.5, 1), textual_inversion (alpha 1).
METHODS = (
    '[{"name": "date"}, {"name": "textual_inversion", "overlay": "configs/tune/methods/textual_inversion.yaml",'
    ' "alphas": [1.0]}]'
)
N_SETTINGS = 2 * 2 + 2 * 1  # steps [0, 2] x alphas
N_ROWS = 2 * N_SETTINGS * 2 * 1  # concepts x settings x prompts x samples


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads on a loaded 2-core machine are many times slower
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_eval")
    write_tiny_eval_models(root)
    return root


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory, tiny_sd_dir) -> Path:
    """A one-step pretraining checkpoint with the sizes of configs/pretrain/tiny.yaml."""
    cfg = OmegaConf.load("configs/pretrain/tiny.yaml")
    model = EncoderPretraining(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        image_encoder_name_or_path=str(tiny_sd_dir),
        personalizer=PersonalizerConfig(**OmegaConf.to_container(cfg.model.init_args.personalizer)),
        token_index_cache=None,
    )
    data = PretrainDataModule(synthetic_concepts=8, synthetic_holdout=2, samples_per_concept=1, batch_size=2)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eval mode.*")  # the frozen backbone, on purpose
        trainer.fit(model, data)
    path = tmp_path_factory.mktemp("pretrain") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def base_args(tiny_sd_dir, pretrain_ckpt, eval_models_dir) -> list[str]:
    return [
        "run",
        "--config",
        "configs/evaluate/tiny.yaml",
        "--pretrained_model_name_or_path",
        str(tiny_sd_dir),
        "--image_encoder_name_or_path",
        str(tiny_sd_dir),
        "--encoder_checkpoint",
        str(pretrain_ckpt),
        "--metrics.tiny_models_dir",
        str(eval_models_dir),
        "--tune_overrides",
        '{"model.init_args.token_index_cache": null, "data.init_args.batch_size": 2}',
        "--concepts.prompts",
        PROMPTS,
        "--methods",
        METHODS,
        "--sweep.steps",
        "[0, 2]",
        "--sampling.num_inference_steps",
        "3",
        "--bootstrap_samples",
        "200",
        "--progress",
        "false",
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, base_args):
    """One full run of the tiny configuration: (output folder, result, argv)."""
    out = tmp_path_factory.mktemp("eval") / "out"
    argv = [*base_args, "--out_dir", str(out)]
    return out, evaluate.main(argv), argv


def test_run_writes_rows_summary_and_plots(evaluated):
    out, result, _ = evaluated
    rows = read_results(out / "results.csv")
    assert len(rows) == N_ROWS == result.n_rows == result.n_generated
    assert len({row_key(r) for r in rows}) == N_ROWS
    assert {r["method"] for r in rows} == {"date", "textual_inversion"}
    assert {r["concept"] for r in rows} == {"stripes_60", "textures_61"}
    assert {r["class_noun"] for r in rows} == {"stripes", "textures"}
    for r in rows:
        assert (out / r["image"]).is_file()
        assert r["seed"] == image_seed(0, r["concept"], r["prompt_idx"], r["sample"])
        assert all(-1.0 <= r[m] <= 1.0 for m in ("clip_i", "clip_t", "dino"))
        assert r["tune_seconds"] is not None and r["metrics_info"] == "metrics.json"
    date = {(r["concept"], r["steps"]): r["tune_seconds"] for r in rows if r["method"] == "date"}
    assert date[("stripes_60", 2)] > date[("stripes_60", 0)]

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["aggregates"]) == N_SETTINGS
    for agg in summary["aggregates"]:
        assert agg["n_concepts"] == 2 and agg["n_images"] == 4
        for metric in ("clip_i", "clip_t", "dino"):
            low, high = agg[metric]["ci95"]
            assert low <= agg[metric]["mean"] <= high
    assert set(summary["metrics"]) == {"CLIP-I", "CLIP-T", "DINO"}
    assert summary["metrics"]["CLIP-I"]["preprocessing"]["source"] == "preprocessor_config.json"
    assert "pairing" in summary["metrics"]["CLIP-T"] and summary["wall_seconds"]["total"] > 0
    assert summary["counts"] == {"rows": N_ROWS, "generated": N_ROWS, "tuned": 4}
    # no plain-words method in this run: nothing to pair against
    assert summary["paired_vs_reference"] == [] and not (out / "paired.md").exists()

    with Image.open(out / "tradeoff.png") as img:
        assert img.format == "PNG" and img.width > 0 and img.height > 0
    assert len(list((out / "grids").rglob("*.png"))) == N_SETTINGS
    for step in (0, 2):
        assert (out / "artifacts" / "date" / "stripes_60" / f"step_{step:04d}.safetensors").is_file()


def test_rerun_skips_completed_rows(evaluated):
    out, _, argv = evaluated
    before = (out / "results.csv").read_bytes()
    again = evaluate.main(argv)
    assert again.n_generated == 0 and again.n_tuned == 0 and again.n_rows == N_ROWS
    assert (out / "results.csv").read_bytes() == before


def test_deleted_rows_are_regenerated_bit_identically(evaluated):
    out, _, argv = evaluated
    path = out / "results.csv"
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    dropped = [raw[3], raw[-1]]  # a tuned DATE image and a textual-inversion image
    images = {r["image"]: load_png(out / r["image"]) for r in dropped}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in raw if r not in dropped)
    for r in dropped:
        (out / r["image"]).unlink()

    again = evaluate.main(argv)
    assert again.n_generated == 2 and again.n_tuned == 0  # snapshots reused, only the two images redone
    rows = {row_key(r): r for r in read_results(path)}
    assert len(rows) == N_ROWS
    for old in dropped:
        new = rows[row_key(old)]
        assert np.array_equal(load_png(out / new["image"]), images[old["image"]])
        for metric in ("clip_i", "clip_t", "dino"):
            assert new[metric] == pytest.approx(float(old[metric]), abs=2e-6)


def test_plot_redraws_from_csv(evaluated, tmp_path):
    out, _, _ = evaluated
    target = tmp_path / "redrawn.png"
    csv_path = str(out / "results.csv")
    argv = ["plot", "--results", csv_path, "--out", str(target), "--reference_points", "true"]
    assert evaluate.main(argv) == target
    with Image.open(target) as img:
        assert img.format == "PNG" and img.width > 0
    both = tmp_path / "both.png"  # several files: methods are prefixed by their folder
    assert evaluate.main(["plot", "--results", f"[{csv_path}, {csv_path}]", "--out", str(both)]) == both


def test_exported_artefacts_are_evaluated_as_a_method(evaluated, base_args, tmp_path):
    out, _, _ = evaluated
    method = f'[{{"name": "exported", "artifacts": "{out / "artifacts" / "date"}"}}]'
    argv = [*base_args, "--out_dir", str(tmp_path / "out"), "--methods", method, "--grids", "false"]
    result = evaluate.main(argv)
    rows = read_results(tmp_path / "out" / "results.csv")
    assert result.n_tuned == 0 and len(rows) == 2 * 2 * 2  # concepts x alphas x prompts
    assert {r["steps"] for r in rows} == {2} and {r["method"] for r in rows} == {"exported"}
    tuned = {row_key(r)[1:]: r for r in read_results(out / "results.csv") if r["method"] == "date"}
    for r in rows:  # the exported final artefact is the last snapshot: same images as the tuned method's
        same = tuned[row_key(r)[1:]]
        assert np.array_equal(load_png(tmp_path / "out" / r["image"]), load_png(out / same["image"]))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--concepts.prompts", '["a photo of a dog"]'], "does not contain the placeholder"),
        (["--encoder_checkpoint", "missing/last.ckpt"], "does not exist"),
        (
            ["--concepts", DREAMBENCH, "--concepts.dreambench_root", "ROOT", "--concepts.subjects", "[dog]"],
            "do not exist",
        ),
    ],
)
def test_configuration_errors_are_one_line_and_early(base_args, tmp_path, capsys, extra, message):
    root = tmp_path / "dreambench"
    root.mkdir()
    out = tmp_path / "out"
    argv = [*base_args, "--out_dir", str(out), *(str(root) if a == "ROOT" else a for a in extra)]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("evaluate.py: error:") and "\n" not in err
    assert not out.exists()  # failed before any work


def test_dreambench_run_with_batches_regenerates_a_batch_member(base_args, tmp_path):
    root = tmp_path / "dreambench"
    (root / "teapot").mkdir(parents=True)
    for j, colour in enumerate([(200, 40, 40), (190, 60, 30)]):
        Image.new("RGB", (40, 48), colour).save(root / "teapot" / f"{j:02d}.jpg")
    subjects = tmp_path / "subjects.json"
    subjects.write_text(json.dumps({"subjects": [{"name": "teapot", "class_noun": "teapot", "live": False}]}))
    method = '[{"name": "ti", "overlay": "configs/tune/methods/textual_inversion.yaml", "steps": [1]}]'
    out = tmp_path / "out"
    argv = [
        *base_args,
        *("--out_dir", str(out), "--methods", method, "--concepts", DREAMBENCH),
        *("--concepts.dreambench_root", str(root), "--concepts.subjects_file", str(subjects)),
        *("--concepts.max_prompts", "2", "--sweep.alphas", "[1.0]", "--sampling.batch_size", "2"),
        *("--grids", "false", "--tensorboard", "true"),
    ]
    assert evaluate.main(argv).n_rows == 2
    rows = read_results(out / "results.csv")
    assert {r["concept"] for r in rows} == {"teapot"} and {r["steps"] for r in rows} == {1}
    assert all(r["class_noun"] == "teapot" and "<s*>" in r["prompt"] for r in rows)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # Drop the second image of the batch: it is regenerated with its batch-mate, bit for bit.
    kept, dropped = rows
    original = load_png(out / dropped["image"])
    (out / dropped["image"]).unlink()
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:2]))
    again = evaluate.main(argv)
    assert again.n_generated == 1 and again.n_tuned == 0 and again.n_rows == 2
    assert np.array_equal(load_png(out / dropped["image"]), original)


def test_committed_configs_parse_and_resolve(capsys):
    for path in sorted(Path("configs/evaluate").glob("*.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["run", "--config", str(path), "--print_config"])
        assert exit_info.value.code == 0, path
        assert "sweep:" in capsys.readouterr().out
        cfg = OmegaConf.load(path)
        overrides = dict(cfg.get("tune_overrides") or {})
        for method in cfg.methods:  # overlays exist and their arguments fit ConceptTuning / ConceptDataModule
            spec = MethodSpec(**OmegaConf.to_container(method))
            recipe = resolve_recipe(cfg.tune_config, spec, overrides, "unused", check_checkpoint=False)
            assert recipe.method == spec.name


def test_image_seed_is_stable_and_distinct():
    assert image_seed(0, "stripes_60", 0, 0) == image_seed(0, "stripes_60", 0, 0)
    seeds = {image_seed(b, c, p, s) for b in (0, 1) for c in ("a", "b") for p in (0, 1) for s in (0, 1)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert Setting(4, 0.5, 7.5).label == "s4_a0.5_g7.5"


def test_results_store_drops_a_partial_last_line(tmp_path):
    path = tmp_path / "results.csv"
    row = {c: "" for c in COLUMNS}
    row.update(method="m", setting="s0_a1_g1", steps=0, alpha=1.0, guidance=1.0, concept="c", prompt_idx=0)
    row.update(sample=0, seed=1, inference_steps=2, clip_i=0.5)
    ResultsStore(path).append([row])
    with open(path, "a") as f:
        f.write("m,s0_a1_g1,0,1.0,1.0,c,,0,,1")  # a crash mid-append
    store = ResultsStore(path)
    assert len(store) == 1 and path.read_text().endswith("\n")
    store.append([{**row, "sample": 1}])
    assert len(read_results(path)) == 2
    with pytest.raises(ValueError, match="already"):
        store.append([row])


def test_synthetic_concepts_and_prompt_check():
    spec = SyntheticConcepts(synthetic_ids=[60], prompts=["a <s*>", "a <s*> in snow"], num_references=3)
    (concept,) = load_concepts(spec, "<s*>")
    refs = concept.load_references()
    assert (
        concept.name == "stripes_60" and refs.shape == (3, 3, 64, 64) and 0 <= refs.min() <= refs.max() <= 1
    )
    assert concept.data_args == {"synthetic_concept": 60, "synthetic_seed": 0}
    with pytest.raises(EvaluationConfigError, match="placeholder"):
        load_concepts(SyntheticConcepts(prompts=["a photo"]), "<s*>")


def test_reused_tuner_matches_a_fresh_one(tiny_sd_dir, tmp_path):
    """The module is built once per method: restoring its initial state must make concept 2 independent of
    concept 1 (checked on the LoRA baseline, which also tunes the shared LoRA factors)."""
    overrides = {
        "model.init_args.pretrained_model_name_or_path": str(tiny_sd_dir),
        "model.init_args.image_encoder_name_or_path": str(tiny_sd_dir),
        "model.init_args.token_index_cache": None,
        "data.init_args.batch_size": 1,
    }
    spec = MethodSpec(name="lora", overlay="configs/tune/methods/lora.yaml")
    recipe = resolve_recipe("configs/tune/tiny.yaml", spec, overrides, str(tmp_path / "export"))
    first, second = load_concepts(SyntheticConcepts(synthetic_ids=[60, 61], prompts=["a <s*>"]), "<s*>")
    reused = ConceptTuner(recipe)
    reused.tune(first, [2], tmp_path / "a")  # the factors move from step 2 (cores start at 0)
    again = reused.tune(second, [0, 1], tmp_path / "b")[1]
    fresh = ConceptTuner(recipe).tune(second, [0, 1], tmp_path / "c")[1]
    assert torch.equal(again.v_star, fresh.v_star) and again.nearest_token_id == fresh.nearest_token_id
    assert again.lora.keys() == fresh.lora.keys()
    for name, (down, up) in again.lora.items():
        assert torch.equal(down, fresh.lora[name][0]) and torch.equal(up, fresh.lora[name][1])
    assert float(again.extra["tune_seconds"]) > 0


def test_evaluation_overlays_parse_on_their_base(capsys):
    """The studies' evaluation overlays (configs/experiments/) only change the configs their ``# stack on:`` header
    names: they parse stacked on them, and every tuned method's recipe resolves."""
    overlays = {}
    for path in sorted(Path("configs/experiments").rglob("*.yaml")):
        lines = path.read_text().splitlines()
        chains = [line.split(":", 1)[1].split() for line in lines if line.startswith("# stack on:")]
        assert chains, f"{path}: no '# stack on:' line naming the configs it changes"
        if chains[0][0].startswith("configs/evaluate/"):  # the others are train.py overlays (test_configs.py)
            (overlays[path],) = chains
    assert len(overlays) >= 10
    for path, chain in overlays.items():
        args = [a for p in [*chain, str(path)] for a in ("--config", p)]
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["run", *args, "--print_config"])
        assert exit_info.value.code == 0, path
        cfg = yaml.safe_load(capsys.readouterr().out)
        assert cfg["methods"] and "toyworld" in str(cfg["tune_config"]) + str(cfg["concepts"])
        for method in cfg["methods"]:
            spec = MethodSpec(**method)
            if spec.overlay or not (spec.plain_words or spec.artifacts or spec.export_of):
                recipe = resolve_recipe(
                    cfg["tune_config"], spec, cfg["tune_overrides"] or {}, "unused", check_checkpoint=False
                )
                assert recipe.method == spec.name
