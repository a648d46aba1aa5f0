"""HeavyTailNoiseCallback: heavy-tailed noise after every real optimizer step, for any Trainer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_heavytail._checks import check_alpha, check_bool, check_choice, check_int, check_positive_finite
from lightning_heavytail._names import NOISE_STRUCTURES, NoiseStructure
from lightning_heavytail.callbacks._noise_support import (
    SETTINGS,
    broadcast_from_rank_zero,
    changed_settings,
    check_strategy_supported,
    hparams_of,
    kernel_change_warning,
    log_hyperparams,
    state_under_another_key,
    step_calls_on_stack,
)
from lightning_heavytail.noise import (
    NONFINITE_POLICIES,
    NoisePlan,
    NonFinitePolicy,
    check_noise_scale,
    noise_scale,
)
from lightning_heavytail.selection import (
    ParamSelector,
    select_parameters,
    uninitialized_parameters,
    validate_exclude,
    validate_selector,
)

__all__ = ["SYNC_MODES", "HeavyTailNoiseCallback", "check_strategy_supported"]

SyncMode = Literal["seed", "broadcast"]
SYNC_MODES: tuple[str, ...] = get_args(SyncMode)
_STATE_VERSION = 2


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

    The noise is a pure function of the seed, the callback's own count of real optimizer steps, the parameter's name
    and each entry's index, so runs are reproducible, a run resumed from a checkpoint continues exactly, and every DDP
    rank draws the same noise (the seed is agreed at setup).

    **Which parameters.** ``params`` and ``exclude`` pick the candidates once, at fit start (after
    ``configure_model``; for lazy modules, after their first forward). At every step the candidates that are trainable
    (``requires_grad``) and in the stepped optimizer get noise, so layers unfrozen later (``BackboneFinetuning``)
    get noise from then on. The noised set is logged (rank zero, Lightning's logging) at fit start and whenever it
    changes.

    Args:
        alpha: stability index in (0, 2]; smaller means heavier tails. 2 is Gaussian noise ``N(0, 2 sigma^2 lr)``.
        sigma: noise level, a finite number >= 0 (0 disables the noise but keeps the step count).
        lr_scaling: scale the noise by ``lr**(1/alpha)``; if False the scale is ``sigma``.
        structure: ``"iid"`` (a draw per coordinate), ``"neuron"`` (one draw per output unit / conv filter, broadcast
            over its incoming weights; the structure the theory covers) or ``"elliptical"`` (a sub-Gaussian stable
            vector per unit). See ``lightning_heavytail.noise``.
        params: which parameters: ``"weights"`` (every parameter with >= 2 dims), ``"paper"`` (weights less the output
            layer and the first conv, as in the paper), glob pattern(s) of names, or a callable
            ``(name, param) -> bool``. Frozen parameters get no noise while they are frozen.
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
        structure: NoiseStructure = "neuron",
        params: ParamSelector = "paper",
        exclude: str | Sequence[str] = (),
        seed: int | None = None,
        start_step: int = 0,
        stop_step: int | None = None,
        sync: SyncMode = "seed",
        on_nonfinite: NonFinitePolicy = "raise",
        log_stats: bool = True,
    ) -> None:
        check_alpha(alpha)
        check_positive_finite(sigma, "sigma", allow_zero=True)
        check_bool(lr_scaling, "lr_scaling")
        check_bool(log_stats, "log_stats")
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
        self.seed = None if seed is None else int(seed)
        self.start_step = int(start_step)
        self.stop_step = None if stop_step is None else int(stop_step)
        self.sync = sync
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self.log_stats = log_stats
        self._resolved_seed: int | None = self.seed
        self._noise_step = 0
        self._candidates: dict[int, str] | None = None  # id(param) -> name; None until the selection is made
        self._module: pl.LightningModule | None = None
        self._noised: tuple[str, ...] | None = None  # what the last step noised, to log changes
        self._noised_any = False
        self._fit_start_step = 0
        self._plans: dict[tuple[int, ...], NoisePlan] = {}  # by the ids of the noised parameters
        self._paths: dict[str, str] = {}  # parameter -> the sampler kernel its noise came from
        self._recorded_paths: dict[str, str] = {}  # the same, from the checkpoint resumed from
        self._handles: list[RemovableHandle] = []
        self._trainer: pl.Trainer | None = None

    @property
    @override
    def state_key(self) -> str:
        # What the callback acts on, not its settings: a resume with another sigma must find its state (and say what
        # changed) rather than silently restart the step count. A callable's repr holds its address, which changes
        # between processes: its qualified name does not.
        return self._generate_state_key(params=self._params_key(), exclude=self.exclude)

    def _params_key(self) -> str:
        return repr(self.params if not callable(self.params) else getattr(self.params, "__qualname__", "callable"))

    @property
    def noise_step(self) -> int:
        """Real optimizer steps seen so far (the counter the noise is a function of)."""
        return self._noise_step

    @property
    def resolved_seed(self) -> int | None:
        """The seed in use, agreed across ranks at setup (None before setup when no seed was given)."""
        return self._resolved_seed

    @property
    def noised_parameters(self) -> tuple[str, ...]:
        """The parameters the last step noised (before the first step: the trainable candidates)."""
        if self._noised is not None:
            return self._noised
        return tuple(name for name, p in self._candidate_params() if p.requires_grad)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy_supported(trainer.strategy, self.sync)
        # Fail early on a selection that matches nothing, unless the module builds its layers in configure_model
        # (which Lightning calls after setup) or has lazy layers: then the selection is made (and checked) later.
        if not is_overridden("configure_model", pl_module, pl.LightningModule) and not uninitialized_parameters(
            pl_module
        ):
            select_parameters(pl_module, self.params, exclude=self.exclude, argument="params", trainable_only=False)
        if self._resolved_seed is None:
            self._resolved_seed = random.SystemRandom().randrange(2**63)
        # Every rank must use rank 0's seed, or DDP replicas drift apart with no error.
        self._resolved_seed = int(trainer.strategy.broadcast(self._resolved_seed, src=0))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()  # a second fit() must not leave doubled hooks
        self._trainer, self._module = trainer, pl_module
        self._candidates, self._noised, self._noised_any = None, None, False
        self._fit_start_step = self._noise_step  # after a resume: the checkpoint's count
        for optimizer in trainer.optimizers:  # a scale that overflows is a configuration error: say so before step 0
            for group in optimizer.param_groups:
                self._group_scale(group)
        lazy = uninitialized_parameters(pl_module)
        if lazy:
            rank_zero_info(
                f"HeavyTailNoiseCallback: {lazy} are lazy (no shape until the first forward); the parameters to noise"
                " are selected at the first optimizer step"
            )
        else:
            self._select(pl_module)
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._post_step_hook))
        self._log_hyperparams(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Again after Lightning has logged the module's (and datamodule's) hyperparameters: TensorBoard's HParams tab
        # shows the last set logged, which then holds both. (The fit-start call put them in hparams.yaml, which
        # TensorBoardLogger writes once, at Lightning's first save.)
        self._log_hyperparams(trainer)

    def _log_hyperparams(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            log_hyperparams(trainer.loggers, self.hparams())

    def hparams(self) -> dict[str, Any]:
        """The noise settings as hyperparameters (``heavytail/alpha``, ...): what tells runs apart in TensorBoard.

        Examples:
            >>> HeavyTailNoiseCallback(alpha=1.75, sigma=0.1, seed=3).hparams()["heavytail/sigma"]
            0.1
        """
        return hparams_of(self._settings(), self._resolved_seed)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        noisy_steps = range(max(self._fit_start_step, self.start_step), self._noise_step)
        if self.stop_step is not None:
            noisy_steps = range(noisy_steps.start, min(noisy_steps.stop, self.stop_step))
        if len(noisy_steps) > 0 and not self._noised_any and self.sigma > 0:
            rank_zero_warn(
                "HeavyTailNoiseCallback added no noise during this fit: none of the selected parameters was trainable"
                f" and in the stepped optimizer at any step (params={self.params!r}, exclude={list(self.exclude)!r})"
            )

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "seed": self._resolved_seed,
            "noise_step": self._noise_step,
            "settings": self._settings(),
            "sampler_paths": dict(self._paths),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        recorded = state_dict.get("settings")
        changes = changed_settings(recorded, self._settings()) if isinstance(recorded, dict) else []
        if self.seed is None or "seed" not in (recorded or {}):
            # no seed asked for (or none recorded to tell a change by): continue the checkpoint's stream
            self._resolved_seed = state_dict.get("seed", self._resolved_seed)
        self._noise_step = int(state_dict.get("noise_step", 0))
        self._recorded_paths = dict(state_dict.get("sampler_paths", {}))
        if changes:
            rank_zero_warn(
                f"HeavyTailNoiseCallback resumed with other settings than the checkpoint's: {'; '.join(changes)}. The"
                f" step count continues from {self._noise_step}; the new settings apply from here on."
            )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning calls load_state_dict with the state under our key; this finds it under another key (settings
        # changed in a version-0.1 key, or params/exclude changed) and says so
        state = state_under_another_key(checkpoint.get("callbacks") or {}, self.state_key, type(self).__name__)
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ private

    def _settings(self) -> dict[str, Any]:
        """The settings a checkpoint records (``SETTINGS``); ``params`` by its key, ``exclude`` as a list."""
        return {**{key: getattr(self, key) for key in SETTINGS}, "params": self._params_key(),
                "exclude": list(self.exclude)}

    def _candidate_params(self) -> list[tuple[str, Tensor]]:
        if self._candidates is None or self._module is None:
            return []
        by_id = {id(p): p for p in self._module.parameters()}
        return [(name, by_id[pid]) for pid, name in self._candidates.items() if pid in by_id]

    def _select(self, pl_module: pl.LightningModule) -> None:
        """Pick the candidates (once per fit), check them against the optimizers and say what gets noise."""
        selected = select_parameters(pl_module, self.params, exclude=self.exclude, argument="params",
                                     trainable_only=False)
        self._candidates = {id(p): name for name, p in selected}
        trainer = self._trainer
        in_optimizers: set[int] = set()
        for optimizer in trainer.optimizers if trainer is not None else []:
            in_optimizers.update(id(p) for group in optimizer.param_groups for p in group["params"])
        trainable = [(name, p) for name, p in selected if p.requires_grad]
        orphans = [name for name, p in trainable if id(p) not in in_optimizers]
        if trainable and len(orphans) == len(trainable) and trainer is not None:
            raise ValueError(
                f"HeavyTailNoiseCallback: none of the selected trainable parameters ({', '.join(orphans)}) is in an"
                " optimizer, so none would ever get noise. Check `params` or configure_optimizers."
            )
        if orphans:
            rank_zero_warn(f"HeavyTailNoiseCallback: selected parameters in no optimizer get no noise: {orphans}")
        frozen = [name for name, p in selected if not p.requires_grad]
        message = (
            f"HeavyTailNoiseCallback (alpha={self.alpha}, sigma={self.sigma}, structure={self.structure!r}) noises"
            f" {len(trainable)} parameter(s): {[name for name, _ in trainable]}"
        )
        if frozen:
            message += f"; frozen now, noised once trainable: {frozen}"
        rank_zero_info(message)
        if not trainable:
            rank_zero_warn(
                f"HeavyTailNoiseCallback: none of the selected parameters {frozen} is trainable at fit start; noise"
                " starts when one becomes trainable"
            )

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._plans = {}  # they hold the parameters: let them go with the fit

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # torch runs the step hooks around every patched `step` in the class hierarchy: a subclass whose step calls
        # super().step() fires them once per level. The noise goes in once, after the outermost step.
        if step_calls_on_stack(optimizer) <= 1:
            self._after_optimizer_step(optimizer)

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

    def _targets(self, optimizer: torch.optim.Optimizer) -> list[tuple[list[tuple[str, Tensor]], float]]:
        """(the candidates of each param group that are trainable now, the group's scale)."""
        if self._candidates is None and self._module is not None:
            lazy = uninitialized_parameters(self._module)
            if lazy:
                raise ValueError(
                    f"HeavyTailNoiseCallback: {lazy} are still uninitialized after an optimizer step, so `params`"
                    f"={self.params!r} cannot be resolved; run the lazy modules in forward, or initialize them"
                    " (a forward pass on an example batch) before fit"
                )
            self._select(self._module)
        candidates = self._candidates or {}
        groups = []
        for group in optimizer.param_groups:
            targets = [(candidates[id(p)], p) for p in group["params"] if id(p) in candidates and p.requires_grad]
            if targets:
                groups.append((targets, self._group_scale(group)))
        return groups

    def _plan(self, groups: list[tuple[list[tuple[str, Tensor]], float]]) -> NoisePlan:
        """The noise plan of these parameters: made when the noised set (or a tensor's layout) changes, else reused."""
        key = tuple(id(p) for targets, _ in groups for _, p in targets)
        plan = self._plans.get(key)
        if plan is None or not plan.is_current():
            if len(self._plans) >= 4:  # one per optimizer in practice; frozen/unfrozen sets come and go
                self._plans.pop(next(iter(self._plans)))
            plan = self._plans[key] = NoisePlan([item for targets, _ in groups for item in targets], self.structure)
        return plan

    def _note_noised(self, noised: tuple[str, ...]) -> None:
        """Say when the noised set changes (a layer unfrozen, frozen, or added to the optimizer)."""
        if len(self._trainer.optimizers if self._trainer is not None else []) > 1:
            return  # manual optimization with several optimizers: each step noises its own optimizer's share
        if self._noised is not None and noised != self._noised:
            added = [name for name in noised if name not in self._noised]
            removed = [name for name in self._noised if name not in noised]
            rank_zero_info(
                f"HeavyTailNoiseCallback: from noise step {self._noise_step} on, noising {len(noised)} parameter(s)"
                + (f"; now trainable: {added}" if added else "") + (f"; no longer: {removed}" if removed else "")
            )
        self._noised = noised

    def _note_paths(self, paths: dict[str, str]) -> None:
        """Warn once if a resumed run draws a parameter's noise with another kernel than the checkpoint's run."""
        warning = kernel_change_warning(self._recorded_paths, paths)
        if warning:
            rank_zero_warn(warning)
        self._recorded_paths = {}
        self._paths.update(paths)

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
        groups = self._targets(optimizer)
        self._note_noised(tuple(name for targets, _ in groups for name, _ in targets))
        self._noised_any = self._noised_any or bool(groups)
        # All groups are checked before any is written: a failure leaves every parameter as the optimizer left it.
        plan = self._plan(groups)
        stats = plan.apply([scale for targets, scale in groups for _ in targets], self.alpha, seed=seed, step=step,
                           on_nonfinite=self.on_nonfinite, track_max=log_now)
        self._note_paths(stats.paths)
        if self.sync == "broadcast":
            # Every target in a fixed order, skipped or not, so all ranks make the same broadcast calls.
            broadcast_from_rank_zero([p for targets, _ in groups for _, p in targets])
        self._noise_step += 1  # only once the step's noise is in
        if log_now and trainer is not None and trainer.is_global_zero:
            metrics = {"heavytail/noise_scale": max(scale for _, scale in groups) if groups else 0.0,
                       "heavytail/max_abs_noise": stats.max_abs_noise or 0.0}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
