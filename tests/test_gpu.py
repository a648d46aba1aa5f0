"""GPU-only checks of the sampler and the noise: skipped without CUDA (CI has none), run by benchmarks/run_gpu.sh.

- CUDA draws are bitwise reproducible on one device, on both kernels (eager and compiled), and follow the law;
- the counter streams agree with the CPU's to float rounding (the same integers, other math libraries);
- bf16 and fp16 parameters get their noise computed in float32 and rounded once, never inf;
- a Lightning fit on the GPU with both callbacks runs and resumes exactly.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import scipy.stats
import torch

from lightning_heavytail import HeavyTailNoiseCallback, sample_stable
from lightning_heavytail._counters import COMPILE_MIN_DRAWS, choose_path
from lightning_heavytail.noise import add_heavy_tailed_noise, noise_key
from lightning_heavytail.stable import stable_at
from tests.helpers import MLP, loader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_draws_are_bitwise_reproducible_and_blocks_are_slices(path: str, dtype: torch.dtype) -> None:
    key = noise_key(3, 7, "layer.weight")
    n = COMPILE_MIN_DRAWS + 17
    whole = stable_at(1.75, key, range(n), device=CUDA, dtype=dtype, path=path)
    assert whole.device.type == "cuda" and bool(torch.isfinite(whole).all())
    assert torch.equal(whole, stable_at(1.75, key, range(n), device=CUDA, dtype=dtype, path=path))
    part = stable_at(1.75, key, range(1234, 1234 + 4099), device=CUDA, dtype=dtype, path=path)
    assert torch.equal(part, whole[1234:1234 + 4099])
    scattered = torch.randint(0, n, (5000,), device=CUDA)
    assert torch.equal(stable_at(1.75, key, scattered, dtype=dtype, path=path), whole[scattered])


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5, 1.75, 2.0])
def test_cuda_draws_follow_the_stable_law(alpha: float) -> None:
    x = sample_stable(alpha, 200_000, generator=torch.Generator(CUDA).manual_seed(0), device=CUDA)
    assert x.device.type == "cuda"
    sample = np.sort(x.double().cpu().numpy())
    grid = sample[np.linspace(1000, sample.size - 1000, 150).astype(int)]
    ecdf = np.searchsorted(sample, grid, side="right") / sample.size
    d = float(np.abs(ecdf - scipy.stats.levy_stable.cdf(grid, alpha, 0.0)).max())
    assert scipy.stats.kstwo.sf(d, sample.size) > 1e-4


def test_compiled_kernel_is_chosen_on_cuda_and_agrees_with_eager_and_cpu_to_rounding() -> None:
    assert choose_path(COMPILE_MIN_DRAWS, CUDA) == "compiled"
    key = noise_key(0, 1, "w")
    compiled = stable_at(1.8, key, range(COMPILE_MIN_DRAWS), device=CUDA, path="compiled")
    eager = stable_at(1.8, key, range(COMPILE_MIN_DRAWS), device=CUDA, path="eager")
    cpu = stable_at(1.8, key, range(COMPILE_MIN_DRAWS), path="eager")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(eager.cpu(), cpu, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("structure", ["iid", "neuron", "elliptical"])
def test_half_precision_parameters_get_float32_noise_rounded_once(dtype: torch.dtype, structure: str) -> None:
    params = [torch.randn(64, 32, device=CUDA).to(dtype) for _ in range(3)]
    before = [p.clone() for p in params]
    add_heavy_tailed_noise([(f"p{i}", p) for i, p in enumerate(params)], 1.7, 0.01, structure=structure, seed=5)
    for i, (p, b) in enumerate(zip(params, before, strict=True)):
        noise = torch.zeros(64, 32, device=CUDA)
        add_heavy_tailed_noise([(f"p{i}", noise)], 1.7, 0.01, structure=structure, seed=5)
        assert p.dtype == dtype and bool(torch.isfinite(p).all())
        assert torch.equal(p, (b.float() + noise).to(dtype))


class DeviceSeen(pl.Callback):
    """Where the parameters were while training (Lightning moves the model back to the CPU when the fit ends)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.trained_on = {p.device.type for p in pl_module.parameters()}


def _fit(tmp_path, max_epochs: int, ckpt_path=None, precision: str = "32-true") -> tuple[MLP, HeavyTailNoiseCallback]:
    pl.seed_everything(0)
    model = MLP(width=64, lr=0.05)
    noise = HeavyTailNoiseCallback(1.75, 0.05, structure="neuron", params="paper", seed=11)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_epochs=max_epochs, precision=precision, logger=False,
                         callbacks=[noise, ckpt, DeviceSeen()], enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, noise


def test_a_gpu_fit_is_reproducible_and_resumes_exactly(tmp_path) -> None:
    straight, noise = _fit(tmp_path / "a", 3)
    again, _ = _fit(tmp_path / "b", 3)
    _fit(tmp_path / "c", 1)
    resumed, _ = _fit(tmp_path / "c", 3, ckpt_path=tmp_path / "c" / "last.ckpt")
    assert noise.noise_step == 12
    for (name, p), q, r in zip(straight.named_parameters(), again.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r), name
    assert straight.trained_on == again.trained_on == resumed.trained_on == {"cuda"}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_mixed_and_half_precision_fits_stay_finite(tmp_path, precision: str) -> None:
    model, noise = _fit(tmp_path, 2, precision=precision)
    assert noise.noise_step > 0 and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not math.isnan(float(model.hidden.weight.float().abs().max()))
