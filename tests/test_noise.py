import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from lightning_heavytail.noise import (
    NoiseTarget,
    NonFiniteParameterError,
    add_heavy_tailed_noise,
    add_heavy_tailed_noise_groups,
    draw_noise,
    name_key,
    noise_key,
    noise_scale,
)
from lightning_heavytail.sharding import LocalBlock
from lightning_heavytail.stable import derive_key, stable_at


def test_noise_scale_follows_lr_to_the_one_over_alpha():
    for lr in (1e-3, 0.01, 0.5):
        assert noise_scale(0.003, lr, 1.75) == pytest.approx(0.003 * math.exp(math.log(lr) / 1.75))
    assert noise_scale(0.2, 0.01, 1.5, lr_scaling=False) == 0.2
    assert noise_scale(0.2, 0.0, 1.5) == 0.0


def test_neuron_noise_is_one_draw_per_output_unit_broadcast_over_its_weights():
    net = nn.Conv2d(3, 5, kernel_size=3, bias=False)
    before = net.weight.detach().clone()
    add_heavy_tailed_noise(net.named_parameters(), 1.5, 0.1, structure="neuron", seed=3, step=7)
    delta = (net.weight.detach() - before).reshape(5, -1)
    # every filter moved by one common amount, and the filters by different amounts
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-6)
    assert delta[:, 0].unique().numel() == 5


def test_noise_is_a_pure_function_of_seed_step_and_name():
    def noised(names, seed, step):
        params = {n: nn.Parameter(torch.zeros(6, 4)) for n in names}
        add_heavy_tailed_noise(params.items(), 1.8, 1.0, seed=seed, step=step)
        return {n: p.detach() for n, p in params.items()}

    a = noised(["x", "y"], seed=1, step=5)
    b = noised(["y", "x", "z"], seed=1, step=5)  # other order, another parameter: same noise for x and y
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert not torch.equal(a["x"], a["y"])
    assert not torch.equal(a["x"], noised(["x"], seed=1, step=6)["x"])
    assert not torch.equal(a["x"], noised(["x"], seed=2, step=5)["x"])
    # and it is exactly scale * the stream noise_key(seed, step, name) read at each entry's flat index
    assert torch.equal(a["x"], stable_at(1.8, noise_key(1, 5, "x"), range(24)).reshape(6, 4))
    step_key, words = derive_key(1, 5), name_key("x")
    assert noise_key(1, 5, "x") == (step_key[0] ^ words[0], step_key[1] ^ words[1])


@pytest.mark.parametrize("structure", ["iid", "elliptical"])
@pytest.mark.parametrize("alpha", [1.2, 1.8])
def test_noise_marginals_are_sas_with_the_requested_scale(structure, alpha):
    scale = 0.05
    p = nn.Parameter(torch.zeros(400, 50))
    add_heavy_tailed_noise([("w", p)], alpha, scale, structure=structure, seed=11, step=0)
    x = p.detach().numpy()[:, :3].ravel()  # within a unit elliptical coordinates are dependent: use few per unit
    pvalue = scipy.stats.kstest(x, scipy.stats.levy_stable(alpha, 0.0, scale=scale).cdf).pvalue
    assert pvalue > 1e-3


def test_elliptical_coordinates_share_one_mixing_variable_per_unit():
    def abs_corr(structure):
        x = draw_noise((4000, 2), 1.5, structure=structure, generator=torch.Generator().manual_seed(0))
        logs = torch.log(x.abs().double())
        return float(torch.corrcoef(logs.T)[0, 1])

    assert abs_corr("elliptical") > 0.12  # a large mixing variable makes the whole unit large (~0.2)
    assert abs(abs_corr("iid")) < 0.06  # sd of the estimate ~0.016


def test_alpha_two_elliptical_is_gaussian_n02():
    x = draw_noise((20000, 3), 2.0, structure="elliptical", generator=torch.Generator().manual_seed(0))
    assert scipy.stats.kstest(x.numpy().ravel(), scipy.stats.norm(scale=math.sqrt(2)).cdf).pvalue > 1e-3


def test_zero_scale_changes_nothing():
    net = nn.Linear(4, 3)
    before = net.weight.detach().clone()
    stats = add_heavy_tailed_noise(net.named_parameters(), 1.5, 0.0)
    assert torch.equal(net.weight, before) and stats.noised == []


def test_nonfinite_parameter_raises_naming_it_and_leaves_every_parameter_unchanged():
    first, bad = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
    with torch.no_grad():
        bad[1, 2] = float("nan")
    snapshot = [first.detach().clone(), bad.detach().clone()]
    with pytest.raises(NonFiniteParameterError, match=r"'layer2.weight'.*step 42"):
        add_heavy_tailed_noise([("layer1.weight", first), ("layer2.weight", bad)], 1.5, 0.1, step=42)
    assert torch.equal(first, snapshot[0])
    assert torch.equal(bad.isnan(), snapshot[1].isnan()) and torch.equal(bad.nan_to_num(), snapshot[1].nan_to_num())


def test_skip_policy_noises_the_finite_parameters_only():
    first, bad = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.full((3, 3), float("inf")))
    stats = add_heavy_tailed_noise([("a", first), ("b", bad)], 1.5, 0.1, on_nonfinite="skip")
    assert stats.noised == ["a"] and stats.skipped == ["b"]
    assert not torch.equal(first, torch.ones(3, 3))


def test_fp16_overflow_is_refused_before_anything_is_written():
    p = nn.Parameter(torch.full((64, 64), 65000.0, dtype=torch.float16))
    q = nn.Parameter(torch.zeros(4, 4))
    before = p.detach().clone()
    with pytest.raises(NonFiniteParameterError, match="overflow"):
        add_heavy_tailed_noise([("q", q), ("p", p)], 1.2, 1000.0)
    assert torch.equal(p, before) and torch.equal(q, torch.zeros(4, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_parameters_get_finite_noise_of_their_dtype(dtype):
    p = nn.Parameter(torch.zeros(256, 256, dtype=dtype))
    add_heavy_tailed_noise([("p", p)], 0.8, 0.01, seed=0)
    assert p.dtype == dtype and bool(torch.isfinite(p).all()) and bool((p != 0).any())


def test_max_abs_noise_is_reported_when_tracked():
    p = nn.Parameter(torch.zeros(10, 10))
    stats = add_heavy_tailed_noise([("p", p)], 1.5, 0.1, track_max=True)
    assert stats.max_abs_noise == pytest.approx(float(p.detach().abs().max()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(alpha=2.5, scale=0.1), "alpha"),
        (dict(alpha=0.0, scale=0.1), "alpha"),
        (dict(alpha=1.5, scale=-1.0), "scale"),
        (dict(alpha=1.5, scale=float("nan")), "scale"),
        (dict(alpha=1.5, scale=1e20), "scale"),
        (dict(alpha=1.5, scale=0.1, structure="row"), "structure"),
        (dict(alpha=1.5, scale=0.1, on_nonfinite="nan"), "on_nonfinite"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        add_heavy_tailed_noise([("p", nn.Parameter(torch.zeros(2, 2)))], **kwargs)


def test_noise_runs_on_the_parameters_device_without_autograd():
    p = nn.Parameter(torch.zeros(3, 3))
    add_heavy_tailed_noise([("p", p)], 1.5, 0.1)
    assert p.grad_fn is None and p.requires_grad and np.isfinite(p.detach().numpy()).all()


def test_noise_scale_saturates_to_inf_instead_of_overflowing_and_is_refused():
    from lightning_heavytail.noise import check_noise_scale

    assert noise_scale(1.0, 1e10, 0.01) == math.inf
    with pytest.raises(ValueError, match="at most 1e\\+15"):
        check_noise_scale(noise_scale(1.0, 1e10, 0.05))


def test_heavy_alpha_below_one_half_is_checked_for_float32_overflow():
    weight = torch.full((64, 64), 3.4e38)  # finite, next to float32's largest value
    before = weight.clone()
    with pytest.raises(NonFiniteParameterError, match="overflow"):  # at alpha 0.1, |X| > 1e20 for ~1% of draws
        add_heavy_tailed_noise([("w", weight)], alpha=0.1, scale=1e15, seed=0, step=0)
    assert torch.equal(weight, before)


def test_a_name_given_twice_is_refused_before_anything_is_written():
    # e.g. two models' named_parameters() concatenated: both "weight" tensors would get identical noise
    a, b = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False)
    before = [a.weight.detach().clone(), b.weight.detach().clone()]
    with pytest.raises(ValueError, match=r"'weight' is given twice.*identical noise"):
        add_heavy_tailed_noise([*a.named_parameters(), *b.named_parameters()], 1.8, 0.1)
    with pytest.raises(ValueError, match="'w' is given twice"):
        add_heavy_tailed_noise_groups([([("w", a.weight)], 0.1), ([("w", b.weight)], 0.2)], 1.8)
    with pytest.raises(ValueError, match="same tensor is given as 'x' and as 'y'"):
        add_heavy_tailed_noise([("x", a.weight), ("y", a.weight)], 1.8, 0.1)
    assert torch.equal(a.weight, before[0]) and torch.equal(b.weight, before[1])


def test_complex_and_integer_tensors_are_refused_with_their_name():
    with pytest.raises(TypeError, match=r"'c' must be a real floating point tensor.*complex64"):
        add_heavy_tailed_noise([("c", torch.zeros(2, 2, dtype=torch.complex64))], 1.8, 0.1)
    with pytest.raises(TypeError, match=r"'i' must be a real floating point tensor.*int64"):
        add_heavy_tailed_noise([("i", torch.zeros(2, 2, dtype=torch.int64))], 1.8, 0.1)


@pytest.mark.parametrize("structure", ["iid", "neuron", "elliptical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_block_of_a_parameter_gets_exactly_its_slice_of_the_whole_noise(structure, dtype):
    # What sharding relies on: the noise is drawn by global index, so any block (rows i..j as FSDP shards them,
    # columns as tensor parallelism does, an empty block) gets the slice the whole tensor would get.
    whole = torch.zeros(7, 5, 3, dtype=dtype)
    add_heavy_tailed_noise([("w", whole)], 1.6, 0.1, structure=structure, seed=4, step=9)
    for offsets, local in [((0, 0, 0), (3, 5, 3)), ((3, 0, 0), (4, 5, 3)), ((6, 0, 0), (1, 5, 3)),
                           ((0, 2, 0), (7, 3, 3)), ((2, 1, 1), (3, 2, 2)), ((7, 0, 0), (0, 5, 3))]:
        part = torch.zeros(local, dtype=dtype)
        block = LocalBlock.from_offsets(whole.shape, offsets, local)
        add_heavy_tailed_noise([NoiseTarget("w", part, block)], 1.6, 0.1, structure=structure, seed=4, step=9)
        index = tuple(slice(o, o + n) for o, n in zip(offsets, local, strict=True))
        assert torch.equal(part, whole[index]), (offsets, local)


def test_noise_accepts_numpy_integers_for_seed_and_step():
    p, q = torch.zeros(3, 3), torch.zeros(3, 3)
    add_heavy_tailed_noise([("w", p)], 1.8, 0.1, seed=np.int64(3), step=np.int32(2))
    add_heavy_tailed_noise([("w", q)], np.float32(1.8), 0.1, seed=3, step=2)
    assert torch.equal(p, q) and bool((p != 0).all())


@pytest.mark.parametrize("structure", ["iid", "neuron", "elliptical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_batched_noise_is_bitwise_the_noise_each_parameter_gets_alone(structure, dtype):
    # Many small parameters share one sampler call and one _foreach_add_ per shape; that must not change a bit.
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4, 3), (7,), (2, 3, 2), (4, 3), (1, 5), ()]
    params = [torch.randn(shape, generator=g).to(dtype) for shape in shapes]
    names = [f"p{i}" for i in range(len(shapes))]
    together = [p.clone() for p in params]
    groups = [([(n, p) for n, p in zip(names[:4], together[:4], strict=True)], 0.1),
              ([(n, p) for n, p in zip(names[4:], together[4:], strict=True)], 0.03)]
    stats = add_heavy_tailed_noise_groups(groups, 1.6, structure=structure, seed=8, step=2, track_max=True)
    largest = 0.0
    for i, (name, param) in enumerate(zip(names, params, strict=True)):
        alone = param.clone()
        scale = 0.1 if i < 4 else 0.03
        single = add_heavy_tailed_noise([(name, alone)], 1.6, scale, structure=structure, seed=8, step=2,
                                        track_max=True)
        assert torch.equal(alone, together[i]), (name, shapes[i])
        largest = max(largest, single.max_abs_noise)
    assert stats.max_abs_noise == largest and set(stats.paths.values()) == {"eager"}


def test_fp16_noise_is_added_in_float32_and_rounded_once():
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(8, 8, generator=g).half() for _ in range(3)]
    before = [p.clone() for p in params]
    add_heavy_tailed_noise([(f"h{i}", p) for i, p in enumerate(params)], 1.7, 0.01, structure="iid", seed=3, step=1)
    for i, (p, b) in enumerate(zip(params, before, strict=True)):
        noise = torch.zeros(8, 8)
        add_heavy_tailed_noise([(f"h{i}", noise)], 1.7, 0.01, structure="iid", seed=3, step=1)
        assert torch.equal(p, (b.float() + noise).half())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_many_parameters_are_checked_in_one_pass_and_the_culprit_is_named(bad):
    # Beyond a few tensors the check is one fused pass over all of them; it must still find any inf or NaN, name the
    # parameter, and leave every parameter bitwise as it was.
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 4, generator=g) for _ in range(20)]
    params[13][2, 1] = bad
    before = [p.clone() for p in params]
    with pytest.raises(NonFiniteParameterError, match="'p13' holds inf or NaN"):
        add_heavy_tailed_noise([(f"p{i}", p) for i, p in enumerate(params)], 1.7, 0.1, structure="iid")
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b) or (bad != bad and torch.equal(p.nan_to_num(), b.nan_to_num()))
    stats = add_heavy_tailed_noise([(f"p{i}", p) for i, p in enumerate(params)], 1.7, 0.1, on_nonfinite="skip")
    assert stats.skipped == ["p13"] and len(stats.noised) == 19
