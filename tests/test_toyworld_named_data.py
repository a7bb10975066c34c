"""The toy world's data: renders, captions, held-out concepts, the prompt command, the vocabulary filter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.token_index import TokenIndex
from models.vocabulary import vocabulary_ids
from toyworld.named import world as tw


def test_render_is_deterministic_and_draws_the_asked_colours():
    scene = tw.Scene("square", "red", "plain", "blue", "center", "large")
    a, b = tw.render(scene), tw.render(scene)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert tuple(a[16, 16]) == tw.COLOURS["red"]  # object at the centre
    assert tuple(a[0, 0]) == tw.COLOURS["blue"]  # background in the corner


@pytest.mark.parametrize("position", tw.POSITIONS)
def test_position_moves_the_object(position):
    img = tw.render(tw.Scene("circle", "white", "plain", "blue", position, "small"))
    cols = np.flatnonzero((img == tw.COLOURS["white"]).all(-1).any(0))
    centre = cols.mean() / 32
    assert abs(centre - tw._X[position]) < 0.05


def test_every_shape_differs_and_patterns_change_pixels():
    masks = {
        s: (tw.render(tw.Scene(s, "red", "plain", "blue", "center", "large")) != tw.COLOURS["blue"]).any(-1)
        for s in tw.SHAPES
    }
    for s in tw.SHAPES:
        assert masks[s].sum() > 40, s
        for t in tw.SHAPES:
            if s < t:
                assert (masks[s] ^ masks[t]).sum() > 20, (s, t)
    plain = tw.render(tw.Scene("square", "red", "plain", "blue", "center", "large"))
    for pattern in ("striped", "checkered"):
        patterned = tw.render(tw.Scene("square", "red", pattern, "blue", "center", "large"))
        assert (patterned != plain).any(-1).sum() > 40, pattern


def test_caption_names_every_attribute_and_takes_a_placeholder():
    scene = tw.Scene("star", "orange", "striped", "green", "left", "large")
    assert tw.caption(scene) == "a large orange striped star on the left on a green background"
    assert tw.caption(scene, identity="<s*>") == "a large <s*> on the left on a green background"
    rng = np.random.default_rng(0)
    dropped = [tw.caption(scene, rng, drop_prob=0.5) for _ in range(50)]
    assert len(set(dropped)) > 5 and all(c.startswith(("a ", "an ")) for c in dropped)


def test_base_split_never_shows_held_out_concepts():
    stream = tw.ToyWorldStream(batch_size=256, seed=3, split="base")
    scenes = stream.batch(0)["scenes"] + stream.batch(1)["scenes"]
    assert not any(tw.is_held_out(s) for s in scenes)
    assert all(s.colour != s.background for s in scenes)
    assert {s.shape for s in scenes} == set(tw.TRAIN_SHAPES)
    everything = tw.ToyWorldStream(batch_size=512, seed=3, split="all").batch(0)["scenes"]
    assert {s.shape for s in everything} == set(tw.SHAPES)


def test_stream_batches_are_a_function_of_seed_and_step():
    a, b = tw.ToyWorldStream(8, seed=1), tw.ToyWorldStream(8, seed=1)
    torch.testing.assert_close(a.batch(5)["pixels"], b.batch(5)["pixels"])
    assert a.batch(5)["captions"] == b.batch(5)["captions"]
    assert not torch.equal(a.batch(5)["pixels"], a.batch(6)["pixels"])
    px = a.batch(0)["pixels"]
    assert px.shape == (8, 3, 32, 32) and px.min() >= -1 and px.max() <= 1


def test_sample_prompts_command_prints_json_lines(capsys):
    """``python -m toyworld sample-prompts``, in process (the same parser and function as the command)."""
    from toyworld.__main__ import main

    main(["sample-prompts", "--n", "5", "--seed", "7"])
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in out]
    assert len(rows) == 5
    for row in rows:
        attrs = row["attributes"]
        assert set(attrs) == set(tw.ATTRIBUTES)
        assert row["prompt"] == tw.caption(tw.Scene(**attrs))
        assert not tw.is_held_out(tw.Scene(**attrs))
    main(["sample-prompts", "--n", "5", "--seed", "7"])
    assert capsys.readouterr().out.splitlines() == out


def test_vocabulary_filter_returns_only_allowed_tokens(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.clip_tokenizer import load_clip_tokenizer, write_clip_tokenizer

    tokenizer = load_clip_tokenizer(write_clip_tokenizer(tmp_path / "tok"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    words = ["red", "blue", "striped", "star"]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("# a comment\nred\nblue\n\nstriped  # trailing comment\nstar\n")
    allowed = vocabulary_ids(tokenizer, vocab_file)
    assert allowed == vocabulary_ids(tokenizer, words)
    assert len(allowed) >= 4
    filtered = TokenIndex.from_text_encoder(text_encoder, tokenizer, mode="exact", vocabulary=vocab_file)
    assert sorted(filtered.vocab_ids.tolist()) == allowed
    queries = torch.randn(32, 16)
    result = filtered.search(queries, 2)
    assert set(result.ids.flatten().tolist()) <= set(allowed)
    # a query equal to an allowed row finds it; unfiltered, the same call is unchanged from before
    table = text_encoder.get_input_embeddings().weight.detach()
    assert filtered.search(table[allowed[1]][None], 1).ids.item() == allowed[1]
    unfiltered = TokenIndex.from_text_encoder(text_encoder, tokenizer, mode="exact")
    reference = TokenIndex.build(table, unfiltered.tokens, set(tokenizer.all_special_ids), mode="torch")
    torch.testing.assert_close(unfiltered.search(queries, 3).ids, reference.search(queries, 3).ids)
    assert len(unfiltered) == 49408 - len(set(tokenizer.all_special_ids))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TokenIndex.from_text_encoder(text_encoder, tokenizer, vocabulary=tmp_path / "missing.txt")


def test_vocabulary_filter_sets_the_token_norm_and_the_modules_search(tiny_sd_dir, tmp_path):
    from lightning_modules import EncoderPretraining

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red\nstar\nstriped\n")
    module = EncoderPretraining(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        image_encoder_name_or_path=str(tiny_sd_dir),
        token_vocabulary=str(vocab),
        token_index_cache=None,
    )
    ids = vocabulary_ids(module.backbone.tokenizer, vocab)
    assert module.backbone.vocabulary_ids == ids
    table = module.backbone.token_embedding_table().detach().float()
    assert module.backbone.mean_token_norm() == pytest.approx(float(table[ids].norm(dim=-1).mean()), rel=1e-6)
    assert module.personalizer.token_embedder.target_norm == pytest.approx(module.backbone.mean_token_norm())
    module.setup("fit")
    assert sorted(module.token_index.vocab_ids.tolist()) == ids
    result = module.token_index.search(torch.randn(16, table.shape[1]), 1)
    assert set(result.ids.flatten().tolist()) <= set(ids)


def test_toyworld_items_train_through_the_ordinary_pretrain_module():
    """The world's pretraining items plug into ``PretrainDataModule`` (its resumable loader), placeholder checked."""
    from datamodules.pretrain import PretrainDataModule
    from toyworld.named.data import ToyWorldConceptDataset, identity_id

    data = ToyWorldConceptDataset(length=8, seed=3)
    module = PretrainDataModule(dataset=data, batch_size=4, seed=3)
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["clip_pixel_values"].shape == (
        4,
        3,
        32,
        32,
    )
    assert all(p.count("<s*>") == 1 for p in batch["prompt"])
    ids = [identity_id(data.scene(0, int(k))) for k in batch["index"]]
    assert batch["concept_id"].tolist() == ids
    assert not any(tw.is_held_out(data.scene(0, k)) for k in range(8))
    with pytest.raises(ValueError, match="placeholder"):
        PretrainDataModule(dataset=data, placeholder="<t*>")
