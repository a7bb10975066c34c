"""Datasets and data modules: file formats, bad files, determinism, held-out split, resume, batch contract."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import (
    CLIP_MEAN,
    CLIP_STD,
    ConceptDataModule,
    EpochSampler,
    ImageFolderDataset,
    ImageLoadError,
    PretrainDataModule,
    ResumableDataLoader,
    SkippedImageWarning,
    SyntheticConceptDataset,
    item_generator,
    load_rgb,
    to_clip_tensor,
)
from datamodules.synthetic import concept_kind, render_concept
from datamodules.transforms import augment, item_seed, pick_template

R, C = 32, 24


def _gradient(w: int = 40, h: int = 30) -> np.ndarray:
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    return np.concatenate(
        [np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)), np.full((h, w, 1), 90.0)], -1
    )


def _write_all_modes(root: Path) -> dict[str, Path]:
    """One file per mode / format / naming case; returns name -> path."""
    rgb = Image.fromarray(_gradient().astype(np.uint8))
    files = {
        "rgb_jpg": root / "rgb.jpg",
        "rgba_png": root / "rgba.png",
        "p_png": root / "palette.png",
        "l_png": root / "gray.png",
        "la_png": root / "gray_alpha.png",
        "cmyk_jpg": root / "cmyk.jpeg",
        "i16_png": root / "depth16.png",
        "webp": root / "img.webp",
        "bmp": root / "img.bmp",
        "upper": root / "UPPER.JPG",
        "nested": root / "sub" / "deeper" / "nested.png",
    }
    files["nested"].parent.mkdir(parents=True)
    rgb.save(files["rgb_jpg"])
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 0)  # fully transparent red -> white
    rgba[:, 20:] = (0, 0, 255, 255)
    Image.fromarray(rgba).save(files["rgba_png"])
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(files["p_png"], transparency=0)
    rgb.convert("L").save(files["l_png"])
    rgb.convert("LA").save(files["la_png"])
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(files["cmyk_jpg"])
    depth = np.zeros((30, 40), np.uint16)
    depth[:, 20:] = 65535
    depth[:, 10:20] = 32896
    Image.fromarray(depth).save(files["i16_png"])
    rgb.save(files["webp"])
    rgb.save(files["bmp"])
    rgb.save(files["upper"], format="JPEG")
    rgb.save(files["nested"])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"junk")  # hidden files are ignored by the scan
    return files


def test_load_rgb_converts_every_mode(tmp_path):
    files = _write_all_modes(tmp_path)
    assert Image.open(files["i16_png"]).mode.startswith("I")
    for name, path in files.items():
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (40, 30), name
    rgba = np.asarray(load_rgb(files["rgba_png"]))
    assert (rgba[:, :20] == 255).all() and (rgba[:, 20:] == (0, 0, 255)).all()
    depth = np.asarray(load_rgb(files["i16_png"]))[0, :, 0]
    assert depth[0] == 0 and depth[15] == 128 and depth[-1] == 255
    cmyk = np.asarray(load_rgb(files["cmyk_jpg"])).reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0, M=Y=255 is red


def test_image_folder_items_follow_batch_contract(tmp_path):
    files = _write_all_modes(tmp_path)
    ds = ImageFolderDataset([str(tmp_path)], resolution=R, clip_size=C, placeholder="<cat-toy>")
    assert sorted(ds.files) == sorted(str(p.resolve()) for p in files.values())
    for i in range(len(ds)):
        item = ds[i]
        px, cp = item["pixel_values"], item["clip_pixel_values"]
        assert px.shape == (3, R, R) and px.dtype == torch.float32
        assert cp.shape == (3, C, C) and cp.dtype == torch.float32
        assert px.min() >= -1.0 and px.max() <= 1.0
        unnorm = cp * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
        assert unnorm.min() >= -1e-5 and unnorm.max() <= 1 + 1e-5
        assert "<cat-toy>" in item["prompt"] and "{}" not in item["prompt"]
        assert item["concept_id"] == i and item["index"] == i
    assert not ds.skipped


def test_corrupt_files_are_skipped_with_one_warning_each(tmp_path):
    good = Image.fromarray(_gradient().astype(np.uint8))
    good.save(tmp_path / "a_good.png")
    (tmp_path / "b_random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    good.save(tmp_path / "c_full.png")
    data = (tmp_path / "c_full.png").read_bytes()
    (tmp_path / "c_truncated.png").write_bytes(data[: len(data) // 2])
    good.save(tmp_path / "d_good.png")
    ds = ImageFolderDataset(str(tmp_path), resolution=R, clip_size=C)
    bad = {str((tmp_path / n).resolve()) for n in ("b_random.jpg", "c_truncated.png")}
    with pytest.warns(SkippedImageWarning) as record:
        ids = [ds[i]["concept_id"] for i in range(len(ds))] + [ds[i]["concept_id"] for i in range(len(ds))]
    messages = [str(w.message) for w in record if issubclass(w.category, SkippedImageWarning)]
    assert len(messages) == 2 and all(any(p in m for m in messages) for p in bad)
    assert all("\n" not in m for m in messages)
    assert ds.skipped == bad
    names = [Path(ds.files[j]).name for j in ids[:5]]
    assert names == ["a_good.png", "c_full.png", "c_full.png", "d_good.png", "d_good.png"]

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedImageWarning)
        with pytest.raises(RuntimeError, match="unreadable"):
            ImageFolderDataset(str(only_bad))[0]


def test_load_rgb_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg") as err:
        load_rgb(bad)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_rgb(tmp_path / "nope.png")


def test_missing_and_empty_roots_fail_at_construction(tmp_path):
    missing = tmp_path / "missing_root"
    with pytest.raises(FileNotFoundError, match="missing_root"):
        ImageFolderDataset([str(missing)])
    empty = tmp_path / "empty_root"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty_root"):
        ImageFolderDataset([str(empty)])
    with pytest.raises(FileNotFoundError, match="missing_root"):
        PretrainDataModule(roots=[str(missing)])
    with pytest.raises(ValueError, match="empty_root"):
        PretrainDataModule(roots=[str(empty)])


def test_synthetic_is_deterministic_by_seed():
    kw = dict(num_concepts=6, resolution=R, clip_size=C, samples_per_concept=1)
    a, b, c = (
        SyntheticConceptDataset(seed=3, **kw),
        SyntheticConceptDataset(seed=3, **kw),
        SyntheticConceptDataset(seed=4, **kw),
    )
    for i in range(6):
        assert torch.equal(a[i]["pixel_values"], b[i]["pixel_values"])
        assert torch.equal(a[i]["clip_pixel_values"], b[i]["clip_pixel_values"])
        assert a[i]["prompt"] == b[i]["prompt"]
        assert not np.array_equal(np.asarray(a.render(i)), np.asarray(c.render(i)))
    assert a.concept_names == b.concept_names and a.concept_names[0].startswith(a.class_nouns[0] + "_")
    assert len(set(a.class_nouns)) == 6  # balanced: the first 6 ids cover all kinds


def _structure(img: Image.Image) -> np.ndarray:
    """Colour-blind descriptor: edge density, orientation coherence, colour count, radial spectrum."""
    a = np.asarray(img, dtype=np.float64) / 255.0
    g = a.mean(-1)
    gy, gx = np.gradient(g)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-12)
    colours = len(np.unique(a.reshape(-1, 3), axis=0))
    power = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
    n = g.shape[0]
    yy, xx = np.mgrid[:n, :n] - n // 2
    r = np.hypot(xx, yy)
    bands = np.array(
        [power[(r >= lo) & (r < hi)].sum() for lo, hi in [(1, 3), (3, 6), (6, 12), (12, 24), (24, n)]]
    )
    bands /= bands.sum() + 1e-12
    edges = (np.hypot(gx, gy) > 0.02).mean()
    return np.concatenate([[edges, coherence, np.log(colours) / np.log(n * n)], bands])


def test_synthetic_kinds_are_visually_distinct():
    n = 36
    feats = np.stack([_structure(render_concept(0, i, 64)) for i in range(n)])
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-12)
    kinds = np.array([concept_kind(0, i) for i in range(n)])
    dist = np.linalg.norm(feats[:, None] - feats[None], axis=-1)
    same = kinds[:, None] == kinds[None]
    within = dist[same & ~np.eye(n, dtype=bool)].mean()
    between = dist[~same].mean()
    assert between > 1.5 * within


def test_pretrain_holds_out_the_last_synthetic_concepts():
    dm = PretrainDataModule(synthetic_concepts=10, synthetic_holdout=3, samples_per_concept=2, batch_size=4)
    assert dm.heldout_concept_ids == [7, 8, 9]
    seen = {int(c) for batch in dm.train_dataloader() for c in batch["concept_id"]}
    assert seen.isdisjoint(dm.heldout_concept_ids) and seen <= set(range(7))
    probe = dm.probe_batch(4)
    assert probe["pixel_values"].shape == (4, 3, 32, 32) and len(probe["prompt"]) == 4
    assert torch.equal(probe["pixel_values"], dm.probe_batch(4)["pixel_values"])
    with pytest.raises(ValueError, match="synthetic_holdout"):
        PretrainDataModule(synthetic_concepts=4, synthetic_holdout=4)


def test_augmentation_is_a_function_of_seed_epoch_index():
    kw = dict(num_concepts=4, resolution=R, clip_size=C, samples_per_concept=4, seed=0)
    a, b = SyntheticConceptDataset(**kw), SyntheticConceptDataset(**kw)
    b.set_epoch(1)
    for i in range(len(a)):
        assert torch.equal(a[(1, i)]["pixel_values"], b[i]["pixel_values"])
    changed = sum(
        not torch.equal(a[(0, i)]["pixel_values"], a[(1, i)]["pixel_values"]) for i in range(len(a))
    )
    assert changed == len(a)
    other = SyntheticConceptDataset(augment_seed=1, **kw)
    assert not torch.equal(a[(0, 0)]["pixel_values"], other[(0, 0)]["pixel_values"])
    assert a.render(2) is a.render(2)  # cached, un-augmented
    seeds = {item_seed(s, e, i) for s in range(3) for e in range(3) for i in range(200)}
    assert len(seeds) == 3 * 3 * 200


def test_sampler_order_is_a_pure_function_of_seed_and_epoch():
    ds = list(range(50))
    first = EpochSampler(ds, seed=7)
    second = EpochSampler(ds, seed=7)
    first.set_epoch(2)
    second.set_epoch(2)
    order = list(first)
    assert order == list(second) and all(e == 2 for e, _ in order)
    assert sorted(i for _, i in order) == ds
    first.set_epoch(3)
    assert [i for _, i in first] != [i for _, i in order]
    shards = [{i for _, i in EpochSampler(ds, num_replicas=2, rank=r, seed=7)} for r in range(2)]
    assert shards[0].isdisjoint(shards[1]) and len(shards[0] | shards[1]) == 50


def _indices(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def test_resumable_loader_continues_mid_epoch_and_across_epochs():
    ds = SyntheticConceptDataset(num_concepts=5, resolution=8, clip_size=8, samples_per_concept=4)

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(ds, sampler=EpochSampler(ds, seed=1), batch_size=3, drop_last=True)

    full = loader()
    full.sampler.set_epoch(1)
    reference = list(full)
    assert full.state_dict() == {"epoch": 1, "batches": len(full)}

    run = loader()
    run.sampler.set_epoch(1)
    it = iter(run)
    head = [next(it) for _ in range(2)]
    state = run.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert _indices(head + tail) == _indices(reference)
    assert torch.equal(tail[0]["pixel_values"], reference[2]["pixel_values"])

    at_end = loader()
    at_end.load_state_dict(full.state_dict())  # an end-of-epoch state resumes at the next epoch
    nxt = loader()
    nxt.sampler.set_epoch(2)
    assert _indices(list(at_end)) == _indices(list(nxt))


def test_persistent_workers_see_the_epoch():
    ds = SyntheticConceptDataset(num_concepts=2, resolution=8, clip_size=8, samples_per_concept=2)
    dl = ResumableDataLoader(
        ds, sampler=EpochSampler(ds, shuffle=False), batch_size=4, num_workers=1, persistent_workers=True
    )
    for epoch in (0, 1):
        dl.sampler.set_epoch(epoch)
        (batch,) = list(dl)
        expected = torch.stack([ds[(epoch, i)]["pixel_values"] for i in range(4)])
        assert torch.equal(batch["pixel_values"], expected)


def test_concept_datamodule_from_file_and_from_synthetic(tmp_path):
    path = tmp_path / "my_dog.png"
    Image.fromarray(_gradient(50, 35).astype(np.uint8)).save(path)
    dm = ConceptDataModule(
        image=str(path), resolution=R, clip_size=C, batch_size=2, steps=5, placeholder="<d>"
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and dm.concept_name == "my_dog"
    assert batches[0]["pixel_values"].shape == (2, 3, R, R)
    assert batches[0]["clip_pixel_values"].shape == (2, 3, C, C)
    assert all("<d>" in p for b in batches for p in b["prompt"])

    syn = ConceptDataModule(synthetic_concept=62, synthetic_seed=0, batch_size=3, steps=4)
    batches = list(syn.train_dataloader())
    assert len(batches) == 4 and all((b["concept_id"] == 62).all() for b in batches)
    assert syn.class_noun == concept_kind(0, 62) and syn.concept_name.endswith("_62")
    pre = PretrainDataModule(synthetic_concepts=64, synthetic_holdout=4)
    assert np.array_equal(np.asarray(syn.concept_image), np.asarray(pre.train_dataset.render(62)))

    with pytest.raises(ValueError, match="exactly one"):
        ConceptDataModule()
    with pytest.raises(ValueError, match="exactly one"):
        ConceptDataModule(image=str(path), synthetic_concept=1)
    with pytest.raises(FileNotFoundError, match="missing_concept.jpg"):
        ConceptDataModule(image=str(tmp_path / "missing_concept.jpg"))


def test_clip_pixel_values_match_manual_and_reference_preprocessing():
    img = Image.fromarray(_gradient(41, 30).astype(np.uint8))
    resized = img.resize((int(C * 41 / 30), C), Image.Resampling.BICUBIC)
    left = (resized.width - C) // 2
    manual = np.asarray(resized.crop((left, 0, left + C, C)), dtype=np.float32) / 255.0
    manual = (manual - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    ours = to_clip_tensor(img, C)
    assert torch.allclose(ours, torch.from_numpy(manual).permute(2, 0, 1), atol=1e-6)

    transformers = pytest.importorskip("transformers")
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_cls(size={"shortest_edge": C}, crop_size={"height": C, "width": C})
    reference = processor(images=img, return_tensors="pt").pixel_values[0]
    assert torch.allclose(ours, reference, atol=1e-5)

    # An item's clip view is the same augmented view as its pixel_values (template draw, then crop/flip).
    ds = SyntheticConceptDataset(num_concepts=2, resolution=R, clip_size=C, samples_per_concept=1)
    gen = item_generator(0, 0, 1)
    prompt = pick_template(ds.views.templates, gen).format("<s*>")
    view = augment(ds.render(1), max(R, C), gen)
    item = ds[1]
    assert item["prompt"] == prompt
    assert torch.equal(item["clip_pixel_values"], to_clip_tensor(view, C))
