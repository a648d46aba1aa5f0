import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_heavytail.models import BiasFreeMLP, Classifier, MeanFieldMLP, VGG11Wide
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


# ------------------------------------------------------------------------------------------------ the mean-field model
def test_mean_field_forward_is_the_mean_field_sum_and_the_output_layer_is_frozen():
    import numpy as np

    torch.manual_seed(0)
    net = MeanFieldMLP(6, 3, width=40)
    x = torch.randn(5, 1, 2, 3)  # flattened to 6 features
    w, b = net.hidden1.weight.detach().double().numpy(), net.out.weight.detach().double().numpy()
    xs = x.reshape(5, 6).double().numpy()
    expected = np.zeros((5, 3))
    for i in range(5):  # f(x) = (1/n) sum_j b_j relu(w_j . x)
        for j in range(40):
            expected[i] += b[:, j] * max(0.0, float(w[j] @ xs[i])) / 40
    assert np.allclose(net(x).detach().double().numpy(), expected, atol=1e-6)
    flags = [(name, p.requires_grad) for name, p in net.named_parameters()]
    assert flags == [("hidden1.weight", True), ("out.weight", False)]
    assert all(getattr(m, "bias", None) is None for m in net.modules())
    # "paper" treats the frozen output layer as the output layer and picks the hidden weight
    assert [n for n, _ in select_parameters(net, "paper")] == ["hidden1.weight"]
    with pytest.raises(ValueError, match="width"):
        MeanFieldMLP(6, 3, width=0)


def test_mean_field_initialization_keeps_rows_of_order_one():
    torch.manual_seed(0)
    net = MeanFieldMLP(400, 10, width=2000)
    assert net.hidden1.weight.std().item() == pytest.approx(400**-0.5, rel=0.02)  # N(0, 1/d): |w_j| ~ 1
    assert net.hidden1.weight.norm(dim=1).mean().item() == pytest.approx(1.0, rel=0.02)
    assert net.out.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert abs(net.out.weight.mean().item()) < 0.02


def test_mean_field_sgd_step_is_n_eta_times_the_gradient_and_b_never_moves(tmp_path):
    torch.manual_seed(1)
    n, eta = 50, 0.3
    net = MeanFieldMLP(8, 3, width=n)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    w0, b0 = net.hidden1.weight.detach().clone(), net.out.weight.detach().clone()
    # the gradient of the loss, computed without the model (no scaling): autograd on the formula itself
    w = w0.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(torch.relu(x @ w.T) @ b0.T / n, y)
    (grad,) = torch.autograd.grad(loss, w)
    model = Classifier(net, num_classes=3, lr=eta)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    assert trainer.optimizers[0].param_groups[0]["lr"] == eta  # the lr the noise callback reads is eta
    assert torch.allclose(net.hidden1.weight.detach(), w0 - n * eta * grad, atol=1e-6)
    assert not torch.allclose(net.hidden1.weight.detach(), w0 - eta * grad, atol=1e-4)
    assert torch.equal(net.out.weight.detach(), b0)


def test_noise_added_per_step_on_the_mean_field_model_has_scale_sigma_eta_pow_one_over_alpha(tmp_path):
    import numpy as np
    from lightning.pytorch.callbacks import Callback
    from scipy import stats

    from lightning_heavytail import HeavyTailNoiseCallback

    n, eta, sigma, alpha, steps = 1000, 0.5, 0.1, 1.75, 2
    torch.manual_seed(0)
    net = MeanFieldMLP(8, 3, width=n)
    with torch.no_grad():
        net.out.weight.zero_()  # f = 0 everywhere: every gradient is exactly zero, so only the noise moves w

    class Record(Callback):
        def __init__(self):
            self.weights = [net.hidden1.weight.detach().clone()]

        def on_train_batch_end(self, *args):
            self.weights.append(net.hidden1.weight.detach().clone())

    record = Record()
    noise = HeavyTailNoiseCallback(alpha=alpha, sigma=sigma, structure="neuron", params="paper", seed=3)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[noise, record])
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    trainer.fit(Classifier(net, num_classes=3, lr=eta), DataLoader(TensorDataset(x, y), batch_size=16))
    increments = torch.stack([b - a for a, b in zip(record.weights, record.weights[1:], strict=False)])
    assert increments.shape == (steps, n, 8)
    # neuron noise: one draw per unit, the same for all its incoming weights
    assert torch.allclose(increments, increments[:, :, :1].expand_as(increments), atol=1e-6)
    draws = increments[:, :, 0].double().numpy().ravel()
    expected = sigma * eta ** (1 / alpha)
    assert stats.kstest(draws, stats.levy_stable(alpha, 0.0, scale=expected).cdf).pvalue > 1e-3
    wrong = sigma * (n * eta) ** (1 / alpha)  # what scaling the param group's lr by n would have given
    assert stats.kstest(draws, stats.levy_stable(alpha, 0.0, scale=wrong).cdf).pvalue < 1e-6
    assert np.median(np.abs(draws)) < 2 * expected


def test_the_papers_stopping_rule_is_lightnings_early_stopping_on_the_full_training_set(tmp_path):
    from lightning.pytorch.callbacks import Callback, EarlyStopping

    torch.manual_seed(0)
    y = torch.randint(0, 3, (120,))
    x = torch.randn(3, 8)[y] * 0.6 + torch.randn(120, 8)  # overlapping classes: several checks before 81% (no k/120)
    train = DataLoader(TensorDataset(x, y), batch_size=40, shuffle=True, generator=torch.Generator().manual_seed(0))
    in_order = DataLoader(TensorDataset(x, y), batch_size=60)
    model = Classifier(BiasFreeMLP(8, 3, width=64), num_classes=3, lr=0.2, val_name="train_full")

    class Record(Callback):
        def __init__(self):
            self.checks: list[float] = []

        def on_validation_end(self, trainer, pl_module):
            self.checks.append(float(trainer.callback_metrics["train_full/accuracy"]))

    record = Record()
    stop = EarlyStopping(monitor="train_full/accuracy", mode="max", stopping_threshold=0.81, patience=10**9,
                         check_on_train_epoch_end=False)
    trainer = pl.Trainer(max_epochs=200, check_val_every_n_epoch=2, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[record, stop], default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=train, val_dataloaders=in_order)
    assert len(record.checks) >= 3 and all(a <= 0.81 for a in record.checks[:-1]) and record.checks[-1] > 0.81
    assert trainer.current_epoch == 2 * len(record.checks)  # stopped right after the check that passed
    with torch.no_grad():  # the final model is the one that was checked, on the whole training set
        by_hand = float((model(x).argmax(dim=1) == y).float().mean())
    assert by_hand == pytest.approx(record.checks[-1])
    with pytest.raises(ValueError, match="`val_name`"):
        Classifier(BiasFreeMLP(8, 3, width=4), num_classes=3, val_name="a/b")
