"""GPU-only checks of the pruning evaluation: skipped without CUDA (CI has none).

- the curves and the epsilon point on a CUDA model (torch.sort thresholds, parametrized weights, a dict output) are the
  CPU ones, and the model and the CUDA RNG are left as they were;
- a Lightning fit on the GPU with PruneEvalCallback logs the epsilon point of the final model, and trains exactly as
  the same fit without the callback.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_heavytail import PruneEvalCallback
from lightning_heavytail.pruning import MASK_METHODS, check_prunable, evaluate_at_epsilon, evaluate_pruning_curve
from tests.callbacks.test_prune_eval import TinyNet
from tests.helpers import loader
from tests.test_pruning import assert_unchanged, batches, snapshot

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


class WeightNormDict(nn.Module):
    """A weight-normed hidden layer and a Hugging Face-style dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.utils.parametrizations.weight_norm(nn.Linear(6, 32))
        self.out = nn.Linear(32, 4)
        with torch.no_grad():
            self.hidden.parametrizations.weight.original0.mul_(torch.logspace(-2, 1, 32).unsqueeze(1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"logits": self.out(torch.relu(self.hidden(x))), "features": x}


def test_curves_and_epsilon_point_on_cuda_are_the_cpu_ones() -> None:
    torch.manual_seed(0)
    cpu_model, data = WeightNormDict(), batches(n_batches=4, size=50)
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    before = snapshot(cuda_model)
    rng = torch.cuda.get_rng_state()
    n = sum(len(y) for _, y in data)
    for method in MASK_METHODS:
        on_cpu = evaluate_pruning_curve(cpu_model, data, (0.0, 0.5, 0.9), method=method, output_key="logits")
        on_cuda = evaluate_pruning_curve(cuda_model, data, (0.0, 0.5, 0.9), method=method, output_key="logits")
        assert on_cuda.params == on_cpu.params == ["hidden.weight"]
        assert on_cuda.sparsities == pytest.approx(on_cpu.sparsities, abs=1e-12)
        # GPU and CPU matmuls round differently: at most a sample's prediction may flip
        assert on_cuda.metrics["accuracy"] == pytest.approx(on_cpu.metrics["accuracy"], abs=1.0 / n + 1e-6)
    point_cpu = evaluate_at_epsilon(cpu_model, data, output_key="logits")
    point_cuda = evaluate_at_epsilon(cuda_model, data, output_key="logits")
    assert point_cuda.ratios == point_cpu.ratios and 0.0 < point_cuda.ratio < 1.0
    assert point_cuda.metrics["accuracy"] == pytest.approx(point_cpu.metrics["accuracy"], abs=1.0 / n + 1e-6)
    assert check_prunable(cuda_model, "neuron", data[0], output_key="logits").params == ["hidden.weight"]
    assert_unchanged(cuda_model, before)
    assert len(cuda_model.hidden.parametrizations.weight) == 1
    assert torch.equal(torch.cuda.get_rng_state(), rng)


def test_gpu_fit_logs_the_epsilon_point_and_trains_as_without_the_callback(tmp_path: Any) -> None:
    def fit(with_callback: bool) -> tuple[TinyNet, list[PruneEvalCallback]]:
        torch.manual_seed(0)
        model = TinyNet(width=64)  # BatchNorm and dropout
        callbacks = [PruneEvalCallback(sparsities=(0.0, 0.5, 0.9), method=("neuron", "global"),
                                       dataloader=loader(48), filename=None)] if with_callback else []
        pl.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=callbacks).fit(model, loader(96))
        return model, callbacks

    model, (callback,) = fit(True)
    plain, _ = fit(False)
    for key, value in model.state_dict().items():  # the evaluation moved neither the weights nor the dropout RNG
        assert torch.equal(value, plain.state_dict()[key]), key
    entry = callback.history[-1]
    assert entry["curves"]["neuron"]["params"] == ["net.0.weight"]  # not the output layer net.4
    point = evaluate_at_epsilon(model, loader(48)).to_dict()
    assert {k: v for k, v in entry["at_epsilon"].items() if k not in ("sparsity", "removed")} == point
