"""The Mahalanobis OOD score equals its textbook formula, and ranks far features above near ones."""

import pytest
import torch

from steelsight.model.inference.ood import OOD_PREFIX, MahalanobisScorer, OodScorer, texture_statistics


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
    fitted = MahalanobisScorer.fit(features, labels)
    loaded = MahalanobisScorer.from_stored_state(fitted.stored_state())
    torch.testing.assert_close(loaded.unit_precision, fitted.unit_precision.half().float())  # symmetric again
    queries = torch.cat([features[::10], torch.randn(6, 64) * 8])
    torch.testing.assert_close(loaded(queries).double(), _formula(loaded, queries), rtol=1e-4, atol=1e-5)


def test_whitening_falls_back_when_rounding_breaks_positive_definiteness():
    scorer = MahalanobisScorer(2, 3)
    scorer.means.copy_(torch.tensor([[0.0, 0, 0], [5, 5, 5]]))
    scorer.unit_precision.copy_(torch.diag(torch.tensor([1.0, 0.5, -1e-6])))  # as fp16 storage can leave it
    scorer.refresh_whitening()
    queries = torch.tensor([[1.0, 2.0, 0.0], [4.0, 4.0, 4.0]])
    torch.testing.assert_close(scorer(queries).double(), _formula(scorer, queries), rtol=1e-4, atol=1e-5)


def _two_part_data(seed: int):
    torch.manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(40)
    pooled = torch.randn(120, 12) + 4 * torch.nn.functional.one_hot(labels, 12).float()
    texture = torch.randn(120, 8).abs() + labels[:, None].float()
    return labels, pooled, texture


def test_two_part_score_is_the_sum_of_parts_over_their_val_medians():
    labels, pooled, texture = _two_part_data(2)
    scorer = OodScorer.fit((pooled[:90], texture[:90]), labels[:90], (pooled[90:], texture[90:]))
    val_parts = scorer.parts(pooled[90:], texture[90:])
    torch.testing.assert_close(val_parts.median(dim=0).values, torch.ones(2))  # both parts weigh alike on val
    expected = scorer.pooled(pooled) / scorer.scales[0] + scorer.texture(texture) / scorer.scales[1]
    torch.testing.assert_close(scorer(pooled, texture), expected)
    # a frame whose texture statistics are off scores higher even when its pooled features look normal
    odd = texture[:5] * 6
    assert (scorer(pooled[:5], odd) > scorer(pooled[:5], texture[:5])).all()


def test_two_part_scorer_round_trips_and_reads_older_single_part_checkpoints():
    labels, pooled, texture = _two_part_data(3)
    scorer = OodScorer.fit((pooled, texture), labels, (pooled, texture))
    loaded = OodScorer.from_prefixed_state(scorer.prefixed_state())
    torch.testing.assert_close(loaded(pooled, texture), scorer(pooled, texture), rtol=2e-3, atol=1e-4)
    assert loaded.method == "mahalanobis_pooled2048+layer3_std1024"
    # before the texture part, checkpoints stored one unprefixed pooled scorer with its full fp16 precision
    old = MahalanobisScorer.fit(pooled, labels)
    legacy = {OOD_PREFIX + k: v for k, v in old.state_dict().items()}
    legacy[OOD_PREFIX + "unit_precision"] = legacy[OOD_PREFIX + "unit_precision"].half()
    single = OodScorer.from_prefixed_state(legacy)
    assert single.texture is None and single.method == "mahalanobis_pooled2048"
    torch.testing.assert_close(single(pooled), old(pooled), rtol=2e-3, atol=1e-4)


def test_unconfidence_part_weighs_like_the_distances_at_the_val_tail_and_round_trips():
    labels, pooled, texture = _two_part_data(4)
    logits = 3 * torch.randn(120, 12) + 8 * torch.nn.functional.one_hot(labels, 12).float()
    log_probs = torch.log_softmax(logits, dim=1)
    scorer = OodScorer.fit((pooled[:90], texture[:90]), labels[:90], (pooled[90:], texture[90:]), log_probs[90:])
    assert scorer.method == "mahalanobis_pooled2048+layer3_std1024+unconfidence"
    parts = scorer.parts(pooled[90:], texture[90:], log_probs[90:])
    distances, unconfident = parts[:, :2].sum(1), parts[:, 2]
    torch.testing.assert_close(torch.quantile(unconfident, 0.995), torch.quantile(distances, 0.995), rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close(unconfident, -log_probs[90:].max(1).values / scorer.scales[2])
    # a torn classifier raises the score of a frame whose features look normal
    torn = torch.log_softmax(torch.zeros(5, 12), dim=1)
    assert (scorer(pooled[:5], texture[:5], torn) > scorer(pooled[:5], texture[:5], log_probs[:5])).all()
    loaded = OodScorer.from_prefixed_state(scorer.prefixed_state())
    assert loaded.uses_confidence
    torch.testing.assert_close(loaded(pooled, texture, log_probs), scorer(pooled, texture, log_probs), rtol=2e-3,
                               atol=1e-4)
    with pytest.raises(ValueError, match="log-probabilities"):
        scorer(pooled, texture)


def test_texture_statistics_are_each_channels_spatial_std():
    x = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(texture_statistics(x), x.flatten(2).std(dim=2, unbiased=False))
