"""DreamBench (Ruiz et al., DreamBooth, CVPR 2023) subjects and prompts.

The dataset (https://github.com/google/dreambooth, ``dataset/``) has one folder of 4-6 images per subject::

    root/backpack/00.jpg, 01.jpg, ...
    root/dog/00.jpg, ...

30 subjects (21 objects, 9 live: cats and dogs), each evaluated on 25 prompts: the object list or the
live-subject list (``evaluation/data/dreambench_prompts.json``). Prompts are stored with the placeholder
``<s*>`` where the original writes ``{0} {1}`` (unique token + class noun); generation puts the learned concept
there and CLIP-T puts the class noun there. The protocol uses one input image per subject (the concept to learn)
and all the subject's images as references for identity metrics.

A custom subjects file with the same schema (``{"subjects": [{"name", "class_noun", "live", "prompts"?}]}``)
points the loader at your own concept folders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from datamodules.transforms import load_rgb, pil_to_uint8_tensor, resize_center_crop
from evaluation.concepts.base import PLACEHOLDER, ConceptSet, EvalConcept, check_prompts, checked_prompts
from evaluation.config import EvaluationConfigError

__all__ = [
    "PLACEHOLDER",
    "DreamBenchConcepts",
    "Subject",
    "check_prompts",
    "fill_placeholder",
    "load_dreambench",
]
DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_PROMPTS_FILE = DATA_DIR / "dreambench_prompts.json"
DEFAULT_SUBJECTS_FILE = DATA_DIR / "dreambench_subjects.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class Subject:
    """One personalization subject.

    Attributes:
        name: folder name (e.g. ``"dog6"``).
        class_noun: the subject's class (``"dog"``, ``"stuffed animal"``), used by CLIP-T and as prior.
        live: live subject (cat, dog): evaluated on the live-subject prompt list.
        image_paths: all real images of the subject, sorted by file name (identity references).
        input_image: the single image the concept is learned from (one of ``image_paths``).
        prompts: evaluation prompts, each containing the placeholder.
    """

    name: str
    class_noun: str
    live: bool
    image_paths: list[Path]
    input_image: Path
    prompts: list[str] = field(default_factory=list)


def fill_placeholder(prompt: str, class_noun: str, placeholder: str = PLACEHOLDER) -> str:
    """Replaces the placeholder by the class noun: ``"a <s*> on the beach"`` -> ``"a dog on the beach"``.

    Raises:
        ValueError: the prompt has no placeholder (the prompt is named in the message).
    """
    if placeholder not in prompt:
        raise ValueError(f"prompt {prompt!r} does not contain the placeholder {placeholder!r}")
    return prompt.replace(placeholder, class_noun)


def load_prompt_lists(
    prompts_file: str | Path = DEFAULT_PROMPTS_FILE, placeholder: str = PLACEHOLDER
) -> dict[str, list[str]]:
    """Reads the object and live-subject prompt lists.

    Args:
        prompts_file: JSON with ``object_prompts``, ``live_subject_prompts`` and the ``placeholder`` they use
            (default ``<s*>``; a file written with ``{}`` works too).
        placeholder: placeholder to put in the returned prompts (replaces the file's own).

    Returns:
        ``{"object": [...], "live": [...]}``.
    """
    data = json.loads(Path(prompts_file).read_text(encoding="utf-8"))
    file_placeholder = data.get("placeholder", PLACEHOLDER)
    lists = {}
    for key, name in (("object_prompts", "object"), ("live_subject_prompts", "live")):
        prompts = check_prompts(data[key], file_placeholder, f"{prompts_file} [{key}]")
        lists[name] = [p.replace(file_placeholder, placeholder) for p in prompts]
    return lists


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def load_dreambench(
    root: str | Path,
    subjects: Sequence[str] | None = None,
    input_image_index: int | dict[str, int] = 0,
    prompts_file: str | Path = DEFAULT_PROMPTS_FILE,
    subjects_file: str | Path = DEFAULT_SUBJECTS_FILE,
    placeholder: str = PLACEHOLDER,
) -> list[Subject]:
    """Loads DreamBench (or a custom set of concept folders in the same layout).

    Args:
        root: folder holding one sub-folder of images per subject.
        subjects: names to load, in this order (default: every subject of ``subjects_file``, in file order).
        input_image_index: index (in the sorted ``image_paths``) of the image the concept is learned from; one
            int for all subjects or a ``{name: index}`` dict (missing names use 0).
        prompts_file: object / live-subject prompt lists (see :func:`load_prompt_lists`).
        subjects_file: ``{"subjects": [{"name", "class_noun", "live", "prompts"?}]}``; a subject's own
            ``prompts`` list, if given, replaces the object / live list.
        placeholder: the concept placeholder in the returned prompts.

    Returns:
        The subjects, with their images, input image and prompts.

    Raises:
        ValueError: an unknown subject name, a prompt without the placeholder (named), or an input image index
            out of range (naming the subject).
        FileNotFoundError: a subject folder is missing or holds no image (naming the folder).
    """
    root = Path(root)
    entries = json.loads(Path(subjects_file).read_text(encoding="utf-8"))["subjects"]
    by_name = {e["name"]: e for e in entries}
    names = list(by_name) if subjects is None else list(subjects)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown subjects {unknown} (not in {subjects_file}); known: {sorted(by_name)}")
    prompt_lists = load_prompt_lists(prompts_file, placeholder)
    missing = [str(root / n) for n in names if not (root / n).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} subject folder(s) under {root} do not exist: {', '.join(missing)}"
        )

    loaded = []
    for name in names:
        entry = by_name[name]
        folder = root / name
        images = list_images(folder)
        if not images:
            raise FileNotFoundError(f"subject folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        index = input_image_index.get(name, 0) if isinstance(input_image_index, dict) else input_image_index
        if not 0 <= index < len(images):
            raise ValueError(
                f"input_image_index {index} is out of range for subject {name!r}, which has {len(images)} images"
            )
        live = bool(entry.get("live", False))
        if "prompts" in entry:
            prompts = check_prompts(entry["prompts"], placeholder, f"{subjects_file} [{name}]")
        else:
            prompts = list(prompt_lists["live" if live else "object"])
        loaded.append(Subject(name, entry["class_noun"], live, images, images[index], prompts))
    return loaded


def load_images(paths: Sequence[str | Path], size: int | None = None) -> Tensor:
    """Reads RGB images into a float batch in [0, 1].

    Args:
        paths: image files.
        size: if given, each image is resized (shorter side, bicubic) and center-cropped to ``size x size`` so
            images of different shapes stack; otherwise all images must share one shape.

    Returns:
        (N, 3, H, W) float32 in [0, 1].
    """
    if not paths:
        raise ValueError("load_images needs at least one path")
    tensors = []
    for path in paths:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                scale = size / min(img.size)
                width, height = max(size, round(img.width * scale)), max(size, round(img.height * scale))
                img = img.resize((width, height), Image.Resampling.BICUBIC)
                left, top = (width - size) // 2, (height - size) // 2
                img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8).copy()
        tensors.append(torch.from_numpy(array).permute(2, 0, 1).float() / 255.0)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"images have different shapes {sorted(shapes)}: pass size= to resize them")
    return torch.stack(tensors)


def _load_references(paths: list[Path], size: int) -> Tensor:
    views = [resize_center_crop(load_rgb(p), size) for p in paths]
    return torch.stack([pil_to_uint8_tensor(v) for v in views]).float() / 255.0


class DreamBenchConcepts(ConceptSet):
    """DreamBench subjects (or your own concept folders in its layout), one input image each.

    Args:
        dreambench_root: DreamBench ``dataset/`` folder (one sub-folder per subject).
        subjects: subjects to evaluate, in order (None: all of ``subjects_file``).
        input_image_index: index of the one image each subject is learned from (sorted file names).
        prompts: prompts with the placeholder that replace the object / live-subject lists (None: the lists).
        prompts_file: DreamBench prompt lists (None: ``evaluation/data/dreambench_prompts.json``).
        subjects_file: DreamBench subjects and class nouns (None: ``evaluation/data/dreambench_subjects.json``).
        reference_size: pixel size of the reference images (every image of the subject).
        max_prompts: use only the first N prompts of each subject (None: all).
    """

    row_selection = ("subjects", "max_prompts")

    def __init__(
        self,
        dreambench_root: str | None = None,
        subjects: list[str] | None = None,
        input_image_index: int = 0,
        prompts: list[str] | None = None,
        prompts_file: str | None = None,
        subjects_file: str | None = None,
        reference_size: int = 64,
        max_prompts: int | None = None,
    ) -> None:
        self.dreambench_root, self.subjects, self.input_image_index = (
            dreambench_root,
            subjects,
            input_image_index,
        )
        self.prompts, self.prompts_file, self.subjects_file = prompts, prompts_file, subjects_file
        self.reference_size, self.max_prompts = reference_size, max_prompts

    def load(self, placeholder: str) -> list[EvalConcept]:
        if not self.dreambench_root:
            raise EvaluationConfigError("concepts.dreambench_root is required for DreamBench concepts")
        root = Path(self.dreambench_root)
        if not root.is_dir():
            raise EvaluationConfigError(f"DreamBench root {root} does not exist (concepts.dreambench_root)")
        try:
            subjects = load_dreambench(
                root,
                subjects=self.subjects,
                input_image_index=self.input_image_index,
                prompts_file=self.prompts_file or DEFAULT_PROMPTS_FILE,
                subjects_file=self.subjects_file or DEFAULT_SUBJECTS_FILE,
                placeholder=placeholder,
            )
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise EvaluationConfigError(str(err).strip("'\"")) from err
        concepts = []
        for sub in subjects:
            prompts = self.prompts if self.prompts else sub.prompts
            prompts = checked_prompts(
                prompts, placeholder, f"prompts of subject {sub.name!r}", self.max_prompts
            )
            paths, size = list(sub.image_paths), self.reference_size
            concepts.append(
                EvalConcept(
                    name=sub.name,
                    class_noun=sub.class_noun,
                    prompts=prompts,
                    data_args={"image": str(sub.input_image), "class_noun": sub.class_noun},
                    load_input=lambda p=sub.input_image: load_rgb(p),
                    load_references=lambda paths=paths, size=size: _load_references(paths, size),
                    input_reference_index=paths.index(sub.input_image),
                )
            )
        return concepts
