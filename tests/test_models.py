import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_heavytail.models import BiasFreeMLP, Classifier, VGG11Wide
from lightning_heavytail.selection import select_parameters


def test_bias_free_mlp_shapes_and_names():
    net = BiasFreeMLP(64, 10, width=32, depth=2)
    names = [name for name, _ in net.named_parameters()]
    assert names == ["hidden1.weight", "hidden2.weight", "out.weight"]
    assert all(getattr(m, "bias", None) is None for m in net.modules())
    assert tuple(net.hidden1.weight.shape) == (32, 64) and tuple(net.out.weight.shape) == (10, 32)
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    # the "paper" selection takes the hidden weights and leaves the output layer out
    assert [n for n, _ in select_parameters(net, "paper")] == ["hidden1.weight", "hidden2.weight"]


def test_bias_free_mlp_is_relu_and_homogeneous():
    net = BiasFreeMLP(8, 3, width=16)
    x = torch.randn(5, 8)
    # no biases: positively homogeneous of degree 1 in the input
    assert torch.allclose(net(2.5 * x), 2.5 * net(x), atol=1e-5)
    with pytest.raises(ValueError, match="width"):
        BiasFreeMLP(8, 3, width=0)


def test_vgg11_wide_shapes_and_no_bias():
    net = VGG11Wide(10, in_channels=3, width_multiplier=1 / 32)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 16, 32, 32, 32, 32]
    assert all(m.bias is None for m in [*convs, net.classifier])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # "paper" leaves out the first conv and the classifier
    selected = [n for n, _ in select_parameters(net, "paper")]
    assert "features.0.weight" not in selected and "classifier.weight" not in selected and len(selected) == 7
    with pytest.raises(ValueError, match="width_multiplier"):
        VGG11Wide(width_multiplier=0.0)


def test_classifier_trains_and_loss_decreases(tmp_path):
    torch.manual_seed(0)
    y = torch.randint(0, 3, (96,))
    x = torch.randn(3, 8)[y] * 3 + torch.randn(96, 8)
    data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)
    model = Classifier(BiasFreeMLP(8, 3, width=32), num_classes=3, lr=0.1)

    def loss():
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    before = loss()
    trainer = pl.Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    trainer.test(model, data, verbose=False)
    assert loss() < 0.5 * before
    assert trainer.callback_metrics["test/accuracy"] > 0.9
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.0 and opt.defaults["weight_decay"] == 0.0


def test_classifier_rejects_bad_arguments():
    with pytest.raises(TypeError, match="net"):
        Classifier("not a module")
    with pytest.raises(ValueError, match="lr"):
        Classifier(BiasFreeMLP(4, 2, width=4), num_classes=2, lr=-1.0)
