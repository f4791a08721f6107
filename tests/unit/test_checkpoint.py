import pickle

import pytest
import torch

from steelsight.model.inference.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
from steelsight.model.inference.network import ArchConfig, AttentionResNet50
from steelsight.model.inference.ood import OodScorer


def test_round_trip_keeps_weights_metadata_and_ood(tmp_path):
    torch.manual_seed(0)
    net = AttentionResNet50(ArchConfig(stride_in_1x1=True, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0))).eval()
    feats, texture, labels = torch.randn(60, 2048), torch.rand(60, 1024), torch.arange(60) % 6
    ood = OodScorer.fit((feats, texture), labels, (feats, texture))
    meta = CheckpointMeta(input_size=96, training={"epochs": 3}, val_metrics={"accuracy": 0.5},
                          data_manifest_sha256="abc", temperature=1.7, ood={"threshold": 2.0})
    path = save_checkpoint(net, meta, tmp_path / "m.safetensors", ood=ood)
    loaded = load_checkpoint(path)
    for key, value in net.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    assert loaded.model.arch == net.arch
    assert loaded.meta.classes == meta.classes and loaded.meta.input_size == 96
    assert loaded.meta.temperature == 1.7 and loaded.meta.data_manifest_sha256 == "abc"
    assert loaded.meta.normalisation["mean"] == [0.1, 0.2, 0.3]
    assert torch.allclose(loaded.ood(feats[:5], texture[:5]), ood(feats[:5], texture[:5]), rtol=1e-2)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), loaded.model(x))


def test_half_precision_checkpoint_keeps_batchnorm_exact(tmp_path):
    torch.manual_seed(0)
    net = AttentionResNet50().eval()
    with torch.no_grad():  # BN statistics like the Keras port's: folded biases make large means
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-40, 40)
                module.running_var.uniform_(1e-3, 1e-2)
                module.weight.mul_(0.01)
    path = save_checkpoint(net, CheckpointMeta(), tmp_path / "h.safetensors", half=True)
    loaded = load_checkpoint(path).model
    for key, value in loaded.state_dict().items():
        if "running" in key or key.endswith(".bias"):
            assert torch.equal(value, net.state_dict()[key]), key
    x = torch.rand(4, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x).softmax(1), loaded(x).softmax(1), atol=5e-3, rtol=0)


class Boom:
    def __reduce__(self):
        return (exec, ("open('/tmp/steelsight_pwned', 'w').write('x')",))


def test_pickle_disguised_as_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
