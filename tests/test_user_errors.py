"""Every mistake a user makes is one line naming it (status 2), and nothing saved is ever half-written.

Each case runs the real command (``python train.py ...`` / ``python evaluate.py ...``) as a subprocess on the
committed toy world, as a new user would; see tests/user_errors_runs.py for what each check means. The
numbers in the comments are the items of the issue these tests close.
"""

from __future__ import annotations

import resource
import shutil

import pytest
import torch
import yaml

from models.artifact import ConceptArtifact
from models.attention import lora_targets
from tests.user_errors_runs import (
    CONCEPT,
    REPO,
    TOY_PIPELINE,
    TOY_PRETRAIN,
    TOY_TUNE,
    assert_umask_modes,
    assert_user_error,
    run,
    temporaries,
    tree,
    tune_args,
)

pytestmark = pytest.mark.slow
PROMPTS = '["a large <s*> in the center on a white background"]'


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return tmp_path_factory.mktemp("toy_index")


@pytest.fixture(scope="module")
def first_set(tmp_path_factory, index):
    """The concept set of a finished 1-step toy-world tuning run (artefact, diffusers and kohya files)."""
    root = tmp_path_factory.mktemp("first")
    export = root / "concepts"
    proc = run("train.py", tune_args(root, export, index, 1, "--model.init_args.export_kohya", "true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return export


@pytest.fixture
def saved(first_set, tmp_path):
    """A copy of the first set, to be left unchanged by a failing run: (folder, its files' sha256 and modes)."""
    export = tmp_path / "concepts"
    shutil.copytree(first_set, export)
    return export, tree(export)


def _assert_unchanged(export, before) -> None:
    assert tree(export) == before
    assert not temporaries(export)


# ----- silent wrong results -----
def test_seed_from_the_command_line_reaches_model_and_data():  # 1
    proc = run("train.py", ["fit", "--config", str(TOY_TUNE), "--seed_everything", "4", "--print_config"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load(proc.stdout)
    assert config["seed_everything"] == 4
    assert config["model"]["init_args"]["seed"] == 4
    assert config["data"]["init_args"]["seed"] == 4


def test_resume_refuses_a_checkpoint_of_another_base_model(pretrain_ckpt, tmp_path):  # 2
    proc = run(
        "train.py",
        ["fit", "--config", str(TOY_PRETRAIN), "--ckpt_path", str(pretrain_ckpt), "--trainer.max_steps", "1"]
        + ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"],
    )
    assert_user_error(proc, "train.py", str(pretrain_ckpt), "assets/toyworld/pipeline", "fingerprint")


def test_sample_refuses_a_concept_of_another_base_model(backbone, tmp_path):  # 3
    lora = {n: (torch.zeros(4, i), torch.zeros(o, 4)) for n, (i, o) in lora_targets(backbone.unet).items()}
    concept = tmp_path / "tiny.safetensors"
    ConceptArtifact(
        v_star=backbone.token_embedding_table()[100].detach().float().clone(),
        lora=lora,
        placeholder="<s*>",
        nearest_token="a</w>",
        nearest_token_id=100,
        alpha=0.5,
        base_model=backbone.name_or_path,
        fingerprint=backbone.fingerprint(),
        steps=1,
    ).save(concept)
    args = ["sample", "--concept", str(concept), "--base_model", str(TOY_PIPELINE), "--prompts", PROMPTS]
    proc = run("evaluate.py", [*args, "--out", str(tmp_path / "s.png")])
    assert_user_error(proc, "evaluate.py", str(concept), backbone.fingerprint(), "fingerprint")
    assert not (tmp_path / "s.png").exists()


def test_zero_step_tuning_is_refused_or_announced(index, tmp_path):  # 4
    proc = run("train.py", tune_args(tmp_path, tmp_path / "concepts", index, 0))
    assert_user_error(proc, "train.py", "--trainer.max_steps 0", "at least 1 step", "encoder_only")
    assert "Loading" not in proc.stderr and not (tmp_path / "concepts").exists()
    # With the data's length given, 0 steps exports the initial prediction, and says so.
    proc = run(
        "train.py", tune_args(tmp_path, tmp_path / "concepts", index, 0, "--data.init_args.steps", "1")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("train.py: warning:")]
    assert "--trainer.max_steps 0" in line and "nothing is tuned" in line and "init: encoder" in line
    assert ConceptArtifact.load(tmp_path / "concepts" / f"{CONCEPT}.safetensors").steps == 0


# ----- one line instead of a traceback -----
def test_diverging_learning_rate_names_step_and_loss_terms(saved, index, tmp_path):  # 5
    export, before = saved
    lr = ["--model.init_args.optimizer.init_args.lr", "1e6"]
    proc = run("train.py", tune_args(tmp_path, export, index, 3, *lr))
    assert_user_error(proc, "train.py", "diverged at step", "loss", "learning rate")
    _assert_unchanged(export, before)


@pytest.mark.parametrize(
    "option, value",
    [
        ("--model.init_args.alpha", "1.5"),
        ("--model.init_args.optimizer.init_args.lr", "-1"),
    ],
)
def test_out_of_range_training_values_are_refused_at_parse_time(option, value, index, tmp_path):  # 6
    proc = run("train.py", tune_args(tmp_path, tmp_path / "concepts", index, 1, option, value))
    assert_user_error(proc, "train.py", option, value)
    assert "Loading" not in proc.stderr and not (tmp_path / "concepts").exists()


@pytest.mark.parametrize(
    "option, value", [("--alpha", "2"), ("--sampler", "euler"), ("--prompts", "[not json")]
)
def test_sample_values_are_refused_before_loading(option, value, first_set, tmp_path):  # 6, 11
    args = ["sample", "--concept", str(first_set / f"{CONCEPT}.safetensors"), "--prompts", PROMPTS]
    proc = run("evaluate.py", [*args, option, value, "--out", str(tmp_path / "s.png")])
    message = assert_user_error(proc, "evaluate.py", option, value)
    if option == "--prompts":
        assert "not a JSON list of strings" in message
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncated", "ckpt"])
def test_damaged_concept_file_is_named(damage, first_set, tmp_path):  # 7
    good = (first_set / f"{CONCEPT}.safetensors").read_bytes()
    bad = tmp_path / f"{damage}.safetensors"
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    else:
        bad = REPO / "assets" / "toyworld" / "encoder" / "date.ckpt"
    proc = run("evaluate.py", ["sample", "--concept", str(bad), "--prompts", PROMPTS])
    assert_user_error(proc, "evaluate.py", str(bad), "not a readable safetensors concept artefact")


def test_full_disk_is_one_line_naming_the_file_and_keeps_the_saved_set(saved, index, tmp_path):  # 8
    export, before = saved

    def small_files():  # writes past 64 KiB fail with EFBIG, as on a full disk (the artefact is ~130 KB)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = run("train.py", tune_args(tmp_path, export, index, 1), preexec_fn=small_files)
    assert_user_error(proc, "train.py", str(export), "File too large")
    _assert_unchanged(export, before)


def test_unwritable_export_folder_is_refused_before_training(index, tmp_path):  # 8
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run("train.py", tune_args(tmp_path, blocker / "concepts", index, 1))
    assert_user_error(proc, "train.py", "--model.init_args.export_dir", str(blocker))
    assert "Loading" not in proc.stderr and blocker.read_text() == "not a folder"


def test_a_folder_given_as_the_image_is_called_a_folder(index, tmp_path):  # 9
    folder = REPO / "assets" / "toyworld" / "concepts"
    proc = run(
        "train.py", tune_args(tmp_path, tmp_path / "c", index, 1, "--data.init_args.image", str(folder))
    )
    message = assert_user_error(proc, "train.py", str(folder), "is a folder")
    assert "not found" not in message


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--model.init_args.alpah", "1"], ["--model.init_args.alpah", "did you mean 'alpha'"]),
        (["--trainr.max_steps", "3"], ["--trainr.max_steps", "did you mean '--trainer.max_steps'"]),
        (["--trainer.max_steps", "ten"], ["--trainer.max_steps", "ten"]),
    ],
)
def test_config_typos_are_one_short_line(args, needles):  # 10
    proc = run("train.py", ["fit", "--config", str(TOY_TUNE), *args])
    assert_user_error(proc, "train.py", *needles)
    assert "usage:" not in proc.stderr


# ----- artefacts -----
def test_a_file_in_the_way_fails_the_whole_set(saved, index, tmp_path):  # 12
    export, _ = saved
    shutil.rmtree(export / f"{CONCEPT}_diffusers")
    (export / f"{CONCEPT}_diffusers").write_text("a file where the diffusers folder goes")
    before = tree(export)
    proc = run("train.py", tune_args(tmp_path, export, index, 1))
    assert_user_error(proc, "train.py", str(export / f"{CONCEPT}_diffusers"))
    _assert_unchanged(export, before)


def test_export_removes_stale_temporaries_warns_on_overwrite_and_follows_umask(saved, index, tmp_path):
    export, before = saved  # 13, 14, 16
    stale = [
        export / f".{CONCEPT}.safetensors.k3j9x2ab.tmp",
        export / f".{CONCEPT}.safetensors.tmp-999999999-x",
    ]
    stale[0].write_bytes(b"")  # what a kill -9 during an export left before this change
    stale[1].mkdir()  # a staging folder of a killed run (no process has that pid)
    proc = run("train.py", tune_args(tmp_path, export, index, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replaced the earlier" in proc.stderr and CONCEPT in proc.stderr
    assert not temporaries(export) and not any(p.exists() for p in stale)
    assert tree(export).keys() == {k for k in before if "_kohya" not in k}  # this run exports no kohya files
    assert ConceptArtifact.load(export / f"{CONCEPT}.safetensors").steps == 2
    assert_umask_modes(export)


def test_first_set_follows_umask_and_names_its_base_model_absolutely(first_set):  # 14, 15
    assert_umask_modes(first_set)
    assert {p.name for p in first_set.iterdir()} == {
        f"{CONCEPT}{s}" for s in (".safetensors", "_diffusers", "_kohya")
    }
    assert ConceptArtifact.load(first_set / f"{CONCEPT}.safetensors").base_model == str(
        TOY_PIPELINE.resolve()
    )


def test_sample_runs_from_another_folder_and_names_a_missing_base_model(first_set, tmp_path):  # 14, 15
    concept = str(first_set / f"{CONCEPT}.safetensors")
    fast = ["--samples_per_prompt", "1", "--num_inference_steps", "2"]
    proc = run("evaluate.py", ["sample", "--concept", concept, "--prompts", PROMPTS, *fast], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_umask_modes(tmp_path / "outputs")
    moved = ConceptArtifact.load(concept)
    moved.base_model = str(tmp_path / "gone" / "pipeline")
    moved.save(tmp_path / "moved.safetensors")
    proc = run(
        "evaluate.py", ["sample", "--concept", str(tmp_path / "moved.safetensors"), "--prompts", PROMPTS]
    )
    assert_user_error(proc, "evaluate.py", str(tmp_path / "gone" / "pipeline"))
