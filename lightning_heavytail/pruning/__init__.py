r"""Pruning curves: a model's metric at several sparsity levels, without changing the model.

The package, by role:

- ``curve``: what an evaluation returns (``PruningCurve``, ``EpsilonPoint``) and the labels of levels.
- ``methods``: the methods and their rules, chosen by name through one registry (``REGISTRY``), see there for
  each method's rule: ``"global"``, ``"layerwise"``, ``"neuron"`` (the paper's), ``"svd"`` and ``"structured"``.
- ``evaluate``: ``evaluate_pruning_curve``, ``evaluate_pruning`` (several methods and the epsilon point in one pass) and
  ``check_prunable``.
- ``epsilon``: the paper's measurement, ``evaluate_at_epsilon``, and ``evaluate_at_ratios``.

What is pruned: ``params=None`` (the default) prunes the weights (tensors with 2+ dimensions) the forward pass uses
to compute the predictions, less the output layer (the last weight used before the predictions are made) and the first
conv (the first conv kernel used), for every method, as the paper does. Both are found by recording, on one forward
pass, which torch calls receive which parameter (a ``TorchFunctionMode``), so registration order, a frozen output
layer or a weight tied to an embedding do not mislead it. A parametrized tensor (``torch.nn.utils.parametrize``, e.g.
``parametrizations.weight_norm``) is pruned as the effective tensor the module computes, named like a plain one
(``0.weight``; see ``tensor_view``): its pruned value comes from a parametrization appended for the evaluation, and the
originals (the magnitude ``g`` and direction ``v`` of a weight norm) are never written.

What is checked first: the evaluation's forward runs once on the first batch, the way the evaluation runs it (eval
mode, no grad, model and RNG left as they were), and an output that cannot be scored is refused with an error saying
what came back and how to fix it: a dict or tuple (``output_key``, ``forward_fn``), ``(N, 1)`` scores or float targets
with the default accuracy (a binary or regression metric), complex predictions, a metric that fails on the output. NaN
or infinite predictions are refused there and at every level: they are never scored.

One pass over the data: each batch is loaded once and every level (of every method, with ``evaluate_pruning``) runs
on it in turn, each scored into its own copy of the metrics; a rule's values for every level are computed once per
evaluation (one sort), and writing a level for a batch costs a small part of a forward pass (see ``_plans``).

The model is never changed: the in-place methods keep one backup of the selected tensors, write each level in place
and restore the weights in a ``finally`` block; evaluation runs under ``torch.no_grad()``.

References:
    M. Barsbey, M. Sefidgaran, M. A. Erdogdu, G. Richard, U. Şimşekli, "Heavy tails in SGD and compressibility of
    overparametrized neural networks", NeurIPS 2021.
    Y. Wan, M. Barsbey, A. Zaidi, U. Şimşekli, "Implicit compressibility of overparametrized neural networks trained
    with heavy-tailed SGD", ICML 2024 (arXiv 2306.08125).
    G. Fang, X. Ma, M. Song, M. B. Mi, X. Wang, "DepGraph: towards any structural pruning", CVPR 2023 (torch-pruning).
"""

from lightning_heavytail._checks import validate_epsilon, validate_forward, validate_sparsities
from lightning_heavytail.pruning._evaluator import rng_preserved
from lightning_heavytail.pruning._scoring import ForwardFn, OutputKey
from lightning_heavytail.pruning._targets import tensor_view
from lightning_heavytail.pruning.curve import DEFAULT_METRIC_KEY, EpsilonPoint, PruningCurve, level_label
from lightning_heavytail.pruning.epsilon import evaluate_at_epsilon, evaluate_at_ratios, prunable_units
from lightning_heavytail.pruning.evaluate import (
    PruningCheck,
    PruningEvaluation,
    check_prunable,
    evaluate_pruning,
    evaluate_pruning_curve,
)
from lightning_heavytail.pruning.methods import MASK_METHODS, PRUNING_METHODS, REGISTRY, validate_method

__all__ = [
    "DEFAULT_METRIC_KEY",
    "MASK_METHODS",
    "PRUNING_METHODS",
    "REGISTRY",
    "EpsilonPoint",
    "ForwardFn",
    "OutputKey",
    "PruningCheck",
    "PruningCurve",
    "PruningEvaluation",
    "check_prunable",
    "evaluate_at_epsilon",
    "evaluate_at_ratios",
    "evaluate_pruning",
    "evaluate_pruning_curve",
    "level_label",
    "prunable_units",
    "rng_preserved",
    "tensor_view",
    "validate_epsilon",
    "validate_forward",
    "validate_method",
    "validate_sparsities",
]
