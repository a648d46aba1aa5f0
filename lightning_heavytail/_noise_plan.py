"""The noise of many parameters at one step, drawn and added in a few batched operations (``NoisePlan``).

A step's noise is a pure function of (seed, step, name, global index), whatever the batching: the plan only decides
how many parameters share one call of the sampler and one ``torch._foreach_add_``. Small parameters of one device and
compute dtype are concatenated into one counter space (a segment per parameter); a parameter with at least
``_BATCH_MAX_DRAWS`` draws per step is drawn on its own, by the kernel its whole size selects
(``stable.choose_path``). Everything that depends only on the parameters (segments, indices, name keys, groups of
equal shapes) is built once, when the plan is made; per step the work is a fixed number of tensor operations per
batch and per run of equally shaped parameters, plus one fused norm for the non-finite check.

The keys and the single-parameter draws are in ``_noise_draws``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_heavytail._counters import choose_path, counter_draws
from lightning_heavytail._distributed import collective_device, every_rank, several_ranks
from lightning_heavytail._noise_draws import (
    HEAVIEST_SAFE_ALPHA,
    MIXING_WORDS,
    NoiseTarget,
    as_target,
    check_distinct,
    draw_count,
    is_narrow,
    name_key,
    scaled_noise,
    stream_key,
    unit_shape,
)
from lightning_heavytail._tensors import all_finite, compute_dtype
from lightning_heavytail.sharding import is_sharded, local_tensor
from lightning_heavytail.stable import derive_key

# A parameter with at least this many draws per step is drawn alone (no index or key tensors are built for it, and
# its noise is not held together with others'); below it, parameters of one device and dtype share batches of at most
# _BATCH_DRAWS draws. Only parameters the eager kernel draws are batched (the kernel is chosen by the whole parameter's
# size, as when it is drawn alone).
_BATCH_MAX_DRAWS = 1 << 16
_BATCH_DRAWS = 1 << 20
# Up to this many tensors of a device and dtype, the finiteness check sums them one by one; beyond, one fused norm.
_SUMMED_ONE_BY_ONE = 8


class NonFiniteParameterError(FloatingPointError):
    """A selected parameter holds inf or NaN at a noise step (the message names it and the step)."""


@dataclass
class NoiseStats:
    """What one call of ``add_heavy_tailed_noise`` did.

    Attributes:
        noised: names of the parameters that received noise.
        skipped: names of the parameters left untouched because they were (or would become) non-finite.
        max_abs_noise: the largest |noise| added, when asked for (``track_max=True``), else ``None``.
        paths: for each noised parameter, the sampler kernel that drew its noise, ``"eager"`` or ``"compiled"``
            (see ``lightning_heavytail.stable.COMPILE_MIN_DRAWS``): the two round differently in the last bits.
    """

    noised: list[str]
    skipped: list[str]
    max_abs_noise: float | None = None
    paths: dict[str, str] = field(default_factory=dict)


def _index(values: range | Tensor) -> Tensor:
    return torch.arange(values.start, values.stop) if isinstance(values, range) else values.cpu()


@dataclass
class _Segments:
    """What a batched draw needs, built once: every draw's member and global index, every member's name key."""

    runs: list[tuple[torch.Size, list[int]]]  # consecutive members of equal shapes (members are sorted by shape)
    main_seg: Tensor  # the member of every main draw (units for neuron, entries otherwise)
    main_index: Tensor  # the global index of every main draw in its member's stream
    row_seg: Tensor  # the member of every unit (elliptical mixing variables)
    row_index: Tensor
    words: Tensor  # name_key of every member, (members, 2)

    @classmethod
    def of(cls, members: list[int], targets: Sequence[NoiseTarget], structure: str, device: torch.device) -> _Segments:
        blocks = [targets[i].block for i in members]
        rows = [_index(block.rows()) for block in blocks]
        main = rows if structure == "neuron" else [_index(block.flat_index(torch.device("cpu"))) for block in blocks]
        positions = torch.arange(len(blocks))
        return cls(
            runs=[(shape, list(group)) for shape, group in itertools.groupby(
                members, key=lambda i: targets[i].block.local_shape)],
            main_seg=positions.repeat_interleave(torch.tensor([len(m) for m in main])).to(device),
            main_index=torch.cat(main).to(device),
            row_seg=positions.repeat_interleave(torch.tensor([len(r) for r in rows])).to(device),
            row_index=torch.cat(rows).to(device),
            words=torch.tensor([name_key(targets[i].name) for i in members], dtype=torch.int64, device=device),
        )


@dataclass
class _Batch:
    """Targets drawn by one sampler call: several small ones (eager, ``segments`` set), or one alone."""

    members: list[int]  # positions in the plan's target list; sorted by shape when batched
    device: torch.device
    dtype: torch.dtype
    segments: _Segments | None = None


def _plan_batches(targets: Sequence[NoiseTarget], structure: str) -> list[_Batch]:
    batches: list[_Batch] = []
    small: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, target in enumerate(targets):
        device, dtype = target.tensor.device, compute_dtype(target.tensor.dtype)
        count = draw_count(target.block.global_shape, structure)
        if choose_path(count, device) == "compiled" or count >= _BATCH_MAX_DRAWS or target.tensor.numel() == 0:
            batches.append(_Batch([i], device, dtype))
        else:
            small.setdefault((device, dtype), []).append(i)
    for (device, dtype), members in small.items():
        members.sort(key=lambda i: tuple(targets[i].block.local_shape))
        size, current = 0, list[int]()
        for i in members:
            draws = draw_count(targets[i].block.local_shape, structure)
            if current and size + draws > _BATCH_DRAWS:
                batches.append(_Batch(current, device, dtype))
                size, current = 0, []
            current.append(i)
            size += draws
        if current:
            batches.append(_Batch(current, device, dtype))
    for batch in batches:
        if len(batch.members) > 1:
            batch.segments = _Segments.of(batch.members, targets, structure, batch.device)
    return batches


def _none_non_finite(tensors: list[Tensor], device: torch.device) -> bool:
    """True if no tensor holds inf or NaN, in one fused pass (False also where the fused op is unavailable)."""
    found = torch.zeros(1, device=device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones(1, device=device))
    except (RuntimeError, NotImplementedError):  # pragma: no cover - an old torch without the CPU kernel
        return False
    return not bool(found.item())


def all_ranks_max(values: Tensor) -> Tensor:
    """The elementwise max of ``values`` over all ranks (a no-op outside a process group)."""
    if not several_ranks():
        return values
    reduced = values.to(collective_device())
    torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
    return reduced.to(values.device)


class NoisePlan:
    """How a fixed list of parameters gets its noise: built once, then ``apply``-ed at every step.

    Building it groups the parameters into batches and precomputes their segments, indices and name keys; ``apply``
    then checks every parameter (one fused norm, one device sync), draws each batch's noise in one sampler call, and
    adds it with one ``torch._foreach_add_`` per run of equally shaped parameters. The noise is bitwise what
    ``add_heavy_tailed_noise`` gives each parameter alone.

    Args:
        named: ``(name, parameter)`` pairs or ``NoiseTarget``s; DTensors contribute their local part.
        structure: ``"iid"``, ``"neuron"`` or ``"elliptical"``.

    Raises:
        ValueError: for a name, or a tensor, given twice.
        TypeError: for a tensor that is not real floating point.
    """

    def __init__(self, named: Sequence[tuple[str, Tensor] | NoiseTarget], structure: str) -> None:
        self.structure = structure
        # a DTensor's local part is read once; is_current() checks that it is still the parameter's storage
        self._sources = [item[1] if not isinstance(item, NoiseTarget) and is_sharded(item[1]) else None
                         for item in named]
        self.targets = [as_target(item) for item in named]
        check_distinct(self.targets)
        self.sharded = any(target.sharded for target in self.targets)
        self._layout = self._signature()
        self._batches = _plan_batches(self.targets, structure)
        norm_groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, target in enumerate(self.targets):
            norm_groups.setdefault((target.tensor.device, compute_dtype(target.tensor.dtype)), []).append(i)
        self._norm_groups = list(norm_groups.items())
        # which tensors need the overflow check (dtypes do not change while the plan is current, see is_current)
        self._narrow = {i for i, target in enumerate(self.targets) if is_narrow(target.tensor.dtype)}
        self._not_float64 = {i for i, target in enumerate(self.targets) if target.tensor.dtype != torch.float64}

    def _signature(self) -> list[tuple[torch.Size, torch.dtype, torch.device]]:
        return [(target.tensor.shape, target.tensor.dtype, target.tensor.device) for target in self.targets]

    def is_current(self) -> bool:
        """Whether every tensor still has the shape, dtype and device (and storage, for DTensors) it was built for."""
        if self._signature() != self._layout:
            return False
        return all(source is None or local_tensor(source).data_ptr() == target.tensor.data_ptr()
                   for source, target in zip(self._sources, self.targets, strict=True))

    def _finite(self, work: set[int]) -> dict[int, bool]:
        """Whether each target in ``work`` is finite: one reduction pass per device and dtype, one sync each.

        A few tensors are summed one by one (a sum reads each entry once, and is inf or NaN whenever a tensor holds
        inf or NaN). Many take one fused call, not one per tensor: GradScaler's non-finite check, with a factor of 1
        (which writes every value back unchanged), then, only if it finds something, the per-tensor test that names
        the culprit. A sum can also overflow for huge finite values, so the tensors it flags get the exact test.
        """
        finite: dict[int, bool] = {}
        for (device, dtype), group in self._norm_groups:
            members = [i for i in group if i in work]
            if not members:
                continue
            tensors = [self.targets[i].tensor for i in members]
            if len(tensors) > _SUMMED_ONE_BY_ONE and _none_non_finite(tensors, device):
                finite.update((i, True) for i in members)
                continue
            sums = torch.stack([tensor.sum(dtype=dtype) for tensor in tensors])
            for i, ok in zip(members, sums.isfinite().tolist(), strict=True):
                finite[i] = bool(ok) or all_finite(self.targets[i].tensor)
        return finite

    def _problems(self, work: list[int], scales: Sequence[float], alpha: float, step: int,
                  step_key: tuple[int, int]) -> dict[int, str]:
        """Why adding noise to a target now would train on inf/NaN, agreed by every rank under sharding."""
        finite = self._finite(set(work))
        problems: dict[int, str] = {}
        for i in work:
            target = self.targets[i]
            if not finite[i]:
                problems[i] = (
                    f"parameter {target.name!r} holds inf or NaN at noise step {step}, before noise was added: the"
                    " optimizer step produced it (check the loss, the learning rate and the gradients)."
                )
            elif i in self._narrow or (alpha < HEAVIEST_SAFE_ALPHA and i in self._not_float64):
                # Draw the noise to check, and again to apply, rather than hold a float32 copy of every fp16 tensor.
                noise, _ = scaled_noise(target, alpha, scales[i], self.structure, stream_key(step_key, target.name))
                if not bool((target.tensor.float() + noise).abs().max() <= torch.finfo(target.tensor.dtype).max):
                    problems[i] = (
                        f"noise would overflow parameter {target.name!r} ({target.tensor.dtype}) at noise step {step};"
                        " nothing was changed. Lower sigma or keep master weights in float32."
                    )
        if self.sharded and several_ranks():
            # the rank whose part holds the problem must not be the only one to stop: a hang, or a parameter noised on
            # some ranks only. One all-reduce of one flag per target.
            fine = every_rank([i not in problems for i in work], collective_device())
            for i, ok in zip(work, fine, strict=True):
                if not ok and i not in problems:
                    problems[i] = (
                        f"parameter {self.targets[i].name!r} holds inf or NaN, or would overflow, in another rank's"
                        f" part at noise step {step}; nothing was changed on any rank."
                    )
        return problems

    @torch.no_grad()
    def apply(self, scales: Sequence[float], alpha: float, *, seed: int, step: int, on_nonfinite: str = "raise",
              track_max: bool = False) -> NoiseStats:
        """Add one step's noise, ``scales[i]`` times the scale-1 noise of target ``i``; all checks before any write.

        Raises:
            NonFiniteParameterError: with ``on_nonfinite="raise"``, before anything is changed.
        """
        stats = NoiseStats(noised=[], skipped=[], max_abs_noise=0.0 if track_max else None)
        work = [i for i, scale in enumerate(scales) if scale > 0.0]
        step_key = derive_key(seed, step)
        skipped: set[int] = set()
        if on_nonfinite != "ignore" and work:
            for i, problem in sorted(self._problems(work, scales, alpha, step, step_key).items()):
                if on_nonfinite == "raise":
                    raise NonFiniteParameterError(problem + " Pass on_nonfinite='skip' to leave such parameters alone.")
                skipped.add(i)
                stats.skipped.append(self.targets[i].name)
        todo = set(work) - skipped
        largest = torch.zeros((), dtype=torch.float64)
        for batch in self._batches:
            if not todo.intersection(batch.members):
                continue
            for noise in self._add_batch(batch, todo, scales, alpha, step_key, stats):
                if track_max and noise.numel() > 0:
                    largest = torch.maximum(largest, noise.abs().max().double().cpu())
        stats.noised = [self.targets[i].name for i in sorted(todo)]
        if track_max:
            # the largest over the whole parameters: under sharding each rank saw only its part
            stats.max_abs_noise = float(all_ranks_max(largest) if self.sharded else largest)
        return stats

    def _add_batch(self, batch: _Batch, todo: set[int], scales: Sequence[float], alpha: float,
                   step_key: tuple[int, int], stats: NoiseStats) -> list[Tensor]:
        """Draw and add one batch's noise; the noise tensors drawn (whole batches: one buffer per run)."""
        if batch.segments is None:
            (i,) = batch.members
            target = self.targets[i]
            noise, stats.paths[target.name] = scaled_noise(target, alpha, scales[i], self.structure,
                                                           stream_key(step_key, target.name))
            target.tensor.add_(noise)  # fp16/bf16: computed in float32, rounded once
            return [noise]
        draws, mixing = self._batch_draws(batch, batch.segments, step_key, alpha)
        finfo = torch.finfo(batch.dtype)
        drawn, offset, row_offset = [], 0, 0
        for shape, members in batch.segments.runs:
            units = unit_shape(shape)
            per_member = units if self.structure == "neuron" else shape
            size = per_member.numel() * len(members)
            block = draws[offset:offset + size].view(len(members), *per_member)
            offset += size
            if mixing is not None:
                rows = units.numel() * len(members)
                block = block.mul_(mixing[row_offset:row_offset + rows].sqrt().view(len(members), *units))
                row_offset += rows
            # the operations of scaled_noise, in its order, so every member gets bitwise its noise drawn alone
            run_scales = [scales[i] for i in members]
            if len(set(run_scales)) == 1:
                block = block.mul_(run_scales[0])
            else:
                factor = torch.tensor(run_scales, dtype=batch.dtype, device=batch.device)
                block = block.mul_(factor.view(len(members), *([1] * len(per_member))))
            block = block.clamp_(finfo.min, finfo.max)
            noises = block.expand(len(members), *shape).unbind(0)
            chosen = [k for k, i in enumerate(members) if i in todo]
            torch._foreach_add_([self.targets[members[k]].tensor for k in chosen], [noises[k] for k in chosen])
            drawn.append(block[chosen] if len(chosen) < len(members) else block)
            stats.paths.update((self.targets[members[k]].name, "eager") for k in chosen)
        return drawn

    def _batch_draws(self, batch: _Batch, segments: _Segments, step_key: tuple[int, int],
                     alpha: float) -> tuple[Tensor, Tensor | None]:
        """Scale-1 draws of a batch, concatenated in member order.

        Units (neuron) or entries row-major; for elliptical the Gaussian part times sqrt(2), and the mixing variable
        of every unit (None at alpha 2).
        """
        words = segments.words ^ torch.tensor(step_key, dtype=torch.int64, device=batch.device)
        seg_words = words[segments.main_seg]
        # alpha as a tensor of the compute dtype, as stable._run passes it: (1 - alpha) / alpha must round alike
        alpha_t = torch.tensor(alpha, dtype=batch.dtype, device=batch.device)
        kind = "normal" if self.structure == "elliptical" else "stable"
        draws = counter_draws(kind, seg_words[:, 0], seg_words[:, 1], segments.main_index, alpha_t, batch.dtype)
        if self.structure != "elliptical":
            return draws, None
        draws = draws.mul_(math.sqrt(2.0))
        if alpha == 2.0:
            return draws, None
        row_words = (words ^ torch.tensor(MIXING_WORDS, device=batch.device))[segments.row_seg]
        half_alpha = torch.tensor(alpha / 2.0, dtype=batch.dtype, device=batch.device)
        mixing = counter_draws("positive_stable", row_words[:, 0], row_words[:, 1], segments.row_index, half_alpha,
                               batch.dtype)
        return draws, mixing

