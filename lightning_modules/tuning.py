"""Phase 2: inference-time tuning of one concept in a few steps, and its export (METHOD.md, "Inference-time tuning").

Also runs the baselines as configs (``configs/tune/*_<baseline>.yaml``): textual inversion (diffusers'
``textual_inversion.py``: embedding only, initialised from the class noun), one-shot LoRA (diffusers'
``train_dreambooth_lora.py``: a peft LoRA on the UNet, instance prompt "a photo of sks <class noun>"), encoder only
(0 steps) and no regulariser (an encoder pretrained with ``nn_weight: 0``, tuned without it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn

from datamodules.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    check_image_size,
    resize_center_crop,
    to_clip_tensor,
    to_diffusion_tensor,
)
from lightning_modules.base import PersonalizationModule, check_checkpoint, read_checkpoint
from losses import add_noise
from models.artifact import ConceptArtifact, write_concept_set
from models.attention import LoraDelta
from models.errors import ConfigurationError
from models.personalizer import Personalizer, PersonalizerConfig
from models.unet_lora import add_unet_lora, lora_parameters, lora_snapshot, restore_lora, save_diffusers_lora
from models.unet_lora import static_factors as unet_lora_factors

Tunable = Literal["embedding", "cores", "factors", "encoder", "unet_lora"]


def load_pretraining_checkpoint(path: str, backbone) -> tuple[dict, dict]:
    """Reads a pretraining checkpoint; returns (tuning-encoder metadata, personalizer state dict).

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointMismatchError: not a tuning-encoder pretraining checkpoint, or made on another base model.
    """
    ckpt = read_checkpoint(path, "encoder_checkpoint")
    meta = check_checkpoint(ckpt, backbone, phase="pretrain", source=f"encoder_checkpoint {path}")
    prefix = "personalizer."
    state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    return meta, state


class ConceptTuning(PersonalizationModule):
    """Predicts v* and the LoRA cores from one image, tunes them for a few steps, and exports the concept.

    Args:
        encoder_checkpoint: pretraining checkpoint (``EncoderPretraining``); None = untrained modules (only
            sensible with ``init: zero`` or ``token``, i.e. the textual-inversion / LoRA baselines).
        optimizer: optimizer factory over the tuned parameters (default AdamW, lr 1e-3, no weight decay).
        tune: what is optimised: ``embedding`` (v*), ``cores`` (M_l), ``factors`` (A_l, B_l), ``encoder`` (E4T-style:
            the encoder weights, predicting v* and cores every step), ``unet_lora`` (a static peft LoRA added to
            the UNet as diffusers' ``train_dreambooth_lora.py`` does: the one-shot LoRA baseline).
        init: start from the ``encoder``'s prediction, from ``zero`` (v* = 0, cores = 0), from the embedding of
            ``init_token`` (cores = 0), or from the embedding of the concept's ``class_noun`` (the datamodule's;
            textual inversion's ``initializer_token``; a multi-word noun uses its last token, the head noun).
        init_token: word used by ``init: token``.
        instance_prompt: if set, every training prompt is this template instead of the datamodule's random ones:
            ``{identifier}`` is filled with the placeholder, whose embedding stays ``init_token``'s (so
            ``"a photo of {identifier} {class_noun}"`` with ``init_token: sks`` is exactly the text
            "a photo of sks dog"), ``{class_noun}`` with the concept's class noun. Needs ``init: token``.
            The special value ``"{caption}"`` keeps the datamodule's prompts (e.g. the image's own caption) and
            writes ``"{identifier} {class_noun}"`` where they say the placeholder: for worlds whose captions are
            not "a photo of ..." (the toy world's text encoder never saw the word "photo").
        unet_lora_rank: rank (and lora_alpha) of the ``unet_lora`` adapter.
        init_noise_draws: the encoder's initial prediction is averaged over this many noise draws.
        export_dir: folder the artefact ``<concept>.safetensors`` (and ``<concept>_diffusers/``) is written to.
        concept_name: artefact name; None = the datamodule's concept name.
        export_diffusers: also write the LoRA + textual-inversion pair plain diffusers loads.
        export_kohya: also write ``<concept>_kohya/``: the LoRA in kohya's key layout with its alpha
            (``<concept>_lora.safetensors``, for Automatic1111 / Forge ``models/Lora`` and ComfyUI ``models/loras``)
            and v* as ``<concept>.safetensors`` (``emb_params``) and ``<concept>.pt`` (A1111 ``string_to_param``)
            for their ``embeddings`` folders; the prompt word there is ``<concept>``.
        method: name recorded in the artefact (e.g. ``date``, ``textual_inversion``).
        **kwargs: the arguments shared with pretraining (weights, placeholder, module sizes, alpha, regulariser,
            seed, sample logging): see :class:`~lightning_modules.base.PersonalizationModule`. Here ``alpha`` is
            also written to the artefact for sampling, and with one concept per batch the regulariser is a pull
            toward the nearest tokens.
    """

    phase = "tune"

    def __init__(
        self,
        encoder_checkpoint: str | None = None,
        optimizer: OptimizerCallable | None = None,
        tune: list[Tunable] | None = None,
        init: Literal["encoder", "zero", "token", "class_noun"] = "encoder",
        init_token: str = "object",
        instance_prompt: str | None = None,
        unet_lora_rank: int = 4,
        init_noise_draws: int = 4,
        export_dir: str = "outputs/concepts",
        concept_name: str | None = None,
        export_diffusers: bool = True,
        export_kohya: bool = False,
        method: str = "date",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer"])
        self.tune = list(tune) if tune is not None else ["embedding", "cores"]
        if not self.tune:
            raise ValueError("tune must name at least one of embedding, cores, factors, encoder")
        if init == "encoder" and encoder_checkpoint is None:
            raise ValueError("init='encoder' needs encoder_checkpoint (a pretraining checkpoint)")
        if instance_prompt is not None and (init != "token" or "embedding" in self.tune):
            raise ValueError(
                "instance_prompt needs init='token' and a fixed embedding (no 'embedding' in tune)"
            )
        state = None
        if encoder_checkpoint is not None:
            meta, state = load_pretraining_checkpoint(encoder_checkpoint, self.backbone)
            self.personalizer_config = PersonalizerConfig(**meta["personalizer"])
        torch.manual_seed(self.seed)
        self.personalizer = Personalizer(self.backbone, self.personalizer_config)
        if state is not None:
            self.personalizer.load_state_dict(state)
        self.personalizer.requires_grad_(False)
        if "factors" in self.tune:
            self.personalizer.hypernetwork.down.requires_grad_(True)
            self.personalizer.hypernetwork.up.requires_grad_(True)
        if "encoder" in self.tune:
            self.personalizer.requires_grad_(True)
        self._initial_unet_lora: dict[str, torch.Tensor] | None = None
        if "unet_lora" in self.tune:
            # After the backbone is frozen: only the adapter's parameters are trainable.
            add_unet_lora(self.backbone.unet, unet_lora_rank)
            self._initial_unet_lora = lora_snapshot(self.backbone.unet)
        n_targets, rank = len(self.personalizer.hypernetwork.names), self.personalizer.hypernetwork.rank
        self.v_star = nn.Parameter(
            torch.zeros(1, self.backbone.token_dim), requires_grad="embedding" in self.tune
        )
        self.cores = nn.Parameter(torch.zeros(1, n_targets, rank, rank), requires_grad="cores" in self.tune)
        self.register_buffer("initialised", torch.tensor(False))
        # Kept to tune several concepts with one module (evaluation): see reset_concept.
        self._initial_personalizer = {
            k: v.detach().clone() for k, v in self.personalizer.state_dict().items()
        }
        self.optimizer_factory = optimizer
        self.init, self.init_token, self.init_noise_draws = init, init_token, init_noise_draws
        self.instance_prompt = instance_prompt
        self.export_dir, self.concept_name, self.export_diffusers = export_dir, concept_name, export_diffusers
        self.export_kohya = export_kohya
        self.method = method
        self.artifact_path: Path | None = None

    def reset_concept(self, concept_name: str | None = None) -> None:
        """Forgets the tuned concept so this module can tune another one without reloading the backbone.

        Restores the personalizer weights it was built with and re-runs the initial prediction at the next fit.
        """
        self.personalizer.load_state_dict(self._initial_personalizer)
        if self._initial_unet_lora is not None:
            restore_lora(self.backbone.unet, self._initial_unet_lora)
        self.initialised.fill_(False)
        self.concept_name = concept_name

    # ----- initial prediction from the one image -----
    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        image = getattr(dm, "concept_image", None)
        if image is not None and getattr(dm, "resolution", None) != self.backbone.resolution:
            # The datamodule checked the image against its own configured resolution; the model's decides.
            check_image_size(
                image.size, self.backbone.resolution, repr(getattr(dm, "concept_name", "concept"))
            )
        if bool(self.initialised):
            return  # resumed: the tuned values come from the checkpoint
        with torch.no_grad():
            if self.init == "encoder":
                v, cores = self._encoder_prediction()
            elif self.init in ("token", "class_noun"):
                v = self.backbone.token_embedding_table()[self.init_token_id()].float().unsqueeze(0)
                cores = torch.zeros_like(self.cores)
            else:
                v, cores = torch.zeros_like(self.v_star), torch.zeros_like(self.cores)
            self.v_star.copy_(v)
            self.cores.copy_(cores)
            self.initialised.fill_(True)

    def _class_noun(self) -> str:
        noun = getattr(getattr(self.trainer, "datamodule", None), "class_noun", None)
        if not noun:
            raise ConfigurationError(
                f"init={self.init!r} / instance_prompt need the concept's class noun: set data.init_args.class_noun"
            )
        return str(noun)

    def init_token_id(self) -> int:
        """Id of the word v* starts from: ``init_token``, or the class noun's (last) token for ``class_noun``."""
        word = self._class_noun() if self.init == "class_noun" else self.init_token
        ids = self.backbone.tokenizer(word, add_special_tokens=False).input_ids
        if not ids or (self.init == "token" and len(ids) != 1):
            raise ValueError(f"init_token {word!r} must be one token, got {len(ids)}")
        return int(ids[-1])

    def training_prompts(self, prompts: list[str]) -> list[str]:
        """The batch's prompts, or the fixed instance prompt (one-shot LoRA) for each of them."""
        if self.instance_prompt is None:
            return prompts
        if self.instance_prompt == "{caption}":
            ph = self.backbone.placeholder
            return [p.replace(ph, f"{ph} {self._class_noun()}") for p in prompts]
        text = self.instance_prompt.format(
            identifier=self.backbone.placeholder, class_noun=self._class_noun()
        )
        return [text] * len(prompts)

    def _concept_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        dm = getattr(self.trainer, "datamodule", None)
        image = getattr(dm, "concept_image", None)
        if image is None:
            raise ValueError("concept tuning needs a datamodule with a `concept_image` (ConceptDataModule)")
        res, clip = self.backbone.resolution, self.backbone.clip_image_size
        proc = self.backbone.image_processor
        mean = tuple(getattr(proc, "image_mean", CLIP_MEAN))
        std = tuple(getattr(proc, "image_std", CLIP_STD))
        pixels = to_diffusion_tensor(resize_center_crop(image, res), res).unsqueeze(0)
        clip_pixels = to_clip_tensor(image, clip, mean, std).unsqueeze(0)
        return pixels.to(self.device), clip_pixels.to(self.device)

    def _encoder_prediction(self) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, clip_pixels = self._concept_views()
        latents = self.backbone.encode_images(pixels).float()
        g = torch.Generator().manual_seed(self.seed)
        vs, cs = [], []
        for _ in range(max(self.init_noise_draws, 1)):
            noised = add_noise(self.backbone.scheduler, latents, generator=g)
            pred = self.personalizer.predict(
                self.backbone, clip_pixels, noised.noisy, noised.timesteps, self.empty_context()
            )
            vs.append(pred.v_star)
            cs.append(pred.cores)
        v = torch.stack(vs).mean(0)
        # Each draw has the token norm, but their mean is shorter (the draws point in different directions):
        # put the average back on the scale of real words, as every prediction is (SDXL: per encoder's part).
        v = self.personalizer.token_embedder.renormalize(v)
        return v, torch.stack(cs).mean(0)

    # ----- the step -----
    def predict_concepts(self, batch: dict, noisy: torch.Tensor, timesteps: torch.Tensor):
        b = noisy.shape[0]
        if "encoder" in self.tune:
            pred = self.personalizer.predict(
                self.backbone, batch["clip_pixel_values"], noisy, timesteps, self.empty_context()
            )
            return pred.v_star, pred.cores
        return self.v_star.expand(b, -1), self.cores.expand(b, -1, -1, -1)

    def lora_deltas(self, cores: torch.Tensor) -> dict[str, LoraDelta]:
        if not self.lora_active:
            return {}  # cores stay exactly zero (e.g. textual inversion): skip the zero LoRA work
        return self.personalizer.deltas(cores)

    @property
    def modifies_backbone(self) -> bool:
        """Whether this module added a trainable adapter to its backbone's UNet (so it is not the base model)."""
        return self._initial_unet_lora is not None

    @property
    def lora_active(self) -> bool:
        """Whether the LoRA offsets can be non-zero: tuned, or predicted by the encoder."""
        return self.init == "encoder" or bool({"cores", "factors", "encoder"} & set(self.tune))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch = {**batch, "prompt": self.training_prompts(list(batch["prompt"]))}
        losses, extras = self.model_step(batch)
        self.log_step(losses, extras, batch_size=len(batch["prompt"]))
        if self.sample_every_n_steps and self.global_step % self.sample_every_n_steps == 0:
            self.log_samples(
                list(batch["prompt"][:1]), extras["v_star"][:1], extras["cores"][:1], tag="concept"
            )
        return losses["loss"]

    def state_dict(self, *args, **kwargs):
        """Trainable weights only; with ``unet_lora`` these include the adapter inside the frozen UNet."""
        state = super().state_dict(*args, **kwargs)
        if self._initial_unet_lora is not None:
            for name, param in lora_parameters(self.backbone.unet).items():
                state[f"backbone.unet.{name}"] = param.detach()
        return state

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        return self.optimizer_factory(params)

    # ----- export -----
    def concept_prediction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, D) v* and (1, T, r, r) cores of the tuned concept."""
        if "encoder" in self.tune:
            with torch.no_grad():
                return self._encoder_prediction()
        return self.v_star.detach(), self.cores.detach()

    def build_artifact(self) -> ConceptArtifact:
        v_star, cores = self.concept_prediction()
        result = self.token_index.search(v_star, 1)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        extra = {"method": self.method, "tuned": ",".join(self.tune), "init": self.init}
        if getattr(dm, "class_noun", None):
            extra["class_noun"] = str(dm.class_noun)
        if parts := self.backbone.embedding_parts():  # SDXL: v* = [v_l, v_g]
            extra["embedding_parts"] = ",".join(f"{k}:{v}" for k, v in parts.items())
        if self.instance_prompt is not None:
            # Sampling writes "<s*> <class noun>" where prompts say "<s*>": with v* = the identifier's
            # embedding that is exactly "sks <class noun>" (evaluation/harness.py).
            extra.update(instance_prompt=self.instance_prompt, identifier=self.init_token)
        if self._initial_unet_lora is not None:
            lora = unet_lora_factors(self.backbone.unet)
        else:
            lora = {
                k: (d.cpu(), u.cpu())
                for k, (d, u) in self.personalizer.hypernetwork.static_lora(cores[0].float()).items()
            }
        return ConceptArtifact(
            v_star=v_star[0].float().cpu(),
            lora=lora,
            placeholder=self.backbone.placeholder,
            nearest_token=result.tokens[0][0],
            nearest_token_id=int(result.ids[0, 0]),
            alpha=self.alpha,
            base_model=self.backbone.name_or_path,
            fingerprint=self.backbone.fingerprint(),
            steps=int(self.global_step),
            extra=extra,
        )

    def on_fit_end(self) -> None:
        self._export()

    @rank_zero_only
    def _export(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        name = self.concept_name or getattr(dm, "concept_name", None) or "concept"
        artifact = self.build_artifact()
        diffusers = self.export_diffusers
        if diffusers and self._initial_unet_lora is not None:
            # The script's own output: the peft state dict via save_lora_weights; "sks" is a real word, so
            # there is no embedding to load.
            diffusers = lambda out: save_diffusers_lora(self.backbone.unet, out)  # noqa: E731
        files = write_concept_set(
            artifact,
            self.export_dir,
            name,
            diffusers=diffusers,
            kohya=self.export_kohya,
            prediction_type=str(self.backbone.scheduler.config.prediction_type),
            resolution=self.backbone.resolution,
        )
        self.artifact_path = files["artifact"]
        msg = f"concept {name!r}: {artifact.steps} steps, nearest token {artifact.nearest_token!r} -> {self.artifact_path}"
        if "diffusers" in files:
            msg += f" (+ diffusers files in {files['diffusers']})"
        if "kohya" in files:
            msg += f" (+ A1111 / ComfyUI LoRA and embeddings in {files['kohya']})"
        rank_zero_info(msg)
