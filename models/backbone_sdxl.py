"""The frozen Stable Diffusion XL backbone: two CLIP text encoders, pooled-text and time-id conditioning.

DATE on SDXL differs from SD 1.x only in the text conditioning, and this module is where that lives:

* Context. As diffusers' ``StableDiffusionXLPipeline.encode_prompt``: the penultimate hidden states
  (``hidden_states[-2]``) of CLIP ViT-L (``text_encoder``) and OpenCLIP bigG (``text_encoder_2``), concatenated
  along the width (768 + 1280 = 2048 on SDXL); the pooled embedding is ``text_encoder_2``'s projected
  end-of-text state; the UNet gets ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ...}`` with
  ``time_ids = (H, W, 0, 0, H, W)`` (original size, crop top-left, target size of the training image).
* v*. One vector ``[v_l, v_g]`` (768 + 1280): ``v_l`` is S*'s input embedding in ``text_encoder``, ``v_g`` in
  ``text_encoder_2`` (both tokenizers give S* the same id: they share CLIP's BPE vocabulary). The token embedder
  has one head per encoder, each rescaled to its own table's mean token norm (``MultiTokenEmbedder``).
* The nearest word (hard prompt and regulariser). Both tables are rows of the same 49,408-token vocabulary. The
  nearest word of v* is the token maximising ``cos(v_l, E_l[t]) + cos(v_g, E_g[t])``: the two encoders vote with
  equal weight, whatever their embedding scales, and when they disagree the token both find fairly close beats
  one only a single encoder finds closest. It is computed exactly as a cosine search over the concatenation of the
  two unit-normalised halves (:meth:`SDXLDiffusionBackbone.similarity_space`): the inner product of two such
  vectors is ``(cos_l + cos_g)``, so the FAISS index, its scores (reported as the mean ``(cos_l + cos_g) / 2``)
  and the nearest-neighbour loss all use this one similarity.
* Dual path. Attention layers blend as on SD 1.x (the processors are the same). The pooled embedding feeds the
  time embedding, hence the ResNets, which run once: it is the blend ``alpha · pooled(soft) + (1 - alpha) ·
  pooled(hard)``, so alpha = 1 is exactly the plain UNet on the soft prompt and alpha = 0 on the hard prompt.
* Classifier-free guidance. SDXL's unconditional branch for an empty negative prompt is all zeros (context and
  pooled) when the pipeline's ``force_zeros_for_empty_prompt`` is set, as in SDXL base; the LoRA offsets act on
  both branches. The UNet feature branch of the encoder (E4T) reads that same null conditioning.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)

from models.attention import LoraDelta
from models.backbone import DEFAULT_IMAGE_ENCODER, DiffusionBackbone, TextConditioning
from models.clip_tokenizer import load_clip_tokenizer
from models.hub import resolve_model_path
from models.placeholder import (
    DEFAULT_PLACEHOLDER,
    PlaceholderError,
    add_placeholder_token,
    check_prompts,
    replace_placeholder_ids,
    run_text_model,
)
from models.token_index import TokenIndex
from models.token_index_split import SplitCosineTokenIndex, normalise_halves
from models.token_rows import ConcatenatedTable

SDXL_PIPELINE = "StableDiffusionXLPipeline"
# The key names of SDXL embedding files (A1111, ComfyUI, diffusers docs).
EMBEDDING_PARTS = ("clip_l", "clip_g")


def encode_sdxl_text(
    text_model: CLIPTextModel,
    input_ids: torch.Tensor,
    eos_token_id: int,
    placeholder_id: int | None = None,
    placeholder_embeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a CLIP text model with v* injected; returns SDXL's context part and the end-of-text state.

    Same computation as ``CLIPTextModel.forward(ids, output_hidden_states=True)`` (tested) through its public
    sub-modules. The end-of-text position is the first ``eos_token_id`` of each row, read from the tokenizer: the
    argmax-of-ids rule that configs with the legacy ``eos_token_id = 2`` use would pick S* (the highest id).

    Args:
        text_model: the ``CLIPTextModel`` (for ``CLIPTextModelWithProjection``, its ``text_model``).
        input_ids: (B, L) ids, each row holding ``eos_token_id``.
        eos_token_id: the tokenizer's end-of-text id.
        placeholder_id: id of S*.
        placeholder_embeds: (B, D) v* part of this encoder.

    Returns:
        ``(hidden_states[-2] (B, L, D), final-layer-normed end-of-text state (B, D))``.
    """
    last, penultimate = run_text_model(
        text_model,
        input_ids,
        placeholder_id,
        placeholder_embeds,
        keep_layer=len(text_model.encoder.layers) - 2,
    )
    eos = (input_ids == eos_token_id).int().argmax(dim=-1)
    return penultimate, last[torch.arange(last.shape[0], device=last.device), eos]


class SDXLDiffusionBackbone(DiffusionBackbone):
    """Frozen SDXL components plus a CLIP image encoder for the concept encoder.

    Args:
        vae, unet, text_encoder, tokenizer, scheduler, image_encoder, image_processor, name_or_path,
            placeholder: as :class:`~models.backbone.DiffusionBackbone` (``text_encoder`` is CLIP ViT-L).
        text_encoder_2: OpenCLIP bigG (``CLIPTextModelWithProjection``), source of the pooled embedding.
        tokenizer_2: its tokenizer (CLIP's vocabulary; SDXL's pads with ``"!"``).
        force_zeros_for_empty_prompt: an empty negative prompt is the all-zero conditioning (SDXL base: True).
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer,
        scheduler: DDPMScheduler,
        image_encoder: CLIPVisionModelWithProjection,
        image_processor: CLIPImageProcessor,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2,
        name_or_path: str = "",
        placeholder: str = DEFAULT_PLACEHOLDER,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError("an SDXL UNet has addition_embed_type 'text_time' (pooled text + time ids)")
        super().__init__(
            vae,
            unet,
            text_encoder,
            tokenizer,
            scheduler,
            image_encoder,
            image_processor,
            name_or_path,
            placeholder,
        )
        self.text_encoder_2 = text_encoder_2.requires_grad_(False).eval()
        self.tokenizer_2 = tokenizer_2
        if add_placeholder_token(self.tokenizer_2, placeholder) != self.placeholder_id:
            raise PlaceholderError(
                f"placeholder {placeholder!r} got different ids in the two SDXL tokenizers"
            )
        if len(self.tokenizer) != len(self.tokenizer_2):
            raise ValueError("the two SDXL tokenizers must share one vocabulary (CLIP's BPE)")
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        image_encoder_name_or_path: str = DEFAULT_IMAGE_ENCODER,
        placeholder: str = DEFAULT_PLACEHOLDER,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
    ) -> SDXLDiffusionBackbone:
        """Loads an SDXL folder or hub id (``stabilityai/stable-diffusion-xl-base-1.0``) with ``from_pretrained``.

        The arguments are :meth:`DiffusionBackbone.from_pretrained`'s; ``variant`` (e.g. ``"fp16"``) applies to the
        second text encoder too.
        """
        base = DiffusionBackbone.from_pretrained(
            pretrained_model_name_or_path,
            image_encoder_name_or_path,
            placeholder,
            revision,
            torch_dtype,
            variant,
        )
        sd = resolve_model_path(pretrained_model_name_or_path, variant=variant, revision=revision)
        kw: dict = {"revision": revision} if revision else {}
        # As the base's components (transformers 5 would load the files' dtype); `dtype`: the name it asks for.
        kw["dtype"] = torch_dtype or torch.float32
        if variant is not None:
            kw["variant"] = variant
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(sd, subfolder="text_encoder_2", **kw)
        tokenizer_2 = load_clip_tokenizer(sd, subfolder="tokenizer_2")
        index = json.loads((Path(sd) / "model_index.json").read_text())
        return cls(
            base.vae,
            base.unet,
            base.text_encoder,
            load_clip_tokenizer(sd, subfolder="tokenizer"),  # fresh: base's already holds the placeholder
            base.scheduler,
            base.image_encoder,
            base.image_processor,
            text_encoder_2,
            tokenizer_2,
            name_or_path=str(pretrained_model_name_or_path),
            placeholder=placeholder,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )

    # ----- sizes -----
    @property
    def token_dims(self) -> tuple[int, ...]:
        return (int(self.text_encoder.config.hidden_size), int(self.text_encoder_2.config.hidden_size))

    @property
    def token_dim(self) -> int:
        return sum(self.token_dims)

    def embedding_parts(self) -> dict[str, int]:
        return dict(zip(EMBEDDING_PARTS, self.token_dims))

    def token_embedding_table(self) -> torch.Tensor:
        """(V, D_l + D_g): row t is ``[E_l[t], E_g[t]]`` (a copy, made at each call: 400 MB in fp32 on SDXL)."""
        a = self.text_encoder.get_input_embeddings().weight
        b = self.text_encoder_2.get_input_embeddings().weight
        return torch.cat([a, b.to(a.dtype)], dim=1)

    def token_rows(self) -> ConcatenatedTable:
        """:meth:`token_embedding_table` as a view whose indexing gathers rows of both tables (no copy)."""
        a = self.text_encoder.get_input_embeddings().weight
        return ConcatenatedTable(a, self.text_encoder_2.get_input_embeddings().weight)

    def mean_token_norms(self) -> tuple[float, ...]:
        table = self.token_embedding_table().detach().float()
        keep = torch.ones(table.shape[0], dtype=torch.bool)
        keep[[i for i in self.special_token_ids() if i < table.shape[0]]] = False
        return tuple(float(p[keep].norm(dim=-1).mean()) for p in torch.split(table, list(self.token_dims), 1))

    def special_token_ids(self) -> list[int]:
        return sorted(set(super().special_token_ids()) | set(self.tokenizer_2.all_special_ids))

    def fingerprint(self, load_path: str | None = None) -> str:
        h = hashlib.sha256(super().fingerprint(load_path).encode())
        cfg = {
            k: v
            for k, v in self.text_encoder_2.config.to_dict().items()
            if "version" not in k and "dtype" not in k and k != "_name_or_path"
        }
        if load_path is not None:
            cfg["_name_or_path"] = load_path
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        t = self.text_encoder_2.get_input_embeddings().weight[:256]
        h.update(t.detach().to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ----- nearest word over both tables -----
    def similarity_space(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Concatenated unit-normalised halves: cosine there is ``(cos_l + cos_g) / 2``."""
        return normalise_halves(embeddings, self.token_dims)

    def build_token_index(self, mode: str = "exact", cache_dir: str | None = None) -> SplitCosineTokenIndex:
        table = self.similarity_space(self.token_embedding_table().detach())
        tokens = [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(range(table.shape[0])))]
        exclude = self.index_exclude_ids()
        if mode == "torch" or cache_dir is None:
            index = TokenIndex.build(table, tokens, exclude, mode)
        else:
            index = TokenIndex.from_text_encoder(
                _TableHolder(table), self.tokenizer, exclude, mode, cache_dir
            )
        return SplitCosineTokenIndex(index, self.token_dims)

    # ----- text -----
    def tokenize(self, prompts: list[str], require_placeholder: bool = False) -> torch.Tensor:
        """(B, 2, L) padded ids of both tokenizers (they differ only in the padding token)."""
        if require_placeholder:
            check_prompts(prompts, self.placeholder)
        ids = [
            tok(
                prompts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tok in (self.tokenizer, self.tokenizer_2)
        ]
        return torch.stack(ids, dim=1).to(self.unet.device)

    def hard_prompt_ids(self, input_ids: torch.Tensor, hard_token_ids: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [replace_placeholder_ids(input_ids[:, i], self.placeholder_id, hard_token_ids) for i in range(2)],
            1,
        )

    def conditioning(
        self, input_ids: torch.Tensor, placeholder_embeds: torch.Tensor | None = None
    ) -> TextConditioning:
        """Context (B, L, D_l + D_g) and pooled (B, P) of (B, 2, L) ids, with v* = [v_l, v_g] at S*."""
        parts = (
            (None, None)
            if placeholder_embeds is None
            else torch.split(placeholder_embeds, self.token_dims, -1)
        )
        ctx_l, _ = encode_sdxl_text(
            self.text_encoder, input_ids[:, 0], self.tokenizer.eos_token_id, self.placeholder_id, parts[0]
        )
        ctx_g, eos_g = encode_sdxl_text(
            self.text_encoder_2.text_model,
            input_ids[:, 1],
            self.tokenizer_2.eos_token_id,
            self.placeholder_id,
            parts[1],
        )
        pooled = self.text_encoder_2.text_projection(eos_g)
        return TextConditioning(torch.cat([ctx_l, ctx_g.to(ctx_l.dtype)], dim=-1), pooled)

    def encode_text(
        self, input_ids: torch.Tensor, placeholder_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L, D_l + D_g) context of (B, 2, L) ids."""
        return self.conditioning(input_ids, placeholder_embeds).context

    def unconditional(self, n: int, negative_prompt: str = "") -> TextConditioning:
        if negative_prompt == "" and self.force_zeros_for_empty_prompt:
            kw = {"device": self.unet.device, "dtype": self.text_encoder.dtype}
            length, width = self.tokenizer.model_max_length, int(self.text_encoder_2.config.projection_dim)
            return TextConditioning(torch.zeros(n, length, self.token_dim, **kw), torch.zeros(n, width, **kw))
        return super().unconditional(n, negative_prompt)

    def empty_context(self) -> torch.Tensor:
        return self.unconditional(1).context

    # ----- UNet -----
    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 6) SDXL micro-conditioning: original size, crop top-left (0, 0), target size, in pixels."""
        h, w = (int(s) * self.vae_scale_factor for s in latents.shape[-2:])
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=latents.dtype, device=latents.device)
        return ids.expand(latents.shape[0], -1)

    def added_cond_kwargs(self, latents: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        dtype = self.unet.dtype
        return {"text_embeds": pooled.to(dtype), "time_ids": self.time_ids(latents).to(dtype)}

    def denoise(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        soft: TextConditioning,
        hard: TextConditioning | None = None,
        lora: dict[str, LoraDelta] | None = None,
        alpha: float = 1.0,
    ) -> torch.Tensor:
        pooled = soft.pooled
        if hard is not None and alpha < 1.0:
            pooled = alpha * soft.pooled + (1.0 - alpha) * hard.pooled
        added = self.added_cond_kwargs(noisy_latents, pooled)
        return self.personalized_call(
            noisy_latents, timesteps, soft, hard, lora, alpha, added_cond_kwargs=added
        )

    def unet_time_embedding(
        self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """The time embedding plus SDXL's pooled-text + time-id embedding, for the null conditioning's pooled
        part (the UNet feature branch always reads the empty prompt, see :meth:`empty_context`)."""
        emb = super().unet_time_embedding(sample, timesteps, encoder_hidden_states)
        pooled = self.unconditional(sample.shape[0]).pooled
        added = self.added_cond_kwargs(sample, pooled)
        return emb + self.unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )


class _TableHolder(torch.nn.Module):
    """Presents a table as a text encoder's input embeddings, for :meth:`TokenIndex.from_text_encoder`'s cache."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Embedding.from_pretrained(table, freeze=True)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.table


def is_sdxl(pretrained_model_name_or_path: str) -> bool:
    """Whether a diffusers folder or cached hub id is an SDXL pipeline (by its ``model_index.json``)."""
    index = Path(resolve_model_path(pretrained_model_name_or_path)) / "model_index.json"
    if not index.is_file():
        return False
    return json.loads(index.read_text()).get("_class_name") == SDXL_PIPELINE
