"""Training data: which dataset a run uses, and the deterministic batch for each step.

Batches are drawn by index from a per-step generator (sampling with replacement), so step s always sees the same
images whatever happened before it: a resumed run continues exactly like the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmd_dar.data.folder import ImageFolderDataset
from dmd_dar.data.procedural import ProceduralImages
from dmd_dar.errors import UserError
from dmd_dar.training.seeding import derive_seed

SOURCES = ("procedural", "folder")


@dataclass
class DataConfig:
    source: str = "procedural"  # procedural (the embedded dataset) | folder (your own images)
    root: str | None = None  # folder of images, for source=folder
    captions: str | None = None  # optional captions file, for source=folder
    image_size: int = 32
    seed: int = 0  # the procedural dataset's seed
    length: int = 1_000_000  # procedural: the index range images are drawn from

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise UserError(f"data.source={self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.source == "folder" and not self.root:
            raise UserError("data.source=folder needs data.root=<folder of images>")
        if self.image_size < 8:
            raise UserError(f"data.image_size={self.image_size} is too small (>= 8)")


def make_dataset(cfg: DataConfig, split: str = "train"):
    """The dataset a run trains on; items are (image [3,H,W] in [-1,1], class_id, caption)."""
    if cfg.source == "procedural":
        return ProceduralImages(split=split, length=cfg.length, size=cfg.image_size, seed=cfg.seed)
    return ImageFolderDataset(cfg.root, image_size=cfg.image_size, captions_file=cfg.captions)


def num_classes_of(dataset) -> int:
    return len(getattr(dataset, "class_names", None) or getattr(dataset, "classes", None) or [])


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator that picks the images of (step, rank): independent of every other random draw."""
    return torch.Generator().manual_seed(derive_seed(seed, "data", step, rank))


class StepBatches(torch.utils.data.Dataset):
    """Item s is the batch of training step ``start + s``: a DataLoader over it renders batches ahead of time in
    worker processes (``num_workers``), while each batch stays a pure function of (seed, step, rank)."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, start: int, stop: int) -> None:
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int):
        images, labels, _ = draw_batch(self.dataset, self.batch_size, step_generator(self.seed, self.start + i,
                                                                                     self.rank))
        return images, labels


def step_batches(dataset, batch_size: int, seed: int, rank: int, start: int, stop: int, num_workers: int = 0):
    """An iterator of (images, labels) for steps start..stop-1 (see ``StepBatches``)."""
    loader = torch.utils.data.DataLoader(StepBatches(dataset, batch_size, seed, rank, start, stop), batch_size=None,
                                         shuffle=False, num_workers=num_workers, persistent_workers=False,
                                         prefetch_factor=4 if num_workers else None)
    return iter(loader)


def draw_batch(dataset, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A batch of (images [B,3,H,W], labels [B], captions) drawn by the step's generator."""
    if len(dataset) == 0:
        raise UserError("the training dataset is empty")
    idx = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
    if hasattr(dataset, "render"):  # the procedural dataset renders a whole batch at once
        return dataset.render(idx)
    items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([int(it[1]) if it[1] is not None else 0 for it in items], dtype=torch.long)
    return images, labels, [it[2] for it in items]
