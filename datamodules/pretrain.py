"""Encoder pretraining data, plus the resumable sampler/loader pair every data module here uses.

Order and content of every batch are pure functions of ``(seed, epoch)``:

* :class:`EpochSampler` permutes with ``torch.randperm`` under a generator seeded ``seed + epoch``
  (``torch.utils.data.DistributedSampler``'s rule, sharded by rank) and yields ``(epoch, index)`` pairs, so
  the dataset's crops, flips and templates (seeded by ``(seed, epoch, index)``) are right even in persistent
  worker processes that never see ``set_epoch``.
* :class:`ResumableDataLoader` counts the batches it has handed out and exposes ``state_dict`` /
  ``load_state_dict``. Lightning stores that state in every checkpoint and restores it before it re-creates
  the iterator, so a run resumed mid-epoch skips the consumed batches and then yields exactly the batches
  the uninterrupted run would have (an end-of-epoch state resumes at the start of the next epoch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from datamodules.image_folder import ImageFolderDataset
from datamodules.synthetic import SyntheticConceptDataset
from datamodules.transforms import CLIP_MEAN, CLIP_STD, DEFAULT_PLACEHOLDER


class EpochSampler(DistributedSampler):
    """Seeded, epoch-aware, optionally sharded sampler yielding ``(epoch, index)`` pairs.

    A ``DistributedSampler`` subclass, so Lightning neither replaces nor wraps it; with
    ``num_replicas=1`` no process group is needed. ``start`` skips that many of this rank's indices on the
    next iteration only (set by :meth:`ResumableDataLoader.load_state_dict`).

    Args:
        dataset: Sized dataset.
        num_replicas: Number of ranks.
        rank: This rank.
        shuffle: Permute per epoch (``False``: ``0, 1, 2, ...``).
        seed: Permutation seed (the permutation uses ``seed + epoch``).
        drop_last: Drop the tail that does not divide evenly across ranks instead of padding it.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch; also forwards the epoch to the dataset."""
        if epoch != self.epoch:
            self.start = 0  # a pending resume offset belongs to the old epoch
        super().set_epoch(epoch)
        if callable(set_dataset_epoch := getattr(self.dataset, "set_epoch", None)):
            set_dataset_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        epoch = self.epoch
        return iter([(epoch, int(i)) for i in indices[start:]])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose position Lightning checkpoints.

    ``len()`` stays the full epoch length while resuming, as Lightning expects of stateful loaders.

    Args:
        dataset: Map-style dataset accepting ``(epoch, index)`` keys.
        sampler: Its sampler.
        batch_size: Items per batch.
        **kwargs: Any other ``DataLoader`` argument (``num_workers``, ``drop_last``, ...).
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._batches = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: the sampler is read at the first ``next``, after Lightning's ``set_epoch``.
        self._batches = self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": current epoch, "batches": batches consumed in it}``."""
        return {"epoch": int(self.sampler.epoch), "batches": int(self._batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Positions the next iteration after ``state_dict["batches"]`` batches of its epoch."""
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = batches * self.batch_size
        self._batches = batches


def default_num_workers() -> int:
    """``min(8, cpu_count - 1)`` DataLoader workers (0 on a single core): one core stays with the main process."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def world_info(module: LightningDataModule) -> tuple[int, int]:
    """``(world_size, global_rank)`` of the attached trainer, ``(1, 0)`` without one."""
    trainer = getattr(module, "trainer", None)
    if trainer is None:
        return 1, 0
    return int(trainer.world_size), int(trainer.global_rank)


class PretrainDataModule(LightningDataModule):
    """Training data for encoder pretraining: image folders, procedural concepts when none are given, or any
    given map-style dataset of the same items (e.g. ``toyworld.ToyWorldConceptDataset``).

    Roots are scanned and validated in ``__init__``, so a missing or empty folder fails with a one-line error
    before any training starts. Only a train dataloader is provided.

    Args:
        roots: Image folders (recursive jpg/jpeg/png/webp/bmp, unlabeled, mixed domains); ``None`` uses
            synthetic concepts.
        synthetic_concepts: Size of the synthetic concept set (when ``roots`` is ``None``).
        synthetic_holdout: The LAST this many synthetic concepts are kept out of pretraining for tuning and
            evaluation (see ``heldout_concept_ids``).
        synthetic_seed: Seed of the synthetic concept set (kinds, palettes); give the same value to
            ``ConceptDataModule.synthetic_seed`` to tune on a held-out concept.
        samples_per_concept: Augmented samples of each synthetic concept per epoch (folders: one per image).
        resolution: Side ``R`` of ``pixel_values`` (the backbone's pixel resolution, VAE input).
        clip_size: Side ``C`` of ``clip_pixel_values`` (the image encoder's input size).
        clip_mean: Per-channel mean of the image encoder's normalisation.
        clip_std: Per-channel std of the image encoder's normalisation.
        scale: Random-resized-crop area range (fraction of the largest square that fits).
        flip_p: Horizontal-flip probability.
        batch_size: Items per batch (per device); >= 2 for the contrastive regulariser.
        num_workers: DataLoader worker processes (persistent when > 0). None (the SD configs): one per CPU core
            but one, at most 8 (:func:`default_num_workers`): decoding and cropping 512 px images in the main
            process would starve the GPU. The tiny configs use 0 (32 px synthetic renders cost microseconds).
        placeholder: Pseudo-word string in the prompts, e.g. ``"a photo of a <s*>"``.
        seed: Seed of the shuffling order and of every crop, flip and template.
        drop_last: Drop the last incomplete batch (keeps every batch at ``batch_size`` concepts).
        dataset: A dataset to train on instead of folders or synthetic concepts (it keeps its own resolution,
            normalisation and seed; only ``batch_size``, ``num_workers``, ``seed`` (shuffling) and ``drop_last``
            apply). It takes ``(epoch, index)`` keys like the built-in ones; its ``placeholder`` attribute, if
            any, must equal ``placeholder``.
    """

    def __init__(
        self,
        roots: list[str] | None = None,
        synthetic_concepts: int = 64,
        synthetic_holdout: int = 4,
        synthetic_seed: int = 0,
        samples_per_concept: int = 8,
        resolution: int = 32,
        clip_size: int = 32,
        clip_mean: tuple[float, float, float] = CLIP_MEAN,
        clip_std: tuple[float, float, float] = CLIP_STD,
        scale: tuple[float, float] = (0.8, 1.0),
        flip_p: float = 0.5,
        batch_size: int = 8,
        num_workers: int | None = 0,
        placeholder: str = DEFAULT_PLACEHOLDER,
        seed: int = 0,
        drop_last: bool = True,
        dataset: Dataset | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["dataset"])
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        common = dict(
            resolution=resolution,
            clip_size=clip_size,
            clip_mean=clip_mean,
            clip_std=clip_std,
            scale=scale,
            flip_p=flip_p,
            placeholder=placeholder,
        )
        self.train_dataset: Dataset
        if dataset is not None:
            self.heldout_concept_ids = []
            own = getattr(dataset, "placeholder", placeholder)
            if own != placeholder:
                raise ValueError(f"the dataset's placeholder {own!r} is not the module's {placeholder!r}")
            self.train_dataset = dataset
            rank_zero_info(f"PretrainDataModule: {len(dataset)} items of {type(dataset).__name__}")
        elif roots:
            self.heldout_concept_ids: list[int] = []
            self.train_dataset = ImageFolderDataset(roots, seed=seed, **common)
            rank_zero_info(f"PretrainDataModule: {len(self.train_dataset)} images under {', '.join(roots)}")
        else:
            if not 0 <= synthetic_holdout < synthetic_concepts:
                raise ValueError(
                    f"synthetic_holdout must be in [0, synthetic_concepts={synthetic_concepts}), "
                    f"got {synthetic_holdout}"
                )
            n_train = synthetic_concepts - synthetic_holdout
            self.heldout_concept_ids = list(range(n_train, synthetic_concepts))
            self.train_dataset = SyntheticConceptDataset(
                num_concepts=synthetic_concepts,
                concept_ids=range(n_train),
                samples_per_concept=samples_per_concept,
                seed=synthetic_seed,
                augment_seed=seed,
                **common,
            )
            rank_zero_info(
                f"PretrainDataModule: {n_train} synthetic concepts x {samples_per_concept} samples"
                f" (held out: {self.heldout_concept_ids})"
            )
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.seed = seed
        self.drop_last = drop_last

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled, seeded, resumable loader; sharded by rank under a distributed strategy."""
        world, rank = world_info(self)
        sampler = EpochSampler(
            self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        return ResumableDataLoader(
            self.train_dataset,
            sampler=sampler,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def probe_batch(self, n: int = 4) -> dict[str, Any]:
        """A fixed batch for logging: ``n`` items spread over the dataset, at epoch 0.

        Returns:
            Collated batch: ``pixel_values`` (n, 3, R, R), ``clip_pixel_values`` (n, 3, C, C), ``prompt``
            (list of n str), ``concept_id`` (n,), ``index`` (n,).
        """
        size = len(self.train_dataset)
        if not 1 <= n <= size:
            raise ValueError(f"probe_batch needs 1 <= n <= {size}, got {n}")
        return default_collate([self.train_dataset[(0, k * size // n)] for k in range(n)])

    def teardown(self, stage: str) -> None:
        """Reports unreadable files skipped in this process (worker processes warn on their own)."""
        skipped = getattr(self.train_dataset, "skipped", None)
        if skipped:
            rank_zero_info(
                f"PretrainDataModule: skipped {len(skipped)} unreadable image(s) in the main process"
            )
