"""HeavyTailNoiseCallback: heavy-tailed noise after every real optimizer step, for any Trainer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_heavytail._checks import check_alpha, check_choice, check_int, check_positive_finite
from lightning_heavytail.noise import (
    NOISE_STRUCTURES,
    NONFINITE_POLICIES,
    NoiseStructure,
    NonFinitePolicy,
    add_heavy_tailed_noise_groups,
    check_noise_scale,
    noise_scale,
)
from lightning_heavytail.selection import ParamSelector, select_parameters, validate_exclude, validate_selector

SYNC_MODES = ("seed", "broadcast")
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
_STATE_VERSION = 1


def check_strategy_supported(strategy: object) -> None:
    """Refuse strategies that shard parameters: noise drawn per full tensor would be wrong on a shard.

    Raises:
        ValueError: naming the strategy and what works instead.
    """
    for cls in type(strategy).__mro__:
        if cls.__name__ in _SHARDED_STRATEGIES:
            raise ValueError(
                f"HeavyTailNoiseCallback does not support {type(strategy).__name__}: it shards parameters, and noise"
                " drawn for a whole tensor is wrong on a shard. Use strategy='ddp' (or 'ddp_spawn'), where every rank"
                " holds full parameters and draws identical noise."
            )


class HeavyTailNoiseCallback(Callback):
    r"""Add ``sigma * lr**(1/alpha) * X`` to the selected parameters after every real optimizer step.

    ``X`` is symmetric alpha-stable with scale 1 (characteristic function ``exp(-|t|**alpha)``), drawn afresh at each
    step; ``lr`` is the current learning rate of the parameter's param group, so LR schedulers are followed. This is
    the heavy-tailed SGD of Wan, Barsbey, Zaidi and Şimşekli (ICML 2024, arXiv:2306.08125); their README example is
    ``alpha=1.75, sigma=0.003, structure="neuron"`` with ``lr=0.01``.

    Lightning has no ``on_after_optimizer_step`` hook, so the callback registers
    ``torch.optim.Optimizer.register_step_post_hook`` on every optimizer at fit start and removes it at the end. The
    hook fires once per real ``optimizer.step()``: not on gradient-accumulation batches, not when an AMP GradScaler
    skips a step, once per ``opt.step()`` in manual optimization (noising only that optimizer's parameters).

    The noise is a pure function of the seed, the callback's own count of real optimizer steps and the parameter's
    name, so runs are reproducible, a run resumed from a checkpoint continues exactly, and every DDP rank draws
    the same noise (the seed is agreed at setup).

    Args:
        alpha: stability index in (0, 2]; smaller means heavier tails. 2 is Gaussian noise ``N(0, 2 sigma^2 lr)``.
        sigma: noise level, a finite number >= 0 (0 disables the noise but keeps the step count).
        lr_scaling: scale the noise by ``lr**(1/alpha)``; if False the scale is ``sigma``.
        structure: ``"iid"`` (a draw per coordinate), ``"neuron"`` (one draw per output unit / conv filter, broadcast
            over its incoming weights; the structure the theory covers) or ``"elliptical"`` (a sub-Gaussian stable
            vector per unit). See ``lightning_heavytail.noise``.
        params: which parameters: ``"weights"`` (every trainable parameter with >= 2 dims), ``"paper"`` (weights less
            the output layer and the first conv, as in the paper), glob pattern(s) of names, or a callable
            ``(name, param) -> bool``. Frozen parameters never get noise.
        exclude: glob patterns of parameter names to leave out, e.g. ``["classifier.*"]``.
        seed: base seed; None draws one on rank 0 and shares it with every rank.
        start_step: first real optimizer step (counted from 0 by this callback) that gets noise.
        stop_step: the step at which noise stops (exclusive); None for never.
        sync: ``"seed"``: every rank draws the same noise from the shared seed; ``"broadcast"``: additionally
            broadcast the noised parameters from rank 0 after each step, for clusters of mixed GPU models where the
            same seed can give different CUDA draws.
        on_nonfinite: when a selected parameter holds inf/NaN at a step (the optimizer step produced it) or fp16 noise
            would overflow: ``"raise"`` (default; nothing is changed, the error names the parameter and step),
            ``"skip"`` that parameter for the step, or ``"ignore"`` (no check).
        log_stats: log ``heavytail/noise_scale`` and ``heavytail/max_abs_noise`` through the trainer's loggers every
            ``log_every_n_steps`` real steps, from rank zero.

    Examples:
        >>> import lightning.pytorch as pl
        >>> noise = HeavyTailNoiseCallback(alpha=1.75, sigma=0.003, structure="neuron", params="paper", seed=0)
        >>> trainer = pl.Trainer(callbacks=[noise], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        alpha: float = 1.8,
        sigma: float = 0.003,
        *,
        lr_scaling: bool = True,
        structure: NoiseStructure = "iid",
        params: ParamSelector = "weights",
        exclude: str | Sequence[str] = (),
        seed: int | None = None,
        start_step: int = 0,
        stop_step: int | None = None,
        sync: Literal["seed", "broadcast"] = "seed",
        on_nonfinite: NonFinitePolicy = "raise",
        log_stats: bool = True,
    ) -> None:
        check_alpha(alpha)
        check_positive_finite(sigma, "sigma", allow_zero=True)
        if not isinstance(lr_scaling, bool):
            raise ValueError(f"`lr_scaling` must be True or False, got {lr_scaling!r}")
        if not isinstance(log_stats, bool):
            raise ValueError(f"`log_stats` must be True or False, got {log_stats!r}")
        check_choice(structure, NOISE_STRUCTURES, "structure")
        validate_selector(params, "params")
        exclude = validate_exclude(exclude)
        check_int(seed, "seed", allow_none=True)
        check_int(start_step, "start_step")
        check_int(stop_step, "stop_step", allow_none=True)
        if stop_step is not None and stop_step <= start_step:
            raise ValueError(f"`stop_step` must be None or greater than `start_step`={start_step}, got {stop_step}")
        check_choice(sync, SYNC_MODES, "sync")
        check_choice(on_nonfinite, NONFINITE_POLICIES, "on_nonfinite")
        self.alpha = float(alpha)
        self.sigma = float(sigma)
        self.lr_scaling = lr_scaling
        self.structure: NoiseStructure = structure
        self.params = params
        self.exclude = tuple(exclude)
        self.seed = seed
        self.start_step = start_step
        self.stop_step = stop_step
        self.sync = sync
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.log_stats = log_stats
        self._resolved_seed: int | None = seed
        self._noise_step = 0
        self._selected: dict[int, str] = {}  # id(param) -> name, fixed at setup
        self._handles: list[RemovableHandle] = []
        self._trainer: pl.Trainer | None = None

    @property
    @override
    def state_key(self) -> str:
        # A callable's repr holds its address, which changes between processes: its qualified name does not, so a
        # resumed run finds its state.
        params = self.params if not callable(self.params) else getattr(self.params, "__qualname__", "callable")
        return self._generate_state_key(alpha=self.alpha, sigma=self.sigma, structure=self.structure,
                                        params=repr(params), exclude=self.exclude)

    @property
    def noise_step(self) -> int:
        """Real optimizer steps seen so far (the counter the noise is a function of)."""
        return self._noise_step

    @property
    def resolved_seed(self) -> int | None:
        """The seed in use, agreed across ranks at setup (None before setup when no seed was given)."""
        return self._resolved_seed

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy_supported(trainer.strategy)
        # Fail early on a selection that matches nothing, unless the module builds its layers in configure_model,
        # which Lightning calls after setup: then the selection is made (and checked) at fit start.
        if not is_overridden("configure_model", pl_module, pl.LightningModule):
            select_parameters(pl_module, self.params, exclude=self.exclude, argument="params")
        if self._resolved_seed is None:
            self._resolved_seed = random.SystemRandom().randrange(2**63)
        # Every rank must use rank 0's seed, or DDP replicas drift apart with no error.
        self._resolved_seed = int(trainer.strategy.broadcast(self._resolved_seed, src=0))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()  # a second fit() must not leave doubled hooks
        self._trainer = trainer
        selected = select_parameters(pl_module, self.params, exclude=self.exclude, argument="params")
        self._selected = {id(p): name for name, p in selected}
        for optimizer in trainer.optimizers:  # a scale that overflows is a configuration error: say so before step 0
            for group in optimizer.param_groups:
                self._group_scale(group)
        in_optimizers: set[int] = set()
        for optimizer in trainer.optimizers:
            in_optimizers.update(id(p) for group in optimizer.param_groups for p in group["params"])
            self._handles += self._register_hooks(optimizer)
        orphans = [name for pid, name in self._selected.items() if pid not in in_optimizers]
        if len(orphans) == len(self._selected):
            raise ValueError(
                f"HeavyTailNoiseCallback: none of the selected parameters ({', '.join(self._selected.values())}) is in"
                " an optimizer, so none would ever get noise. Check `params` or configure_optimizers."
            )
        if orphans:
            rank_zero_warn(f"HeavyTailNoiseCallback: selected parameters in no optimizer get no noise: {orphans}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "seed": self._resolved_seed, "noise_step": self._noise_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resolved_seed = state_dict.get("seed", self._resolved_seed)
        self._noise_step = int(state_dict.get("noise_step", 0))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _register_hooks(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        # torch runs an optimizer's step hooks around every patched `step` in the class hierarchy: a subclass whose
        # step calls super().step() fires them twice per real step. Counting depth, the noise goes in once, after
        # the outermost step has returned.
        depth = [0]

        def pre_hook(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            depth[0] += 1

        def post_hook(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            depth[0] = max(depth[0] - 1, 0)
            if depth[0] == 0:
                self._after_optimizer_step(opt)

        return [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]

    def _group_scale(self, group: dict[str, Any]) -> float:
        scale = noise_scale(self.sigma, float(group["lr"]), self.alpha, lr_scaling=self.lr_scaling)
        try:
            check_noise_scale(scale, "sigma * lr**(1/alpha)")
        except ValueError as err:
            raise ValueError(
                f"HeavyTailNoiseCallback: sigma={self.sigma}, lr={group['lr']}, alpha={self.alpha} give a noise scale"
                f" of {scale:g}: {err}. Lower sigma or the learning rate, or raise alpha."
            ) from None
        return scale

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self._noise_step
        if step < self.start_step or (self.stop_step is not None and step >= self.stop_step):
            self._noise_step += 1
            return
        trainer = self._trainer
        log_now = (
            self.log_stats
            and trainer is not None
            and bool(trainer.loggers)
            # the same steps Lightning logs training metrics at: the n-th, 2n-th, ... real step
            and (step + 1) % max(int(getattr(trainer, "log_every_n_steps", 50)), 1) == 0
        )
        seed = self._resolved_seed if self._resolved_seed is not None else 0
        groups = []
        for group in optimizer.param_groups:
            targets = [(self._selected[id(p)], p) for p in group["params"]
                       if id(p) in self._selected and p.requires_grad]
            if targets:
                groups.append((targets, self._group_scale(group)))
        # All groups are checked before any is written: a failure leaves every parameter as the optimizer left it.
        stats = add_heavy_tailed_noise_groups(groups, self.alpha, structure=self.structure, seed=seed, step=step,
                                              on_nonfinite=self.on_nonfinite, track_max=log_now)
        if self.sync == "broadcast":
            # Every target in a fixed order, skipped or not, so all ranks make the same broadcast calls.
            _broadcast_from_rank_zero([p for targets, _ in groups for _, p in targets])
        self._noise_step += 1  # only once the step's noise is in
        if log_now and trainer is not None and trainer.is_global_zero:
            metrics = {"heavytail/noise_scale": max(scale for _, scale in groups) if groups else 0.0,
                       "heavytail/max_abs_noise": stats.max_abs_noise or 0.0}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def _broadcast_from_rank_zero(tensors: list[Tensor]) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    for tensor in tensors:
        torch.distributed.broadcast(tensor.data, src=0)
