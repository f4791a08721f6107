"""Fine-tune the attention-ResNet-50 on one-folder-per-class data.

Outputs in ``--out``: ``best.safetensors`` (best epoch by val macro-F1, then
val loss), ``model.safetensors`` (best weights + temperature + OOD scorer, the
file to ship), ``last_state.pt`` (resume state), ``history.json`` and
``training_curves.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from steelsight.model.evaluation.corruptions import CAMERA_FAULTS, CORRUPTIONS, corrupt_all
from steelsight.model.evaluation.metrics import classification_report, expected_calibration_error
from steelsight.model.evaluation.plots import training_curves
from steelsight.model.inference.checkpoint import CheckpointMeta, save_checkpoint
from steelsight.model.inference.device import resolve_device
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.network import ArchConfig, AttentionResNet50, load_trunk_weights
from steelsight.model.inference.ood import CameraBank, OodScorer, VirtualLogitScorer
from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.inference.quality import summarise_inputs
from steelsight.model.training.calibrate import (
    fit_temperature,
    format_unseen,
    ood_threshold,
    unseen_false_unknown_rate,
)
from steelsight.model.training.data import (
    SurfaceDataset,
    limit_per_class,
    manifest_hash,
    scan_folders,
    stratified_split,
    training_split,
)
from steelsight.model.training.losses import FocalLoss, cam_outside_box_loss
from steelsight.model.training.pretrained import resolve_pretrained
from steelsight.model.training.transforms import reseed, seed_augment_worker, train_augment


@dataclass
class TrainConfig:
    data: str
    out: str = "runs/neu"
    pretrained: str = "keras"
    image_size: int = 160
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    trunk_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    freeze_stages: int = 0
    freeze_bn: bool = False
    val_fraction: float = 0.2
    seed: int = 0
    folds: int = 0  # > 1: k-fold cross-validation, val = part ``fold`` of ``folds``
    fold: int = 0
    gamma: float = 2.0
    alpha: float = 0.75
    workers: int = 1
    device: str = "auto"
    limit_per_class: int = 0
    half: bool = False
    resume: bool = False
    finalize_only: bool = False
    # False: stop at best.safetensors (an intermediate k-fold stage: only the next stage's start, so no
    # temperature, OOD scorer or camera bank is fitted for it)
    finalize: bool = True
    augment: str = "standard"
    init_from: str | None = None
    annotations: str | None = None  # NEU-DET boxes, for the Grad-CAM box loss
    loc_weight: float = 0.0


def build_model(pretrained: str) -> tuple[AttentionResNet50, str]:
    init = resolve_pretrained(pretrained)
    model = AttentionResNet50(ArchConfig(stride_in_1x1=init.stride_in_1x1, mean=init.mean, std=init.std))
    if init.state is not None:
        load_trunk_weights(model, init.state)
    return model, init.source


def frozen_modules(model: AttentionResNet50, stages: int) -> list[torch.nn.Module]:
    """Stage 0 is the stem (conv1 + bn1); stage i >= 1 is layer i."""
    if stages <= 0:
        return []
    trunk = model.trunk
    return [trunk[0], trunk[1], *[trunk[3 + i] for i in range(1, min(stages, 4) + 1)]]


def set_train_mode(model: AttentionResNet50, frozen: list[torch.nn.Module], freeze_bn: bool = False) -> None:
    model.train()
    for module in frozen:
        module.eval()  # frozen stages keep their ImageNet BatchNorm statistics
    if freeze_bn:  # a fine-tune on shifted inputs (blur) must not drag the running statistics with it
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()


@dataclass
class Inferred:
    """One pass over a loader: logits, labels, pooled features, layer3 texture statistics, the head's hidden layer."""

    logits: torch.Tensor
    labels: torch.Tensor
    pooled: torch.Tensor
    texture: torch.Tensor
    hidden: torch.Tensor


@torch.inference_mode()
def infer(model: AttentionResNet50, loader: DataLoader, device: torch.device, trunk=None) -> Inferred:
    """``trunk``: another runtime of the model's trunk (the int8 one), whose features the rest reads."""
    model.eval()
    columns: list[list[torch.Tensor]] = [[], [], [], [], []]
    for x, y in loader:
        feats, texture = (trunk or model.trunk_outputs)(x.to(device))
        feats, texture = feats.to(device), texture.to(device)
        pooled = model.pooled(feats)
        hidden = model.hidden(pooled)
        for column, value in zip(columns, (model.classifier(hidden), y, pooled, texture, hidden), strict=True):
            column.append(value.cpu())
    return Inferred(*(torch.cat(column) for column in columns))


def ood_scores(scorer: OodScorer, feats: Inferred, temperature: float) -> torch.Tensor:
    log_probs = torch.log_softmax(feats.logits.float() / temperature, dim=1)
    return scorer(feats.pooled, feats.texture, log_probs, feats.hidden, feats.logits)


def fit_ood(train: Inferred, val: Inferred, temperature: float, model: AttentionResNet50,
            camera: tuple[Inferred, Inferred, tuple[str, ...]] | None = None) -> tuple[OodScorer, dict]:
    """OOD scorer on the training images' features; threshold, scales and blend on val's.

    ``camera``: the camera bank's images and the images that set its cut (both training images, see
    :func:`camera_bank_inputs`) under the faults of ``corruptions.CAMERA_FAULTS`` (labels = the fault's reason
    index), and the reasons.
    """
    val_log_probs = torch.log_softmax(val.logits.float() / temperature, dim=1)
    distance = OodScorer.fit((train.pooled, train.texture), train.labels, (val.pooled, val.texture), val_log_probs)
    vim = VirtualLogitScorer.fit(train.hidden, train.logits, model.classifier.weight, model.classifier.bias)
    scorer = distance.with_vim(vim, distance(val.pooled, val.texture, val_log_probs), vim(val.hidden, val.logits))
    if camera is not None:
        faulty_bank, faulty_cut, reasons = camera
        scorer.camera = CameraBank.fit(faulty_bank.texture, faulty_bank.labels, reasons, faulty_cut.texture)
    val_scores = ood_scores(scorer, val, temperature).numpy()
    threshold = ood_threshold(val_scores)
    return scorer, {
        "method": scorer.method,
        "threshold": threshold,
        "part_scales": scorer.scales.tolist(),
        "val_false_unknown_rate": float((val_scores > threshold).mean()),
        "val_score_median": float(np.median(val_scores)),
        # every val score, sorted: a deployment picks its own false-unknown rate from them (Settings)
        "val_scores": [round(float(v), 5) for v in np.sort(val_scores)],
        "camera_reasons": list(camera[2]) if camera is not None else [],
    }


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        samples = limit_per_class(scan_folders(Path(cfg.data)), cfg.limit_per_class)
        self.manifest = manifest_hash(samples)
        train_s, val_s = stratified_split(samples, cfg.val_fraction, cfg.seed, cfg.folds, cfg.fold)
        print(f"data: {len(samples)} images, train {len(train_s)}, val {len(val_s)}, "
              f"manifest sha256 {self.manifest[:12]}…; device {self.device}")
        boxes = Path(cfg.annotations) if cfg.annotations and cfg.loc_weight > 0 else None
        self.train_set = SurfaceDataset(train_s, train_augment(cfg.image_size, cfg.augment), cfg.image_size, boxes)
        if boxes is not None:
            print(f"Grad-CAM box loss x{cfg.loc_weight}: {sum(m is not None for m in self.train_set.masks)} of "
                  f"{len(train_s)} training images have boxes of their class")
        self.val_set = SurfaceDataset(val_s, None, cfg.image_size)
        self.model, self.init_source = self._initial_model()
        self.model.to(self.device)
        self.frozen = frozen_modules(self.model, cfg.freeze_stages)
        for module in self.frozen:
            module.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self._param_groups(), weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max(cfg.epochs * self.steps_per_epoch, 1), eta_min=cfg.lr * 0.01
        )
        self.criterion = FocalLoss(cfg.gamma, cfg.alpha)
        self.history: list[dict] = []
        self.start_epoch = 1
        self.best_key = (-1.0, -math.inf)
        if cfg.resume:
            self._resume()

    def _initial_model(self) -> tuple[AttentionResNet50, str]:
        """ImageNet trunk (--pretrained), or every weight of an earlier steelsight checkpoint (--init-from)."""
        if not self.cfg.init_from:
            return build_model(self.cfg.pretrained)
        from steelsight.model.inference.checkpoint import file_sha256, load_checkpoint

        start = load_checkpoint(self.cfg.init_from)
        return start.model, f"checkpoint:{Path(self.cfg.init_from).name}:{file_sha256(Path(self.cfg.init_from))[:12]}"

    def _param_groups(self):
        trunk = [p for p in self.model.trunk.parameters() if p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("trunk.")]
        return [
            {"params": trunk, "lr": self.cfg.lr * self.cfg.trunk_lr_scale},
            {"params": rest, "lr": self.cfg.lr},
        ]

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        epoch_seed = self.cfg.seed + len(self.history)
        if getattr(dataset, "transform", None) is not None:  # augmenting in this process (workers 0)
            reseed(dataset.transform, epoch_seed)
        return DataLoader(
            dataset, batch_size=self.cfg.batch_size, shuffle=shuffle, num_workers=self.cfg.workers,
            generator=torch.Generator().manual_seed(epoch_seed), worker_init_fn=seed_augment_worker,
            drop_last=False, pin_memory=self.device.type == "cuda",
        )

    # resume state -------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.out / "last_state.pt"

    def _save_state(self, epoch: int) -> None:
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": json.dumps(self.history),
            "best_key": list(self.best_key),
            "config": json.dumps(asdict(self.cfg)),
        }
        tmp = self._state_path().with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._state_path())

    def _resume(self) -> None:
        path = self._state_path()
        if not path.exists():
            print(f"--resume: no {path}, starting from scratch")
            return
        state = torch.load(path, map_location=self.device, weights_only=True)  # no arbitrary pickles
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = json.loads(state["history"])
        self.best_key = tuple(state["best_key"])
        self.start_epoch = int(state["epoch"]) + 1
        print(f"resumed after epoch {state['epoch']} from {path}")

    # epochs -----------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> float:
        set_train_mode(self.model, self.frozen, self.cfg.freeze_bn)
        total, seen = 0.0, 0
        bar = tqdm(self._loader(self.train_set, True), desc=f"epoch {epoch}/{self.cfg.epochs}", unit="batch",
                   leave=False)
        for batch in bar:
            x, y = batch[0].to(self.device), batch[1].to(self.device)
            feats = self.model.features(x)
            logits = self.model.classify(feats)
            loss = self.criterion(logits, y)
            if len(batch) == 4:  # box masks: keep the Grad-CAM inside the defect
                masks, has_mask = batch[2].to(self.device), batch[3].to(self.device).float()
                loss = loss + self.cfg.loc_weight * cam_outside_box_loss(feats, logits, y, masks, has_mask)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        return total / max(seen, 1)

    def _validate(self) -> dict:
        val = infer(self.model, self._loader(self.val_set, False), self.device)
        logits, labels = val.logits, val.labels
        report = classification_report(torch.softmax(logits, 1).numpy(), labels.numpy(), list(CLASSES))
        report["focal_loss"] = float(self.criterion(logits, labels))
        return report

    def _meta(self, val_metrics: dict) -> CheckpointMeta:
        training = asdict(self.cfg) | {"init": self.init_source, "epochs_done": len(self.history)}
        return CheckpointMeta(
            input_size=self.cfg.image_size, training=training, val_metrics=val_metrics,
            data_manifest_sha256=self.manifest,
        )

    def fit(self) -> Path:
        for epoch in range(self.start_epoch, self.cfg.epochs + 1):
            started = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            report = self._validate()
            row = {
                "epoch": epoch, "train_loss": train_loss, "val_loss": report["focal_loss"],
                "val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"],
                "val_ece": report["ece"], "lr": self.optimizer.param_groups[1]["lr"],
                "seconds": time.perf_counter() - started,
            }
            self.history.append(row)
            key = (report["macro_f1"], -report["focal_loss"])
            improved = key > tuple(self.best_key)
            if improved:
                self.best_key = key
                save_checkpoint(self.model, self._meta(_summary(report)), self.out / "best.safetensors")
            print(f"epoch {epoch}: train loss {train_loss:.4f} | val loss {row['val_loss']:.4f} "
                  f"acc {row['val_accuracy']:.4f} macro-F1 {row['val_macro_f1']:.4f} ECE {row['val_ece']:.4f} "
                  f"| {row['seconds']:.0f}s{' | best' if improved else ''}", flush=True)
            self._save_state(epoch)
            (self.out / "history.json").write_text(json.dumps(self.history, indent=2))
            training_curves(self.history, self.out / "training_curves.png")
        return self.finalize() if self.cfg.finalize else self.out / "best.safetensors"

    def finalize(self) -> Path:
        """Best weights + temperature + OOD scorer (train features) -> model.safetensors.

        The temperature is fitted on val *and* val under the moderate corruptions: a
        model that makes no error on clean val would otherwise be pushed to T -> 0
        (ever sharper), which is overconfident the first time the line is noisy.
        """
        from steelsight.model.inference.checkpoint import load_checkpoint

        best = load_checkpoint(self.out / "best.safetensors", device=self.device)
        self.model = best.model
        val = infer(self.model, self._loader(self.val_set, False), self.device)
        plain_train = SurfaceDataset(self.train_set.samples, None, self.cfg.image_size)
        train = infer(self.model, self._loader(plain_train, False), self.device)
        shifted = concat_inferred(corrupted_copies(self.model, self.val_set.samples, self.cfg.image_size,
                                                   self.device, self.cfg.batch_size))
        meta = best.meta
        meta.temperature = fit_temperature(torch.cat([val.logits, shifted.logits]),
                                           torch.cat([val.labels, shifted.labels]))
        camera = camera_bank_inputs(self.model, self.train_set.samples, self.cfg.image_size, self.device,
                                    self.cfg.batch_size)
        scorer, meta.ood = fit_ood(train, val, meta.temperature, self.model, camera)
        meta.input_stats = summarise_inputs(read_gray(s.path) for s in self.train_set.samples)
        meta.val_metrics["calibration"] = {
            "temperature_fitted_on": "val + val under the 5 moderate corruptions",
            **_ece_pair("val", val.logits, val.labels, meta.temperature),
            **_ece_pair("val_corrupted", shifted.logits, shifted.labels, meta.temperature),
        }
        path = save_checkpoint(self.model, meta, self.out / "model.safetensors", half=self.cfg.half, ood=scorer)
        unseen = format_unseen(unseen_false_unknown_rate(meta.ood["val_scores"], meta.ood["threshold"]))
        print(f"temperature {meta.temperature:.3f}; calibration {meta.val_metrics['calibration']}; "
              f"OOD threshold {meta.ood['threshold']:.3f}, false unknowns on unseen frames {unseen}; wrote {path}")
        return path


def _ece_pair(name: str, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    before = torch.softmax(logits, 1).numpy()
    after = torch.softmax(logits / temperature, 1).numpy()
    return {f"ece_{name}_before": expected_calibration_error(before, labels.numpy()),
            f"ece_{name}_after": expected_calibration_error(after, labels.numpy())}


def _summary(report: dict) -> dict:
    keys = ("n", "accuracy", "accuracy_ci95", "macro_f1", "ece", "nll")
    return {k: report[k] for k in keys}


def train(cfg: TrainConfig) -> Path:
    trainer = Trainer(cfg)
    return trainer.finalize() if cfg.finalize_only else trainer.fit()


def refit_ood(checkpoint: Path, data: Path, out: Path, device: str = "auto", batch_size: int = 32,
              with_corruptions: bool = False) -> Path:
    """Fit a checkpoint's OOD scorer anew on its own split; weights and temperature stay as they are.

    ``with_corruptions`` also fits on the training images under the five moderate
    corruptions, so that blurred or noisy steel stops looking foreign: fewer unknowns on
    degraded frames, for a lower AUROC on noise-like OOD frames (docs/model_card/history-0.1.md).
    """
    from steelsight.model.inference.checkpoint import load_checkpoint

    dev = resolve_device(device)
    loaded = load_checkpoint(checkpoint, device=dev)
    meta = loaded.meta
    samples = limit_per_class(scan_folders(Path(data)), meta.training.get("limit_per_class", 0))
    if manifest_hash(samples) != meta.data_manifest_sha256:
        raise ValueError(f"{data} is not the data {checkpoint} was trained on (manifest sha256 differs)")
    train_s, val_s = training_split(samples, meta.training)
    size = int(meta.input_size)

    def features(split) -> Inferred:
        return infer(loaded.model, DataLoader(SurfaceDataset(split, None, size), batch_size=batch_size), dev)

    train = features(train_s)
    if with_corruptions:
        train = concat_inferred([train, *corrupted_copies(loaded.model, train_s, size, dev, batch_size)])
    camera = camera_bank_inputs(loaded.model, train_s, size, dev, batch_size)
    scorer, meta.ood = fit_ood(train, features(val_s), float(meta.temperature or 1.0), loaded.model, camera)
    meta.input_stats = summarise_inputs(read_gray(s.path) for s in train_s)
    meta.ood["fitted_on"] = "train + train under the 5 moderate corruptions" if with_corruptions else "train"
    path = save_checkpoint(loaded.model, meta, Path(out), half=bool(meta.training.get("half")), ood=scorer)
    unseen = format_unseen(unseen_false_unknown_rate(meta.ood["val_scores"], meta.ood["threshold"]))
    print(f"OOD {meta.ood['method']} fitted on {meta.ood['fitted_on']}: threshold {meta.ood['threshold']:.3f}, "
          f"val false unknowns {meta.ood['val_false_unknown_rate']:.2%}, on unseen NEU frames {unseen}; wrote {path}")
    return path


def corrupted_copies(model: AttentionResNet50, samples, size: int, device: torch.device, batch_size: int,
                     trunk=None) -> list[Inferred]:
    """The samples under each moderate corruption, applied at full resolution as ``evaluate`` applies them."""
    originals = [read_gray(s.path) for s in samples]
    labels = torch.tensor([s.label for s in samples])
    copies = []
    for name in tqdm(CORRUPTIONS, desc="corrupted copies", unit="corruption", leave=False):
        batch = eval_batch(corrupt_all(originals, name), size)
        copies.append(infer(model, DataLoader(TensorDataset(batch, labels), batch_size=batch_size), device, trunk))
    return copies


# the camera bank keeps every 8th training image under each fault: 144 x 9 NEU rows, 2.7 MB of the checkpoint
CAMERA_BANK_STRIDE = 8


def camera_fault_copies(model: AttentionResNet50, samples, size: int, device: torch.device, batch_size: int,
                        trunk=None) -> tuple[Inferred, tuple[str, ...]]:
    """The samples under every camera fault (``CAMERA_FAULTS``), labelled by the fault's reason index."""
    reasons = tuple(dict.fromkeys(reason for _, reason in CAMERA_FAULTS.values()))
    originals = [read_gray(s.path) for s in samples]
    parts = []
    for fault, reason in tqdm(CAMERA_FAULTS.values(), desc="camera faults", unit="fault", leave=False):
        batch = eval_batch([fault(img, seed=i) for i, img in enumerate(originals)], size)
        labels = torch.full((len(originals),), reasons.index(reason))
        parts.append(infer(model, DataLoader(TensorDataset(batch, labels), batch_size=batch_size), device, trunk))
    return concat_inferred(parts), reasons


def camera_bank_inputs(model: AttentionResNet50, train_samples, size: int, device: torch.device,
                       batch_size: int, trunk=None) -> tuple[Inferred, Inferred, tuple[str, ...]]:
    """fit_ood's ``camera``: every ``CAMERA_BANK_STRIDE``-th training image under each fault (the bank), and as
    many others half a stride on (its cut).

    Both from training images, so val under the same faults (``evaluate --corruptions``) measures it out of
    sample.
    """
    stride = CAMERA_BANK_STRIDE
    bank, reasons = camera_fault_copies(model, train_samples[::stride], size, device, batch_size, trunk)
    cut, _ = camera_fault_copies(model, train_samples[stride // 2 :: stride], size, device, batch_size, trunk)
    return bank, cut, reasons


def concat_inferred(parts: list[Inferred]) -> Inferred:
    return Inferred(*(torch.cat([getattr(p, f) for p in parts])
                      for f in ("logits", "labels", "pooled", "texture", "hidden")))
