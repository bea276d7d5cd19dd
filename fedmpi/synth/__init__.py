"""Synthetic-feature fitting: find (X, Y) whose loss gradient at w points along a target u.

The fitting step of 3SFC (Zhou et al., "Communication-Efficient Federated Learning with
Single-Step Synthetic Features Compressor for Faster Convergence", ICCV 2023, arXiv
2302.13562; E-3SFC, TNNLS 2025, arXiv 2502.03092), shared with FedSynSAM's server-side
synthetic set. For a model f, weights w (flat fp32), a target vector u (length d) and
trainable synthetic inputs X (M samples of the dataset's input shape) and soft labels
Y (M x C), minimise

    J(X, Y) = 1 - |cos(g(X, Y), u)| + lambda (||X||^2 + ||Y||^2),
    g(X, Y) = grad_w CE(f_w(X), Y)      (soft-target cross-entropy, mean over the M samples,
                                         Y used raw, as torch's CrossEntropyLoss does)

(``absolute=False`` drops the |.|). The gradient of J with respect to (X, Y) is a double
backward through the model. As in the official code (``fl_devices.py``,
``compute_synthetic_sample``): X ~ N(0, 1), Y ~ N(0, 1); LBFGS with torch's defaults
(lr 1, 20 iterations per step, history 100, no line search) for S outer ``step`` calls
whose state carries over, keeping the (X, Y) of the smallest finite J seen after a step
(the official ``0 <= J`` test; J >= 0 here). A plain gradient-descent option
(``optimizer = "gd"``; ``steps = 1`` is the paper's "single step") is also here.

The vector matched is a :data:`Direction` of (X, Y): :class:`Gradient` (3SFC: one
gradient at w) or :class:`Replay` (FedSynth: w_K - w after K SGD steps on K synthetic
batches, differentiated through the unrolled steps).

Two implementations of the same fit:

* :func:`fit` solves B independent problems (one per client, each with its own target and
  start) at once. :func:`lbfgs` runs B LBFGS instances in lockstep, each with its own
  history, step sizes and stopping tests (a problem that stops waits; its rows are never
  touched); per problem it is ``torch.optim.LBFGS``'s algorithm (no line search), with
  the two-loop recursion replaced by the equal compact form of the inverse Hessian
  (:class:`_History`: a dozen batched operations per iteration instead of four per
  history entry). The objectives are evaluated in one of three ways (``mode``):
  ``factored`` for chains of dense layers (:class:`Layers`: the cosine's inner product
  and norm from per-layer factors, never forming the d-sized gradient, all problems in
  one batched call; ``auto`` picks it for 3SFC's MLP / logreg), ``vmap`` (one
  ``torch.func`` call for all problems: ``functional_call`` + ``grad`` + ``vmap``, the
  choice on a GPU for other models) or ``loop`` (one problem after another with autograd:
  faster on a CPU for other models, where one problem's d-sized intermediates stay in
  cache). ``loop`` and ``factored`` give a problem bit-identical results whatever batch
  it is in (tested), so runs do not depend on how clients are spread over ranks. The
  result equals :func:`fit_sequential` up to floating-point rounding (LBFGS without line
  search amplifies rounding over many iterations).
* :func:`fit_sequential` is the reference: one ``torch.optim.LBFGS`` per problem with an
  autograd closure, as the official code does.

The model is never modified: every evaluation passes views of ``w`` to
``torch.func.functional_call``, so ``w`` may be a server's authoritative global model.
"""

from fedmpi.synth.directions import Direction, Gradient, Replay, SynthModel
from fedmpi.synth.fitting import fit, fit_sequential, init_xy, scale
from fedmpi.synth.objective import (
    BatchedFn,
    Layers,
    Packing,
    cosine_objective,
    match_fn,
    resolve_mode,
)
from fedmpi.synth.optimizer import _History, gradient_descent, lbfgs, optimise
from fedmpi.synth.options import FitOptions, FitResult, Solver

__all__ = [
    "BatchedFn", "Direction", "FitOptions", "FitResult", "Gradient", "Layers", "Packing",
    "Replay", "Solver", "SynthModel", "_History", "cosine_objective", "fit", "fit_sequential",
    "gradient_descent", "init_xy", "lbfgs", "match_fn", "optimise", "resolve_mode", "scale",
]
