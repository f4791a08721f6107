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
