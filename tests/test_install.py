"""`pip install .` and `pip install -e .` install the top-level packages: another project imports the public API
from its own directory, with the repository nowhere on its path.

Offline and fast: the package is built from a copy of the sources with the test interpreter's setuptools
(``--no-build-isolation``) into a throwaway virtual environment whose only extra path is the test
interpreter's site-packages (the dependencies, installed once by requirements.txt); ``--no-deps``.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = [
    p.split(".")[0]
    for p in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
]

# What another project uses: the personalizer, the concept file and its exporters, the losses, the metrics, the
# LightningModules and datamodules. Run with the installed package; prints where each module came from.
USE_THE_API = """
import json
import models.artifact, models.export_kohya, models.personalizer, models.clip_tokenizer
from models.artifact import ConceptArtifact
from models.personalizer import Personalizer, PersonalizerConfig
from losses import DiffusionLoss, NearestNeighbourContrastiveLoss
from lightning_modules import ConceptTuning, EncoderPretraining
from datamodules import ConceptDataModule, PretrainDataModule
from evaluation import IdentitySimilarity
import evaluation.concepts.dreambench, benchmarks
import tempfile
folder = models.clip_tokenizer.write_clip_tokenizer(tempfile.mkdtemp())  # from the BPE file shipped as package data
tokenizer = models.clip_tokenizer.load_clip_tokenizer(folder)
print(json.dumps({
    "files": [m.__file__ for m in (models.artifact, models.personalizer, evaluation.concepts.dreambench)],
    "vocab": len(tokenizer),
    "ids": tokenizer("a photo of a dog").input_ids,
}))
"""


def make_venv(root: Path) -> Path:
    """A virtual environment without pip whose only extra path is this interpreter's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "outer_site_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def copy_sources(dest: Path) -> Path:
    dest.mkdir()
    shutil.copy(REPO / "pyproject.toml", dest)
    shutil.copy(REPO / "README.md", dest)
    for package in dict.fromkeys(PACKAGES):
        if (REPO / package).is_dir():
            shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def clean_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_installed_package_imports_from_another_directory(tmp_path, editable):
    sources = copy_sources(tmp_path / "src")
    python = make_venv(tmp_path / "venv")
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    install += ["-e", str(sources)] if editable else [str(sources)]
    proc = subprocess.run(install, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "another_project"
    elsewhere.mkdir()
    proc = subprocess.run(
        [str(python), "-c", USE_THE_API],
        cwd=elsewhere,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().split("\n")[-1])
    assert report["vocab"] == 49408
    assert report["ids"] == [49406, 320, 1125, 539, 320, 1929, 49407]
    # what the install leaves in the source folder is what .gitignore ignores (test_install_leftovers_are_ignored)
    leftovers = {p.name for p in sources.iterdir() if p.name == "build" or p.name.endswith(".egg-info")}
    assert leftovers <= {"build", "tuning_encoder.egg-info"}, leftovers
    home = sources if editable else tmp_path / "venv"
    for file in report["files"]:
        assert Path(file).resolve().is_relative_to(home.resolve()), (file, home)
        assert not Path(file).resolve().is_relative_to(REPO)


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_install_leftovers_are_ignored():
    """`pip install .` leaves build/ and <name>.egg-info/ in the checkout, the README's install a .venv (a folder,
    or a link to one in a worktree: a link is a file to git, and one was once committed): git ignores them."""
    leftovers = ["build/lib/models/backbone.py", "tuning_encoder.egg-info/PKG-INFO", ".venv"]
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", *leftovers], cwd=REPO, capture_output=True, text=True
    )
    assert proc.stdout.split() == leftovers, proc.stdout + proc.stderr
