"""The unknown verdict on other industrial surfaces: scorers compared source by source, leaving each one out.

    python -m bench.ood_sources --data NEU --ood-data OOD              # the shipped checkpoint
    python -m bench.ood_sources --data NEU --ood-data OOD --checkpoint runs/.../model.safetensors
    python -m bench.ood_sources --data NEU --ood-data OOD --quick

NEU is the folder the checkpoint was trained on; OOD holds one folder of images per source (for example
ood-surfaces: elpv, aitex, kolektorsdd, bsdata). Frames are cut into tiles exactly as `predict` and the
worker cut them (the STEELSIGHT_TILE_* settings), and every tile is scored.

Scorers, each refitted here from the checkpoint's features on its own train/val split:
* ``distance``: the three-part score (Mahalanobis on pooled features and on layer3 texture, unconfidence);
* ``energy``: -logsumexp of the logits; ``knn``: cosine distance to the nearest training feature (pooled);
* ``vim``: Virtual-logit Matching on the head's hidden layer (model/inference/ood.py);
* ``outlier exposure``: attention and head fine-tuned with a uniform-output loss on the *other* sources' tiles
  (trunk frozen), scored by its max softmax: for each source, fitted without it;
* ``vim + distance``: what `train` and `refit-ood` fit (each over its val median and spread).
Only outlier exposure is fitted on OOD images, so only it is refitted per left-out source. The others'
settings (ViM's 64 directions, the blend, the camera bank's layer, the frame rule) were chosen looking at
all four sources' figures here, so for them these are not held-out figures: the independent sets are.

Printed per scorer and source: AUROC (tiles against NEU val), FPR95 (share of the source's tiles scored
below NEU val's 95th percentile), tiles flagged at the threshold that leaves `unknown_false_rate` of NEU
val flagged (plus the input-quality gate, as the verdict has it), and frames flagged by the verdict's
rule (`frame_unknown_share` of tiles) and by "all tiles". Then NEU val under camera faults: flagged, and for
the shipped scorer the share of flagged tiles named a camera fault. Then the scorer's cost against the
trunk's. Writes the operating curve (tiles caught per source against false unknowns) to --plot.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.harness import BenchParser, describe, emit
from steelsight.contract import Settings
from steelsight.model.evaluation.corruptions import (
    CORRUPTIONS,
    MOTION_BLUR_LENGTHS,
    auroc,
    corrupt_all,
    motion_blur,
    ood_sets,
)
from steelsight.model.evaluation.evaluate import select_split
from steelsight.model.inference.imageio import read_gray
from steelsight.model.inference.ood import CameraBank, OodScorer, VirtualLogitScorer, ood_threshold
from steelsight.model.inference.predictor import Predictor
from steelsight.model.inference.preprocess import eval_batch
from steelsight.model.inference.quality import fault_shows, input_statistics, quality_issue
from steelsight.model.inference.tiling import TilingConfig, plan_frame, share_reached
from steelsight.model.training.data import scan_folders
from steelsight.model.training.train import camera_bank_inputs

NAME = "ood_sources"
SYNTHETIC = ("blank_or_saturated", "noise", "synthetic_patterns", "photos_and_textures", "noise_variants",
             "photo_crops", "drawings", "lens_dirt", "heavy_corruption")


class Tiles:
    """Per-tile features of a set of frames, with each tile's frame index and input-quality verdict."""

    def __init__(self, predictor: Predictor, crops: list[np.ndarray], frame: list[int], keep_maps: bool):
        net = predictor.net
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("pooled", "texture", "hidden", "logits", "maps")}
        with torch.inference_mode():
            for start in range(0, len(crops), 32):
                x = eval_batch(crops[start:start + 32], predictor.input_size)
                maps, texture = net.trunk_outputs(x)
                pooled = net.pooled(maps)
                hidden = net.hidden(pooled)
                for key, value in (("pooled", pooled), ("texture", texture), ("hidden", hidden),
                                   ("logits", net.classifier(hidden)), ("maps", maps.half() if keep_maps else None)):
                    if value is not None:
                        cols[key].append(value)
        self.pooled, self.texture, self.hidden, self.logits = (torch.cat(cols[k]) for k in
                                                                ("pooled", "texture", "hidden", "logits"))
        self.maps = torch.cat(cols["maps"]) if keep_maps else None
        self.frame = np.asarray(frame)
        self.frames = len(set(frame))
        self.gated = np.array([quality_issue(c) is not None for c in crops])
        self.stats = [input_statistics(c) for c in crops]

    def __len__(self) -> int:
        return len(self.frame)


def frames_of(predictor: Predictor, paths: list[Path], keep_maps: bool) -> Tiles:
    """Every frame's tiles, planned as the worker plans them (``tiles.frames``: how many frames)."""
    tiling = TilingConfig.from_settings(Settings())
    crops, frame = [], []
    for index, path in enumerate(paths):
        plan = plan_frame(read_gray(path), tiling, predictor.input_size)
        tiles = plan.crops()
        crops += tiles
        frame += [index] * len(tiles)
    tiles = Tiles(predictor, crops, frame, keep_maps)
    tiles.frames = len(paths)
    return tiles


def images_of(predictor: Predictor, images: list[np.ndarray], keep_maps: bool = False) -> Tiles:
    return Tiles(predictor, images, list(range(len(images))), keep_maps)


# scorers: each maps Tiles -> scores (higher: less like NEU) -------------------------------------------
def log_probs(t: Tiles, temperature: float) -> torch.Tensor:
    return torch.log_softmax(t.logits.float() / temperature, dim=1)


def fit_scorers(predictor: Predictor, train: Tiles, val: Tiles, labels: torch.Tensor) -> tuple[dict, OodScorer]:
    """Name -> score function for each scorer fitted without OOD images, and the shipped (blended) scorer."""
    temp = predictor.temperature
    distance = OodScorer.fit((train.pooled, train.texture), labels, (val.pooled, val.texture), log_probs(val, temp))
    classifier = predictor.net.classifier
    vim = VirtualLogitScorer.fit(train.hidden, train.logits, classifier.weight, classifier.bias)
    bank = torch.nn.functional.normalize(train.pooled, dim=1)

    def distance_score(t: Tiles) -> np.ndarray:
        return distance(t.pooled, t.texture, log_probs(t, temp)).numpy()

    def vim_score(t: Tiles) -> np.ndarray:
        return vim(t.hidden, t.logits).numpy()

    blended = distance.with_vim(vim, torch.from_numpy(distance_score(val)), torch.from_numpy(vim_score(val)))
    return {
        "distance (3 parts)": distance_score,
        "energy": lambda t: (-torch.logsumexp(t.logits.float(), 1)).numpy(),
        "knn (pooled, k=1)": lambda t: (1 - (F.normalize(t.pooled, dim=1) @ bank.T).max(1).values).numpy(),
        "vim": vim_score,
        "vim + distance (shipped)": lambda t: blended(t.pooled, t.texture, log_probs(t, temp), t.hidden,
                                                      t.logits).numpy(),
    }, blended


class OutlierExposure:
    """Attention and head fine-tuned on frozen trunk maps: cross-entropy on NEU train plus ``weight`` x the
    cross-entropy to the uniform distribution on outlier tiles (Hendrycks et al., 2019)."""

    def __init__(self, predictor: Predictor, train: Tiles, labels: torch.Tensor, outliers: list[Tiles],
                 epochs: int, weight: float = 0.5, seed: int = 0):
        torch.manual_seed(seed)
        net = predictor.net
        self.attention, self.head, self.pool = copy.deepcopy(net.attention), copy.deepcopy(net.head), net.pool
        params = [*self.attention.parameters(), *self.head.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        x, y = train.maps, labels
        o = torch.cat([t.maps for t in outliers])
        self.attention.train()
        self.head.train()
        for _ in range(epochs):
            order, out_order = torch.randperm(len(x)), torch.randperm(len(o))
            for step, start in enumerate(range(0, len(x), 32)):
                idx = order[start:start + 32]
                out_idx = out_order[(step * 32) % len(o):][:32]
                loss = F.cross_entropy(self._logits(x[idx].float()), y[idx]) \
                    + weight * (-self._logits(o[out_idx].float()).log_softmax(1).mean(1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.attention.eval()
        self.head.eval()

    def _logits(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.attention(maps)).flatten(1))

    @torch.no_grad()
    def __call__(self, t: Tiles) -> np.ndarray:
        logits = torch.cat([self._logits(t.maps[i:i + 256].float()) for i in range(0, len(t), 256)])
        return (-logits.softmax(1).max(1).values).numpy()


# figures ----------------------------------------------------------------------------------------------
def frames_flagged(flags: np.ndarray, tiles: Tiles, share: float) -> np.ndarray:
    """Per frame: unknown by the product's rule (tiling.share_reached); a frame of background only is not."""
    counts = np.bincount(tiles.frame, weights=flags.astype(float), minlength=tiles.frames)
    totals = np.bincount(tiles.frame, minlength=tiles.frames)
    return np.array([share_reached(int(c), int(n), share) for c, n in zip(counts, totals, strict=True)])


def source_cells(val: np.ndarray, out: np.ndarray, tiles: Tiles, threshold: float, share: float) -> dict:
    flagged = (out > threshold) | tiles.gated
    return {"auroc": auroc(val, out), "fpr95": float(np.mean(out <= np.quantile(val, 0.95))),
            "tiles_flagged": float(flagged.mean()),
            "frames_flagged": float(frames_flagged(flagged, tiles, share).mean()),
            "frames_all_tiles_flagged": float(frames_flagged(flagged, tiles, 1.0).mean())}


def operating_curve(val: np.ndarray, sources: dict[str, np.ndarray], faulty: np.ndarray, chosen: float,
                    path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = np.geomspace(0.001, 0.2, 60)
    thresholds = [ood_threshold(val, r) for r in rates]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, scores in sources.items():
        ax.plot(rates * 100, [100 * np.mean(scores > t) for t in thresholds], label=f"{name}: tiles caught")
    ax.plot(rates * 100, [100 * np.mean(faulty > t) for t in thresholds], "k--",
            label="NEU val under camera faults: flagged")
    ax.axvline(chosen * 100, color="grey", lw=1)
    ax.text(chosen * 100, 2, f" default {chosen:.1%}", color="grey", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("false unknowns on NEU val (%), as the threshold moves")
    ax.set_ylabel("flagged unknown (%)")
    ax.set_ylim(0, 101)
    ax.set_title("Unknown verdict: what each threshold catches and costs")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cost(predictor: Predictor, blended: OodScorer, repeats: int) -> tuple[float, float]:
    """Seconds per batch of 16 for the trunk (the serving runtime) and for the whole scorer incl. camera bank."""
    x = eval_batch([np.random.default_rng(i).integers(0, 255, (200, 200), np.uint8) for i in range(16)],
                   predictor.input_size)
    with torch.inference_mode():
        maps, texture = predictor.trunk(x)
        pooled = predictor.net.pooled(maps)
        hidden = predictor.net.hidden(pooled)
        logits = predictor.net.classifier(hidden)
        lp = torch.log_softmax(logits, 1)

        def timed(fn) -> float:
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return float(np.median(times))

        trunk = timed(lambda: predictor.trunk(x))
        scorer = timed(lambda: (blended(pooled, texture, lp, predictor.net.hidden(pooled), logits),
                                blended.camera_reasons(texture)))
    return trunk, scorer


def main() -> None:
    parser = BenchParser(__doc__, quick={"stride": 12, "frame_stride": 10, "oe_epochs": 1, "repeats": 3})
    parser.add_argument("--data", type=Path, required=True, help="the NEU folder the checkpoint was trained on")
    parser.add_argument("--ood-data", type=Path, required=True, help="one folder of images per OOD source")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--stride", type=int, default=1, help="every k-th NEU train/val image (default: 1)")
    parser.add_argument("--frame-stride", type=int, default=1, help="every k-th frame of each source (default: 1)")
    parser.add_argument("--oe-epochs", type=int, default=6, help="outlier-exposure epochs (default: 6)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats for the cost (default: 20)")
    parser.add_argument("--plot", type=Path, default=Path("docs/model_card/ood_operating_curve.png"),
                        help="where the operating curve goes (default: docs/model_card/ood_operating_curve.png)")
    args = parser.parse_args()
    settings = Settings()
    rate, share = settings.unknown_false_rate, settings.frame_unknown_share

    predictor = Predictor.load(args.checkpoint, device="cpu", backend="auto")
    samples = scan_folders(args.data, predictor.classes)
    train_s = select_split(samples, predictor, "train")[:: args.stride]
    val_s = select_split(samples, predictor, "val")[:: args.stride]
    labels = torch.tensor([s.label for s in train_s])
    val_labels = np.array([s.label for s in val_s])
    train = images_of(predictor, [read_gray(s.path) for s in train_s], keep_maps=True)
    val_images = [read_gray(s.path) for s in val_s]
    val = images_of(predictor, val_images, keep_maps=True)
    sources = {d.name: frames_of(predictor, sorted(p for p in d.iterdir() if p.is_file())[:: args.frame_stride],
                                 keep_maps=True)
               for d in tqdm(sorted(p for p in args.ood_data.iterdir() if p.is_dir()), desc="sources", leave=False)}
    synthetic = {name: images_of(predictor, images) for name, images in
                 ood_sets(predictor.input_size, val_images).items() if name in SYNTHETIC}
    faults = {name: images_of(predictor, corrupt_all(val_images, name)) for name in CORRUPTIONS}
    faults.update({f"motion_blur_{n}px": images_of(predictor, [motion_blur(im, n, seed=i)
                                                               for i, im in enumerate(val_images)])
                   for n in MOTION_BLUR_LENGTHS})

    scorers, blended = fit_scorers(predictor, train, val, labels)
    faulty_bank, faulty_cut, reasons = camera_bank_inputs(predictor.net, train_s, predictor.input_size,
                                                          predictor.device, 32)
    blended.camera = CameraBank.fit(faulty_bank.texture, faulty_bank.labels, reasons, faulty_cut.texture)

    figures: dict = {"checkpoint_sha256": predictor.checkpoint.sha256, "unknown_false_rate": rate,
                     "frame_unknown_share": share, "train": len(train_s), "val": len(val_s),
                     "tiles": {k: len(v) for k, v in sources.items()}, "scorers": {}}
    names = list(sources)
    lines = [f"# {describe()}; checkpoint {predictor.checkpoint.path.name} ({predictor.checkpoint.sha256[:12]}…); "
             f"NEU train {len(train_s)} / val {len(val_s)}; threshold: {rate:.1%} of NEU val flagged; frames "
             f"flagged when >= {share:.0%} of their tiles are (all tiles)",
             "| scorer | " + " | ".join(f"{n} ({sources[n].frames} frames, "
                                       f"{len(sources[n])} tiles): AUROC / FPR95 / tiles / frames (all)"
                                       for n in names) + " | worst source, frames |",
             "|---|" + "---|" * (len(names) + 1)]
    rows = [*scorers, "outlier exposure (others)"]
    for name in tqdm(rows, desc="scorers", leave=False):
        cells, figures["scorers"][name] = [], {}
        for source in names:
            if name.startswith("outlier"):
                fn = OutlierExposure(predictor, train, labels, [sources[s] for s in names if s != source],
                                     args.oe_epochs)  # fitted on the other sources only
                val_scores = fn(val)
            else:
                fn, val_scores = scorers[name], scorers[name](val)
            out = fn(sources[source])
            threshold = ood_threshold(val_scores, rate)
            c = source_cells(val_scores, out, sources[source], threshold, share)
            figures["scorers"][name][source] = c
            cells.append(f"{c['auroc']:.3f} / {c['fpr95']:.1%} / {c['tiles_flagged']:.0%} / "
                         f"{c['frames_flagged']:.0%} ({c['frames_all_tiles_flagged']:.0%})")
        worst = min(figures["scorers"][name][s]["frames_flagged"] for s in names)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst:.0%} |")

    # synthetic sets and camera faults, for the non-OE scorers
    lines += ["", "Synthetic and held-out image sets (model/evaluation/corruptions.py): AUROC / flagged",
              "| scorer | " + " | ".join(synthetic) + " |", "|---|" + "---|" * len(synthetic)]
    for name, fn in scorers.items():
        v = fn(val)
        threshold = ood_threshold(v, rate)
        lines.append(f"| {name} | " + " | ".join(
            f"{auroc(v, fn(t)):.3f} / {np.mean((fn(t) > threshold) | t.gated):.0%}" for t in synthetic.values()) + " |")
    lines += ["", "NEU val under camera faults: accuracy, and share flagged unknown by each scorer",
              "| | " + " | ".join(faults) + " |", "|---|" + "---|" * len(faults),
              "| accuracy | " + " | ".join(f"{np.mean(t.logits.argmax(1).numpy() == val_labels):.1%}"
                                          for t in faults.values()) + " |"]
    figures["fault_accuracy"] = {k: float(np.mean(t.logits.argmax(1).numpy() == val_labels)) for k, t in faults.items()}
    for name, fn in scorers.items():
        v = fn(val)
        threshold = ood_threshold(v, rate)
        lines.append(f"| {name} | " + " | ".join(f"{np.mean((fn(t) > threshold) | t.gated):.0%}"
                                                for t in faults.values()) + " |")

    # the shipped scorer's reasons: camera fault or not what the model knows
    shipped = scorers["vim + distance (shipped)"]
    v = shipped(val)
    threshold = ood_threshold(v, rate)

    def camera_share(t: Tiles) -> tuple[float, float]:
        """Of the tiles the score flags, the share named a camera fault; of the frames the verdict flags, the
        share whose reason is a camera fault (most of their unknown tiles, as tiling.summarise decides)."""
        flagged = shipped(t) > threshold
        reference = predictor.meta.input_stats
        named = np.array([r is not None and fault_shows(r, st, reference)
                          for r, st in zip(blended.camera_reasons(t.texture), t.stats, strict=True)])
        tiles = float(named[flagged].mean()) if flagged.any() else float("nan")
        unknown = flagged | t.gated
        camera = (flagged & named) | t.gated  # the quality gate's reasons are camera faults too
        n_camera = np.bincount(t.frame, weights=camera & unknown, minlength=t.frames)
        n_unknown = np.bincount(t.frame, weights=unknown, minlength=t.frames)
        frames = frames_flagged(unknown, t, share)
        camera_frames = frames & (n_camera > n_unknown - n_camera)
        return tiles, (float(camera_frames.sum() / frames.sum()) if frames.any() else float("nan"))

    named = {**{k: camera_share(t) for k, t in faults.items()}, **{k: camera_share(t) for k, t in sources.items()}}
    figures["camera_reason_share"] = {k: {"tiles": a, "frames": b} for k, (a, b) in named.items()}
    lines += ["", "Shipped scorer: of what it flags, the share named a camera fault (the rest: not what the model "
              "knows); on NEU val under camera faults a frame is a tile",
              "| | " + " | ".join(named) + " |", "|---|" + "---|" * len(named),
              "| tiles | " + " | ".join(f"{a:.0%}" for a, _ in named.values()) + " |",
              "| frames | " + " | ".join(f"{b:.0%}" for _, b in named.values()) + " |"]

    trunk_s, scorer_s = cost(predictor, blended, args.repeats)
    figures["cost"] = {"trunk_s": trunk_s, "scorer_s": scorer_s, "ratio": scorer_s / trunk_s}
    lines += ["", f"Scorer cost (distance + ViM + camera bank, batch 16): {scorer_s / trunk_s:.1%} of the trunk's "
              f"time ({type(predictor.trunk).__name__}, the CPU runtime `auto` picks)"]
    faulty = np.concatenate([shipped(faults[k]) for k in CORRUPTIONS])
    operating_curve(v, {k: shipped(t) for k, t in sources.items()}, faulty, rate, args.plot)
    lines.append(f"operating curve: {args.plot}")
    emit(NAME, args, lines, figures)


if __name__ == "__main__":
    main()
