"""The Mahalanobis OOD score equals its textbook formula, and ranks far features above near ones."""

import torch

from steelsight.model.ood import MahalanobisScorer


def test_score_matches_the_formula_and_ranks_outliers_higher():
    torch.manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    features = torch.randn(120, 16) + 4 * torch.nn.functional.one_hot(labels, 16).float()
    scorer = MahalanobisScorer.fit(features, labels)
    queries = torch.cat([features[:5], torch.randn(5, 16) * 10])
    precision = scorer.unit_precision / scorer.feature_var
    expected = torch.tensor([
        min(float((q - m) @ precision @ (q - m)) for m in scorer.means) for q in queries]) / 16
    torch.testing.assert_close(scorer(queries), expected.float(), rtol=1e-4, atol=1e-5)
    assert scorer(queries[5:]).min() > scorer(queries[:5]).max()


def _formula(scorer, queries):
    precision = scorer.unit_precision.double() / scorer.feature_var.double()
    means = scorer.means.double()
    return torch.stack([min((q - m) @ precision @ (q - m) for m in means) for q in queries.double()]) / means.shape[1]


def test_stored_scorer_scores_like_the_formula_after_fp16_round_trip():
    torch.manual_seed(1)
    labels = torch.arange(4).repeat_interleave(30)
    features = torch.randn(120, 64) * 3 + torch.nn.functional.one_hot(labels, 64).float() * 6
    loaded = MahalanobisScorer.from_prefixed_state(MahalanobisScorer.fit(features, labels).prefixed_state())
    queries = torch.cat([features[::10], torch.randn(6, 64) * 8])
    torch.testing.assert_close(loaded(queries).double(), _formula(loaded, queries), rtol=1e-4, atol=1e-5)


def test_whitening_falls_back_when_rounding_breaks_positive_definiteness():
    scorer = MahalanobisScorer(2, 3)
    scorer.means.copy_(torch.tensor([[0.0, 0, 0], [5, 5, 5]]))
    scorer.unit_precision.copy_(torch.diag(torch.tensor([1.0, 0.5, -1e-6])))  # as fp16 storage can leave it
    scorer.refresh_whitening()
    queries = torch.tensor([[1.0, 2.0, 0.0], [4.0, 4.0, 4.0]])
    torch.testing.assert_close(scorer(queries).double(), _formula(scorer, queries), rtol=1e-4, atol=1e-5)
