"""The Lightning DataModule and the resumable training order (layer 3).

Exact resume (bitwise-identical batches after a checkpoint, mid-epoch or on an epoch's last
batch, single process or DDP) rests on three pieces:

- `ResumableSampler`: the epoch's order is a permutation derived from (seed, epoch) only,
  sharded over ranks like `DistributedSampler` (rank r takes positions r, r + W, ... of the
  padded global order). It yields (epoch, index) keys, so per-example augmentation is seeded
  from (seed, epoch, index) inside the dataset, also in persistent workers. It subclasses
  `DistributedSampler` so that Lightning keeps it under DDP instead of replacing it
  (`use_distributed_sampler` can stay at its default).
- `ResumableLoader`: a `DataLoader` with `state_dict()`/`load_state_dict()`. Lightning 2.6's
  fit loop saves `state_dict()` of every train loader that has both methods (the `_Stateful`
  protocol; `CombinedLoader._state_dicts`) under `loops.fit_loop.state_dict.combined_loader`
  and calls `load_state_dict()` on resume before creating the epoch's iterator. The state is
  (epoch, samples consumed globally), counted as batches leave the loader's iterator in the
  main process, so worker prefetching does not advance it. A state taken after the epoch's
  last batch resumes at the start of the next epoch.
- `ConditionalDataModule.train_dataloader` builds both with the trainer's rank/world size.

Plain loop use: `loader.sampler.set_epoch(e)` before each epoch (Lightning does it), and
`loader.state_dict()` / `new_loader.load_state_dict(state)` to continue where it stopped.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate

from msdiff.datasets import ConditionalDataset
from msdiff.tasks import Task
from msdiff.utils import make_generator, mix_seed

__all__ = ["ResumableSampler", "ResumableLoader", "ConditionalDataModule"]


class ResumableSampler(DistributedSampler):
    """Order of one rank's training examples, a pure function of (seed, epoch, position).

    Args:
        dataset: the (sized) dataset to draw from.
        seed: seed of the permutations; epoch e uses the permutation drawn from (seed, e).
        shuffle: permute (True) or keep dataset order (False).
        rank, world_size: this process's shard (0 and 1 without DDP).
        drop_last: drop the tail that does not divide evenly over ranks (else pad by wrapping).

    Yields `(epoch, index)` keys (`ConditionalDataset` accepts them). `len()` is the full
    epoch's count per rank, also while resuming, as Lightning's progress tracking expects.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: rank must be in [0, world_size={world_size}), got {rank}")
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0  # global position where the next iteration begins (set by a resume)

    def global_order(self, epoch: int) -> torch.Tensor:
        """The padded (or truncated) global order of `epoch`, length `total_size`."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=make_generator(mix_seed(self.seed, epoch)))
        else:
            order = torch.arange(n)
        if self.total_size > n:
            order = order.repeat(math.ceil(self.total_size / n))
        return order[: self.total_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # computed eagerly: the epoch and start in force when iter() is called decide the order,
        # whether or not workers start pulling indices right away
        start, self.start = self.start, 0
        remaining = self.global_order(self.epoch)[start:]
        return iter([(self.epoch, i) for i in remaining[self.rank :: self.num_replicas].tolist()])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a resume position set for this same epoch is kept."""
        if epoch != self.epoch:
            self.epoch, self.start = int(epoch), 0


class _CountingIterator:
    """Wraps a DataLoader iterator; counts the batches it hands out into its loader's position."""

    def __init__(self, loader: "ResumableLoader", inner: Iterator[Any]) -> None:
        self.loader, self.inner = loader, inner

    def __iter__(self) -> "_CountingIterator":
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        self.loader._consumed += self.loader._per_batch()
        return batch

    def __len__(self) -> int:
        return len(self.inner)


class ResumableLoader(DataLoader):
    """A `DataLoader` over a `ResumableSampler` whose position is checkpointable (module doc).

    Takes DataLoader's arguments; `sampler` must be a `ResumableSampler`.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int = 1, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise ValueError(f"ResumableLoader: sampler must be a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._epoch, self._consumed = sampler.epoch, sampler.start

    def _per_batch(self) -> int:
        return self.batch_size * self.sampler.num_replicas

    def __iter__(self) -> Iterator[Any]:
        self._epoch, self._consumed = self.sampler.epoch, self.sampler.start
        return _CountingIterator(self, super().__iter__())

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "consumed"}: samples (over all ranks) already delivered in that epoch."""
        total = len(self) * self._per_batch()
        epoch, consumed = self._epoch, min(self._consumed, total)
        if consumed >= total:  # taken on the epoch's last batch: continue with the next epoch
            epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the next batch after the one where `state` was taken."""
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if consumed >= len(self) * self._per_batch():
            epoch, consumed = epoch + 1, 0
        self.sampler.epoch, self.sampler.start = epoch, consumed
        self._epoch, self._consumed = epoch, consumed


def _evenly_spaced(dataset: Dataset, size: int | None) -> Dataset:
    if size is None or size >= len(dataset):
        return dataset
    return Subset(dataset, torch.linspace(0, len(dataset) - 1, size).round().long().tolist())


class ConditionalDataModule(pl.LightningDataModule):
    """Train/val/test/predict loaders for conditional generation from one dataset factory.

    Args:
        dataset: a callable split -> dataset, e.g. `functools.partial(msdiff.datasets.CelebA,
            task=SuperResolution(8), root="data/celeba")`, or in YAML a `class_path` with
            `init_args` (everything but the split), which LightningCLI turns into that callable.
        batch_size: examples per batch and per process (the effective batch is this times the
            world size).
        val_batch_size: batch size of the evaluation loaders (default `batch_size`).
        num_workers: loader worker processes per rank.
        seed: seed of the training order (augmentation is seeded by the dataset's own seed).
        val_size: use an evenly spaced subset of this many validation examples (None: all).
        test_size: the same for the test/predict split.
        drop_last: drop each epoch's incomplete last training batch.
        pin_memory, persistent_workers: passed to the loaders.

    `setup()` builds the datasets, so a missing or empty root fails before training starts.
    The train loader is a `ResumableLoader` whose state Lightning checkpoints; under DDP each
    rank reads its own shard, and the validation batch of `fixed_batch()` is the same on every
    rank.
    """

    def __init__(self, dataset: Callable[[str], ConditionalDataset], batch_size: int = 16,
                 val_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 val_size: int | None = None, test_size: int | None = None, drop_last: bool = True,
                 pin_memory: bool = False, persistent_workers: bool = False) -> None:
        super().__init__()
        for name, v in (("batch_size", batch_size), ("val_batch_size", val_batch_size or 1),
                        ("val_size", val_size or 1), ("test_size", test_size or 1)):
            if v < 1:
                raise ValueError(f"ConditionalDataModule: {name} must be a positive integer, got {v}")
        if num_workers < 0:
            raise ValueError(f"ConditionalDataModule: num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.val_size, self.test_size, self.drop_last = val_size, test_size, drop_last
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers and num_workers > 0
        self.datasets: dict[str, Dataset] = {}

    def split(self, name: str) -> Dataset:
        """The dataset of split `name` ("train", "val" or "test"), built once."""
        if name not in self.datasets:
            ds = self.dataset(name)
            size = {"val": self.val_size, "test": self.test_size}.get(name)
            self.datasets[name] = _evenly_spaced(ds, size)
        return self.datasets[name]

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for name in needed.get(stage, ("train", "val", "test")):
            self.split(name)

    @property
    def task(self) -> Task | None:
        """The task of the data (forward operator and consistency for evaluation)."""
        ds = self.split("val")
        return (ds.dataset if isinstance(ds, Subset) else ds).task

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_kwargs(self) -> dict[str, Any]:
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory,
                    persistent_workers=self.persistent_workers)

    def train_dataloader(self) -> ResumableLoader:
        ds = self.split("train")
        rank, world = self._rank_world()
        sampler = ResumableSampler(ds, seed=self.seed, shuffle=True, rank=rank, world_size=world)
        loader = ResumableLoader(ds, sampler, batch_size=self.batch_size, drop_last=self.drop_last,
                                 **self._loader_kwargs())
        if len(loader) == 0:
            raise ValueError(f"ConditionalDataModule: batch_size={self.batch_size} exceeds the "
                             f"{len(sampler)} training examples per rank; expected a smaller batch_size")
        return loader

    def _eval_loader(self, name: str) -> DataLoader:
        return DataLoader(self.split(name), batch_size=self.val_batch_size, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def fixed_batch(self, n: int = 8, split: str = "val") -> dict[str, Any]:
        """The first `n` examples of `split`, collated: the same batch at every call and on every
        rank (evaluation splits carry no epoch-dependent randomness), for sample grids."""
        ds = self.split(split)
        return default_collate([ds[i] for i in range(min(n, len(ds)))])
