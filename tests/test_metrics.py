"""CLIP-I / DINO / CLIP-T metrics on tiny offline backbones, cross-checked against direct computations and
torchmetrics' CLIPScore."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from evaluation.concepts.dreambench import DEFAULT_PROMPTS_FILE
from evaluation.metrics.features import ClipFeatures, DinoFeatures
from evaluation.metrics.similarity import (
    IdentitySimilarity,
    PromptSimilarity,
    clipscore_for,
    fill_prompts,
    identity_scores,
    prompt_scores,
)
from evaluation.metrics.tiny_models import write_tiny_eval_models


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # The tiny backbones gain nothing from intra-op threads; on a loaded 2-core machine, 2 OpenMP threads made
    # each forward pass about 50x slower (spin-waiting), so this module runs single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory):
    return write_tiny_eval_models(tmp_path_factory.mktemp("tiny_eval"))


@pytest.fixture(scope="module")
def clip(eval_dirs):
    return ClipFeatures(eval_dirs["clip"])


@pytest.fixture(scope="module")
def dino(eval_dirs):
    return DinoFeatures(eval_dirs["dino"])


def _images(n: int, seed: int, size: tuple[int, int] = (32, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, *size, generator=g)


@pytest.mark.parametrize("name", ["clip", "dino"])
def test_identical_images_score_one(name, request):
    features = request.getfixturevalue(name)
    images = _images(3, 0, (40, 48))
    metric = IdentitySimilarity(features)
    metric.update(images[:1], images[:1].clone())
    assert metric.compute().item() == pytest.approx(1.0, abs=1e-5)
    assert identity_scores(features, images, images).shape == (3,)


def test_clip_i_equals_direct_computation(clip):
    generated, references = _images(5, 1), _images(4, 2)
    model = clip.model
    mean = torch.tensor(clip.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.image_processor.image_std).view(1, 3, 1, 1)

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(model.get_image_features(pixel_values=(x - mean) / std).pooler_output, dim=-1)

    direct = (embed(generated) @ embed(references).T).mean(dim=1)
    torch.testing.assert_close(identity_scores(clip, generated, references), direct, atol=1e-6, rtol=0)
    metric = IdentitySimilarity(clip)
    metric.update(generated, references)
    assert metric.compute().item() == pytest.approx(direct.mean().item(), abs=1e-6)


def test_torch_preprocessing_matches_processor_on_resize(clip):
    # A smooth non-square image: the processor resizes in PIL on uint8, we resize in torch on floats; the gap
    # is rounding only (PIL's bicubic and torch's antialiased bicubic use the same kernel).
    ramp = torch.linspace(0, 1, 64).view(1, 1, 64).expand(3, 48, 64)
    image = (ramp * torch.tensor([1.0, 0.6, 0.3]).view(3, 1, 1) * 255).round().to(torch.uint8)
    expected = clip.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    ours = clip.preprocessing(image[None])
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    assert (ours - expected).abs().max().item() < 0.02  # < 1.5 uint8 levels after normalisation
    torch.testing.assert_close(clip.preprocessing(image[None]), clip.preprocessing(image[None].float() / 255))


def test_clip_t_matches_torchmetrics_clipscore(clip):
    prompts = json.loads(DEFAULT_PROMPTS_FILE.read_text())["object_prompts"]
    # uint8 images: CLIPScore's processor rescales by 1/255; at the crop size (32) its resize is the identity.
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (25, 3, 1, 1), generator=g, dtype=torch.uint8).expand(25, 3, 32, 32)
    ours = prompt_scores(clip, images.float() / 255, prompts, "dog")
    texts = fill_prompts(prompts, "dog", len(prompts))

    clipscore = clipscore_for(clip)
    clipscore.update(list(images), texts)
    # Unclamped running mean of 100 * cosine, before CLIPScore's max(., 0).
    unclamped = (clipscore.score / clipscore.n_samples).item()
    assert unclamped / 100 == pytest.approx(ours.mean().item(), abs=1e-4)

    positive = ours > 0  # CLIPScore reports 100 * max(mean cos, 0): compare where the cosine is positive
    assert positive.sum() >= 1
    clipscore = clipscore_for(clip)
    clipscore.update(list(images[positive]), [t for t, keep in zip(texts, positive) if keep])
    assert clipscore.compute().item() / 100 == pytest.approx(ours[positive].mean().item(), abs=1e-4)


def test_clip_t_replaces_placeholder_with_class_noun(clip):
    images = _images(2, 3)
    scores = prompt_scores(clip, images, ["a <s*> on the beach", "a red <s*>"], ["dog", "stuffed animal"])
    text = clip.text_embeds(["a dog on the beach", "a red stuffed animal"])
    torch.testing.assert_close(scores, (clip.image_embeds(images) * text).sum(-1))
    assert fill_prompts("a <s*> in the snow", "cat", 2) == ["a cat in the snow"] * 2

    metric = PromptSimilarity(clip, placeholder="S*")
    metric.update(images[:1], "a S* in the snow", "cat")
    metric.update(images[1:], ["a {} in the snow"], "cat", placeholder="{}")
    expected = prompt_scores(clip, images, "a <s*> in the snow", "cat").mean()
    assert metric.compute().item() == pytest.approx(expected.item(), abs=1e-6)


def test_clip_t_missing_placeholder_names_prompt(clip, dino):
    metric = PromptSimilarity(clip)
    with pytest.raises(ValueError, match="a dog on the beach"):
        metric.update(_images(1, 4), ["a dog on the beach"], "dog")
    with pytest.raises(ValueError, match="expected 2 prompts"):
        metric.update(_images(2, 4), ["a <s*>"], "dog")
    with pytest.raises(TypeError):
        PromptSimilarity(dino)


def test_metrics_accumulate_like_one_update(clip, dino):
    generated, references = _images(6, 5), _images(3, 6, (48, 40))
    prompts = ["a <s*> in the jungle", "a purple <s*>", "a wet <s*>"] * 2
    for features in (clip, dino):
        split, whole = IdentitySimilarity(features), IdentitySimilarity(features)
        for chunk in generated.split([1, 2, 3]):
            split.update(chunk, references)
        whole.update(generated, references)
        assert split.compute().item() == pytest.approx(whole.compute().item(), abs=1e-6)

    whole = PromptSimilarity(clip)
    whole.update(generated, prompts, "toy")
    # Two "ranks" merged as DDP's sum reduction would: the states add up.
    rank0, rank1 = PromptSimilarity(clip), PromptSimilarity(clip)
    rank0.update(generated[:2], prompts[:2], "toy")
    rank1.update(generated[2:], prompts[2:], ["toy"] * 4)
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(whole.compute().item(), abs=1e-6)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(PromptSimilarity(clip).compute())


def test_describe_records_backbone_preprocessing_pairing(clip, dino, eval_dirs):
    clip_i = IdentitySimilarity(clip).describe()
    assert clip_i["metric"] == "CLIP-I" and clip_i["backbone"] == str(eval_dirs["clip"])
    assert clip_i["preprocessing"]["resize_mode"] == "shortest_edge"
    assert clip_i["preprocessing"]["interpolation"] == "bicubic"
    assert clip_i["preprocessing"]["crop_size"] == (32, 32)
    assert clip_i["preprocessing"]["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert "every real image of the same subject" in clip_i["pairing"]

    dino_info = IdentitySimilarity(dino).describe()
    assert dino_info["metric"] == "DINO" and dino_info["model_class"] == "ViTModel"
    assert dino_info["preprocessing"]["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert dino_info["embedding"].startswith("CLS")

    clip_t = PromptSimilarity(clip).describe()
    assert clip_t["metric"] == "CLIP-T" and clip_t["placeholder"] == "<s*>"
    assert "class noun" in clip_t["pairing"] and clip_t["text_max_length"] == 77
    json.dumps([clip_i, dino_info, clip_t])  # recordable next to every number


def test_features_are_frozen_and_validate_inputs(clip):
    metric = IdentitySimilarity(clip)
    metric.train()
    assert not clip.training and not clip.model.training
    assert not any(p.requires_grad for p in clip.parameters())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip.image_embeds(_images(1, 7) * 2 - 1)
    with pytest.raises(ValueError, match="shape"):
        clip.image_embeds(torch.rand(3, 32, 32))
    assert len(clip.tokenizer) == 49408


def test_unavailable_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pass a local folder"):
        ClipFeatures("no-such-org/no-such-clip-model")
    with pytest.raises(OSError, match="pass a local folder"):
        DinoFeatures("no-such-org/no-such-dino-model")


def test_tiny_models_are_seeded_and_reused(tmp_path, eval_dirs, capsys):
    from safetensors.torch import load_file

    again = write_tiny_eval_models(tmp_path)
    for name in ("clip", "dino"):
        a, b = load_file(eval_dirs[name] / "model.safetensors"), load_file(again[name] / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
    stamp = (again["clip"] / "model.safetensors").stat().st_mtime_ns
    assert write_tiny_eval_models(tmp_path) == again
    assert (again["clip"] / "model.safetensors").stat().st_mtime_ns == stamp

    from evaluation.metrics.tiny_models import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "OUT_DIR" in capsys.readouterr().out
