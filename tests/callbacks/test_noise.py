import contextlib
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.stats
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from lightning_heavytail.callbacks.noise import HeavyTailNoiseCallback, check_strategy_supported
from lightning_heavytail.noise import NonFiniteParameterError
from tests.helpers import MLP, loader, trainer, weights

# 64 samples in batches of 16: 4 real steps per epoch without accumulation.
STEPS_PER_EPOCH = 4


def test_noise_after_every_real_step_has_the_stable_law_at_sigma_lr_pow_one_over_alpha(tmp_path):
    # zero gradients: SGD leaves the weights alone, so what changes them is the noise alone
    alpha, sigma, lr = 1.5, 0.05, 0.2
    model = MLP(width=256, lr=lr, grad_scale=0.0)
    before = weights(model)
    cb = HeavyTailNoiseCallback(alpha, sigma, structure="iid", params="weights", seed=0)
    trainer(tmp_path, callbacks=[cb], max_steps=1).fit(model)
    assert cb.noise_step == 1
    delta = (model.hidden.weight.detach() - before["hidden.weight"]).numpy().ravel()
    expected = scipy.stats.levy_stable(alpha, 0.0, scale=sigma * lr ** (1 / alpha))
    assert scipy.stats.kstest(delta, expected.cdf).pvalue > 1e-3
    assert (model.out.weight != before["out.weight"]).any()  # "weights" includes the output layer


def test_each_step_draws_fresh_noise_and_biases_are_untouched(tmp_path):
    model = MLP(lr=0.1, grad_scale=0.0, bias=True)
    deltas = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = pl_module.hidden.weight.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            deltas.append(pl_module.hidden.weight.detach() - self.before)

    before = weights(model)
    trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(1.8, 0.1, seed=1), Record()]).fit(model)
    assert len(deltas) == STEPS_PER_EPOCH and all((d != 0).all() for d in deltas)
    assert not torch.allclose(deltas[0], deltas[1])
    assert torch.equal(model.hidden.bias, before["hidden.bias"]) and torch.equal(model.out.bias, before["out.bias"])


def test_paper_selection_leaves_the_output_layer_and_neuron_structure_moves_whole_rows(tmp_path):
    model = MLP(lr=0.1, grad_scale=0.0)
    before = weights(model)
    cb = HeavyTailNoiseCallback(1.75, 0.1, structure="neuron", params="paper", seed=2)
    trainer(tmp_path, callbacks=[cb], max_steps=1).fit(model)
    assert torch.equal(model.out.weight, before["out.weight"])
    delta = model.hidden.weight.detach() - before["hidden.weight"]
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-7) and (delta != 0).all()


def test_gradient_accumulation_noises_once_per_real_step(tmp_path):
    cb = HeavyTailNoiseCallback(1.8, 0.01, seed=0)
    pl_trainer = trainer(tmp_path, callbacks=[cb], accumulate_grad_batches=2)
    pl_trainer.fit(MLP())
    assert pl_trainer.global_step == STEPS_PER_EPOCH // 2
    assert cb.noise_step == STEPS_PER_EPOCH // 2


class InfOnSecondBatch(MLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == 1 else loss


def test_a_step_skipped_by_the_amp_grad_scaler_gets_no_noise(tmp_path):
    model = InfOnSecondBatch()
    cb = HeavyTailNoiseCallback(1.8, 0.01, seed=0)
    real_steps = []
    # Lightning turns precision="16-mixed" into bf16 (no scaler) on the CPU: hand it a real fp16 GradScaler.
    scaler = torch.amp.GradScaler("cpu")
    pl_trainer = trainer(tmp_path, callbacks=[cb], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])

    class CountRealSteps(pl.Callback):  # an independent count of the optimizer's real steps
        def on_fit_start(self, trainer, pl_module):
            trainer.optimizers[0].register_step_post_hook(lambda *_: real_steps.append(1))

    pl_trainer.callbacks.append(CountRealSteps())
    pl_trainer.fit(model)
    assert pl_trainer.precision_plugin.scaler is scaler
    assert len(real_steps) < STEPS_PER_EPOCH  # the scaler really skipped at least the inf step
    assert cb.noise_step == len(real_steps)
    assert torch.isfinite(model.hidden.weight).all()


class TwoOptimizers(MLP):
    def __init__(self):
        super().__init__(lr=0.1, grad_scale=0.0)
        self.automatic_optimization = False
        self.checks = []

    def configure_optimizers(self):
        return [torch.optim.SGD(self.hidden.parameters(), lr=0.1), torch.optim.SGD(self.out.parameters(), lr=0.1)]

    def training_step(self, batch, batch_idx):
        opt_hidden, opt_out = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        for opt, mine, other in ((opt_hidden, self.hidden, self.out), (opt_out, self.out, self.hidden)):
            if opt is opt_hidden and batch_idx % 2:
                continue  # the first optimizer steps every other batch
            mine_before, other_before = mine.weight.detach().clone(), other.weight.detach().clone()
            opt.step()
            self.checks.append((not torch.equal(mine.weight, mine_before), torch.equal(other.weight, other_before)))
            opt.zero_grad()


def test_manual_optimization_noises_only_the_stepped_optimizers_parameters(tmp_path):
    model = TwoOptimizers()
    cb = HeavyTailNoiseCallback(1.8, 0.1, params="weights", seed=0)
    trainer(tmp_path, callbacks=[cb]).fit(model)
    assert len(model.checks) == STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2
    assert all(mine_moved and other_still for mine_moved, other_still in model.checks)
    assert cb.noise_step == len(model.checks)


def test_frozen_parameters_get_no_noise(tmp_path):
    model = MLP(grad_scale=0.0)
    model.out.weight.requires_grad_(False)
    before = weights(model)
    trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(1.8, 0.1, seed=0)]).fit(model)
    assert torch.equal(model.out.weight, before["out.weight"])
    assert not torch.equal(model.hidden.weight, before["hidden.weight"])


def test_fit_twice_leaves_no_doubled_hooks(tmp_path):
    cb = HeavyTailNoiseCallback(1.8, 0.01, seed=0)
    model = MLP()
    trainer(tmp_path, callbacks=[cb]).fit(model)
    assert cb.noise_step == STEPS_PER_EPOCH and cb._handles == []
    second = trainer(tmp_path, callbacks=[cb], max_epochs=2)
    second.fit(model)
    assert cb.noise_step == STEPS_PER_EPOCH + 2 * STEPS_PER_EPOCH
    assert cb._handles == []
    assert all(len(opt._optimizer_step_post_hooks) == 0 for opt in second.optimizers)


def test_start_and_stop_step_bound_the_noisy_steps(tmp_path):
    model = MLP(grad_scale=0.0)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = pl_module.hidden.weight.detach().clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(not torch.equal(pl_module.hidden.weight, self.before))

    trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(1.8, 0.1, seed=0, start_step=1, stop_step=3), Record()]).fit(
        model
    )
    assert seen == [False, True, True, False]


def test_lr_scheduler_is_followed_and_stats_are_logged_at_log_every_n_steps(tmp_path):
    alpha, sigma = 1.6, 0.02

    class Halving(MLP):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.4)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    logger = CSVLogger(tmp_path, name="csv")
    pl_trainer = trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(alpha, sigma, seed=0)], logger=logger,
                         log_every_n_steps=2)
    pl_trainer.fit(Halving())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["step"]): float(r["heavytail/noise_scale"]) for r in rows if r.get("heavytail/noise_scale")}
    # noise steps 1 and 3 are logged, as Lightning logs its own training metrics; the lr at noise step k is 0.4 * 0.5**k
    assert sorted(logged) == [1, 3]
    for step, value in logged.items():
        assert value == pytest.approx(sigma * (0.4 * 0.5**step) ** (1 / alpha))
    max_noise = [float(r["heavytail/max_abs_noise"]) for r in rows if r.get("heavytail/max_abs_noise")]
    assert len(max_noise) == 2 and all(m > 0 for m in max_noise)


def test_resume_from_checkpoint_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    def run(root, max_epochs, seed, ckpt_path=None):
        pl.seed_everything(0)
        model = MLP(lr=0.05)
        cb = HeavyTailNoiseCallback(1.7, 0.05, structure="neuron", seed=seed)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True)
        t = trainer(tmp_path / root, callbacks=[cb, ckpt], max_epochs=max_epochs, enable_checkpointing=True)
        t.fit(model, ckpt_path=ckpt_path)
        return model, cb

    straight, _ = run("straight", 3, seed=1234)
    run("resumed", 1, seed=1234)
    # the resumed callback is built without a seed: the seed and the step count come from the checkpoint
    resumed, cb = run("resumed", 3, seed=None, ckpt_path=tmp_path / "resumed" / "last.ckpt")
    assert cb.resolved_seed == 1234 and cb.noise_step == 3 * STEPS_PER_EPOCH
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    other_seed, _ = run("other", 3, seed=4321)  # the noise matters: another seed ends elsewhere
    assert not torch.equal(other_seed.hidden.weight, straight.hidden.weight)


def test_nonfinite_weights_raise_with_name_and_step_and_keep_the_model(tmp_path):
    class NanOnThirdBatch(MLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 2 else loss

    model = NanOnThirdBatch()
    with pytest.raises(NonFiniteParameterError, match=r"'hidden.weight'.*noise step 2"):
        trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(1.8, 0.01, seed=0)]).fit(model)


def test_nonfinite_skip_policy_trains_on(tmp_path):
    class InfBias(MLP):
        def on_train_start(self):
            with torch.no_grad():
                self.out.weight[0, 0] = float("inf")

    cb = HeavyTailNoiseCallback(1.8, 0.01, seed=0, on_nonfinite="skip", params="hidden.weight")
    trainer(tmp_path, callbacks=[cb], max_steps=2).fit(InfBias(grad_scale=0.0))
    assert cb.noise_step == 2


def test_selection_that_matches_nothing_fails_at_setup_with_the_available_names(tmp_path):
    model = MLP()
    before = weights(model)
    with pytest.raises(ValueError, match=r"`params`='encoder\.\*'.*hidden\.weight"):
        trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(params="encoder.*")]).fit(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(alpha=0.0), ValueError, r"`alpha` must be a number in \(0, 2\], got 0.0"),
        (dict(alpha=2.1), ValueError, "alpha"),
        (dict(sigma=-0.1), ValueError, r"`sigma` must be a finite number >= 0, got -0.1"),
        (dict(sigma=float("inf")), ValueError, "sigma"),
        (dict(structure="rows"), ValueError,
         r"`structure` must be one of \['elliptical', 'iid', 'neuron'\], got 'rows'"),
        (dict(start_step=5, stop_step=5), ValueError, "stop_step"),
        (dict(start_step=-1), ValueError, "start_step"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(sync="allreduce"), ValueError, "sync"),
        (dict(on_nonfinite="warn"), ValueError, "on_nonfinite"),
        (dict(exclude=["out.*", 3]), TypeError, "exclude"),
        (dict(lr_scaling="yes"), TypeError, "lr_scaling"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        HeavyTailNoiseCallback(**kwargs)


def test_params_of_the_wrong_type_fail_at_construction():
    with pytest.raises(TypeError, match="`params`"):
        HeavyTailNoiseCallback(params=3)


def test_sharding_strategies_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"FSDPStrategy.*shards parameters.*ddp"):
        check_strategy_supported(FSDPStrategy())
    with pytest.raises(ValueError, match="DeepSpeedStrategy"):
        check_strategy_supported(DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    check_strategy_supported(pl.Trainer(accelerator="cpu", logger=False).strategy)  # single device: fine


def test_state_dict_round_trip_and_defaults_for_missing_fields():
    cb = HeavyTailNoiseCallback(seed=7)
    cb.load_state_dict({"seed": 123, "noise_step": 9})  # a version-1 state: no settings recorded
    state = cb.state_dict()
    assert state["version"] == 2 and state["seed"] == 123 and state["noise_step"] == 9
    assert state["settings"]["alpha"] == 1.8 and state["settings"]["seed"] == 7 and state["sampler_paths"] == {}
    fresh = HeavyTailNoiseCallback(seed=7)
    fresh.load_state_dict({})  # a checkpoint from before these fields existed
    assert fresh.resolved_seed == 7 and fresh.noise_step == 0
    # the key names what the callback acts on, not its settings: a resume with another sigma finds its state
    assert HeavyTailNoiseCallback(alpha=1.5).state_key == HeavyTailNoiseCallback(alpha=1.6, sigma=0.1).state_key
    assert HeavyTailNoiseCallback(params="paper").state_key != HeavyTailNoiseCallback(params="weights").state_key


def test_lightning_cli_builds_the_callback_from_flags(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        MLP,
        run=False,
        args=[
            "--trainer.callbacks+=lightning_heavytail.HeavyTailNoiseCallback",
            "--trainer.callbacks.alpha=1.7",
            "--trainer.callbacks.structure=neuron",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        save_config_callback=None,
    )
    noise = [c for c in cli.trainer.callbacks if isinstance(c, HeavyTailNoiseCallback)]
    assert len(noise) == 1 and noise[0].alpha == 1.7 and noise[0].structure == "neuron"
    assert math.isclose(noise[0].sigma, 0.003)


def test_trains_through_a_real_loader_with_bf16_mixed_precision(tmp_path):
    model = MLP()
    trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(1.8, 0.01, seed=0)], precision="bf16-mixed").fit(
        model, train_dataloaders=loader()
    )
    assert model.hidden.weight.dtype == torch.float32 and torch.isfinite(model.hidden.weight).all()


def test_parameters_in_no_optimizer_are_reported(tmp_path):
    class OnlyHidden(MLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.hidden.parameters(), lr=0.1)

    with pytest.warns(UserWarning, match="out.weight"):
        trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(params="weights", seed=0)], max_steps=1).fit(OnlyHidden())




def test_a_failure_in_one_param_group_leaves_every_group_unnoised(tmp_path):
    class NanInSecondGroup(torch.optim.SGD):
        def step(self, closure=None):
            loss = super().step(closure)
            with torch.no_grad():  # as if this step had overflowed group 1 (the noise hook runs right after)
                self.param_groups[1]["params"][0][0, 0] = float("nan")
            return loss

    class TwoGroups(MLP):
        def configure_optimizers(self):
            return NanInSecondGroup([{"params": [self.hidden.weight]}, {"params": [self.out.weight], "lr": 0.01}],
                                    lr=0.1)

    model = TwoGroups(grad_scale=0.0)  # zero gradients: only the noise could move the weights
    before = model.hidden.weight.detach().clone()
    cb = HeavyTailNoiseCallback(1.8, 0.1, params="weights", seed=0)
    with pytest.raises(NonFiniteParameterError, match=r"'out.weight'.*noise step 0"):
        trainer(tmp_path, callbacks=[cb]).fit(model)
    assert torch.equal(model.hidden.weight, before)  # group 0 comes first, and was still not noised
    assert cb.noise_step == 0  # the step whose noise failed is not counted


def test_modules_that_build_layers_in_configure_model_get_noise(tmp_path):
    class Lazy(MLP):
        def __init__(self):
            super().__init__()
            del self.hidden, self.out

        def configure_model(self):
            if not hasattr(self, "hidden"):
                self.hidden, self.out = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(16, 3, bias=False)

    model = Lazy()
    cb = HeavyTailNoiseCallback(1.8, 0.1, seed=0, params="hidden.weight")
    t = trainer(tmp_path, callbacks=[cb], max_steps=2)
    t.fit(model)
    assert cb.noise_step == 2 and cb.noised_parameters == ("hidden.weight",)


def test_a_scale_that_would_overflow_fails_at_fit_start_naming_sigma_lr_and_alpha(tmp_path):
    model = MLP(lr=0.1)
    before = weights(model)
    with pytest.raises(ValueError, match=r"sigma=1e\+20, lr=0\.1, alpha=1\.8 give a noise scale"):
        trainer(tmp_path, callbacks=[HeavyTailNoiseCallback(1.8, 1e20, seed=0)]).fit(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_state_key_of_a_callable_selection_is_the_same_in_every_process():
    def hidden_only(name, param):
        return name.startswith("hidden")

    key = HeavyTailNoiseCallback(params=hidden_only).state_key
    assert "0x" not in key and "hidden_only" in key
    assert key == HeavyTailNoiseCallback(params=hidden_only).state_key


def test_log_stats_must_be_a_bool():
    with pytest.raises(TypeError, match="`log_stats` must be True or False, got 'no'"):
        HeavyTailNoiseCallback(log_stats="no")


def test_an_optimizer_subclass_calling_super_step_gets_noise_once_per_step(tmp_path):
    class LoggingSGD(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)

    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])  # torch patches SGD.step with the step hooks: now both are
    calls = []

    class Counting(HeavyTailNoiseCallback):
        def _after_optimizer_step(self, optimizer):
            calls.append(self.noise_step)
            super()._after_optimizer_step(optimizer)

    class Model(MLP):
        def configure_optimizers(self):
            return LoggingSGD(self.parameters(), lr=0.1)

    cb = Counting(1.8, 0.01, seed=0)
    trainer(tmp_path, callbacks=[cb], max_steps=3).fit(Model())
    assert calls == [0, 1, 2] and cb.noise_step == 3


# ---------------------------------------------------------------------------------- issue 8: no silent wrong noise


class _RecordStepDeltas(pl.Callback):
    """The change of one parameter across each optimizer step (the noise, when the gradients are zero)."""

    def __init__(self, name):
        self.name, self.deltas = name, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before = pl_module.get_parameter(self.name).detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.deltas.append(pl_module.get_parameter(self.name).detach() - self.before)


def _expected_noise(alpha, scale, seed, step, name, shape, structure="iid"):
    from lightning_heavytail.noise import NoiseTarget, add_heavy_tailed_noise

    zeros = torch.zeros(shape)
    add_heavy_tailed_noise([NoiseTarget.of(name, zeros)], alpha, scale, structure=structure, seed=seed, step=step)
    return zeros


class LazyMLP(MLP):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = torch.nn.LazyLinear(16, bias=False)


@pytest.mark.parametrize("params", ["paper", "weights"])
def test_lazy_parameters_get_noise_once_materialized(tmp_path, params, caplog):
    model = LazyMLP(lr=0.1, grad_scale=0.0)
    record = _RecordStepDeltas("hidden.weight")
    cb = HeavyTailNoiseCallback(1.8, 0.1, structure="iid", params=params, seed=5)
    with caplog.at_level("INFO"):
        trainer(tmp_path, callbacks=[cb, record], max_steps=2).fit(model)
    assert cb.noise_step == 2 and "hidden.weight" in cb.noised_parameters
    scale = 0.1 * 0.1 ** (1 / 1.8)
    for step, delta in enumerate(record.deltas):
        expected = _expected_noise(1.8, scale, 5, step, "hidden.weight", (16, 8))
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)
    noised = "1 parameter(s): ['hidden.weight']"
    if params == "weights":
        noised = "2 parameter(s): ['hidden.weight', 'out.weight']"
    assert "are lazy" in caplog.text and f"noises {noised}" in caplog.text


def test_a_layer_unfrozen_later_gets_noise_from_then_on_and_the_change_is_logged(tmp_path, caplog):
    from lightning.pytorch.callbacks import BackboneFinetuning

    class WithBackbone(MLP):
        def __init__(self):
            super().__init__(lr=0.1, grad_scale=0.0)
            self.backbone = self.hidden
            del self.hidden

        def forward(self, x):
            return self.out(torch.relu(self.backbone(x)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.out.parameters(), lr=0.1)  # BackboneFinetuning adds the backbone later

    model = WithBackbone()
    record = _RecordStepDeltas("backbone.weight")
    cb = HeavyTailNoiseCallback(1.8, 0.1, structure="iid", params="backbone.*", seed=3)
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0, verbose=False)
    with caplog.at_level("INFO"):
        trainer(tmp_path, callbacks=[finetune, cb, record], max_epochs=2).fit(model)
    frozen, unfrozen = record.deltas[:STEPS_PER_EPOCH], record.deltas[STEPS_PER_EPOCH:]
    assert all((d == 0).all() for d in frozen)  # frozen: no noise
    assert len(unfrozen) == STEPS_PER_EPOCH and all((d != 0).all() for d in unfrozen)
    scale = 0.1 * 0.1 ** (1 / 1.8)
    expected = _expected_noise(1.8, scale, 3, STEPS_PER_EPOCH, "backbone.weight", (16, 8))
    torch.testing.assert_close(unfrozen[0], expected, rtol=1e-4, atol=1e-6)
    assert "frozen now, noised once trainable: ['backbone.weight']" in caplog.text
    assert f"from noise step {STEPS_PER_EPOCH} on, noising 1 parameter(s); now trainable: ['backbone.weight']" in (
        caplog.text
    )


def test_a_step_that_raises_does_not_silence_the_noise_of_later_steps(tmp_path):
    class RaisingClosure(MLP):
        def __init__(self):
            super().__init__(lr=0.1, grad_scale=0.0)
            self.automatic_optimization = False
            self.changed = []

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()

            def failing():
                raise RuntimeError("closure failed")

            if batch_idx == 0:
                with contextlib.suppress(RuntimeError):  # the user catches the failed step and goes on
                    opt.step(closure=failing)
            before = self.hidden.weight.detach().clone()
            opt.zero_grad()
            self.manual_backward(super().training_step(batch, batch_idx))
            opt.step()
            self.changed.append(bool((self.hidden.weight != before).all()))

    model = RaisingClosure()
    cb = HeavyTailNoiseCallback(1.8, 0.1, params="weights", seed=0)
    trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(model)
    assert model.changed == [True] * STEPS_PER_EPOCH and cb.noise_step == STEPS_PER_EPOCH


def _checkpointed_run(tmp_path, cb, **kwargs):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, callbacks=[cb, ckpt], enable_checkpointing=True, **kwargs).fit(MLP(lr=0.05))
    return tmp_path / "last.ckpt"


def test_changed_settings_on_resume_are_named_in_a_warning_and_the_step_count_continues(tmp_path):
    path = _checkpointed_run(tmp_path / "a", HeavyTailNoiseCallback(1.8, 0.01, structure="iid", seed=3))
    resumed = HeavyTailNoiseCallback(1.7, 0.02, structure="neuron", seed=4)
    with pytest.warns(UserWarning, match=r"alpha 1\.8 -> 1\.7; sigma 0\.01 -> 0\.02; structure 'iid' -> 'neuron'; "
                                         r"seed 3 -> 4\. The step count continues from 4"):
        trainer(tmp_path / "b", callbacks=[resumed], max_epochs=2).fit(MLP(lr=0.05), ckpt_path=path)
    assert resumed.noise_step == 2 * STEPS_PER_EPOCH and resumed.resolved_seed == 4


def test_a_checkpoint_written_before_settings_were_recorded_is_found_and_compared(tmp_path):
    first = HeavyTailNoiseCallback(1.8, 0.01, structure="iid", params="weights", seed=3)
    path = _checkpointed_run(tmp_path / "a", first)
    checkpoint = torch.load(path, weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("HeavyTailNoiseCallback")]
    old_key = ("HeavyTailNoiseCallback{'alpha': 1.8, 'sigma': 0.01, 'structure': 'iid', 'params': \"'weights'\","
               " 'exclude': ()}")  # the key of version 1, which held the settings
    checkpoint["callbacks"] = {old_key: {"version": 1, "seed": state["seed"], "noise_step": state["noise_step"]}}
    torch.save(checkpoint, path)
    resumed = HeavyTailNoiseCallback(1.8, 0.03, structure="iid", params="weights")
    with pytest.warns(UserWarning, match=r"sigma 0\.01 -> 0\.03\. The step count continues from 4"):
        trainer(tmp_path / "b", callbacks=[resumed], max_epochs=2).fit(MLP(lr=0.05), ckpt_path=path)
    assert resumed.noise_step == 2 * STEPS_PER_EPOCH and resumed.resolved_seed == 3


@pytest.mark.slow
def test_a_resume_that_changes_the_sampler_kernel_warns(tmp_path, monkeypatch):
    from lightning_heavytail import _counters

    monkeypatch.setattr(_counters, "COMPILE_MIN_DRAWS", 64)  # the hidden weight (128 draws) goes through the compiler
    monkeypatch.setenv("LIGHTNING_HEAVYTAIL_COMPILE", "1")
    first = HeavyTailNoiseCallback(1.8, 0.01, structure="iid", seed=3, params="hidden.weight")
    path = _checkpointed_run(tmp_path / "a", first)
    assert first.state_dict()["sampler_paths"] == {"hidden.weight": "compiled"}
    monkeypatch.setenv("LIGHTNING_HEAVYTAIL_COMPILE", "0")  # as on a machine without a compiler
    resumed = HeavyTailNoiseCallback(1.8, 0.01, structure="iid", seed=3, params="hidden.weight")
    with pytest.warns(UserWarning, match=r"'hidden.weight' comes from the eager sampler kernel \(the checkpoint's run"
                                         r" used compiled\)"):
        trainer(tmp_path / "b", callbacks=[resumed], max_epochs=2).fit(MLP(lr=0.05), ckpt_path=path)
    assert resumed.state_dict()["sampler_paths"] == {"hidden.weight": "eager"}


def test_numpy_integers_are_accepted_for_seed_and_steps():
    cb = HeavyTailNoiseCallback(np.float64(1.7), np.float32(0.01), seed=np.int64(3), start_step=np.int32(1))
    assert cb.seed == 3 and type(cb.seed) is int and cb.start_step == 1 and cb.alpha == pytest.approx(1.7)


def _hparams_sessions(log_dir):
    """The hyperparameter sets in a TensorBoard event file, in the order written (the HParams tab shows the last)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    sessions.append({k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                                     for k, v in data.session_start_info.hparams.items()})
    return sessions


def test_noise_settings_join_the_module_hyperparameters_in_tensorboard_and_hparams_yaml(tmp_path):
    import yaml
    from lightning.pytorch.loggers import TensorBoardLogger

    class WithHparams(MLP):
        def __init__(self, lr=0.1):
            super().__init__(lr=lr)
            self.save_hyperparameters()

    logger = TensorBoardLogger(tmp_path, name="run")
    cb = HeavyTailNoiseCallback(1.75, 0.02, structure="neuron", params="paper", seed=5)
    trainer(tmp_path, callbacks=[cb], logger=logger, max_steps=2).fit(WithHparams(lr=0.05))
    last = _hparams_sessions(logger.log_dir)[-1]
    assert last["lr"] == pytest.approx(0.05)  # the module's, kept
    assert last["heavytail/alpha"] == pytest.approx(1.75) and last["heavytail/sigma"] == pytest.approx(0.02)
    assert last["heavytail/structure"] == "neuron" and last["heavytail/params"] == "paper"
    assert last["heavytail/seed"] == 5
    saved = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert saved["lr"] == 0.05 and saved["heavytail/sigma"] == 0.02 and saved["heavytail/structure"] == "neuron"
