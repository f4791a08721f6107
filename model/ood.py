"""Out-of-distribution score: Mahalanobis distance on the pooled features.

Class means and one shared (tied) covariance are fitted on the training
images' attention-pooled 2048-d features; the score is the squared distance to
the nearest class mean, divided by the feature dimension so that in-distribution
images sit near 1. Shrinkage towards a scaled identity keeps the covariance
invertible with far fewer images than dimensions.
"""

from __future__ import annotations

import torch
from torch import nn

OOD_PREFIX = "ood."


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

    def prefixed_state(self) -> dict[str, torch.Tensor]:
        state = dict(self.state_dict())
        state["unit_precision"] = state["unit_precision"].half()
        return {OOD_PREFIX + k: v.contiguous() for k, v in state.items()}

    @classmethod
    def from_prefixed_state(cls, state: dict[str, torch.Tensor]) -> MahalanobisScorer | None:
        own = {k[len(OOD_PREFIX):]: v.float() for k, v in state.items() if k.startswith(OOD_PREFIX)}
        if not own:
            return None
        scorer = cls(*own["means"].shape)
        scorer.load_state_dict(own)
        scorer.refresh_whitening()
        return scorer
