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

The score is the sum of the parts. Each distance is divided by its median on val
images, so both weigh alike and in-distribution images sit near 2; the unconfidence
is scaled to match them at val's 99.5th percentile. Checkpoints fitted before a part
existed score without it.
"""

from __future__ import annotations

import torch
from torch import nn

OOD_PREFIX = "ood."
TEXTURE_LAYER = 6  # index of layer3 in the trunk (stem 0-3, layer1..layer4 = 4..7)


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
                 scales: tuple[float, ...] = (1.0, 1.0)):
        super().__init__()
        self.pooled, self.texture = pooled, texture
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))

    @property
    def uses_confidence(self) -> bool:
        return len(self.scales) > 2

    @property
    def method(self) -> str:
        return ("mahalanobis_pooled2048" + ("+layer3_std1024" if self.texture is not None else "")
                + ("+unconfidence" if self.uses_confidence else ""))

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
                log_probs: torch.Tensor | None = None) -> torch.Tensor:
        return self.parts(pooled, texture, log_probs).sum(dim=1)

    def prefixed_state(self) -> dict[str, torch.Tensor]:
        state = {f"{OOD_PREFIX}scales": self.scales.clone()}
        for name in ("pooled", "texture"):
            part = getattr(self, name)
            if part is not None:
                state.update({f"{OOD_PREFIX}{name}.{k}": v.contiguous() for k, v in part.stored_state().items()})
        return state

    @classmethod
    def from_prefixed_state(cls, state: dict[str, torch.Tensor]) -> OodScorer | None:
        own = {k[len(OOD_PREFIX):]: v for k, v in state.items() if k.startswith(OOD_PREFIX)}
        if not own:
            return None
        if "means" in own:  # older checkpoints: one pooled scorer, unprefixed
            return cls(MahalanobisScorer.from_stored_state(own))

        def part(name: str) -> MahalanobisScorer | None:
            sub = {k[len(name) + 1:]: v for k, v in own.items() if k.startswith(name + ".")}
            return MahalanobisScorer.from_stored_state(sub) if sub else None

        return cls(part("pooled"), part("texture"), tuple(own["scales"].tolist()))
