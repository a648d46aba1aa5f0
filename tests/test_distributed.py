"""The distributed selection and layouts (``_distributed``), and the functional pruning core on sharded modules.

Two real processes (``torch.multiprocessing.spawn``, gloo on the CPU) run the checks below; each rank saves what it
found, and the tests compare both ranks with the single-process answers: ``np.sort`` / ``torch.kthvalue`` of the
gathered values, the rules on whole tensors, ``evaluate_pruning_curve`` in one process.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

pytestmark = pytest.mark.slow
LEVELS = (0.0, 0.3, 0.5, 0.8, 0.95)
WORLD = 2


# ------------------------------------------------------------------------------------------------------ the workers
def selection_cases() -> list[tuple[str, torch.Tensor, list[torch.Tensor]]]:
    """(name, all values, each rank's share): ties, NaN, tiny and empty shards, float32 and float64."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.float64):
        plain = torch.randn(1001, generator=g, dtype=dtype).abs()
        cases.append((f"uneven {dtype}", plain, [plain[:700], plain[700:]]))
        tied = torch.randint(0, 5, (64,), generator=g).to(dtype)  # 5 distinct values, many ties, zeros included
        cases.append((f"ties {dtype}", tied, [tied[:13], tied[13:]]))
        nan = torch.cat([plain[:40], torch.full((7,), math.nan, dtype=dtype), torch.tensor([math.inf], dtype=dtype)])
        cases.append((f"nan {dtype}", nan, [nan[::2], nan[1::2]]))
        cases.append((f"empty shard {dtype}", plain[:9], [plain[:9], plain[:0]]))
        cases.append((f"one value each {dtype}", plain[:2], [plain[:1], plain[1:2]]))
    return cases


def _selection(rank: int) -> dict[str, Any]:
    from lightning_heavytail._distributed import kth_smallest_distributed

    found = {}
    for name, values, shares in selection_cases():
        ks = sorted({1, 2, values.numel() // 3, values.numel() // 2, values.numel() - 1, values.numel()} - {0})
        [column] = kth_smallest_distributed([shares[rank]], [[0, *ks]], torch.device("cpu"))
        found[name] = (ks, column)
    return found


def _sharded(tensor: torch.Tensor, placement: Any) -> torch.Tensor:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor, init_device_mesh("cpu", (WORLD,)), [placement])


def layout_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {name: torch.randn(*shape, generator=g) for name, shape in
            (("rows", (5, 6)), ("columns", (4, 7)), ("one row", (1, 9)), ("replicated", (3, 3)), ("plain", (4, 2)))}


def _layouts(rank: int) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    from lightning_heavytail._distributed import Layout, as_units, squared_sums
    from lightning_heavytail.pruning import REGISTRY

    whole = layout_tensors()
    placements = {"rows": Shard(0), "columns": Shard(1), "one row": Shard(0), "replicated": Replicate()}
    tensors = [_sharded(t, placements[n]) if n in placements else t.clone() for n, t in whole.items()]
    layout = Layout.of(tensors, torch.device("cpu"))
    locals_ = [t.to_local().clone() if hasattr(t, "to_local") else t.clone() for t in tensors]
    norms = [layout.unit_values(i, as_units(local), whole=lambda rows: rows.norm(dim=1), partial=squared_sums,
                                finish=lambda sums: sums.sqrt().float()) for i, local in enumerate(locals_)]
    sizes: list[int] = []  # how many values the distributed selection was given, per call
    real = Layout.kth_smallest

    def counting(self: Any, values: Any, ks: Any) -> Any:  # the real selection, its inputs' sizes recorded
        sizes.extend(v.numel() for v in values)
        return real(self, values, ks)

    written = {}
    Layout.kth_smallest = counting  # type: ignore[method-assign]  # the rules call it through the layout
    try:
        for method in ("global", "layerwise", "neuron"):
            plan = REGISTRY[method].rule(locals_, LEVELS, layout)  # type: ignore[attr-defined]
            outs = [local.clone() for local in locals_]
            written[method] = []
            for level in range(len(LEVELS)):
                for index, (out, backup) in enumerate(zip(outs, locals_, strict=True)):
                    plan.write(level, index, backup, out, None)
                written[method].append(([out.clone() for out in outs], plan.sparsity(level, outs)))
    finally:
        Layout.kth_smallest = real  # type: ignore[method-assign]
    return {"counted": layout.counted, "whole_rows": layout.whole_rows, "norms": norms, "written": written,
            "blocks": [b.indices for b in layout.blocks], "selection_sizes": sizes,
            "local_sizes": [t.numel() for t in locals_]}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.mid, self.out = nn.Linear(6, 15), nn.Linear(15, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.hidden(x)))))


def data(batches: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(batches)]


def _functional(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_heavytail.pruning import evaluate_pruning, evaluate_pruning_curve

    found: dict[str, Any] = {}
    mine = data()[rank::WORLD]  # 3 batches on rank 0, 2 on rank 1: the ranks keep in step
    for per_layer in (True, False):
        torch.manual_seed(0)
        net = Net()
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in (net.hidden, net.mid, net.out) if per_layer else ():
            fully_shard(layer, mesh=mesh)
        fully_shard(net, mesh=mesh)
        before = {n: p.full_tensor().clone() for n, p in net.named_parameters()}
        both = evaluate_pruning(net, mine, LEVELS, methods=("global", "layerwise", "neuron"), epsilon=0.1)
        found[f"curves {per_layer}"] = {m: c.to_dict() for m, c in both.curves.items()}
        found[f"point {per_layer}"] = both.at_epsilon.to_dict() if both.at_epsilon else None
        after = {n: p.full_tensor() for n, p in net.named_parameters()}
        found[f"unchanged {per_layer}"] = all(torch.equal(before[n], after[n]) for n in before)
        found[f"types {per_layer}"] = sorted({type(p).__name__ for p in net.parameters()})
        for method in ("svd", "structured"):
            try:
                evaluate_pruning_curve(net, mine, LEVELS, method=method)
                found[f"{method} {per_layer}"] = "no error"
            except ValueError as err:
                found[f"{method} {per_layer}"] = str(err)
    # NaN predictions on rank 1's second batch only: both ranks raise, at the same point, and neither hangs
    bad = [*mine[:1], (torch.full((8, 6), math.inf), mine[0][1])] if rank == 1 else mine
    try:
        evaluate_pruning_curve(net, bad, LEVELS)
        found["nan"] = "no error"
    except ValueError as err:
        found["nan"] = str(err)
    # Any other error on one rank (a metric's RuntimeError: rank 1's second batch has a target of the wrong shape), in
    # the pass or on the first batch, stops every rank too
    wrong = (mine[1][0], mine[1][1][:5])
    for case, batches in (("other error", [mine[0], wrong]), ("first batch", [wrong, mine[0]])):
        try:
            evaluate_pruning_curve(net, batches if rank == 1 else mine, LEVELS)
            found[case] = "no error"
        except (RuntimeError, ValueError) as err:
            found[case] = f"{type(err).__name__}: {err}"
    # FSDP2 leaves a root-only sharded model gathered after a forward (as Lightning's validation loop leaves it): the
    # evaluation must still see a sharded model and keep the ranks in step over their 3 and 2 batches
    torch.manual_seed(0)
    net = Net()
    fully_shard(net, mesh=init_device_mesh("cpu", (WORLD,)))
    with torch.no_grad():
        net(mine[0][0])
    found["gathered before"] = sorted({type(p).__name__ for p in net.parameters()})
    found["curves after a forward"] = {
        m: c.to_dict() for m, c in evaluate_pruning(net, mine, LEVELS, methods=("global", "neuron")).curves.items()}
    return found


def _worker(rank: int, port: int, out: str) -> None:
    # a short timeout: a rank left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        found = {"selection": _selection(rank), "layouts": _layouts(rank), "functional": _functional(rank)}
        torch.save(found, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("distributed")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


# -------------------------------------------------------------------------------------------------------- the tests
def test_distributed_selection_is_the_kth_value_of_the_gathered_values(ranks: list[dict[str, Any]]) -> None:
    for name, values, _ in selection_cases():
        ks, column = ranks[0]["selection"][name]
        assert repr(ranks[1]["selection"][name]) == repr((ks, column)), name  # the same on both ranks (NaN too)
        assert column[0] is None  # k = 0: nothing pruned
        ordered = np.sort(values.numpy())  # NaN last, like the package's sort
        for k, found in zip(ks, column[1:], strict=True):
            expected = float(ordered[k - 1])
            assert found == expected or (math.isnan(found) and math.isnan(expected)), (name, k)
            if not values.isnan().any():
                assert found == float(torch.kthvalue(values, k).values), (name, k)


def test_layouts_count_every_entry_once_and_give_every_rank_the_unit_norms(ranks: list[dict[str, Any]]) -> None:
    whole = list(layout_tensors().values())
    found = [r["layouts"] for r in ranks]
    # rows: 3 + 2 rows; columns: 4 + 3 columns; one row: rank 1 holds none; replicated and plain: rank 0 counts them
    assert found[0]["counted"] == [True, True, True, True, True]
    assert found[1]["counted"] == [True, True, False, False, False]
    assert found[0]["whole_rows"] == [True, False, True, True, True]
    for rank in range(WORLD):
        for index, tensor in enumerate(whole):
            expected = tensor.norm(dim=1)
            if found[rank]["whole_rows"][index]:
                assert torch.equal(found[rank]["norms"][index], expected), (rank, index)  # bitwise
            else:  # a split row: float64 partial sums of squares added over the ranks
                torch.testing.assert_close(found[rank]["norms"][index], expected, rtol=1e-6, atol=0)


def test_mask_rules_write_each_shard_its_part_of_the_whole_tensors_masks(ranks: list[dict[str, Any]]) -> None:
    from lightning_heavytail._distributed import Layout
    from lightning_heavytail.pruning import REGISTRY

    whole = list(layout_tensors().values())
    single = Layout.of(whole, torch.device("cpu"))
    for method in ("global", "layerwise", "neuron"):
        plan = REGISTRY[method].rule(whole, LEVELS, single)  # type: ignore[attr-defined]
        for level in range(len(LEVELS)):
            outs = [t.clone() for t in whole]
            for index, (out, backup) in enumerate(zip(outs, whole, strict=True)):
                plan.write(level, index, backup, out, None)
            for rank in range(WORLD):
                parts, sparsity = ranks[rank]["layouts"]["written"][method][level]
                assert sparsity == plan.sparsity(level, outs), (method, level, rank)
                for index, (part, out) in enumerate(zip(parts, outs, strict=True)):
                    rows, *rest = ranks[rank]["layouts"]["blocks"][index]
                    expected = out[list(rows)][:, list(rest[0])] if rest else out[list(rows)]
                    assert torch.equal(part, expected), (method, level, rank, index)
            assert any((out == 0).any() for out in outs) or level == 0  # something was pruned


def test_no_rank_gives_the_selection_more_than_the_parts_it_counts(ranks: list[dict[str, Any]]) -> None:
    whole = [t.numel() for t in layout_tensors().values()]
    for rank in range(WORLD):
        found = ranks[rank]["layouts"]
        counted = sum(n for n, counts in zip(found["local_sizes"], found["counted"], strict=True) if counts)
        assert found["selection_sizes"], "the distributed selection ran"
        assert max(found["selection_sizes"]) <= counted < sum(whole)  # rank 0: 60 of 84 values, rank 1: 24
    assert sum(max(r["layouts"]["selection_sizes"]) for r in ranks) == sum(whole)  # together: each value once


def test_functional_curves_of_a_fully_sharded_module_equal_the_single_process_curves(
        ranks: list[dict[str, Any]]) -> None:
    from lightning_heavytail.pruning import evaluate_at_epsilon

    torch.manual_seed(0)
    net = Net()
    for per_layer in (True, False):
        for rank in range(WORLD):
            found = ranks[rank]["functional"]
            assert found[f"types {per_layer}"] == ["DTensor"]
            assert found[f"unchanged {per_layer}"]  # every shard restored bitwise
            for method, curve in found[f"curves {per_layer}"].items():
                alone = evaluate_pruning_curve_of(net, method)
                assert curve == alone, (per_layer, rank, method)
                assert len(set(curve["metrics"]["accuracy"])) > 1
            assert found[f"point {per_layer}"] == evaluate_at_epsilon(net, data(), epsilon=0.1).to_dict()
            assert "sharded" in found[f"svd {per_layer}"] and "'global', 'layerwise', 'neuron'" in found[
                f"svd {per_layer}"]
            assert "sharded parameters" in found[f"structured {per_layer}"]
            assert "'neuron'" in found[f"structured {per_layer}"]


def evaluate_pruning_curve_of(net: nn.Module, method: str) -> dict[str, Any]:
    from lightning_heavytail.pruning import evaluate_pruning_curve

    return evaluate_pruning_curve(net, data(), LEVELS, method=method).to_dict()


def test_predictions_refused_on_one_rank_stop_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert "NaN or infinity (method='global' at sparsity 0.0)" in ranks[1]["functional"]["nan"]
    assert "refused on another rank" in ranks[0]["functional"]["nan"]


@pytest.mark.parametrize("case", ["other error", "first batch"])
def test_any_error_on_one_rank_stops_every_rank(ranks: list[dict[str, Any]], case: str) -> None:
    assert "must match the size of tensor b (5)" in ranks[1]["functional"][case]  # the metric's error, on its rank
    assert ranks[0]["functional"][case] == "ValueError: The evaluation was refused on another rank (see its error)"


def test_a_root_only_sharded_model_left_gathered_by_a_forward_is_evaluated_sharded(
        ranks: list[dict[str, Any]]) -> None:
    torch.manual_seed(0)
    net = Net()
    for rank in range(WORLD):
        found = ranks[rank]["functional"]
        assert found["gathered before"] == ["Parameter"]  # no DTensor: what fooled the check of the parameters' types
        for method in ("global", "neuron"):
            assert found["curves after a forward"][method] == evaluate_pruning_curve_of(net, method)
