import pytest
import torch

from steelsight.model.inference.labels import CLASSES
from steelsight.model.inference.network import ArchConfig, AttentionResNet50, SpatialAttention


@pytest.mark.parametrize("stride_in_1x1", [False, True])
def test_shapes(stride_in_1x1):
    net = AttentionResNet50(ArchConfig(stride_in_1x1=stride_in_1x1)).eval()
    x = torch.rand(2, 1, 64, 96)
    with torch.no_grad():
        feats = net.features(x)
        assert feats.shape == (2, 2048, 2, 3)
        assert net.pooled(feats).shape == (2, 2048)
        assert net(x).shape == (2, len(CLASSES))


def test_trunk_has_no_pool_or_fc_and_head_matches_spec():
    net = AttentionResNet50()
    assert not any(isinstance(m, (torch.nn.AdaptiveAvgPool2d, torch.nn.Linear)) for m in net.trunk.modules())
    dropout, fc1, relu, fc2 = net.head
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.3
    assert (fc1.in_features, fc1.out_features) == (2048, 512)
    assert isinstance(relu, torch.nn.ReLU)
    assert (fc2.in_features, fc2.out_features) == (512, 6)
    assert net.attention.conv.kernel_size == (7, 7)


def test_v1_strides_move_to_the_1x1_conv():
    v1 = AttentionResNet50(ArchConfig(stride_in_1x1=True))
    block = v1.trunk[5][0]  # layer2, first block
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    v15 = AttentionResNet50()
    assert v15.trunk[5][0].conv1.stride == (1, 1) and v15.trunk[5][0].conv2.stride == (2, 2)


def test_gray_input_is_repeated_and_normalised():
    net = AttentionResNet50(ArchConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    out = net.input_adapter(torch.full((1, 1, 4, 4), 0.75))
    assert out.shape == (1, 3, 4, 4)
    assert torch.allclose(out, torch.ones_like(out))


def test_attention_uses_channel_mean_and_max():
    att = SpatialAttention(7)
    x = torch.zeros(1, 4, 5, 5)
    x[0, :, 2, 2] = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, max 6 at the centre
    with torch.no_grad():
        att.conv.weight.zero_()
        att.conv.weight[0, 0, 3, 3] = 1.0  # picks the mean map at the same pixel
        amap = att.attention_map(x)
        assert amap.shape == (1, 1, 5, 5)
        assert torch.isclose(amap[0, 0, 2, 2], torch.sigmoid(torch.tensor(3.0)))
        assert torch.isclose(amap[0, 0, 0, 0], torch.tensor(0.5))
        att.conv.weight.zero_()
        att.conv.weight[0, 1, 3, 3] = 1.0  # picks the max map
        assert torch.isclose(att.attention_map(x)[0, 0, 2, 2], torch.sigmoid(torch.tensor(6.0)))
        out = att(x)
        assert torch.allclose(out, x * att.attention_map(x))


def test_attention_map_is_a_gate():
    att = SpatialAttention()
    amap = att.attention_map(torch.randn(3, 16, 6, 6) * 10)
    assert amap.min() >= 0 and amap.max() <= 1
