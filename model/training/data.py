"""Labelled image folders, seeded stratified splits and NEU-DET boxes."""

from __future__ import annotations

import hashlib
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from steelsight.contract import IMAGE_EXTENSIONS
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.preprocess import resize_for_model, to_tensor


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]


def class_root(data_dir: Path, classes: Sequence[str] = CLASSES) -> Path:
    """The folder holding one sub-folder per class (``DIR`` or ``DIR/images``, as in the NEU layout)."""
    data_dir = Path(data_dir)
    for candidate in (data_dir, data_dir / "images"):
        if any((candidate / name).is_dir() for name in classes):
            return candidate
    raise FileNotFoundError(f"{data_dir} has no class folders named like {', '.join(classes)}")


def scan_folders(data_dir: Path, classes: Sequence[str] = CLASSES) -> list[Sample]:
    """Every image under ``<root>/<class>/``, sorted for reproducibility."""
    root = class_root(data_dir, classes)
    samples = [
        Sample(path, label)
        for label, name in enumerate(classes)
        if (root / name).is_dir()
        for path in sorted((root / name).iterdir())
        if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    ]
    if not samples:
        raise FileNotFoundError(f"no images found under {root}")
    return samples


def limit_per_class(samples: Sequence[Sample], per_class: int) -> list[Sample]:
    """The first ``per_class`` samples of each class (0 keeps all): for smoke runs."""
    if per_class <= 0:
        return list(samples)
    counts: dict[int, int] = {}
    kept = []
    for sample in samples:
        counts[sample.label] = counts.get(sample.label, 0) + 1
        if counts[sample.label] <= per_class:
            kept.append(sample)
    return kept


def manifest_hash(samples: Sequence[Sample]) -> str:
    """sha256 over (class, file name, file sha256): identifies the exact data a model saw."""
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda s: (s.label, s.path.name)):
        file_hash = hashlib.sha256(sample.path.read_bytes()).hexdigest()
        digest.update(f"{sample.class_name}/{sample.path.name}\t{file_hash}\n".encode())
    return digest.hexdigest()


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int, folds: int = 0, fold: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Per-class seeded shuffle; the same fraction of every class goes to val.

    With ``folds`` > 1 (k-fold cross-validation) each class is dealt into ``folds``
    parts and part ``fold`` is val, so the folds' val sets cover every image once;
    ``val_fraction`` is then unused.
    """
    if folds > 1 and not 0 <= fold < folds:
        raise ValueError(f"fold {fold} is not one of 0..{folds - 1}")
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted({s.label for s in samples}):
        group = sorted((s for s in samples if s.label == label), key=lambda s: s.path.name)
        rng.shuffle(group)
        if folds > 1:
            val.extend(group[fold::folds])
            train.extend(s for i, s in enumerate(group) if i % folds != fold)
            continue
        n_val = round(len(group) * val_fraction)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return train, val


def training_split(samples: Sequence[Sample], training: dict) -> tuple[list[Sample], list[Sample]]:
    """The (train, val) split a checkpoint was trained on, from its stored training config."""
    return stratified_split(samples, training["val_fraction"], training["seed"], training.get("folds", 0),
                            training.get("fold", 0))


class SurfaceDataset(Dataset):
    """Decodes every image once into memory (NEU: 1,440 x 40 kB), augments per access.

    With ``annotations`` each item also carries the mask of its own class's boxes,
    moved by the same spatial augmentation as the image, and a flag saying whether
    the image has such boxes: ``(x, label, mask, has_mask)``.
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[..., dict] | None, size: int,
                 annotations: Path | None = None):
        self.samples = list(samples)
        originals = [read_gray(s.path) for s in self.samples]
        self.images = [resize_for_model(image, size) for image in originals]
        self.transform = transform
        self.masks = None if annotations is None else [
            own_box_mask(sample, annotations, image.shape, size) for sample, image in zip(self.samples, originals,
                                                                                          strict=True)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        image, label = self.images[index], self.samples[index].label
        if self.masks is None:
            if self.transform is not None:
                image = self.transform(image=image)["image"]
            return to_tensor(image), label
        mask = self.masks[index]
        has_mask = mask is not None
        if mask is None:
            mask = np.zeros_like(image)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return to_tensor(image), label, torch.from_numpy(np.ascontiguousarray(mask)).float()[None], float(has_mask)


@dataclass(frozen=True)
class Box:
    name: str
    xmin: int
    ymin: int
    xmax: int
    ymax: int


def read_voc_boxes(xml_path: Path) -> list[Box]:
    """Pascal-VOC boxes from a NEU-DET annotation file."""
    root = ET.parse(xml_path).getroot()
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        coords = [int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")]
        boxes.append(Box(obj.findtext("name", "").strip(), *coords))
    return boxes


def annotation_for(sample: Sample, annotations_dir: Path) -> Path | None:
    """``annotations/<class>/<stem>.xml`` as laid out in the NEU folder."""
    annotations_dir = Path(annotations_dir)
    for candidate in (
        annotations_dir / sample.class_name / f"{sample.path.stem}.xml",
        annotations_dir / f"{sample.path.stem}.xml",
    ):
        if candidate.exists():
            return candidate
    return None


def box_mask(boxes: Sequence[Box], class_name: str, shape: tuple[int, int]) -> np.ndarray | None:
    """Union of the boxes of one class as a boolean mask, or None when there are none."""
    mask = np.zeros(shape, dtype=bool)
    own = [b for b in boxes if b.name == class_name]
    for b in own:
        mask[max(b.ymin - 1, 0) : b.ymax, max(b.xmin - 1, 0) : b.xmax] = True
    return mask if own else None


def own_box_mask(sample: Sample, annotations: Path, shape: tuple[int, int], size: int) -> np.ndarray | None:
    """uint8 mask (size x size) of the sample's own-class NEU-DET boxes, or None without any."""
    xml = annotation_for(sample, annotations)
    mask = box_mask(read_voc_boxes(xml), sample.class_name, shape) if xml else None
    if mask is None:
        return None
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
