import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM

from steelsight.model.inference.cam import CheapCam
from steelsight.model.inference.checkpoint import load_checkpoint


@pytest.fixture()
def trained_like_net(tiny_checkpoint):
    net = load_checkpoint(tiny_checkpoint).model
    with torch.no_grad():  # a non-trivial attention gate, so its gradient path matters
        net.attention.conv.weight.normal_(0, 0.5)
    return net


@pytest.mark.parametrize(("name", "cls"), [("gradcam", GradCAM), ("gradcam++", GradCAMPlusPlus),
                                           ("hirescam", HiResCAM)])
def test_cheap_path_equals_plain_full_backward(trained_like_net, name, cls):
    x = torch.rand(3, 1, 64, 64)
    targets = [0, 3, 5]
    plain = cls(model=trained_like_net, target_layers=[trained_like_net.last_block])
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    expected = plain(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    expected_logits = plain.outputs.detach()
    plain.activations_and_grads.release()
    heatmaps, logits, _, _ = CheapCam(trained_like_net)(x, targets, name)
    assert heatmaps.shape == (3, 64, 64)
    np.testing.assert_allclose(heatmaps, expected, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits)


def test_cheap_path_never_backpropagates_into_the_trunk(trained_like_net):
    trained_like_net.zero_grad(set_to_none=True)
    CheapCam(trained_like_net)(torch.rand(2, 1, 64, 64))
    assert all(p.grad is None for p in trained_like_net.trunk.parameters())
    assert trained_like_net.head[1].weight.grad is not None  # the head did get a backward pass


def test_explain_returns_overlays_at_input_size(tiny_predictor):
    images = [np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
              for i, shape in enumerate([(200, 200), (90, 130)])]
    out = tiny_predictor.explain(images)
    for image, exp in zip(images, out, strict=True):
        assert exp.heatmap.shape == image.shape and exp.heatmap.dtype == np.float32
        assert exp.heatmap.min() >= 0.0 and exp.heatmap.max() <= 1.0
        assert exp.overlay.shape == (*image.shape, 3) and exp.overlay.dtype == np.uint8
    plain = tiny_predictor.predict(images)
    for exp, pred in zip(out, plain, strict=True):
        assert exp.label == pred.label
        assert abs(exp.confidence - pred.confidence) < 1e-4
        assert abs(sum(pred.probabilities.values()) - 1.0) < 1e-5


def test_explain_can_target_another_class(tiny_predictor):
    image = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    out = tiny_predictor.explain([image, image], method="eigencam", targets=[1, 4])
    assert [e.cam_class for e in out] == ["inclusion", "rolled-in_scale"]


def test_overlay_matches_the_packages_show_cam_on_image_and_encodes_losslessly():
    import io

    from PIL import Image
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from steelsight.model.inference.imageio import encode_png
    from steelsight.model.inference.predictor import overlay_heatmap

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (48, 40), dtype=np.uint8)
    heat = rng.random((48, 40)).astype(np.float32)
    expected = show_cam_on_image(np.repeat(gray[..., None], 3, 2) / np.float32(255), heat, use_rgb=True,
                                 image_weight=0.55)
    overlay = overlay_heatmap(gray, heat)
    assert overlay.shape == expected.shape and overlay.dtype == np.uint8
    assert np.abs(overlay.astype(int) - expected).max() <= 1  # rounding vs truncation
    for level in (0, 1, 9):
        assert (np.asarray(Image.open(io.BytesIO(encode_png(overlay, level)))) == overlay).all()


def test_jpeg_overlay_stays_close_to_the_exact_one_at_a_fraction_of_the_bytes():
    import cv2

    from steelsight.model.inference.imageio import encode_jpeg, encode_overlay, encode_png, read_gray
    from steelsight.model.inference.predictor import overlay_heatmap

    from ..helpers import SAMPLES

    gray = read_gray(SAMPLES / "scratches" / "Sc_1.bmp")
    rows, cols = np.mgrid[: gray.shape[0], : gray.shape[1]]
    heat = np.exp(-((rows - 80) ** 2 + (cols - 120) ** 2) / 2000).astype(np.float32)  # one smooth hot spot
    overlay = overlay_heatmap(gray, heat)
    jpeg = encode_jpeg(overlay, 90)
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert decoded.shape == overlay.shape and cv2.PSNR(decoded, overlay) > 32
    assert len(jpeg) * 4 < len(encode_png(overlay, 0))
    assert encode_overlay(overlay, "jpeg", 90) == jpeg and encode_overlay(overlay, "png") == encode_png(overlay, 0)
    with pytest.raises(ValueError, match="overlay format"):
        encode_overlay(overlay, "gif")
