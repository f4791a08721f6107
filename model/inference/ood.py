"""Out-of-distribution score: Mahalanobis distances at two depths of the trunk, plus the classifier's unconfidence.

Each part fits class means and one shared (tied) covariance on the training
images' features and scores the squared distance to the nearest class mean,
divided by the feature dimension. Shrinkage towards a scaled identity keeps the
covariance invertible with far fewer images than dimensions.

* ``pooled``: the attention-pooled 2048-d features the head classifies.
* ``texture``: the spatial standard deviation of each of layer3's 1024 channels,
  a texture statistic that separates drawings, photo crops and heavy corruption
  from steel better than the pooled features. Earlier layers separate even more,
  but flag mildly blurred or noisy steel too (MODEL_CARD.md, Unknown verdict;
  bench/ood_variants.py).

A third part is not a distance:

* ``unconfidence``: -log of the top class probability. Noise that the
  trunk reads as rough steel lands near a class mean but leaves the classifier torn;
  this part catches it, and the model's own errors under corruption with it.

These three make the *feature-distance score*: the sum of the parts. Each distance is
divided by its median on val images, so both weigh alike and in-distribution images sit
near 2; the unconfidence is scaled to match them at val's 99.5th percentile.

* ``vim``: Virtual-logit Matching (Wang et al., CVPR 2022) on the head's 512-d hidden
  layer: the norm of the feature's part outside the training features' 64 principal
  directions (or as many as the fit images span; measured from the classifier's origin),
  scaled to the mean top logit, minus the log-sum-exp of the logits. Other materials land
  far off the subspace steel spans; it is fitted on training images only, no outlier images
  (``bench/ood_sources.py`` compares it with outlier exposure, which is refitted leaving
  each source out).

With ``vim``, the score is the sum of the two scores, each minus its val median and over
its val spread (99.5th percentile minus median): in-distribution images score near 0, and
the threshold sits near 1.5. Checkpoints fitted before a part existed score without it
(on their own scale, with their own threshold).

:class:`CameraBank` does not score: for a frame already called unknown it says whether the
frame looks like steel seen through a faulty camera (blurred, noisy, badly exposed), by its
nearest layer3 texture statistics among training images under those faults.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from steelsight.contract import UNKNOWN_FALSE_RATE

OOD_PREFIX = "ood."
TEXTURE_LAYER = 6  # index of layer3 in the trunk (stem 0-3, layer1..layer4 = 4..7)
VIM_DIM = 64  # principal directions of the 512-d hidden layer kept as "steel" (chosen among 32-256, MODEL_CARD.md)
RANK_TOLERANCE = 1e-10  # eigenvalue, relative to the largest, below which a direction holds no variance
# added to the val score the threshold sits on (score units: val's spread is about 1). That val image scored again by
# another runtime or batch size, or read from the header's 5-decimal copy, moves by float rounding and must not cross
THRESHOLD_MARGIN = 1e-3


def ood_threshold(val_scores, false_unknown_rate: float = UNKNOWN_FALSE_RATE) -> float:
    """Score above which an image is unknown, leaving at most this share of val images flagged: a val score (plus
    ``THRESHOLD_MARGIN``), not an interpolation between two, so the rate is an upper bound on val (in steps of one
    image) that rounding cannot break."""
    if not 0.0 <= false_unknown_rate < 1.0:
        raise ValueError(f"unknown_false_rate must be in [0, 1), not {false_unknown_rate}")
    at = np.quantile(np.asarray(val_scores, dtype=np.float64), 1.0 - false_unknown_rate, method="higher")
    return float(at) + THRESHOLD_MARGIN


class MahalanobisScorer(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("means", torch.zeros(num_classes, dim))
        # precision x mean feature variance: eigenvalues <= 1/shrinkage, safe in fp16
        self.register_buffer("unit_precision", torch.eye(dim))
        self.register_buffer("feature_var", torch.ones(1))
        # derived at load, not stored: a factor W with W @ W.T == unit_precision, and the means in W's space
        self.register_buffer("whiten", torch.eye(dim), persistent=False)
        self.register_buffer("white_means", torch.zeros(num_classes, dim), persistent=False)

    def refresh_whitening(self) -> None:
        """(x - m) P (x - m)^T == |x W - m W|^2: one (N, D) x (D, D) GEMM per batch, not one per class."""
        precision = self.unit_precision.double()
        factor, info = torch.linalg.cholesky_ex(precision)
        if int(info) != 0:  # not positive definite after fp16 storage: drop the (tiny) negative part
            values, vectors = torch.linalg.eigh(precision)
            factor = vectors * values.clamp(min=0).sqrt()
        self.whiten.copy_(factor.float())
        self.white_means.copy_((self.means.double() @ factor).float())

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, shrinkage: float = 0.1) -> MahalanobisScorer:
        features = features.double()
        classes = int(labels.max()) + 1
        scorer = cls(classes, features.shape[1])
        means = torch.stack([features[labels == c].mean(0) for c in range(classes)])
        centred = features - means[labels]
        cov = centred.T @ centred / max(len(features) - classes, 1)
        target = torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean()
        cov = (1 - shrinkage) * cov + shrinkage * target
        scorer.means.copy_(means.float())
        scorer.feature_var.fill_(float(cov.diagonal().mean()))
        scorer.unit_precision.copy_((torch.linalg.inv(cov) * scorer.feature_var.double()).float())
        scorer.refresh_whitening()
        return scorer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        white = features.float() @ self.whiten  # (N, D)
        dist = (white.unsqueeze(1) - self.white_means.unsqueeze(0)).square().sum(-1) / self.feature_var  # (N, C)
        return dist.min(dim=1).values / self.means.shape[1]

    def stored_state(self) -> dict[str, torch.Tensor]:
        """The symmetric precision as its upper triangle in fp16: half the bytes of the full matrix."""
        state = {k: v for k, v in self.state_dict().items() if k != "unit_precision"}
        rows, cols = torch.triu_indices(*self.unit_precision.shape)
        state["unit_precision_triu"] = self.unit_precision[rows, cols].half()
        return state

    @classmethod
    def from_stored_state(cls, own: dict[str, torch.Tensor]) -> MahalanobisScorer:
        own = {k: v.float() for k, v in own.items()}
        scorer = cls(*own["means"].shape)
        if "unit_precision_triu" in own:  # else an older checkpoint's full matrix
            dim = own["means"].shape[1]
            rows, cols = torch.triu_indices(dim, dim)
            full = torch.zeros(dim, dim)
            full[rows, cols] = own.pop("unit_precision_triu")
            own["unit_precision"] = full + full.triu(1).T
        scorer.load_state_dict(own)
        scorer.refresh_whitening()
        return scorer


class VirtualLogitScorer(nn.Module):
    """ViM: ``alpha * |P_null (h - o)| - logsumexp(logits)``, o = -pinv(W) b of the last linear layer.

    Stores at most ``dim`` principal directions, not their (8x larger) complement: the residual's norm is
    ``sqrt(|h - o|^2 - |(h - o) V|^2)`` for the orthonormal principal basis V.
    """

    def __init__(self, hidden_dim: int, dim: int):
        super().__init__()
        self.register_buffer("origin", torch.zeros(hidden_dim))
        self.register_buffer("principal", torch.zeros(hidden_dim, dim))
        self.register_buffer("alpha", torch.ones(1))

    @classmethod
    def fit(cls, hidden: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
            dim: int = VIM_DIM) -> VirtualLogitScorer:
        hidden = hidden.double()
        weight, bias = weight.detach().to(hidden.device).double(), bias.detach().to(hidden.device).double()
        origin = -torch.linalg.pinv(weight) @ bias
        centred = hidden - origin
        values, vectors = torch.linalg.eigh(centred.T @ centred / len(centred))
        # directions the fit images do not span (fewer images than ``dim``) would be arbitrary picks from the
        # null space, which float rounding moves: keep only those with variance
        spanned = int((values > values.max() * RANK_TOLERANCE).sum())
        principal = vectors[:, values.argsort(descending=True)[:min(dim, spanned)]]
        scorer = cls(hidden.shape[1], principal.shape[1])
        scorer.origin.copy_(origin.float())
        scorer.principal.copy_(principal.float())
        residual = scorer.residual(centred).mean().clamp(min=1e-12)
        scorer.alpha.fill_(float(logits.double().max(dim=1).values.mean().cpu() / residual.cpu()))
        return scorer

    def residual(self, centred: torch.Tensor) -> torch.Tensor:
        """Norm of the part of ``centred`` outside the principal directions."""
        inside = centred @ self.principal.to(centred.dtype)
        return (centred.square().sum(dim=1) - inside.square().sum(dim=1)).clamp(min=0).sqrt()

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        virtual = self.residual(hidden.float() - self.origin) * self.alpha
        return virtual - torch.logsumexp(logits.float(), dim=1)


class CameraBank(nn.Module):
    """Nearest neighbour among training images under camera faults, by cosine distance of layer3 statistics.

    ``reason(texture)`` gives the fault's index into ``reasons`` when the nearest is closer than ``cut``
    (the 95th percentile of the same distance for other training images under the same faults), else -1.
    It names the look, not the cause: a smooth frame of another material can look blurred
    (bench/ood_sources.py counts how often).
    """

    def __init__(self, size: int, dim: int, reasons: tuple[str, ...] = ()):
        super().__init__()
        self.reasons = tuple(reasons)
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("kind", torch.zeros(size, dtype=torch.long))
        self.register_buffer("cut", torch.zeros(1))

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x.float(), dim=1)

    @classmethod
    def fit(cls, texture: torch.Tensor, kind: torch.Tensor, reasons: tuple[str, ...],
            val_texture: torch.Tensor, quantile: float = 0.95) -> CameraBank:
        bank = cls(len(texture), texture.shape[1], reasons)
        bank.bank.copy_(cls._unit(texture).half().float())  # as stored: the cut is set on what is loaded
        bank.kind.copy_(kind)
        bank.cut.fill_(float(torch.quantile(bank.nearest(val_texture)[0].double(), quantile)))
        return bank

    def nearest(self, texture: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        similarity = self._unit(texture) @ self.bank.T
        best, index = similarity.max(dim=1)
        return 1 - best, self.kind[index]

    def reason(self, texture: torch.Tensor) -> torch.Tensor:
        distance, kind = self.nearest(texture)
        return torch.where(distance <= self.cut, kind, torch.full_like(kind, -1))


def texture_statistics(layer3: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C): each channel's spatial standard deviation."""
    centred = layer3 - layer3.mean(dim=(2, 3), keepdim=True)
    return centred.square().mean(dim=(2, 3)).sqrt()


def unconfidence(log_probs: torch.Tensor) -> torch.Tensor:
    """-log of the top (temperature-scaled) class probability: 0 when certain, larger when torn."""
    return -log_probs.max(dim=1).values


class OodScorer(nn.Module):
    """Sum of the pooled and texture Mahalanobis scores, each over its val median, and the classifier's unconfidence.

    ``scales`` holds one divisor per part. The unconfidence part's divisor makes its
    99.5th percentile on val equal to that of the two distances together, so the
    parts weigh alike where the threshold sits.
    """

    def __init__(self, pooled: MahalanobisScorer, texture: MahalanobisScorer | None = None,
                 scales: tuple[float, ...] = (1.0, 1.0), vim: VirtualLogitScorer | None = None,
                 blend: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0), camera: CameraBank | None = None):
        super().__init__()
        self.pooled, self.texture, self.vim, self.camera = pooled, texture, vim, camera
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))
        # distance score's val median and spread, then ViM's: each (score - median) / spread
        self.register_buffer("blend", torch.tensor(blend, dtype=torch.float32))

    @property
    def uses_confidence(self) -> bool:
        return len(self.scales) > 2

    @property
    def method(self) -> str:
        return ("mahalanobis_pooled2048" + ("+layer3_std1024" if self.texture is not None else "")
                + ("+unconfidence" if self.uses_confidence else "")
                + (f"+vim{self.vim.principal.shape[1]}" if self.vim is not None else ""))

    @classmethod
    def fit(cls, train: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
            val: tuple[torch.Tensor, torch.Tensor], val_log_probs: torch.Tensor | None = None) -> OodScorer:
        """``train``/``val``: (pooled, texture) features; the scales come from val.

        With ``val_log_probs`` (the classifier's temperature-scaled log-probabilities on
        val) the score gains the unconfidence part.
        """
        pooled = MahalanobisScorer.fit(train[0], labels)
        texture = MahalanobisScorer.fit(train[1], labels)
        val_pooled, val_texture = pooled(val[0]), texture(val[1])
        scales = (float(val_pooled.median()), float(val_texture.median()))
        if val_log_probs is None:
            return cls(pooled, texture, scales)
        tail = torch.quantile((val_pooled / scales[0] + val_texture / scales[1]).double(), 0.995)
        confidence_tail = torch.quantile(unconfidence(val_log_probs).double(), 0.995).clamp(min=1e-12)
        return cls(pooled, texture, (*scales, float(confidence_tail / tail)))

    def parts(self, pooled: torch.Tensor, texture: torch.Tensor | None,
              log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """(N, parts) scaled part scores."""
        scores = [self.pooled(pooled) / self.scales[0]]
        if self.texture is not None:
            if texture is None:
                raise ValueError("this OOD scorer needs layer3 texture statistics from the trunk")
            scores.append(self.texture(texture) / self.scales[1])
        if self.uses_confidence:
            if log_probs is None:
                raise ValueError("this OOD scorer needs the classifier's log-probabilities")
            scores.append(unconfidence(log_probs.float()) / self.scales[2])
        return torch.stack(scores, dim=1)

    def forward(self, pooled: torch.Tensor, texture: torch.Tensor | None = None,
                log_probs: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                logits: torch.Tensor | None = None) -> torch.Tensor:
        distance = self.parts(pooled, texture, log_probs).sum(dim=1)
        if self.vim is None:
            return distance
        if hidden is None or logits is None:
            raise ValueError("this OOD scorer needs the head's hidden layer and the logits")
        b = self.blend
        return (distance - b[0]) / b[1] + (self.vim(hidden, logits) - b[2]) / b[3]

    def with_vim(self, vim: VirtualLogitScorer, val_distance: torch.Tensor, val_vim: torch.Tensor) -> OodScorer:
        """This scorer plus ``vim``, blended by each score's val median and spread."""

        def centre_spread(x: torch.Tensor) -> tuple[float, float]:
            median = float(x.double().median())
            return median, max(float(torch.quantile(x.double(), 0.995)) - median, 1e-12)

        blend = (*centre_spread(val_distance), *centre_spread(val_vim))
        return OodScorer(self.pooled, self.texture, tuple(self.scales.tolist()), vim, blend, self.camera)

    def camera_reasons(self, texture: torch.Tensor | None) -> list[str | None]:
        """Per image: the camera fault it looks like (see :class:`CameraBank`), or None."""
        if self.camera is None or texture is None:
            return [None] * (0 if texture is None else len(texture))
        return [None if k < 0 else self.camera.reasons[k] for k in self.camera.reason(texture).tolist()]

    def prefixed_state(self) -> dict[str, torch.Tensor]:
        state = {f"{OOD_PREFIX}scales": self.scales.clone()}
        for name in ("pooled", "texture"):
            part = getattr(self, name)
            if part is not None:
                state.update({f"{OOD_PREFIX}{name}.{k}": v.contiguous() for k, v in part.stored_state().items()})
        if self.vim is not None:
            state[f"{OOD_PREFIX}blend"] = self.blend.clone()
            state.update({f"{OOD_PREFIX}vim.{k}": v.contiguous() for k, v in self.vim.state_dict().items()})
        if self.camera is not None:
            state[f"{OOD_PREFIX}camera.bank"] = self.camera.bank.half().contiguous()
            state[f"{OOD_PREFIX}camera.kind"] = self.camera.kind.contiguous()
            state[f"{OOD_PREFIX}camera.cut"] = self.camera.cut.clone()
        return state

    @classmethod
    def from_prefixed_state(cls, state: dict[str, torch.Tensor], reasons: tuple[str, ...] = ()
                            ) -> OodScorer | None:
        """``reasons``: the camera bank's fault names, kept in the checkpoint's header (tensors hold no text)."""
        own = {k[len(OOD_PREFIX):]: v for k, v in state.items() if k.startswith(OOD_PREFIX)}
        if not own:
            return None
        if "means" in own:  # older checkpoints: one pooled scorer, unprefixed
            return cls(MahalanobisScorer.from_stored_state(own))

        def part(name: str) -> MahalanobisScorer | None:
            sub = {k[len(name) + 1:]: v for k, v in own.items() if k.startswith(name + ".")}
            return MahalanobisScorer.from_stored_state(sub) if sub else None

        vim = camera = None
        if any(k.startswith("vim.") for k in own):  # raises KeyError/RuntimeError when incomplete: the loader says so
            if "blend" not in own:
                raise ValueError("the OOD scorer has a ViM part but no blend: its score would not match its threshold")
            vim = VirtualLogitScorer(own["vim.origin"].shape[0], own["vim.principal"].shape[1])
            vim.load_state_dict({k[4:]: v.float() for k, v in own.items() if k.startswith("vim.")})
        if any(k.startswith("camera.") for k in own):
            camera = CameraBank(*own["camera.bank"].shape, reasons=reasons)
            camera.load_state_dict({k[7:]: v.long() if k == "camera.kind" else v.float()
                                    for k, v in own.items() if k.startswith("camera.")})
            if len(camera.kind) and int(camera.kind.max()) >= len(reasons):
                raise ValueError(f"the camera bank names {int(camera.kind.max()) + 1} faults, the header "
                                 f"{len(reasons)} ({', '.join(reasons) or 'none'})")
        blend = tuple(own["blend"].tolist()) if "blend" in own else (0.0, 1.0, 0.0, 1.0)
        return cls(part("pooled"), part("texture"), tuple(own["scales"].tolist()), vim, blend, camera)
