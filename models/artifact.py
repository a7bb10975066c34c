"""Concept artefacts: one safetensors file per tuned concept, the pair plain diffusers loads, and kohya's files.

The artefact holds v*, its nearest real token, the concept's LoRA as static factors (``down' = M·A``, ``up = B``
for each target linear), the dual-path alpha, the base model (an absolute path for a local folder, so it
resolves from any working directory; else the hub id) and its fingerprint, and the tuning steps.

:func:`write_concept_set` writes a concept's files (the artefact, ``<name>_diffusers/``, ``<name>_kohya/``) as one
set: all are built in a staging folder next to them and moved into place only when all succeeded, so a failure
(full disk, read-only folder, a file in the way) leaves the previous set as it was. See :mod:`models.io`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.attention import LoraDelta
from models.errors import ArtifactWriteError, MissingFileError, TuningEncoderError
from models.export_kohya import write_kohya
from models.export_sdxl import write_diffusers_sdxl
from models.io import (
    atomic_write,
    check_writable_dir,
    remove_stale_temporaries,
    replace_all,
    temp_prefix,
)

FORMAT = "tuning-encoder/concept"
FORMAT_VERSION = "1"
OFFSET_PREFIX = "unet_offset."  # dense UNet offsets of full fine-tuning (DreamBooth)


class ArtifactError(TuningEncoderError, ValueError):
    """A file that is not a readable concept artefact, or one tuned on another base model."""


class ConceptOverwriteWarning(UserWarning):
    """An export replaced the files of an earlier concept of the same name."""


def portable_base_model(name_or_path: str) -> str:
    """An existing local folder as an absolute path (it then resolves from any directory); a hub id unchanged."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


@dataclass
class ConceptArtifact:
    """One personalized concept.

    Attributes:
        v_star: (D,) word embedding of S*.
        lora: ``"<attention module>.<projection>" -> (down (r, in), up (out, r))``.
        placeholder: the pseudo-word, e.g. ``"<s*>"``.
        nearest_token: the nearest real token string of v* (the hard prompt's word).
        nearest_token_id: its id.
        alpha: dual-path blend to sample with.
        base_model: name or path of the Stable Diffusion weights.
        fingerprint: :meth:`DiffusionBackbone.fingerprint` of the base model.
        steps: tuning steps taken.
        extra: any further string metadata (method, concept name, ...).
        unet_offsets: dense offsets ``W - W_base`` of UNet parameters by name (full fine-tuning, DreamBooth);
            empty for every other method (:mod:`models.unet_offsets`).
        hard_token: the hard prompt's word when it is not the nearest token (``hard_word: class_noun``: the
            concept's class noun); None = ``nearest_token``.
        hard_token_id: its id (None with ``hard_token``).
    """

    v_star: torch.Tensor
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
    placeholder: str
    nearest_token: str
    nearest_token_id: int
    alpha: float
    base_model: str
    fingerprint: str
    steps: int
    extra: dict[str, str] = field(default_factory=dict)
    unet_offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    hard_token: str | None = None
    hard_token_id: int | None = None

    @property
    def hard_prompt_token_id(self) -> int:
        """The word the vanilla path reads in place of S* (the class noun if recorded, else the nearest token)."""
        return self.nearest_token_id if self.hard_token_id is None else self.hard_token_id

    @property
    def hard_prompt_token(self) -> str:
        """The string of :attr:`hard_prompt_token_id`."""
        return self.nearest_token if self.hard_token is None else self.hard_token

    def embedding_parts(self) -> dict[str, int]:
        """Names and widths of v*'s parts (SDXL: ``{"clip_l": 768, "clip_g": 1280}``); empty for one encoder."""
        spec = self.extra.get("embedding_parts", "")
        return {k: int(v) for k, v in (item.split(":") for item in spec.split(",") if item)}

    def embedding_tensors(self, single_key: str = "emb_params") -> dict[str, torch.Tensor]:
        """v* as (1, D) tensors: ``{single_key: v*}``, or one per part for SDXL (``{"clip_l": .., "clip_g": ..}``)."""
        vec = self.v_star.detach().float().cpu().reshape(-1)
        parts = self.embedding_parts()
        if not parts:
            return {single_key: vec.reshape(1, -1).contiguous()}
        if sum(parts.values()) != vec.numel():
            raise ValueError(f"embedding parts {parts} do not add up to v*'s {vec.numel()} values")
        pieces = torch.split(vec, list(parts.values()))
        return {name: p.reshape(1, -1).contiguous() for name, p in zip(parts, pieces)}

    def check_backbone(self, backbone, source: str) -> None:
        """Refuses a backbone other than the one this concept was tuned on (its fingerprint), naming both.

        Raises:
            ArtifactError: the fingerprints differ.
        """
        if not backbone.matches_fingerprint(self.fingerprint, self.base_model):
            raise ArtifactError(
                f"{source} was tuned on base model {self.base_model!r} (fingerprint {self.fingerprint}), not on "
                f"{backbone.name_or_path!r} (fingerprint {backbone.fingerprint()})"
            )

    def deltas(self) -> dict[str, LoraDelta]:
        """LoRA deltas for the dual-path processors (core = identity, batch 1)."""
        out = {}
        for name, (down, up) in self.lora.items():
            eye = torch.eye(down.shape[0], dtype=down.dtype, device=down.device).unsqueeze(0)
            out[name] = LoraDelta(down, eye, up)
        return out

    def save(self, path: str | Path) -> Path:
        tensors = {"v_star": self.v_star.detach().float().cpu().contiguous()}
        for name, (down, up) in self.lora.items():
            tensors[f"lora.{name}.down"] = down.detach().float().cpu().contiguous()
            tensors[f"lora.{name}.up"] = up.detach().float().cpu().contiguous()
        for name, delta in self.unet_offsets.items():
            tensors[f"{OFFSET_PREFIX}{name}"] = delta.detach().float().cpu().contiguous()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "placeholder": self.placeholder,
            "nearest_token": self.nearest_token,
            "nearest_token_id": str(self.nearest_token_id),
            "alpha": repr(float(self.alpha)),
            "base_model": portable_base_model(self.base_model),
            "fingerprint": self.fingerprint,
            "steps": str(int(self.steps)),
            "extra": json.dumps(self.extra),
        }
        if self.hard_token_id is not None:
            meta.update(hard_token=str(self.hard_token), hard_token_id=str(int(self.hard_token_id)))
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> ConceptArtifact:
        """Reads an artefact; a missing file or a safetensors file of another kind is a clear error."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"concept artefact {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as err:  # safetensors raises several error types for foreign or damaged files
            first = " ".join((str(err).strip() or type(err).__name__).split())
            raise ArtifactError(f"{path} is not a readable safetensors concept artefact: {first}") from err
        if meta.get("format") != FORMAT:
            raise ArtifactError(
                f"{path} is not a tuning-encoder concept artefact (format {meta.get('format')!r})"
            )
        lora = {}
        for key in tensors:
            if key.startswith("lora.") and key.endswith(".down"):
                name = key[len("lora.") : -len(".down")]
                lora[name] = (tensors[key], tensors[f"lora.{name}.up"])
        return cls(
            v_star=tensors["v_star"],
            lora=lora,
            placeholder=meta["placeholder"],
            nearest_token=meta["nearest_token"],
            nearest_token_id=int(meta["nearest_token_id"]),
            alpha=float(meta["alpha"]),
            base_model=meta["base_model"],
            fingerprint=meta["fingerprint"],
            steps=int(meta["steps"]),
            extra=json.loads(meta.get("extra", "{}")),
            unet_offsets={
                k[len(OFFSET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(OFFSET_PREFIX)
            },
            hard_token=meta.get("hard_token"),
            hard_token_id=int(meta["hard_token_id"]) if "hard_token_id" in meta else None,
        )

    def export_diffusers(self, out_dir: str | Path) -> Path:
        """Writes the single-path approximation plain diffusers loads.

        ``pytorch_lora_weights.safetensors`` (peft key format, read by ``pipe.load_lora_weights(out_dir)``) and
        ``learned_embeds.safetensors`` (``{placeholder: v*}``, read by ``pipe.load_textual_inversion``). What it
        loses: the vanilla path (it is alpha = 1: no blending with the base model on the hard prompt).
        """
        if self.embedding_parts():
            return write_diffusers_sdxl(self, out_dir)  # clip_l / clip_g embedding, SDXL LoRA loader
        out = Path(out_dir)
        lora_sd = {}
        for name, (down, up) in self.lora.items():
            lora_sd[f"unet.{name}.lora_A.weight"] = down.detach().float().cpu().contiguous()
            lora_sd[f"unet.{name}.lora_B.weight"] = up.detach().float().cpu().contiguous()
        meta = {"format": "pt", "base_model": self.base_model, "placeholder": self.placeholder}
        atomic_write(
            out / "pytorch_lora_weights.safetensors", lambda tmp: save_file(lora_sd, tmp, metadata=meta)
        )
        emb = {self.placeholder: self.embedding_tensors()["emb_params"].reshape(-1)}
        atomic_write(out / "learned_embeds.safetensors", lambda tmp: save_file(emb, tmp, metadata=meta))
        return out

    def export_kohya(
        self,
        out_dir: str | Path,
        name: str,
        alpha: float | None = None,
        prediction_type: str = "epsilon",
        resolution: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, Path]:
        """Writes the files Automatic1111, Forge and ComfyUI read (diffusers reads them too).

        ``<name>_lora.safetensors``: the LoRA in kohya's SD 1.x/2.x key layout
        (``lora_unet_<module path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``), with
        ``alpha / rank · up @ down`` equal to the delta this project applies, and kohya ``ss_*`` plus SAI
        ``modelspec.*`` metadata; ``<name>.safetensors`` (``emb_params``) and ``<name>.pt`` (A1111's
        ``string_to_param``): v*. Like :meth:`export_diffusers` this is the single-path approximation (alpha = 1).
        See :mod:`models.export_kohya` for what each tool's loader reads.

        Args:
            out_dir: folder to write into.
            name: file stem; A1111 and ComfyUI name the embedding after it (the prompt word).
            alpha: kohya alpha of every module; None = the rank (scale 1). Any value gives the same delta.
            prediction_type: the base model's scheduler ``prediction_type`` (metadata only).
            resolution: the base model's pixel resolution (metadata only).
            dtype: tensor dtype of the LoRA file.

        Returns:
            ``{"lora": path, "embedding": path, "embedding_pt": path}``.
        """
        return write_kohya(self, out_dir, name, alpha, prediction_type, resolution, dtype)


def write_concept_set(
    artifact: ConceptArtifact,
    export_dir: str | Path,
    name: str,
    diffusers: bool | Callable[[Path], object] = True,
    kohya: bool = False,
    prediction_type: str = "epsilon",
    resolution: int | None = None,
) -> dict[str, Path]:
    """Writes ``<name>.safetensors`` (+ ``<name>_diffusers/``, ``<name>_kohya/``) into ``export_dir`` as one set.

    Everything is built in a staging folder inside ``export_dir``, then moved into place (:func:`models.io.
    replace_all`); on any failure the previous files stay as they were. Temporaries a killed run left in
    ``export_dir`` are removed first. Files of an earlier set under the same name that this set does not write
    (e.g. ``_kohya/`` when this run exports no kohya files) are removed with it, so the set stays consistent;
    replacing an earlier set is announced as a warning.

    Args:
        diffusers: write the plain-diffusers pair (:meth:`ConceptArtifact.export_diffusers`), or a callable
            writing that folder itself (the one-shot LoRA baseline's ``save_lora_weights`` output).
        kohya: write the kohya / web-UI files (:meth:`ConceptArtifact.export_kohya`).
        prediction_type, resolution: the base model's, recorded in the kohya metadata.

    Returns:
        ``{"artifact": path}`` plus ``"diffusers"`` / ``"kohya"`` folders when written.

    Raises:
        ArtifactWriteError: the folder cannot be written, a file or folder of the wrong kind is in the way, or
            a write failed (full disk, ...): one line naming the path and the cause.
    """
    export_dir = Path(export_dir)
    check_writable_dir(export_dir, "export_dir")
    targets = {
        "artifact": export_dir / f"{name}.safetensors",
        "diffusers": export_dir / f"{name}_diffusers",
        "kohya": export_dir / f"{name}_kohya",
    }
    wanted = {"artifact": True, "diffusers": bool(diffusers), "kohya": kohya}
    for key, target in targets.items():
        wrong = target.is_dir() if key == "artifact" else target.exists() and not target.is_dir()
        if wrong:
            kind = "a folder" if key == "artifact" else "a file"
            raise ArtifactWriteError(f"cannot write concept {name!r}: {target} is {kind}; move it away")
    previous = [t.name for t in targets.values() if t.exists()]
    export_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(export_dir)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(targets["artifact"]), dir=export_dir))
    try:
        artifact.save(staging / targets["artifact"].name)
        if callable(diffusers):
            diffusers(staging / targets["diffusers"].name)
        elif diffusers:
            artifact.export_diffusers(staging / targets["diffusers"].name)
        if kohya:
            artifact.export_kohya(
                staging / targets["kohya"].name, name, prediction_type=prediction_type, resolution=resolution
            )
        replace_all({staging / targets[k].name: targets[k] for k in targets if wanted[k]})
        for key, target in targets.items():
            if not wanted[key] and target.exists():  # an earlier set's export this set does not have
                shutil.move(str(target), str(staging / target.name))  # dropped with the staging folder
    except OSError as err:
        where = Path(err.filename) if err.filename else export_dir
        if staging in where.parents:  # name the file the user will look for, not the staging copy
            where = export_dir / where.relative_to(staging)
        cause = err.strerror or type(err).__name__
        raise ArtifactWriteError(f"cannot write concept {name!r} to {where}: {cause}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if previous:
        warnings.warn(
            f"concept {name!r}: replaced the earlier {', '.join(previous)} in {export_dir}",
            ConceptOverwriteWarning,
            stacklevel=2,
        )
    return {k: t for k, t in targets.items() if wanted[k]}
