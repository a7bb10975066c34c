"""Concept artefacts: one safetensors file per tuned concept, the pair plain diffusers loads, and kohya's files.

The artefact holds v*, its nearest real token, the concept's LoRA as static factors (``down' = M·A``, ``up = B``
for each target linear), the dual-path alpha, the base model and its fingerprint, and the tuning steps.
Every file is written atomically (a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.attention import LoraDelta
from models.errors import MissingFileError
from models.export_kohya import write_kohya
from models.export_sdxl import write_diffusers_sdxl, write_kohya_sdxl
from models.io import atomic_write

FORMAT = "tuning-encoder/concept"
FORMAT_VERSION = "1"


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

    def embedding_parts(self) -> dict[str, int]:
        """Names and widths of v*'s parts (SDXL: ``{"clip_l": 768, "clip_g": 1280}``); empty for one encoder."""
        spec = self.extra.get("embedding_parts", "")
        return {k: int(v) for k, v in (item.split(":") for item in spec.split(",") if item)}

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
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "placeholder": self.placeholder,
            "nearest_token": self.nearest_token,
            "nearest_token_id": str(self.nearest_token_id),
            "alpha": repr(float(self.alpha)),
            "base_model": self.base_model,
            "fingerprint": self.fingerprint,
            "steps": str(int(self.steps)),
            "extra": json.dumps(self.extra),
        }
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
        except Exception as err:  # safetensors raises several error types for foreign files
            raise ValueError(f"{path} is not a safetensors concept artefact: {err}") from err
        if meta.get("format") != FORMAT:
            raise ValueError(
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
        emb = {self.placeholder: self.v_star.detach().float().cpu().reshape(-1).contiguous()}
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
        if self.embedding_parts():  # SDXL: no .pt, the embedding as clip_l / clip_g
            return write_kohya_sdxl(self, out_dir, name, alpha, prediction_type, resolution, dtype)
        return write_kohya(self, out_dir, name, alpha, prediction_type, resolution, dtype)
