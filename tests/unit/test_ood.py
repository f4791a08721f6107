"""The Mahalanobis OOD score equals its textbook formula, and ranks far features above near ones."""

import numpy as np
import pytest
import torch

from steelsight.model.inference.ood import (
    OOD_PREFIX,
    CameraBank,
    MahalanobisScorer,
    OodScorer,
    VirtualLogitScorer,
    texture_statistics,
)


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


def test_vim_is_the_residual_off_the_principal_subspace_minus_the_energy():
    torch.manual_seed(3)
    basis = torch.linalg.qr(torch.randn(32, 32)).Q
    hidden = torch.randn(200, 4) @ basis[:, :4].T * 5 + 0.5 * torch.randn(200, 32)  # mostly 4 directions
    weight, bias = torch.randn(3, 32), torch.randn(3) * 0.1
    logits = hidden @ weight.T + bias
    vim = VirtualLogitScorer.fit(hidden, logits, weight, bias, dim=4)
    # textbook: origin -pinv(W) b, null space = all but the top-4 principal directions, alpha = mean max logit /
    # mean residual norm on training
    origin = -torch.linalg.pinv(weight.double()) @ bias.double()
    null = torch.eye(32, dtype=torch.float64) - vim.principal.double() @ vim.principal.double().T  # projector
    residual = ((hidden.double() - origin) @ null).norm(dim=1)
    alpha = logits.double().max(1).values.mean() / residual.mean()
    torch.testing.assert_close(vim.alpha.double(), alpha.reshape(1), rtol=1e-4, atol=1e-6)
    queries = torch.cat([hidden[:5], hidden[:5] + basis[:, 10] * 30])  # the same, pushed off the subspace
    q_logits = queries @ weight.T + bias
    expected = alpha * ((queries.double() - origin) @ null).norm(dim=1) \
        - torch.logsumexp(q_logits.double(), 1)
    torch.testing.assert_close(vim(queries, q_logits).double(), expected, rtol=1e-4, atol=1e-4)
    assert vim(queries[5:], q_logits[5:]).min() > vim(queries[:5], q_logits[:5]).max()


def test_vim_fitted_on_fewer_images_than_its_directions_keeps_only_those_they_span():
    """Directions the fit images do not span would be arbitrary null-space picks, moved by float rounding: two fits
    on the same images, one nudged by rounding-sized noise, must measure the same residual for a new frame."""
    torch.manual_seed(4)
    hidden, weight, bias = torch.randn(10, 32).relu() + 1, torch.randn(3, 32), torch.randn(3) * 0.1
    nudged = hidden * (1 + 1e-7 * torch.randn_like(hidden))
    fits = [VirtualLogitScorer.fit(h, h @ weight.T + bias, weight, bias, dim=16) for h in (hidden, nudged)]
    assert [f.principal.shape[1] for f in fits] == [10, 10]  # 10 images about the origin span 10 directions
    queries = torch.randn(20, 32).relu() + 1
    origin = fits[0].origin
    first, second = (f.residual(queries - origin) for f in fits)
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-4)


def test_camera_bank_names_the_nearest_fault_within_its_cut_only():
    directions = torch.eye(6)
    texture = torch.cat([directions[0] + 0.05 * torch.randn(20, 6), directions[1] + 0.05 * torch.randn(20, 6)]).abs()
    kind = torch.tensor([0] * 20 + [1] * 20)
    val = torch.cat([directions[0] + 0.05 * torch.randn(10, 6), directions[1] + 0.05 * torch.randn(10, 6)]).abs()
    bank = CameraBank.fit(texture, kind, ("blurred", "noisy"), val)
    far = directions[4:5] + 0.01
    assert bank.reason(torch.cat([directions[0:1], directions[1:2], far])).tolist() == [0, 1, -1]


def _vim_scorer(camera: bool):
    labels, pooled, texture = _two_part_data(4)
    hidden, logits = torch.randn(120, 16).abs(), torch.randn(120, 3)
    base = OodScorer.fit((pooled[:90], texture[:90]), labels[:90], (pooled[90:], texture[90:]),
                         torch.log_softmax(logits[90:], 1))
    vim = VirtualLogitScorer.fit(hidden[:90], logits[:90], torch.randn(3, 16), torch.randn(3), dim=4)
    scorer = base.with_vim(vim, base(pooled[90:], texture[90:], torch.log_softmax(logits[90:], 1)),
                           vim(hidden[90:], logits[90:]))
    if camera:
        scorer.camera = CameraBank.fit(texture[:60], labels[:60] % 2, ("blurred", "noisy"), texture[60:])
    return scorer, (pooled, texture, torch.log_softmax(logits, 1), hidden, logits)


def test_blended_score_puts_both_scores_on_val_scale_and_round_trips_with_the_camera_bank():
    scorer, feats = _vim_scorer(camera=True)
    val = [f[90:] for f in feats]
    blended = scorer(*val)
    # each score minus its val median over its val spread: the blend's val median is about 0
    assert abs(float(blended.median())) < 1.0
    with pytest.raises(ValueError, match="hidden layer"):
        scorer(*val[:3])
    loaded = OodScorer.from_prefixed_state(scorer.prefixed_state(), ("blurred", "noisy"))
    torch.testing.assert_close(loaded(*feats), scorer(*feats), rtol=2e-3, atol=1e-3)  # fp16 precision
    assert loaded.method.endswith("+vim4") and loaded.camera.reasons == ("blurred", "noisy")
    assert loaded.camera_reasons(feats[1]) == scorer.camera_reasons(feats[1])
    assert set(scorer.camera_reasons(feats[1])) <= {None, "blurred", "noisy"}


def test_every_unknown_reason_the_model_gives_is_in_the_contract():
    import ast
    from pathlib import Path

    from steelsight.contract import CAMERA_REASONS, UNFAMILIAR_REASON, unknown_kind
    from steelsight.model.evaluation.corruptions import CAMERA_FAULTS

    assert {reason for _, reason in CAMERA_FAULTS.values()} <= set(CAMERA_REASONS)
    source = Path(__file__).parents[2] / "model/inference/quality.py"
    returned = {n.value.value for n in ast.walk(ast.parse(source.read_text()))
                if isinstance(n, ast.Return) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
    assert returned and returned <= set(CAMERA_REASONS)
    assert unknown_kind(UNFAMILIAR_REASON) == "unfamiliar" and unknown_kind("blurred") == "camera"
    assert unknown_kind(None) is None


def test_the_threshold_is_a_val_score_that_flags_at_most_the_rate():
    from steelsight.model.inference.ood import THRESHOLD_MARGIN, ood_threshold

    scores = np.arange(288, dtype=float)
    for rate in (0.0, 0.005, 0.01, 0.05):
        flagged = np.mean(scores > ood_threshold(scores, rate))
        assert flagged <= rate and np.isclose(scores, ood_threshold(scores, rate) - THRESHOLD_MARGIN).any()
    with pytest.raises(ValueError, match="unknown_false_rate"):
        ood_threshold(scores, 1.0)


def test_val_scores_scored_again_with_rounding_still_flag_at_most_the_rate():
    """The threshold sits on a val score; that image, scored again by another runtime or read back from the
    header's 5-decimal copy, must not cross it (it did: 2 of 288 val images flagged at a 0.5 % rate)."""
    from steelsight.model.inference.ood import ood_threshold

    fitted = np.random.default_rng(0).normal(0.0, 0.4, 288)
    stored = np.round(fitted, 5)
    threshold = ood_threshold(stored)
    for drift in (1e-6, 1e-5, 1e-4):
        assert np.mean(fitted * (1 + drift) + drift > threshold) <= 0.005, drift


def test_a_broken_or_inconsistent_ood_scorer_is_a_checkpoint_error(tmp_path):
    from steelsight.model.inference.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
    from steelsight.model.inference.network import AttentionResNet50

    scorer, _ = _vim_scorer(camera=True)
    meta = CheckpointMeta(input_size=64, ood={"threshold": 1.0, "camera_reasons": ["blurred"]})  # 2 faults in bank
    path = save_checkpoint(AttentionResNet50(), meta, tmp_path / "c.safetensors", ood=scorer)
    with pytest.raises(CheckpointError, match="camera bank names 2 faults"):
        load_checkpoint(path)
    scorer.camera = None
    state = {k: v for k, v in scorer.prefixed_state().items() if k != OOD_PREFIX + "blend"}
    with pytest.raises(ValueError, match="no blend"):
        OodScorer.from_prefixed_state(state)


def test_an_older_checkpoint_without_val_scores_keeps_its_own_threshold(tiny_checkpoint, caplog, tmp_path):
    from steelsight.model.inference.predictor import Predictor

    predictor = Predictor.load(tiny_checkpoint, device="cpu", backend="torch", unknown_false_rate=0.01)
    assert predictor.ood_threshold is None and predictor.ood is None  # no scorer at all: nothing to set
    # a three-part scorer from before val scores were stored: the worker's default rate must not stop it
    from steelsight.model.inference.checkpoint import CheckpointMeta, save_checkpoint
    from steelsight.model.inference.network import AttentionResNet50

    labels, pooled, texture = _two_part_data(5)
    old = OodScorer.fit((pooled[:90], texture[:90]), labels[:90], (pooled[90:], texture[90:]))
    path = save_checkpoint(AttentionResNet50(), CheckpointMeta(input_size=64, ood={"threshold": 7.5}),
                           tmp_path / "old.safetensors", ood=old)
    with caplog.at_level("WARNING"):
        predictor = Predictor.load(path, device="cpu", backend="torch", unknown_false_rate=0.01)
    assert predictor.ood_threshold == 7.5 and "stores no val OOD scores" in caplog.text
    with pytest.raises(ValueError, match="unknown_false_rate"):
        Predictor.load(tiny_checkpoint, device="cpu", backend="torch", unknown_false_rate=5.0)


def test_a_camera_fault_is_named_only_when_the_frame_shows_it():
    import cv2

    from steelsight.model.inference.quality import fault_shows, input_statistics

    rng = np.random.default_rng(0)
    steel = [np.clip(rng.normal(128, 25, (64, 64)), 0, 255).astype(np.uint8) for _ in range(2)]
    own = input_statistics(steel[0])
    # training images spread like this around the first frame's statistics
    reference = {k: {"mean": v, "std": 0.2 * v} for k, v in own.items()}
    blurred = cv2.GaussianBlur(steel[0], (0, 0), 3)
    dark = (steel[0] * 0.2).astype(np.uint8)
    assert fault_shows("blurred", input_statistics(blurred), reference)
    assert not fault_shows("blurred", input_statistics(steel[1]), reference)  # as sharp as training: not blur
    assert fault_shows("bad_exposure", input_statistics(dark), reference)
    assert not fault_shows("bad_exposure", input_statistics(steel[1]), reference)
    assert not fault_shows("noisy", input_statistics(blurred), reference)
    assert fault_shows("blurred", input_statistics(steel[1]), {})  # no reference: the features decide
