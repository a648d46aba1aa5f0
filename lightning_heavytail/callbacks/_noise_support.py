"""What HeavyTailNoiseCallback needs around its hooks: supported strategies, nested steps, resume, broadcast."""

from __future__ import annotations

import ast
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor

from lightning_heavytail._checks import check_strategy, is_strategy
from lightning_heavytail._distributed import several_ranks

# The settings a checkpoint records; a resume that changes one of them is told so (the step count continues).
SETTINGS = ("alpha", "sigma", "lr_scaling", "structure", "params", "exclude", "seed", "start_step", "stop_step")
# The code object of torch's step wrapper (Optimizer.profile_hook_step), which calls the step hooks: its frames on the
# stack tell a nested step (an optimizer subclass whose step calls super().step()) from the outermost one.
_STEP_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__


def check_strategy_supported(strategy: object, sync: str = "seed") -> None:
    """Refuse the strategies whose parameters the noise cannot be mapped onto.

    Single-device, DDP-family and ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` and tensor parallelism, whose
    DTensor parameters get exactly their part of the whole tensor's noise) are supported. FSDP1 (``FSDPStrategy``)
    flattens parameters into shards that are not DTensors, and DeepSpeed partitions them its own way: both are refused,
    as is ``sync="broadcast"`` where parameters are sharded (there is no replica to broadcast).

    Raises:
        ValueError: naming the strategy and what works instead.
    """
    check_strategy(
        strategy, "HeavyTailNoiseCallback", supported=("ModelParallelStrategy",),
        why="it shards parameters in a layout whose entries cannot be mapped to the whole tensor's noise",
        instead="For sharded training use ModelParallelStrategy with torch.distributed.fsdp.fully_shard applied in"
        " configure_model (FSDP2): every rank then adds exactly its shard's part of the noise. Or use strategy='ddp'.",
    )
    if is_strategy(strategy, "ModelParallelStrategy") and sync == "broadcast":
        raise ValueError(
            "HeavyTailNoiseCallback: sync='broadcast' needs every rank to hold whole parameters, and"
            f" {type(strategy).__name__} shards them; use sync='seed' (each shard draws its part of the same noise)"
        )


def hparams_of(settings: Mapping[str, Any], resolved_seed: int | None) -> dict[str, Any]:
    """The noise settings (see ``SETTINGS``) as hyperparameters, ``heavytail/alpha``, ...; -1 stands for None."""
    return {
        "heavytail/alpha": settings["alpha"],
        "heavytail/sigma": settings["sigma"],
        "heavytail/structure": settings["structure"],
        "heavytail/lr_scaling": settings["lr_scaling"],
        "heavytail/params": str(settings["params"]).strip("'"),
        "heavytail/exclude": ",".join(settings["exclude"]),
        "heavytail/seed": resolved_seed if resolved_seed is not None else -1,
        "heavytail/start_step": settings["start_step"],
        "heavytail/stop_step": settings["stop_step"] if settings["stop_step"] is not None else -1,
    }


def log_hyperparams(loggers: Sequence[Logger], hparams: Mapping[str, Any]) -> None:
    """Log ``hparams`` to every logger, merged with what it already logged (the module's own hyperparameters)."""
    for logger in loggers:
        logged = getattr(logger, "hparams", None)
        earlier = dict(logged) if isinstance(logged, Mapping) else {}
        logger.log_hyperparams({**earlier, **hparams})


def step_calls_on_stack(optimizer: torch.optim.Optimizer) -> int:
    """How many calls of ``optimizer.step`` are running: 1 in the outermost, 2 inside ``super().step()``, ...

    Read from the stack rather than counted in pre/post hooks, so that a step that raised (and whose post hook
    therefore never ran) cannot leave a stale count that silences the noise of every later step.
    """
    count = 0
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _STEP_WRAPPER_CODE and frame.f_locals.get("self") is optimizer:
            count += 1
        frame = frame.f_back  # type: ignore[assignment]
    return count


def changed_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"sigma 0.003 -> 0.01"`` for every recorded setting the current one differs from (a seed of None keeps)."""
    changes = []
    for key in SETTINGS:
        if key not in recorded:
            continue
        old, new = recorded[key], current[key]
        if key == "exclude":
            old, new = list(old or []), list(new)
        if key == "seed" and new is None:
            continue  # no seed given: the checkpoint's is kept
        if old != new:
            changes.append(f"{key} {old!r} -> {new!r}")
    return changes


def state_under_another_key(states: Mapping[Any, Any], state_key: str, name: str) -> dict[str, Any] | None:
    """The one ``name`` state of a checkpoint when none is under ``state_key`` (with its settings), else None.

    Raises:
        ValueError: if there are several, none of them ours: which one to continue would be a guess.
    """
    if state_key in states:
        return None
    mine = {str(key): state for key, state in states.items()
            if str(key).startswith(name) and isinstance(state, dict) and "noise_step" in state}
    if not mine:
        return None
    if len(mine) > 1:
        raise ValueError(
            f"The checkpoint holds several {name} states ({sorted(mine)}) and none has this callback's key"
            f" {state_key!r}: give each callback the `params`/`exclude` it had, so each finds its own state"
        )
    key, state = next(iter(mine.items()))
    if "settings" not in state:  # written before settings were recorded: they are in the key
        state = {**state, "settings": _settings_from_key(key, name)}
    return dict(state)


def _settings_from_key(key: str, name: str) -> dict[str, Any]:
    """The settings an older checkpoint wrote into its state key, ``Name{'alpha': 1.8, ...}``; {} if unreadable."""
    try:
        settings = ast.literal_eval(key[len(name):])
    except (ValueError, SyntaxError):
        return {}
    if not isinstance(settings, dict):
        return {}
    settings["exclude"] = list(settings.get("exclude", ()))
    return settings


def kernel_change_warning(recorded: Mapping[str, str], paths: Mapping[str, str]) -> str | None:
    """What to tell when a parameter's noise now comes from another sampler kernel than in the run resumed from."""
    changed = {name: (recorded[name], path) for name, path in paths.items()
               if name in recorded and recorded[name] != path}
    if not changed:
        return None
    return (
        "HeavyTailNoiseCallback: after resuming, the noise of "
        + ", ".join(f"{name!r} comes from the {new} sampler kernel (the checkpoint's run used {old})"
                    for name, (old, new) in changed.items())
        + ". Both draw the same law but round differently (about 1e-7 relative), so the run is no longer"
        " bitwise the uninterrupted one. See docs/sampler.md (LIGHTNING_HEAVYTAIL_COMPILE)."
    )


def broadcast_from_rank_zero(tensors: list[Tensor]) -> None:
    if not several_ranks():
        return
    for tensor in tensors:
        torch.distributed.broadcast(tensor.data, src=0)
