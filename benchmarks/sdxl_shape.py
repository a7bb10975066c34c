"""DATE's sizes at Stable Diffusion XL's real shapes, and what one CPU can run of it (random weights, offline).

    python -m benchmarks.sdxl_shape                 # sizes (meta device, instant) + timed UNet forwards
    python -m benchmarks.sdxl_shape --sizes-only    # sizes only
    python -m benchmarks.sdxl_shape --latent 32     # forward latent size (128 = 1024 px; 32 = 256 px)

Sizes come from SDXL base 1.0's UNet config built on the meta device (no memory, no weights): parameter count,
transformer blocks, LoRA'd projections and the parameter count of the hypernetwork, token embedder and feature
encoder with the sizes of ``configs/pretrain/sdxl.yaml`` (CLIP ViT-L/14 image encoder, ViT-L + bigG text widths).
The timed part builds the same UNet with random bfloat16 weights (5.1 GB) and runs, on the same input, the plain
UNet and the dual-path UNet (alpha 0.5, hard prompt, per-sample LoRA deltas on every target) once each after a
warm-up, printing the ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from lightning_modules.cli import resolve_config
from models.attention import PERSONALIZATION_KWARG, Personalization, install_dual_path, lora_targets
from models.backbone import unet_feature_dim
from models.encoder import FeatureEncoder, HyperNetwork, MultiTokenEmbedder

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that set shapes).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 x 256 + bigG's projection 1280
    "norm_num_groups": 32,
}
TOKEN_DIMS = (768, 1280)  # CLIP ViT-L, OpenCLIP bigG
POOLED_DIM = 1280
CLIP_VISION = {"hidden_size": 1024, "num_hidden_layers": 24}  # openai/clip-vit-large-patch14


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes(personalizer: dict) -> dict:
    """Parameter counts of the SDXL UNet and of DATE's trainable modules at SDXL's shapes (meta device)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        targets = lora_targets(
            unet, tuple(personalizer["lora_projections"]), tuple(personalizer["lora_attention"])
        )
        hyper = HyperNetwork(
            personalizer["feature_dim"], targets, personalizer["lora_rank"], personalizer["hyper_hidden_dim"]
        )
        tokens = MultiTokenEmbedder(personalizer["feature_dim"], TOKEN_DIMS, personalizer["token_hidden_dim"])
        feat_dim = unet_feature_dim(tuple(SDXL_UNET["block_out_channels"]), SDXL_UNET["layers_per_block"])
        encoder = FeatureEncoder(
            CLIP_VISION["hidden_size"],
            CLIP_VISION["num_hidden_layers"],
            feat_dim,
            personalizer["feature_dim"],
            personalizer["clip_layer_stride"],
            personalizer["unet_hidden_dim"],
        )
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in unet.modules())
    return {
        "unet_params": count(unet),
        "transformer_blocks": blocks,
        "attention_layers": len(targets) // len(personalizer["lora_projections"]),
        "lora_projections": len(targets),
        "hypernetwork_params": count(hyper),
        "hypernetwork_factor_params": sum(p.numel() for p in [*hyper.down, *hyper.up]),
        "hypernetwork_trunk_head_params": count(hyper.trunk) + count(hyper.heads),
        "token_embedder_params": count(tokens),
        "feature_encoder_params": count(encoder),
        "unet_feature_dim": feat_dim,
        "trainable_params": count(hyper) + count(tokens) + count(encoder),
    }


@torch.no_grad()
def time_forwards(latent: int, personalizer: dict, seed: int = 0) -> dict:
    """Seconds of one plain and one dual-path SDXL UNet forward (bf16, batch 1) at ``latent`` x ``latent``."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built directly in bf16: 5.1 GB instead of 10.3 GB in fp32
    try:
        unet = UNet2DConditionModel(**SDXL_UNET).eval()
    finally:
        torch.set_default_dtype(previous)
    install_dual_path(unet)
    build_s = time.perf_counter() - t0
    targets = lora_targets(
        unet, tuple(personalizer["lora_projections"]), tuple(personalizer["lora_attention"])
    )
    hyper = HyperNetwork(
        personalizer["feature_dim"], targets, personalizer["lora_rank"], personalizer["hyper_hidden_dim"]
    )
    torch.nn.init.normal_(hyper.heads.weight, std=0.01)
    cores = hyper(torch.randn(1, personalizer["feature_dim"]))
    x = torch.randn(1, 4, latent, latent, dtype=torch.bfloat16)
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, sum(TOKEN_DIMS), dtype=torch.bfloat16)
    hard = torch.randn(1, 77, sum(TOKEN_DIMS), dtype=torch.bfloat16)
    px = latent * 8
    added = {
        "text_embeds": torch.randn(1, POOLED_DIM, dtype=torch.bfloat16),
        "time_ids": torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.bfloat16),
    }
    dual = {PERSONALIZATION_KWARG: Personalization(lora=hyper.deltas(cores), hard_context=hard, alpha=0.5)}

    def run(kwargs: dict | None) -> float:
        start = time.perf_counter()
        out = unet(
            x, t, encoder_hidden_states=ctx, added_cond_kwargs=added, cross_attention_kwargs=kwargs
        ).sample
        assert torch.isfinite(out.float()).all()
        return time.perf_counter() - start

    run(None)  # warm-up
    plain_s = run(None)
    dual_s = run(dual)
    return {
        "latent": latent,
        "pixels": px,
        "threads": torch.get_num_threads(),
        "build_s": round(build_s, 1),
        "plain_forward_s": round(plain_s, 2),
        "dual_path_forward_s": round(dual_s, 2),
        "dual_over_plain": round(dual_s / plain_s, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="configs/pretrain/sdxl.yaml", help="pretraining config (its personalizer sizes)"
    )
    parser.add_argument(
        "--latent", type=int, default=32, help="latent size of the timed forwards (128 = 1024 px)"
    )
    parser.add_argument("--sizes-only", action="store_true", help="skip the timed forwards")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    personalizer = asdict(resolve_config([args.config]).model_kwargs["personalizer"])
    result = {"sizes": sizes(personalizer)}
    if not args.sizes_only:
        result["cpu_bf16"] = time_forwards(args.latent, personalizer)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
