"""
osig.py: a small, readable reproduction of "Outliers with Opposing Signals Have an Outsized Effect on Neural
Network Optimization" (Rosenfeld & Risteski, ICLR 2024).

Read it top to bottom: each section uses only what came before it.

  1. Sharpness       the objective, Hessian-vector products, Lanczos and power iteration, top eigenvalues.
  2. Training        one loop for gradient descent and minibatch optimizers with one measurement hook; the
                     edge of stability.
  3. Outliers        per-example losses, gradients and curvatures; the examples one GD step moves most,
                     split into opposing groups; anti-phase, heavy tails and one null test for all of them.
  4. Features        what the groups share: the sky rule, planted skies, recolouring, uniform probes.
  5. Linear model    a two-layer linear network with an opposing feature: its sharpness in closed form.
  6. Toy network     a small ReLU network on a rare, large input: the mechanism end to end.
  7. Adam and SGD    preconditioned sharpness, split-update SGD, opposing groups under minibatch noise.
  Appendix A         the larger models: MLP, small CNN, VGG-11, ResNet-18, ViT and a character GPT.
  Appendix B         the data: CIFAR-10, tiny Shakespeare, downloads and safe reading.

Conventions. A `loss_fn` maps (outputs [B, C], labels [B]) to per-example losses [B]; the training objective is
their mean. For a language model outputs are [B, T, C] and labels [B, T]: each (sequence, position) is one
example and per-example arrays are flat over B·T (example i·T + t is position t of sequence i). Flat parameter
vectors concatenate [p.reshape(-1) for p in model.parameters() if p.requires_grad] in module order. Every
measurement is of the deterministic objective: dropout is switched off while measuring (`preserved`).

Paste promise: every public function works when pasted into another project with the imports below and the
helpers its docstring names ("Needs ...").
"""

import codecs
import hashlib
import math
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- 1. Sharpness

def mse_loss(outputs, labels):
    """Per-example squared error to one-hot targets: ½ Σ_c (outputs[i, c] − 1[c = labels[i]])², summed (not
    averaged) over classes as in Cohen et al. outputs [B, C], integer class labels [B] -> [B]."""
    if outputs.shape[:-1] != labels.shape or torch.is_floating_point(labels):
        raise ValueError(f"mse_loss: outputs {tuple(outputs.shape)} need integer class labels of shape "
                         f"{tuple(outputs.shape[:-1])}, got {labels.dtype} {tuple(labels.shape)}")
    # a comparison rather than F.one_hot, which checks label values and so cannot run under vmap
    one_hot = (labels.unsqueeze(-1) == torch.arange(outputs.shape[-1], device=outputs.device)).to(outputs.dtype)
    return 0.5 * (outputs - one_hot).pow(2).sum(-1)


def cross_entropy_loss(outputs, labels):
    """Per-example cross-entropy −log softmax(outputs[i])[labels[i]]: [B, C], [B] -> [B]; [B, T, C], [B, T] -> [B, T]."""
    if outputs.shape[:-1] != labels.shape or torch.is_floating_point(labels):
        raise ValueError(f"cross_entropy_loss: outputs {tuple(outputs.shape)} need integer class labels of shape "
                         f"{tuple(outputs.shape[:-1])}, got {labels.dtype} {tuple(labels.shape)}")
    flat = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1), reduction="none")
    return flat.view(labels.shape)


def check_examples(x, y, outputs=None, losses=None):
    """Raise ValueError, saying what to pass instead, unless x and y hold the same N >= 1 examples; `losses`
    (loss_fn of the first examples' `outputs`) has one entry per label, not one mean (a loss_fn that averages
    would silently make N examples one); and, for class scores (outputs [..., C], C > 1), every label is an
    integer class index in 0..C−1 (MSE would silently turn any other label into an all-zero target)."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples and y {len(y)}: pass one label per example (N >= 1)")
    if losses is not None and (losses.dim() == 0 or losses.shape != y[:losses.shape[0]].shape):
        raise ValueError(f"loss_fn returned shape {tuple(losses.shape)} for {len(outputs)} examples: it must "
                         f"return one loss per example, not their mean "
                         f"(e.g. F.cross_entropy(outputs, labels, reduction='none'))")
    if outputs is not None and outputs.shape[-1] > 1:
        if torch.is_floating_point(y):
            raise ValueError(f"labels are {y.dtype} but the model outputs {outputs.shape[-1]} class scores: pass "
                             f"integer class indices 0..{outputs.shape[-1] - 1} (for regression, one output)")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= outputs.shape[-1]:
            raise ValueError(f"labels range over {low}..{high} but the model has {outputs.shape[-1]} outputs: "
                             f"labels must be class indices 0..{outputs.shape[-1] - 1}")


@contextmanager
def preserved(model):
    """Measure without side effects. Inside, gradients are on and dropout is off, so a measurement is of the deterministic objective
    (the loss with dropout disabled, as at evaluation); batch norm keeps its mode (in train mode it normalizes by
    the batch it is given). On exit every module's own train/eval flag, every buffer (BN running statistics) and
    the CPU and CUDA random-number states are as on entry: measuring during training changes nothing in it."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [b.detach().clone() for b in model.buffers()]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)
    for module in model.modules():
        if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                               nn.FeatureAlphaDropout)):
            module.training = False
    try:
        with torch.enable_grad():              # a measurement needs gradients even when called under no_grad
            yield model
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), buffers):
                buffer.copy_(value)
        for module, training in modes:
            module.training = training
        torch.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state_all(rng[1])


def unflatten(vector, params):
    """Split a flat vector [sum of sizes] into tensors shaped like `params` (views, module order)."""
    return [part.view_as(p) for part, p in zip(torch.split(vector, [p.numel() for p in params]), params)]


@contextmanager
def shifted(model, vector):
    """Context manager: the trainable parameters moved to θ + vector (flat [P]) inside, restored exactly on exit.
    A trial gradient-descent step is shifted(model, −lr·g). Needs `unflatten`."""
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, step in zip(params, unflatten(vector.to(params[0].dtype), params)):
            p.add_(step)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def hessian_operator(model, loss_fn, x, y, chunk=None):
    """The Hessian H of the mean loss L = (1/N) Σ_i loss_fn(model(x), y)[i] as a function v [P] -> H v [P].

    When every example fits in one chunk (chunk None or >= len(x)) the gradient graph g = ∇L is built once and
    each product is one backward pass of <g, v> through it. Otherwise each product goes chunk by chunk: every
    chunk adds d/dθ <∇(Σ_chunk ℓ_i / N), v>, so the sum is exactly H v (up to rounding) for any model whose
    per-example losses do not depend on other examples; one product then costs a forward, a backward and a
    double backward pass per chunk. N counts every example (B·T for a language model). The product is of the
    function the model computes in its current mode: with batch norm in train mode each chunk is normalized by
    its own statistics ("ghost batch norm"), so chunk becomes part of the objective. Call it inside
    `preserved(model)`. Needs `check_examples`, `unflatten`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n, chunk = len(x), chunk or len(x)
    check_examples(x, y)

    def gradient(start):
        outputs = model(x[start:start + chunk])
        losses = loss_fn(outputs, y[start:start + chunk])
        if start == 0:
            check_examples(x, y, outputs, losses)
        return torch.autograd.grad(losses.sum() / (n * losses[0].numel()), params, create_graph=True,
                                   materialize_grads=True)

    def flat(parts):
        return torch.cat([part.reshape(-1) for part in parts])

    if chunk >= n:
        grads = gradient(0)
        return lambda v: flat(torch.autograd.grad(grads, params, unflatten(v, params), retain_graph=True,
                                                  materialize_grads=True))
    return lambda v: sum(flat(torch.autograd.grad(gradient(start), params, unflatten(v, params),
                                                  materialize_grads=True)) for start in range(0, n, chunk))


def hvp(model, loss_fn, x, y, v, chunk=None):
    """One Hessian-vector product H v of the mean loss over (x, y) (`hessian_operator`), without side effects on
    the model (`preserved`). v and the result: flat [P]. Needs `hessian_operator`, `preserved`, `check_examples`,
    `unflatten`."""
    with preserved(model):
        return hessian_operator(model, loss_fn, x, y, chunk)(v)


def lanczos(matvec, dim, k=1, iters=100, tol=1e-6, seed=0, v0=None, dtype=torch.float64, device="cpu"):
    """The k largest (algebraic) eigenpairs of a symmetric linear operator, by Lanczos.

    matvec: [dim] -> [dim], v -> A v. Builds an orthonormal Krylov basis q_1..q_m of span{v0, A v0, A² v0, ...}
    with the three-term recurrence w = A q_j − α_j q_j − β_{j−1} q_{j−1}, α_j = q_j·A q_j, β_j = |w|,
    re-orthogonalized against every previous q (twice: "twice is enough") so rounding never brings back
    converged directions. The eigenvalues θ of the tridiagonal T_m = Qᵀ A Q (Ritz values) approximate A's
    extreme eigenvalues; the residual |A y − θ y| of the Ritz vector y = Q s is β_m |s_m| and costs nothing.
    Stops when the k largest Ritz values all have residual <= tol·max|θ|, after `iters` products, or when the
    Krylov space fills R^dim. On breakdown (β ≈ 0: an invariant subspace) it restarts from a random vector
    orthogonal to the basis, so a warm start that is an exact eigenvector still finds the others.
    v0: start vector [dim] (e.g. the last call's top eigenvector: fewer products during training) or [dim, m]
    (its columns are normalized and summed); random if None. Raises FloatingPointError when a product is not
    finite (a diverging network's Hessian). Returns eigenvalues float64 [k] (descending), eigenvectors [dim, k],
    Ritz residuals float64 [k].
    """
    if not 1 <= k <= dim:
        raise ValueError(f"lanczos: k={k} eigenpairs of a {dim}-dimensional operator: need 1 <= k <= dim")
    iters = min(max(iters, k), dim)
    generator = torch.Generator().manual_seed(seed)

    def random_vector():
        return torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    if v0 is None:
        q = random_vector()
    else:
        v0 = v0.reshape(dim, -1).to(device=device, dtype=dtype)
        q = (v0 / v0.norm(dim=0).clamp_min(1e-30)).sum(dim=1)
    basis = torch.zeros(iters, dim, dtype=dtype, device=device)
    basis[0] = q / q.norm()
    alphas, betas = [], []
    for j in range(iters):
        w = matvec(basis[j]).to(dtype)
        alphas.append(float(w @ basis[j]))
        for _ in range(2):
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta = float(w.norm())
        if not (math.isfinite(alphas[-1]) and math.isfinite(beta)):
            raise FloatingPointError(f"lanczos: the operator returned a non-finite product at iteration {j} "
                                     f"(alpha {alphas[-1]}, beta {beta}): the Hessian has overflowed")
        theta, S = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        top = np.argsort(theta)[::-1][:k]
        residuals = beta * np.abs(S[-1, top])
        scale = max(np.abs(theta).max(), 1e-300)
        breakdown = beta <= 1e-10 * scale
        if j + 1 == iters or (j + 1 >= k and not breakdown and np.all(residuals <= tol * scale)):
            break
        if breakdown:
            w = random_vector()
            for _ in range(2):
                w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
            beta = 0.0
        betas.append(beta)
        basis[j + 1] = w / (w.norm() if breakdown else beta)
    eigenvectors = basis[:len(alphas)].T @ torch.as_tensor(S[:, top].copy(), dtype=dtype, device=device)
    return torch.as_tensor(theta[top].copy()), eigenvectors, torch.as_tensor(residuals.copy())


def power_iteration(matvec, dim, iters=1000, tol=1e-6, seed=0, v0=None, dtype=torch.float64, device="cpu"):
    """Top eigenvalue by power iteration, the teaching baseline for `lanczos`: v <- A v / |A v|.

    Converges to the eigenvalue of largest magnitude (the top one for a Hessian near a minimum) at the rate
    |λ_2 / λ_1| per product: slowly when the top two are close. Each iteration takes the Rayleigh quotient
    λ = v·A v and stops when |A v − λ v| <= tol·|λ|. Returns (eigenvalue, eigenvector [dim], converged, products).
    """
    if dim < 1:
        raise ValueError(f"power_iteration: dim={dim} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype) \
        if v0 is None else v0.reshape(-1).to(device=device, dtype=dtype).clone()
    v = v / v.norm()
    eigenvalue = 0.0
    for step in range(1, iters + 1):
        w = matvec(v).to(dtype)
        eigenvalue = float(v @ w)
        if not math.isfinite(eigenvalue):
            raise FloatingPointError(f"power_iteration: non-finite Rayleigh quotient at product {step}")
        if float((w - eigenvalue * v).norm()) <= tol * abs(eigenvalue):
            return eigenvalue, v, True, step
        v = w / w.norm()
    return eigenvalue, v, False, iters


def top_eigenvalues(model, loss_fn, x, y, k=1, chunk=None, iters=100, tol=1e-3, seed=0, v0=None,
                    preconditioner=None):
    """Sharpness: the k largest eigenvalues of the Hessian H of the mean loss over (x, y), by `lanczos` on
    `hessian_operator`, measured without side effects (`preserved`: the deterministic objective, with dropout
    off; buffers, modes and random state restored).

    preconditioner: a diagonal P [P] > 0 (e.g. `adaptive_preconditioner`). Then the eigenvalues are those of
    P^-1/2 H P^-1/2, the sharpness an adaptive optimizer sees: `lanczos` runs on the symmetric u -> s ⊙ H (s ⊙ u),
    s = P^-1/2 (similar to P^-1 H); its eigenvectors w are whitened (s ⊙ w is a parameter direction).
    Returns eigenvalues float64 [k] (descending), eigenvectors [P, k], Ritz residuals [k]; raises
    FloatingPointError when the products overflow. Needs `check_examples`, `preserved`, `unflatten`,
    `hessian_operator`, `lanczos`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    if not 1 <= k <= dim:
        raise ValueError(f"top_eigenvalues: k={k} but the model has {dim} parameters: need 1 <= k <= {dim}")
    with preserved(model):
        hessian_times = matvec = hessian_operator(model, loss_fn, x, y, chunk)
        if preconditioner is not None:
            scale = preconditioner.to(device=params[0].device, dtype=params[0].dtype).rsqrt()

            def matvec(u):
                return scale * hessian_times(scale * u)
        return lanczos(matvec, dim, k=k, iters=iters, tol=tol, seed=seed, v0=v0, dtype=params[0].dtype,
                       device=params[0].device)

# ----------------------------------------------------------------------------- 2. Training

def full_batch_gradient(model, loss_fn, x, y, chunk):
    """Put ∇L of the mean loss L = (1/N) Σ_i ℓ_i into p.grad, `chunk` rows at a time: each chunk adds
    ∇(Σ_chunk ℓ_i)/N, so the sum is the one-batch gradient (N counts every example, B·T for a language model).
    The same forward pass gives every example's loss. Returns (losses [N] detached, flat; accuracy, nan for a
    single output). Needs `check_examples`."""
    losses, correct = [], []
    for start in range(0, len(x), chunk):
        outputs = model(x[start:start + chunk])
        chunk_losses = loss_fn(outputs, y[start:start + chunk])
        if start == 0:
            check_examples(x, y, outputs, chunk_losses)
        (chunk_losses.sum() / (len(x) * chunk_losses[0].numel())).backward()
        losses.append(chunk_losses.detach().reshape(-1))
        correct.append((outputs.detach().argmax(-1) == y[start:start + chunk]).reshape(-1))
    accuracy = float(torch.cat(correct).float().mean()) if outputs.shape[-1] > 1 else math.nan
    return torch.cat(losses), accuracy


def minibatches(n, batch_size, generator):
    """Endless minibatch indices: consecutive batch_size slices of a seeded random permutation of range(n), a
    new permutation each epoch (a last, partial slice is skipped)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def stability_threshold(optimizer):
    """The sharpness above which an optimizer is unstable on a quadratic (Cohen et al., 2021, 2022), for a
    constructed optimizer (its first parameter group):
      torch.optim.Adam, β1               on the preconditioned sharpness λ(P^-1/2 H P^-1/2), P = sqrt(v̂) + ε:
                                         (2 + 2β1) / ((1 − β1) lr), 38/lr for β1 = 0.9;
      heavy ball (SGD, SplitSGD), μ      b ← μ b + g, θ ← θ − lr b: (2 + 2μ)/lr; μ = 0 is gradient descent's
                                         2/lr (SplitSGD: on its own preconditioned sharpness).
    Clipping only shortens steps, so clipped SGD has SGD's threshold while the gradient is not clipped.
    Raises ValueError for an optimizer with neither rule."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.Adam):
        return (2.0 + 2.0 * group["betas"][0]) / ((1.0 - group["betas"][0]) * group["lr"])
    if isinstance(optimizer, torch.optim.SGD) or "normalized_lr" in group:        # SGD or SplitSGD
        return (2.0 + 2.0 * group["momentum"]) / group["lr"]
    raise ValueError(f"no stability threshold known for {type(optimizer).__name__}: use SGD, Adam or SplitSGD")


def train(model, x, y, loss_fn, optimizer, steps, batch_size=None, chunk=None, measure=None, clip_norm=None,
          seed=0, log=print):
    """Train `model` on (x, y) with a constructed torch `optimizer`, recording every step.

    Full batch (batch_size None): the gradient of L(θ) = (1/N) Σ_i ℓ_i(θ) (`full_batch_gradient`); with
        torch.optim.SGD(lr) this is gradient descent θ ← θ − lr ∇L, and its forward pass gives every example's
        loss ℓ_i(θ_t), kept as per_example_loss [T, N] at no extra cost.
    Minibatch (batch_size B): each step the next B examples of a seeded reshuffle (`minibatches`); loss and
        accuracy are the minibatch's.
    clip_norm: rescale the gradient g to g·min(1, clip_norm/|g|) before the update.
    measure(step, model, optimizer) -> dict or None: called at θ_t after the gradient is computed (p.grad holds
        it), before the update, inside `preserved` (so it cannot change modes, buffers or the random stream);
        what it returns is kept in history["measured"] with its step. `train` never reads it.
    Divergence (a non-finite loss, or a FloatingPointError from measure) stops the run with a message naming the
        optimizer's own stability threshold; all earlier steps are kept.
    Returns a dict: step, loss, accuracy, grad_norm (before clipping) [T]; per_example_loss float32 [T, N]
    ([0, N] for minibatches); measured (list of dicts); diverged (None or the message). Same seed and init give
    identical records on the CPU. Needs `check_examples`, `full_batch_gradient`, `minibatches`, `preserved`,
    `stability_threshold`.
    """
    check_examples(x, y)
    n, chunk = len(x), chunk or len(x)
    if steps < 0 or chunk < 1 or (batch_size is not None and not 1 <= batch_size <= n):
        raise ValueError(f"train: need steps >= 0 (got {steps}), chunk >= 1 (got {chunk}) and batch_size None "
                         f"(full batch) or in 1..{n} (got {batch_size})")
    params = [p for p in model.parameters() if p.requires_grad]
    batches = minibatches(n, batch_size or n, torch.Generator().manual_seed(seed))
    history = {key: [] for key in ("step", "loss", "accuracy", "grad_norm", "per_example_loss", "measured")}
    history["diverged"], start_time = None, time.time()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if batch_size is None:
            losses, accuracy = full_batch_gradient(model, loss_fn, x, y, chunk)
            history["per_example_loss"].append(losses.float().cpu())
            loss = float(losses.mean())
        else:
            batch = next(batches).to(x.device)
            outputs = model(x[batch])
            losses = loss_fn(outputs, y[batch])
            if step == 0:
                check_examples(x, y, outputs, losses)
            losses.mean().backward()
            loss = float(losses.detach().mean())
            accuracy = float((outputs.argmax(-1) == y[batch]).float().mean()) if outputs.shape[-1] > 1 else math.nan
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                                if p.grad is not None])))
        for key, value in (("step", step), ("loss", loss), ("accuracy", accuracy), ("grad_norm", grad_norm)):
            history[key].append(value)
        problem = None if math.isfinite(loss) else f"loss {loss}"
        if measure is not None and problem is None:
            try:
                with preserved(model):
                    record = measure(step, model, optimizer)
                history["measured"] += [dict(record, step=step)] if record is not None else []
            except FloatingPointError as error:
                problem = str(error)
        if problem is not None:
            lr = optimizer.param_groups[0]["lr"]
            try:
                edge = f"{type(optimizer).__name__} at lr {lr:g} is stable up to a sharpness of " \
                       f"{stability_threshold(optimizer):.4g}"
            except ValueError:
                edge = f"the step size is lr {lr:g}"
            history["diverged"] = (f"training diverged at step {step} ({problem}); {edge}: lower the learning "
                                   f"rate. Steps 0..{step} are kept in the history.")
            if log:
                log(history["diverged"])
            break
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            elapsed = time.time() - start_time
            log(f"step {step:5d} | loss {loss:.4f} | acc {accuracy:.3f} | {elapsed:6.1f}s, "
                f"ETA {elapsed / (step + 1) * (steps - step - 1):6.1f}s")
    result = {key: np.asarray(history[key], dtype=np.float64) for key in ("loss", "accuracy", "grad_norm")}
    result["per_example_loss"] = (torch.stack(history["per_example_loss"]).numpy()
                                  if history["per_example_loss"] else np.zeros((0, n), np.float32))
    return dict(result, step=np.asarray(history["step"], dtype=np.int64), measured=history["measured"],
                diverged=history["diverged"])


def measured(history, key):
    """The steps [M] and values [M, ...] (numpy) of `key` in a train history's measure records that have it."""
    records = [m for m in history["measured"] if key in m]
    return (np.asarray([m["step"] for m in records], dtype=np.int64),
            np.asarray([np.asarray(m[key], dtype=np.float64) for m in records]))


def evaluate(model, loss_fn, x, y, chunk=1024):
    """Mean loss and accuracy (nan for a single output) on (x, y), without gradients or side effects.
    Returns (loss, accuracy) floats. Needs `check_examples`, `preserved`."""
    check_examples(x, y)
    with preserved(model), torch.no_grad():
        outputs = torch.cat([model(x[s:s + chunk]) for s in range(0, len(x), chunk)])
        losses = loss_fn(outputs, y)
    check_examples(x, y, outputs, losses)
    accuracy = float((outputs.argmax(-1) == y).float().mean()) if outputs.shape[-1] > 1 else math.nan
    return float(losses.mean()), accuracy


def edge_of_stability(steps, sharpness, threshold):
    """Progressive sharpening to a stability threshold (2/lr for gradient descent) and the hover there.

    steps [E], sharpness [E] (the top Hessian eigenvalue λ measured at those steps). The crossing is the first
    time λ reaches the threshold, interpolated linearly between the two measurements around it (steps[0] when λ
    starts above it, nan when it never gets there): the one definition every statistic here uses. Returns a
    dict: crossing (float step or nan), start_ratio = λ(steps[0]) / threshold, hover = median over the
    measurements from the crossing on of |λ / threshold − 1| (nan without a crossing)."""
    steps, sharpness = np.asarray(steps, dtype=np.float64), np.asarray(sharpness, dtype=np.float64)
    if len(sharpness) == 0:
        return {"crossing": math.nan, "start_ratio": math.nan, "hover": math.nan}
    above = np.flatnonzero(sharpness >= threshold)
    if len(above) == 0:
        return {"crossing": math.nan, "start_ratio": float(sharpness[0] / threshold), "hover": math.nan}
    i = above[0]
    crossing = steps[0] if i == 0 else steps[i - 1] + (threshold - sharpness[i - 1]) / (
        sharpness[i] - sharpness[i - 1]) * (steps[i] - steps[i - 1])
    return {"crossing": float(crossing), "start_ratio": float(sharpness[0] / threshold),
            "hover": float(np.median(np.abs(sharpness[i:] / threshold - 1)))}

def sharpening_rate(steps, sharpness, window):
    """Progressive sharpening over a fixed window from the start: (λ(window) − λ(steps[0])) / window · 100, the
    rise of the sharpness per 100 steps, λ interpolated between measurements (steps [E], sharpness [E])."""
    return float((np.interp(window, steps, sharpness) - sharpness[0]) / window * 100)


# ----------------------------------------------------------------------------- 3. Outliers and opposing groups

def per_example_losses(model, loss_fn, x, y, chunk=1024):
    """loss_fn(model(x), y) for every example, without gradients or side effects: [N] (flat over B·T for a
    language model). During full-batch training `train` records these at no cost; this is for other times.
    Needs `check_examples`, `preserved`."""
    check_examples(x, y)
    with preserved(model), torch.no_grad():
        outputs = model(x[:chunk])
        check_examples(x, y, outputs, loss_fn(outputs, y[:chunk]))
        return torch.cat([loss_fn(model(x[s:s + chunk]), y[s:s + chunk]).reshape(-1)
                          for s in range(0, len(x), chunk)])


def per_example_grads(model, loss_fn, x, y, chunk=256, positions=None):
    """Gradient of each example's own loss: G[i] = ∇θ loss_fn(model(x[i:i+1]), y[i:i+1]), [N, P].

    torch.func: vmap over examples of grad of a functional_call, `chunk` examples at a time (memory: chunk x P),
    written straight into one [N, P] matrix. For a language model (losses [B, T]) row i's example is its
    position positions[i] in 0..T−1; without positions, the gradient of the row's summed losses. Per-example
    gradients are undefined under batch statistics, so batch norm must be in eval mode; dropout is off (the
    deterministic objective). Columns follow the flat parameter order. Needs `check_examples`, `preserved`.
    """
    from torch.func import functional_call, grad, vmap
    if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("per-example gradients need batch norm in eval mode: call model.eval() first")
    check_examples(x, y)
    with preserved(model), torch.no_grad():
        outputs = model(x[:1])
        losses = loss_fn(outputs, y[:1])
    check_examples(x, y, outputs, losses)
    per_row = losses[0].numel()
    positions = torch.full((len(x),), -1) if positions is None else torch.as_tensor(positions).reshape(-1)
    if len(positions) != len(x) or (positions >= per_row).any() or (positions < -1).any():
        raise ValueError(f"positions must give one position in 0..{per_row - 1} per example ({len(x)}), "
                         f"or be None for each row's summed losses")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def example_loss(params, xi, yi, ti):
        losses = loss_fn(functional_call(model, (params, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0)).reshape(-1)
        chosen = (torch.arange(len(losses), device=losses.device) == ti) | (ti < 0)     # ti = −1: the whole row
        return (losses * chosen).sum()

    grad_per_example = vmap(grad(example_loss), in_dims=(None, 0, 0, 0))
    positions = positions.to(x.device)
    sizes = [p.numel() for p in params.values()]
    first = next(iter(params.values()))
    result = torch.empty(len(x), sum(sizes), dtype=first.dtype, device=first.device)
    with preserved(model):
        for start in range(0, len(x), chunk):
            grads = grad_per_example(params, x[start:start + chunk], y[start:start + chunk],
                                     positions[start:start + chunk])
            for column, g in zip(np.cumsum([0] + sizes[:-1]), grads.values()):
                result[start:start + len(g), column:column + g[0].numel()] = g.reshape(len(g), -1)
    return result


def per_example_curvature(model, loss_fn, x, y, v, chunk=1024):
    """Each example's curvature along a direction v, split into its Gauss-Newton and residual parts.

    With f_i(θ) the outputs on example i and ℓ_i its loss, the curvature of the mean loss along a unit v is
    vᵀHv = (1/N) Σ_i c_i,  c_i = d²/dt² ℓ_i(f_i(θ + t v)) at t = 0
                               = (J_i v)ᵀ ∇²_f ℓ_i (J_i v)  +  Σ_c ∂ℓ_i/∂f_c · vᵀ∇²f_{i,c} v,
    the Gauss-Newton term (MSE: |J_i v|²; cross-entropy: (J_i v)ᵀ(diag p_i − p_i p_iᵀ)(J_i v)) and the residual
    term. Forward-mode products give all of them for every example at once: J v is one jvp of the outputs, the
    total a jvp of that jvp through the loss, the Gauss-Newton term the second derivative of ℓ_i(f_i + s J_i v)
    in s. Buffers are read, never updated (BN: eval mode). Returns float64 numpy [N] arrays: total,
    gauss_newton, residual (= total − gauss_newton). Needs `check_examples`, `unflatten`.
    """
    from torch.func import functional_call, jvp
    check_examples(x, y)
    with torch.no_grad():
        outputs = model(x[:chunk])
        check_examples(x, y, outputs, loss_fn(outputs, y[:chunk]))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    directions = dict(zip(names, unflatten(v.to(params[0].dtype), params)))
    base, buffers = dict(zip(names, params)), {name: b.detach() for name, b in model.named_buffers()}
    zero = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    one = torch.ones_like(zero)
    totals, gauss_newton = [], []
    for start in range(0, len(x), chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]

        def outputs_at(t):
            return functional_call(model, ({n: base[n] + t * directions[n] for n in names}, buffers), (xc,))

        def slope(t):
            return jvp(lambda s: loss_fn(outputs_at(s), yc), (t,), (one,))[1]

        outputs, jv = (part.detach() for part in jvp(outputs_at, (zero,), (one,)))
        totals.append(jvp(slope, (zero,), (one,))[1].detach().reshape(-1))

        def output_slope(s):
            return jvp(lambda r: loss_fn(outputs + r * jv, yc), (s,), (one,))[1]

        gauss_newton.append(jvp(output_slope, (zero,), (one,))[1].detach().reshape(-1))
    total, gn = (torch.cat(parts).double().cpu().numpy() for parts in (totals, gauss_newton))
    return {"total": total, "gauss_newton": gn, "residual": total - gn}


def group_gradients(model, loss_fn, x, y, groups):
    """Each group's share of the full-batch gradient: g_k = ∇θ (Σ_{i in group k} ℓ_i) / N, one backward pass per
    group. groups: bool masks [N] over the examples (flat over B·T for a language model); the g_k of disjoint
    groups covering the data sum to ∇θ L. Returns flat gradients [P], without touching .grad or the model's
    state. Needs `check_examples`, `preserved`."""
    params = [p for p in model.parameters() if p.requires_grad]
    check_examples(x, y)
    with preserved(model):
        outputs = model(x)
        losses = loss_fn(outputs, y)
        check_examples(x, y, outputs, losses)
        losses = losses.reshape(-1)
        return [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            losses[torch.as_tensor(mask, device=losses.device)].sum() / len(losses), params, retain_graph=True,
            materialize_grads=True)]) for mask in groups]


def parameter_layers(model):
    """Group the trainable tensors into layers, in module order: a tensor's layer is its name up to and including
    its first all-digit part ("net.1.weight" -> "net.1", "blocks.2.attention.qkv.weight" -> "blocks.2": a
    whole block), else its name without the last part ("embed.weight" -> "embed", "position" -> "position").
    Returns (layer names [L] by first appearance, layer of every flat parameter entry int64 [P])."""
    names, index = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
            layer = ".".join(parts[:digit + 1]) if digit is not None else (".".join(parts[:-1]) or name)
            names += [layer] if layer not in names else []
            index.append(np.full(p.numel(), names.index(layer), dtype=np.int64))
    return names, np.concatenate(index)


def layer_shares(vector, model):
    """Share of a flat parameter vector's squared norm in each layer (`parameter_layers`): [L], sums to 1. A random
    isotropic vector puts each layer's parameter count / P there, so divide by
    np.bincount(parameter_layers(model)[1]) / P to see which layers hold more than their size. "Early layers"
    are the first third of them (rounded up), the layers that read the input. Needs `parameter_layers`."""
    names, index = parameter_layers(model)
    shares = np.bincount(index, weights=vector.detach().double().pow(2).cpu().numpy(), minlength=len(names))
    return shares / max(shares.sum(), 1e-300)


def early_layer_ratio(shares, parameter_shares):
    """How much more of a direction the early layers hold than their size: the share of the first third of the
    layers (rounded up; `layer_shares` [L]) over their share of the parameters [L]. 1 for a random direction."""
    early = math.ceil(len(parameter_shares) / 3)
    return float(np.sum(shares[:early]) / np.sum(parameter_shares[:early]))


def opposing_groups(model, loss_fn, x, y, lr, eigenvectors, top=30):
    """The examples one gradient-descent step moves most, and the direction each moves.

    At θ (the model as given) with g = ∇L(θ), the step θ' = θ − lr·g is taken on trial (`shifted`, restored
    exactly) and every example's Δℓ_i = ℓ_i(θ') − ℓ_i(θ) measured. The outliers are the `top` examples by
    |Δℓ_i|; "up" marks those whose loss rose: the two opposing groups of this step. With V = eigenvectors [P, k]
    spanning the sharp subspace (k = 1: the top eigenvector; under MSE several eigenvalues sit at 2/lr
    together) the step's oscillating direction there is u = V Vᵀg / |Vᵀg|; to first order the sharp part of the
    step changes ℓ_i by −lr·|Vᵀg|·<g_i, u>, so <g_i, u> < 0 predicts "up". How often it does (balanced
    accuracy) checks the linearization; it is not evidence. For a language model the examples are (sequence,
    position) pairs and index is flat over them.
    Returns a dict: index [top] (by decreasing |Δℓ|), loss_change [top], up [top], cos_subspace [top] =
    |Vᵀg_i|/|g_i|, cos_top [top] = |<g_i, v_1>|/|g_i|, linearization, loss_change_all [N] (numpy) and gradient
    [P] (torch). Needs `check_examples`, `preserved`, `unflatten`, `shifted`, `per_example_grads`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved(model):
        outputs = model(x)
        losses = loss_fn(outputs, y)
        check_examples(x, y, outputs, losses)
        gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.mean(), params)])
        with shifted(model, -lr * gradient), torch.no_grad():
            change = (loss_fn(model(x), y) - losses.detach()).reshape(-1).double()
    index = torch.argsort(change.abs(), descending=True)[:top]
    per_row = change.numel() // len(x)                        # examples per input row: T for a language model
    rows, positions = index // per_row, index % per_row
    g = per_example_grads(model, loss_fn, x[rows], y[rows], positions=positions if per_row > 1 else None)
    V = eigenvectors.to(device=g.device, dtype=g.dtype)
    coefficients = V.T @ gradient
    u = V @ (coefficients / coefficients.norm().clamp_min(1e-30))
    up, predicted_up, norms = change[index] > 0, (g @ u) < 0, g.norm(dim=1).clamp_min(1e-30)
    recalls = [float((predicted_up[up == side] == side).float().mean()) for side in (True, False)
               if (up == side).any()]
    return {"index": index.cpu().numpy(), "loss_change": change[index].cpu().numpy(), "up": up.cpu().numpy(),
            "cos_subspace": ((g @ V).norm(dim=1) / norms).double().cpu().numpy(),
            "cos_top": ((g @ V[:, 0]).abs() / norms).double().cpu().numpy(),
            "linearization": float(np.mean(recalls)), "loss_change_all": change.cpu().numpy(), "gradient": gradient}


def selection_matched_draws(loss_change, labels, index, draws=50, band=10, seed=0):
    """Null groups that pass the same selection as the outliers `index` of one step.

    loss_change [N]: Δℓ of every example in that step; labels [N]: classes (for a language model, the target
    tokens); index [top]: the outliers. Each draw replaces the outliers of every class and sign of Δℓ by as many
    examples of that class and sign drawn, without replacement, from the next band x as many ranks of that class
    and sign by |Δℓ|: large movers of the same classes, split the same way, that just missed the cut. Comparing
    the outliers with random examples instead would credit them with what selection alone gives (look-alike
    members of confusable classes). Returns int64 [draws, top], row j mirroring index position by position; a
    row of −1 where no draw was possible (fewer such examples left than outliers)."""
    change, labels, index = np.asarray(loss_change), np.asarray(labels).reshape(-1), np.asarray(index)
    keys = labels * 2 + (change > 0)
    order = np.argsort(-np.abs(change), kind="stable")
    order = order[~np.isin(order, index)]
    result, rng = np.full((draws, len(index)), -1, dtype=np.int64), np.random.default_rng(seed)
    slots = {key: np.flatnonzero(keys[index] == key) for key in np.unique(keys[index])}
    pools = {key: order[keys[order] == key][:band * len(where)] for key, where in slots.items()}
    if all(len(pools[key]) >= len(where) for key, where in slots.items()):
        for row in result:
            for key, where in slots.items():
                row[where] = rng.choice(pools[key], len(where), replace=False)
    return result


def pair_gradient_cosine(model, loss_fn, x, y, first, second, columns):
    """Cosine between two groups' gradients (of their summed losses) restricted to the flat parameter entries
    `columns` (bool [P], e.g. the first layer's: parameter_layers(model)[1] == 0). Below 0 the groups push the
    layer that reads the input in opposite directions: opposing signals on a shared input feature. first,
    second: example indices (flat over B·T for a language model). Needs `group_gradients`, `preserved`."""
    per_row = y[0].numel()
    members = np.concatenate([first, second]).astype(np.int64)
    rows = np.unique(members // per_row)
    local = np.searchsorted(rows, members // per_row) * per_row + members % per_row
    masks = [np.isin(np.arange(len(rows) * per_row), part) for part in np.split(local, [len(first)])]
    a, b = (g[torch.as_tensor(columns, device=g.device)] for g in group_gradients(model, loss_fn, x[rows],
                                                                                   y[rows], masks))
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def outlier_analysis(model, loss_fn, x, y, lr, eigenvectors, top=30, draws=50, band=10, seed=0, chunk=1024):
    """Everything measured about the outliers of one full-batch GD step, as one flat dict:
      index, loss_change, up, cos_subspace, cos_top, linearization   the step's opposing groups (`opposing_groups`);
      null_index [draws, top]       their selection-matched null groups (`selection_matched_draws`);
      grad_cosine, grad_cosine_null [draws]   first-layer cosine of the up and down groups' gradients, and of each
                                    null pair's (`pair_gradient_cosine`; nan when a side is empty);
      top1_share, outlier_share, residual_share   of the curvature vᵀHv along the top eigenvector v: carried by
                                    the top 1% of examples (selection-free), by the outliers, and the share of the
                                    residual (non-Gauss-Newton) term (`per_example_curvature`);
      midpoint                      the sharpness at the midpoint θ − lr·g/2 of the step (the loss is not
                                    quadratic at the scale of one step, so it can differ from the sharpness at θ).
    Needs `opposing_groups`, `selection_matched_draws`, `pair_gradient_cosine`, `group_gradients`,
    `per_example_curvature`, `parameter_layers`, `top_eigenvalues` and their needs.
    """
    groups = opposing_groups(model, loss_fn, x, y, lr, eigenvectors, top)
    gradient, change, index, up = groups.pop("gradient"), groups.pop("loss_change_all"), groups["index"], groups["up"]
    null = selection_matched_draws(change, y.reshape(-1).cpu().numpy(), index, draws, band, seed)
    first_layer = parameter_layers(model)[1] == 0
    pairs = [(index, up)] + [(row, up) for row in null if row[0] >= 0]
    cosines = [pair_gradient_cosine(model, loss_fn, x, y, members[side], members[~side], first_layer)
               if side.any() and not side.all() else math.nan for members, side in pairs]
    curvature = per_example_curvature(model, loss_fn, x, y, eigenvectors[:, 0], chunk)
    total, count = curvature["total"], max(1, len(curvature["total"]) // 100)
    with shifted(model, -lr / 2 * gradient):
        midpoint = float(top_eigenvalues(model, loss_fn, x, y, v0=eigenvectors[:, 0])[0][0])
    return dict(groups, null_index=null, grad_cosine=cosines[0],
                grad_cosine_null=np.asarray(cosines[1:] + [math.nan] * (draws - len(pairs) + 1)),
                top1_share=np.sort(total)[-count:].sum() / total.sum(), outlier_share=total[index].sum() / total.sum(),
                residual_share=curvature["residual"].sum() / total.sum(), midpoint=midpoint)


def sharpness_measure(loss_fn, x, y, every=20, k=1, chunk=None, iters=100, tol=1e-3, preconditioner=None, lr=None,
                      top=0, draws=50):
    """The `measure` hook for `train`: every `every` steps the top-k Hessian eigenvalues of the mean loss over
    (x, y) (a subset of the training set is cheaper), warm-started from the last call's eigenvectors, as
    "eigenvalues" [k], and the top eigenvector's "layer_shares" [L] (`layer_shares`).
    preconditioner: optimizer -> diagonal P or None (e.g. `adaptive_preconditioner`); then also
    "preconditioned_eigenvalues" [k] of P^-1/2 H P^-1/2 (nan before the optimizer's first step).
    top > 0 (full-batch gradient descent at step size lr): also the `outlier_analysis` of the step.
    A non-finite sharpness raises FloatingPointError, which `train` treats as divergence. Returns
    measure(step, model, optimizer) -> dict or None. Needs `top_eigenvalues`, `layer_shares`, `outlier_analysis`
    and their needs.
    """
    warm = {}

    def measure(step, model, optimizer):
        if step % every:
            return None
        values, vectors, _ = top_eigenvalues(model, loss_fn, x, y, k, chunk, iters, tol, v0=warm.get("plain"))
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"non-finite sharpness {values.tolist()}")
        warm["plain"], record = vectors, {"eigenvalues": values.numpy(),
                                          "layer_shares": layer_shares(vectors[:, 0], model)}
        P = preconditioner(optimizer) if preconditioner is not None else None
        if preconditioner is not None:
            record["preconditioned_eigenvalues"] = np.full(k, np.nan)
        if P is not None:
            values, warm["preconditioned"], _ = top_eigenvalues(model, loss_fn, x, y, k, chunk, iters, tol,
                                                                v0=warm.get("preconditioned"), preconditioner=P)
            record["preconditioned_eigenvalues"] = values.numpy()
        if top:
            record.update(outlier_analysis(model, loss_fn, x, y, lr, vectors, top, draws, seed=step,
                                           chunk=chunk or 1024))
        return record

    return measure


def loss_spikes(loss, window=20, factor=1.1):
    """Loss spike events: maximal runs of consecutive steps t with loss[t] > factor·min(loss[t−window:t]).
    loss [T]. Counting events rather than steps keeps one long spike from counting many times. Returns int64
    [events, 2]: the first and last step of each run."""
    loss = np.asarray(loss, dtype=np.float64)
    high = np.array([loss[t] > factor * loss[t - window:t].min() for t in range(window, len(loss))], dtype=bool)
    edges = np.diff(np.concatenate([[0], high.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return np.stack([starts + window, ends + window], axis=1).astype(np.int64) if len(starts) else \
        np.zeros((0, 2), dtype=np.int64)


def top_fraction_share(loss_change, fraction=0.01, members=None):
    """Share of the total |loss change| carried by the top `fraction` of examples (or, given bool `members` [N],
    by those examples): loss_change [..., N] -> [...]. For i.i.d. Gaussian changes and fraction 0.01 it is about
    0.036, for Laplace changes about 0.056: compare a run with its own earlier steps."""
    magnitude = np.abs(np.asarray(loss_change, dtype=np.float64))
    if members is not None:
        return magnitude[..., np.asarray(members, dtype=bool)].sum(-1) / np.maximum(magnitude.sum(-1), 1e-300)
    top = max(1, int(math.ceil(fraction * magnitude.shape[-1])))
    return -np.sort(-magnitude, axis=-1)[..., :top].sum(-1) / np.maximum(magnitude.sum(-1), 1e-300)


def spike_tail_ratio(per_example_loss, crossing, count=10, fraction=0.01, members=None):
    """Heavy tail at the loss spikes: `top_fraction_share` of the per-example loss changes, median over the `count`
    steps after the crossing where the total loss rises most, divided by its median over the pre-EoS steps
    crossing/2 .. crossing (a run's own earlier steps). per_example_loss [T, N]. nan without a crossing."""
    if not math.isfinite(crossing) or crossing < 4:
        return math.nan
    losses = np.asarray(per_example_loss, dtype=np.float64)
    delta, start = np.diff(losses, axis=0), int(math.ceil(crossing))
    rises = start + np.argsort(-np.diff(losses.mean(1))[start:])[:count]
    if len(rises) == 0:
        return math.nan
    return float(np.median(top_fraction_share(delta[rises], fraction, members))
                 / np.median(top_fraction_share(delta[start // 2:start], fraction, members)))


def antiphase(series, first, second):
    """Anti-phase of two groups: corr(diff(mean of series[:, first]), diff(mean of series[:, second])), the
    Pearson correlation of the step-to-step changes of their mean series. series [T, N]; first, second: index
    arrays or bool masks [N]. −1: one rises exactly when the other falls. nan when a group is empty, T < 3 or a
    series is flat."""
    values = np.asarray(series, dtype=np.float64)
    first, second = (np.flatnonzero(g) if np.asarray(g).dtype == bool else np.asarray(g) for g in (first, second))
    if len(values) < 3 or len(first) == 0 or len(second) == 0:
        return math.nan
    da, db = np.diff(values[:, first].mean(1)), np.diff(values[:, second].mean(1))
    return float(np.corrcoef(da, db)[0, 1]) if da.std() > 0 and db.std() > 0 else math.nan


def null_p(observed, null, alternative="less"):
    """p-value of `observed` against the same statistic on null draws [D]: (1 + #{null as or more extreme}) /
    (1 + #finite null); "less": as small or smaller, "greater": as large or larger, "two-sided": twice the
    smaller, at most 1. nan (never significant) when observed is nan or no null value is finite."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or len(null) == 0:
        return math.nan
    less, greater = [(1 + np.sum(side)) / (1 + len(null)) for side in (null <= observed, null >= observed)]
    return float({"less": less, "greater": greater, "two-sided": min(1.0, 2 * min(less, greater))}[alternative])


def combined_p(observed, null, alternative="less"):
    """One test over S selections: observed [S] against null [S, D] (draw d of every selection). The mean of the
    observed values over the selections where both are measurable is compared (`null_p`) with each draw's mean
    over the same selections: the draws stay exchangeable with the observation whatever the dependence between
    selections. Returns (p, observed mean, median null mean, selections used); p nan with none. Needs `null_p`."""
    observed, null = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64).reshape(len(observed), -1)
    used = np.isfinite(observed) & np.isfinite(null).any(1)
    if not used.any():
        return math.nan, math.nan, math.nan, 0
    with np.errstate(all="ignore"):
        means = np.nanmean(null[used], axis=0)
    return null_p(observed[used].mean(), means, alternative), float(observed[used].mean()), \
        float(np.nanmedian(means)), int(used.sum())


def pair_statistics(per_example_loss, steps, index, up, null_index, features=None, length=40, gap=2):
    """The opposing pair of each selection s and its null draws, measured after the selection:
      antiphase   `antiphase` of the up and down groups' losses over steps[s] + gap .. steps[s] + gap + length
                  (gap leaves out the selecting change itself);
      coherence   (given features [N, F], e.g. the inputs) mean cosine between an up member's and a down
                  member's features, centred on the mean over all N: large when the groups share a feature
                  beyond their classes, negative when they carry it with opposite signs.
    per_example_loss [T, N]; steps [S]; index, up [S, top]; null_index [S, D, top] (`selection_matched_draws`,
    mirroring index). Returns {name: (observed [S], null [S, D])}, nan where not measurable. Needs `antiphase`."""
    losses = np.asarray(per_example_loss, dtype=np.float64)
    unit = None
    if features is not None:
        centred = torch.as_tensor(features, dtype=torch.float32).flatten(1)
        centred = centred - centred.mean(0)
        unit = (centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-30)).numpy()
    result = {name: (np.full(len(steps), np.nan), np.full(np.shape(null_index)[:2], np.nan))
              for name in ["antiphase"] + (["coherence"] if unit is not None else [])}
    for s, step in enumerate(steps):
        span = losses[step + gap:step + gap + length]
        for d, members in enumerate([index[s]] + list(null_index[s])):
            if members[0] < 0 or up[s].all() or not up[s].any():
                continue
            first, second = members[up[s]], members[~up[s]]
            values = {"antiphase": antiphase(span, first, second) if len(span) >= 10 else math.nan}
            if unit is not None:
                values["coherence"] = float((unit[first] @ unit[second].T).mean())
            for name, value in values.items():
                if d == 0:
                    result[name][0][s] = value
                else:
                    result[name][1][s, d - 1] = value
    return result


def pair_contrast(series, first, second, first_pool, second_pool, draws=200, seed=0):
    """How much more two groups move in anti-phase than two control groups (`antiphase`): the pair (e.g. sky
    airplanes and sky birds/ships) against pairs from the pools (e.g. no-sky airplanes, no-sky birds/ships).
    Size-matched: every draw subsamples each group and its pool to the smaller of their two sizes, so pair and
    control average over equally many members. series [T, N]; groups and pools: bool [N] or indices. Returns a
    dict: pair and control (medians over draws), contrast = control − pair (> 0: the pair is more opposed), low
    and high (2.5 and 97.5 percentiles over draws of the contrast). Needs `antiphase`."""
    groups = [np.flatnonzero(g) if np.asarray(g).dtype == bool else np.asarray(g)
              for g in (first, second, first_pool, second_pool)]
    if min(len(g) for g in groups) == 0:
        return dict.fromkeys(("pair", "control", "contrast", "low", "high"), math.nan)
    rng, sizes = np.random.default_rng(seed), [min(len(groups[0]), len(groups[2])), min(len(groups[1]), len(groups[3]))]
    values = np.array([[antiphase(series, rng.choice(groups[j], sizes[0], replace=False),
                                  rng.choice(groups[j + 1], sizes[1], replace=False)) for j in (0, 2)]
                       for _ in range(draws)])
    low, high = np.nanpercentile(values[:, 1] - values[:, 0], [2.5, 97.5])
    pair, control = np.nanmedian(values, axis=0)
    return {"pair": float(pair), "control": float(control), "contrast": float(control - pair),
            "low": float(low), "high": float(high)}

def null_false_positive_rate(null, alternative="less", level=0.05):
    """The false-positive rate of `combined_p` where the null holds by construction: each draw of null [S, D] in
    turn plays the observation against the other draws (picked by the same rule, nothing planted). Returns the
    fraction of draws with p < level; a calibrated test gives about `level`. Needs `combined_p`, `null_p`."""
    null = np.asarray(null, dtype=np.float64)
    p = [combined_p(null[:, d], np.delete(null, d, axis=1), alternative)[0] for d in range(null.shape[1])]
    return float(np.mean(np.asarray(p) < level)) if null.shape[1] > 1 else math.nan


def t_interval(values, level=0.95):
    """Mean of the finite `values` and its two-sided Student t interval mean ± q·sd/√n, q the (1 + level)/2 quantile
    of Student's t with n − 1 degrees of freedom (integrated numerically from its density). Returns (mean, low,
    high); low and high are nan for fewer than 2 values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return (float(values.mean()) if len(values) else math.nan), math.nan, math.nan
    grid = np.linspace(0, 200, 400001)
    density = np.exp(torch.distributions.StudentT(float(len(values) - 1)).log_prob(torch.as_tensor(grid)).numpy())
    cdf = 0.5 + np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * (grid[1] - grid[0]))])
    half = grid[np.searchsorted(cdf, (1 + level) / 2)] * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def matched_examples(values, chosen, labels=None):
    """A matched control for the examples `chosen`: for each in turn, the example not yet taken (and not chosen),
    of the same label when labels [N] are given, nearest to it in `values` [N] or [N, F] (columns standardized),
    without replacement. Returns int64 [len(chosen)], −1 where no candidate is left."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    values = (values - values.mean(0)) / np.maximum(values.std(0), 1e-300)
    available, result = np.ones(len(values), dtype=bool), []
    available[np.asarray(chosen)] = False
    for i in chosen:
        candidates = np.flatnonzero(available & (True if labels is None else np.asarray(labels) == labels[i]))
        result.append(candidates[np.argmin(((values[candidates] - values[i]) ** 2).sum(1))] if len(candidates) else -1)
        available[max(result[-1], 0)] &= result[-1] < 0
    return np.asarray(result, dtype=np.int64)


def intervention_endpoints(history, lr, pair, window=50, rate_steps=100):
    """The endpoints of one gradient-descent run of a causal test, from its `train` history with sharpness
    measurements ("eigenvalues"): crossing (the step the sharpness first reaches 2/lr, `edge_of_stability`,
    interpolated; nan: never) and after (it rounded up; the run's length when never); rate, the sharpening per 100
    steps over the fixed window 0..rate_steps, (λ(rate_steps) − λ(0)) / rate_steps · 100 with λ interpolated;
    antiphase, the pair's (bool [N] each) amplitude after the crossing, mean |Δ(L_first − L_second)| per step;
    spikes, `loss_spikes` events per 100 steps after the crossing; final, the last training loss; curve, the
    sharpness at every step [T] (nan where not measured). Needs `edge_of_stability`, `measured`, `loss_spikes`."""
    steps, sharpness = measured(history, "eigenvalues")
    crossing = edge_of_stability(steps, sharpness[:, 0], 2 / lr)["crossing"]
    losses, T = history["per_example_loss"].astype(np.float64), len(history["loss"])
    after = T if math.isnan(crossing) else int(math.ceil(crossing))
    gap = losses[after:, pair[0]].mean(1) - losses[after:, pair[1]].mean(1) if T - after > 2 else np.zeros(2)
    curve = np.full(T, np.nan)
    curve[steps] = sharpness[:, 0]
    return {"crossing": crossing, "after": after, "rate": sharpening_rate(steps, sharpness[:, 0], rate_steps),
            "antiphase": float(np.abs(np.diff(gap)).mean()), "final": float(history["loss"][-1]), "curve": curve,
            "spikes": 100 * float(np.sum(loss_spikes(history["loss"])[:, 0] >= after)) / max(T - after, 1)}


# ----------------------------------------------------------------------------- 4. Features the groups share
#
# The sky feature: one documented pixel rule defines the groups, so that they come from the images, not from the
# network. Synthetic images plant the same feature where we control it. Probes are uniform images: how the
# network's output on a flat sky-coloured image moves tells how it uses the colour itself.

def sky_pixels(images):
    """The sky rule, per pixel: blue-dominant and not dark, B > R + 10, B >= G and B > 80 (0..255).
    images uint8 [N, H, W, 3] -> bool [N, H, W]."""
    pixels = images.to(torch.int32)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return (blue > red + 10) & (blue >= green) & (blue > 80)


def sky_groups(images, sky_at=0.7, clear_below=0.1, flat_below=20.0, rows=0.25):
    """Images with a sky background, and images clearly without one; ambiguous images are in neither.
    sky: at least `sky_at` of the top `rows` of rows are sky pixels (`sky_pixels`). No sky: at most
    `clear_below` are, and the top is not flat (luminance std >= `flat_below` grey levels), so grey skies and
    other uniform backgrounds, features that could themselves be opposing signals, stay out of the control. The
    rule is crude by design (blue water at the top counts as sky). Returns (sky, no_sky) bool [N].
    Needs `sky_pixels`."""
    top = images[:, :max(1, int(round(rows * images.shape[1])))]
    fraction = sky_pixels(top).flatten(1).float().mean(1)
    luminance_std = (top.float() @ torch.tensor([0.299, 0.587, 0.114])).flatten(1).std(1)
    return fraction >= sky_at, (fraction <= clear_below) & (luminance_std >= flat_below)


def make_planted_images(n=1000, num_classes=10, image_size=32, planted_classes=(0, 2), planted_fraction=0.25,
                        planted_strength=1.0, class_signal=5.0, noise=60.0, seed=0):
    """Synthetic images with a planted pair of opposing signals.

    Each class c has a fixed random smooth pattern T_c (unit pixel std): an image of class c is
    128 + class_signal·T_c + noise·z per pixel and channel (z i.i.d. Gaussian, clipped to uint8); class_signal
    sets how strongly genuine class evidence competes with the planted feature (5 against noise 60: weak and
    slow to fit; 30: easy). A fraction `planted_fraction` of the images of each of the two `planted_classes`
    get a sky-blue background (RGB 80, 150, 255 plus noise of std 10) outside a centred square of half the
    image size, blended in with weight planted_strength (1: replaced, 0: nothing planted). The background
    appears on both classes, so by itself it carries no label information; it is large in pixel norm and rare:
    the structure the paper says produces opposing signals. planted_fraction 0 gives unplanted data.
    Returns images uint8 [n, H, W, 3], labels int64 [n] (balanced, shuffled) and planted int64 [n]
    (0: none; 1: background on planted_classes[0]; 2: on planted_classes[1]).
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=generator)]
    z = torch.randn(n, 3, image_size, image_size, generator=generator)
    images = 128 + class_signal * templates[labels] + noise * z
    planted = torch.zeros(n, dtype=torch.int64)
    for group, cls in enumerate(planted_classes, start=1):
        members = torch.nonzero(labels == cls).flatten()
        planted[members[:round(planted_fraction * len(members))]] = group
    border = torch.ones(image_size, image_size, dtype=torch.bool)
    quarter = image_size // 4
    border[quarter:image_size - quarter, quarter:image_size - quarter] = False
    sky = torch.tensor([80.0, 150.0, 255.0]).view(3, 1, 1) + 10 * z[planted > 0]
    blended = (1 - planted_strength) * images[planted > 0] + planted_strength * sky
    images[planted > 0] = torch.where(border, blended, images[planted > 0])
    images = images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return images, labels.to(torch.int64), planted


def recolour(images, masks):
    """Copies of `images` in which the pixels of `masks` take the mean colour of the same image's other pixels
    (the background turns neutral, the rest of the example is kept). images uint8 [N, H, W, 3], masks bool
    [N, H, W] (e.g. `sky_pixels`, or the top quarter of rows as its control). Returns the images and the
    fraction of pixels changed per image [N], so that a no-op cannot pass unseen."""
    images, masks = images.clone(), torch.as_tensor(masks, dtype=torch.bool)
    for image, mask in zip(images, masks):
        if mask.any() and (~mask).any():
            image[mask] = image[~mask].float().mean(0).round().to(torch.uint8)
    changed = masks & ~(masks.flatten(1).all(1) | ~masks.flatten(1).any(1)).view(-1, 1, 1)
    return images, changed.flatten(1).float().mean(1)


def paste_top(images, rgb, rows=0.25, members=None):
    """Copies of `images` whose top `rows` of rows is the uniform colour `rgb` (0..255; None: unchanged), on every
    image or on the `members` (indices): the sky rule in reverse."""
    images, members = images.clone(), slice(None) if members is None else torch.as_tensor(members, dtype=torch.long)
    if rgb is not None:
        images[members, :max(1, int(round(rows * images.shape[1])))] = torch.tensor(rgb).round().to(torch.uint8)
    return images


def uniform_probe(rgb, mean, std, size=32):
    """A uniform image of colour `rgb` (0..255), normalized like the training data (mean, std from `normalize`):
    float32 [1, 3, size, size]."""
    colour = torch.as_tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).round() / 255
    return ((colour - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).expand(1, 3, size, size).contiguous()


def orthogonal_probe(probe):
    """The control for a uniform probe [1, 3, H, W] in normalized input space: a uniform image of the same norm
    whose channel vector c' is orthogonal to the probe's c and to the grey axis (1, 1, 1), c' ∝ c × (1, 1, 1):
    as far from the probe's colour as any image of its size, with no change of brightness."""
    colour = probe[0, :, 0, 0]
    other = torch.linalg.cross(colour, torch.ones(3, dtype=colour.dtype))
    return (other * colour.norm() / other.norm().clamp_min(1e-30)).view(1, 3, 1, 1).expand_as(probe).contiguous()


def token_features(x, y, vocabulary):
    """Named features of every token example (sequence i, position t), flat over B·T: its target character
    ("target 'e'") and its input, the previous character ("after ' '"). Returns (names [F], bool masks [F, B·T])."""
    inputs, targets = x.reshape(-1).numpy(), y.reshape(-1).numpy()
    names = [f"target {vocabulary[c]!r}" for c in np.unique(targets)] + [f"after {vocabulary[c]!r}"
                                                                          for c in np.unique(inputs)]
    masks = [targets == c for c in np.unique(targets)] + [inputs == c for c in np.unique(inputs)]
    return names, np.stack(masks)


def feature_shares(features, index, loss_change):
    """Which features the outliers carry: for each feature (bool masks [F, N] over the examples, e.g. "target ' '",
    the tokens whose next character is a space) its share of the outliers' summed |Δℓ| over the selections and
    its base rate (the fraction of all examples). index, loss_change [S, top]. Returns (share [F], base [F])."""
    mass = np.zeros(features.shape[1])
    np.add.at(mass, np.asarray(index).reshape(-1), np.abs(np.asarray(loss_change, dtype=np.float64)).reshape(-1))
    return features @ mass / max(mass.sum(), 1e-300), features.mean(1)

def sky_pair(labels, sky, no_sky, first=(0,), second=(2, 8)):
    """The sky pair and its controls, bool [N] each: sky images of the `first` classes (CIFAR-10: airplanes) and of
    the `second` (birds and ships), then the clearly-no-sky images of the same classes (`sky_groups`)."""
    a, b = np.isin(labels, first), np.isin(labels, second)
    return sky & a, sky & b, no_sky & a, no_sky & b


def probe_swing(outputs, classes, probe=0, controls=(1, 3)):
    """How much a uniform probe's output on `classes` moves from step to step, against control probes: mean |Δ| of
    the mean over `classes` of outputs [T, P, C] for the probe, over the largest of the controls' (e.g. a grey
    probe and `orthogonal_probe`)."""
    swing = np.abs(np.diff(np.asarray(outputs)[:, :, list(classes)].mean(-1), axis=0)).mean(0)
    return float(swing[probe] / np.max(swing[list(controls)]))


def probe_tracking(outputs, losses, labels, sky, no_sky, classes, probe=0, control=3):
    """Does the probe follow the feature? |corr| of the step changes of the probe's mean output on `classes`
    (outputs [T, P, C]) with those of the differential loss L(sky members of classes) − L(no-sky members) (losses
    [T, N]), minus the same for the control probe. Needs `antiphase`."""
    members = np.isin(labels, classes)
    difference = losses[:, sky & members].mean(1) - losses[:, no_sky & members].mean(1)
    series = np.column_stack([np.asarray(outputs)[:, [probe, control]][:, :, list(classes)].mean(-1), difference])
    return abs(antiphase(series, [0], [2])) - abs(antiphase(series, [1], [2]))


def top_feature(features, index, loss_change, min_base=0.01):
    """The feature the outliers carry most: among features with base rate >= min_base (`feature_shares`), the one
    with the largest share of the outliers' |Δℓ| over its base rate. Returns (feature index, that ratio).
    Needs `feature_shares`."""
    share, base = feature_shares(features, index, loss_change)
    ratio = np.where(base >= min_base, share / np.maximum(base, 1e-300), -np.inf)
    return int(np.argmax(ratio)), float(np.max(ratio))


def feature_pair(features, names, index, loss_change, min_base=0.01):
    """A feature-defined opposing pair for text, like sky airplanes against sky birds and ships: in the context
    ("after c") that carries the most outlier |Δℓ| (base rate >= min_base), the target carrying most of it
    against every other target; the controls are the same targets in all other contexts. Returns the four bool
    masks [N] of `pair_contrast` and a description. Needs `feature_shares`."""
    share, base = feature_shares(features, index, loss_change)
    context = max((i for i, name in enumerate(names) if str(name).startswith("after") and base[i] >= min_base),
                  key=lambda i: share[i])
    mass = np.zeros(features.shape[1])
    np.add.at(mass, np.asarray(index).reshape(-1), np.abs(np.asarray(loss_change, dtype=np.float64)).reshape(-1))
    target = max((i for i, name in enumerate(names) if str(name).startswith("target")),
                 key=lambda i: mass[features[i] & features[context]].sum())
    inside, main = features[context], features[target]
    return inside & main, inside & ~main, ~inside & main, ~inside & ~main, f"{names[target]} vs others, {names[context]}"


def paste_swing(shift, crossing, span=50, controls=(1, 2, 3)):
    """How much more a pasted feature's effect swings after the crossing than before, against control pastes:
    shift [T, P] (e.g. p(airplane) on pasted minus original test images, at every step; column 0 the sky paste).
    For each paste, mean |step change| over the `span` steps after the crossing over the `span` steps before;
    returns log(the sky's ratio) − log(the largest control's). nan without a crossing."""
    if not math.isfinite(crossing):
        return math.nan
    c, change = int(round(crossing)), np.abs(np.diff(np.asarray(shift, dtype=np.float64), axis=0))
    ratio = change[c:c + span].mean(0) / np.maximum(change[max(c - span, 0):c].mean(0), 1e-300)
    return float(np.log(ratio[0]) - np.log(np.max(ratio[list(controls)])))


# ----------------------------------------------------------------------------- 5. Two-layer linear model
#
# OUR RECONSTRUCTION. The paper analyses a two-layer linear network on "a simple model of opposing
# signals"; its text is not available to us, so the model, the data and the derivation below are
# built from first principles and checked against simulation (run_all.py --only linear).
#
# Model and loss. f(x) = bᵀA x with A [h, d], b [h]; w = Aᵀb [d] is the end-to-end linear map.
# L = (1/N) Σ_i ½ (f(x_i) − y_i)², residual r_i = f(x_i) − y_i, Σ = (1/N) Σ_i x_i x_iᵀ,
# g = ∇_w L = (1/N) Σ_i r_i x_i.
#
# Hessian. Along a parameter direction (Ȧ, ḃ) the output moves by ḟ_i = ẇᵀx_i with
# ẇ = Ȧᵀb + Aᵀḃ, and f̈_i = 2 ḃᵀȦ x_i, so
#     (Ȧ, ḃ)ᵀ H (Ȧ, ḃ) = ẇᵀ Σ ẇ  +  2 ḃᵀȦ g        (Gauss-Newton term + residual term).
# The residual term has eigenvalues ±|g| (|2 ḃᵀȦg| <= |g| (|Ȧ|² + |ḃ|²)), so it vanishes where the
# fit is stationary. The Gauss-Newton term is J_wᵀ Σ J_w with J_w: (Ȧ, ḃ) -> ẇ, and
# J_w J_wᵀ = |b|² I + AᵀA, so its non-zero eigenvalues are those of Σ^½ (|b|² I + AᵀA) Σ^½
# (the neural tangent kernel of a two-layer linear net, seen through the data).
#
# Data (make_opposing_signal_data). x = (x_o, x_g): by construction Σ = diag(p α², diag(scales²))
# exactly, with p the fraction of examples that carry the opposing feature x_o = ±α. Take the
# opposing direction θ_o = (b e_oᵀ, a)/√S with a = A e_o (the hidden weights that read x_o) and
# S = |a|² + |b|². Then ẇ = (|b|² e_o + Aᵀa)/√S, whose x_o component is √S, and g_o = p α² w_o
# with w_o = aᵀb the end-to-end weight on x_o ("the opposing weight"). Its Rayleigh quotient is
#     θ_oᵀ H θ_o = p α² S  +  |Σ_g^½ A_gᵀ a|² / S  +  2 p α² w_o² / S.
# The key step: x_o carries no signal (its best weight is 0) and its gradient ∇_a L = g_o b = p α² w_o b
# only ever shrinks w_o, so |a| stays at its initial scale until an oscillation starts, and the last
# two terms are small. When p α² exceeds the genuine features' scales, θ_o is the top eigenvector and
#     sharpness ≈ p α² (|b|² + |A e_o|²) ≈ p α² |b|².
# Depth makes this grow: under gradient flow d/dt (AAᵀ − bbᵀ) = 0 (Ȧ = −b gᵀ, ḃ = −A g), so
# from a small init A ≈ b uᵀ with |u| = 1, hence w = |b|² u and |b|² = |w|: the sharpness grows linearly
# with the learned genuine signal and ends at p α² |β| (progressive sharpening caused by depth acting on
# the large feature, not by anything x_o itself does).
#
# Edge of stability. Where the genuine part is fit (∇_{w_g} L = 0) one GD step with step size η moves
# only the opposing block, a -> a − η g_o b and b -> b − η g_o a, and exactly
#     w_o -> (1 − η λ + (η p α² w_o)²) w_o,     S -> S − η p α² w_o² (4 − η λ),
#     λ = p α² S.
# Once λ > 2/η the opposing weight flips sign every step and grows by |1 − η λ| per step; the two groups
# s = ±1 see the output shifted by ±α w_o, so their losses alternate (for this data L+ − L− = −2 α
# offset w_o exactly). And for 2 < η λ < 4 the oscillation itself shrinks S by an amount ∝ w_o², so the
# sharpness falls back towards 2/η (self-stabilization) instead of diverging.


def make_opposing_signal_data(n_pairs=200, n_plain=800, alpha=7.0, scales=(1.0, 0.7, 0.5, 0.35, 0.25),
                              beta=None, offset=0.5, seed=0, dtype=torch.float64):
    """Regression data with one large, rare feature that opposes itself across two groups.

    OUR RECONSTRUCTION of the paper's "simple model of opposing signals". x = (x_o, x_g) [N, 1 + k].
    Genuine features x_g [k]: Gaussian, then centred and whitened so that their empirical second
    moment is exactly diag(scales²), separately on the signal-bearing and the plain examples
    (so the identities below hold exactly over the data, not only in expectation); different
    scales make a linear network learn them one after another, largest first.
    Opposing feature x_o = α s: each of the n_pairs signal-bearing x_g appears twice, with s = +1 and
    with s = −1; the n_plain other examples have s = 0. Hence, averaged over the N = 2 n_pairs + n_plain
    examples, E[x_o] = 0, E[x_o x_g] = 0, E[x_o y] = 0 and E[x_o²] = p α² with p = 2 n_pairs / N: x_o
    carries no information about y (its best linear weight is 0), is large (α above every scale) and
    rare (p < 1).
    Target y = βᵀx_g + offset·|s| (β all ones by default). The offset is shared by both groups and
    depends on |x_o| only, so no linear function of x fits it (x has mean zero): a linear model's
    residual on the signal-bearing examples keeps the sign of −offset, which is what makes a weight
    on x_o help one group and hurt the other (their loss difference is exactly −2 α offset w_o for the
    two-layer linear model). It changes neither ∇_w L nor the Hessian, only the loss. A ReLU network
    can fit it by computing |x_o| (section 6).

    Returns x [N, 1 + k], y [N] (dtype), sign [N] int64 in {+1, −1, 0}; rows ordered +1 group,
    −1 group, plain.
    """
    generator = torch.Generator().manual_seed(seed)
    scales = torch.as_tensor(scales, dtype=torch.float64)
    beta = (torch.ones(len(scales), dtype=torch.float64) if beta is None
            else torch.as_tensor(beta, dtype=torch.float64))

    def whitened(n):
        # exact zero mean and identity second moment, then the requested scales
        z = torch.randn(n, len(scales), generator=generator, dtype=torch.float64)
        z = z - z.mean(0)
        cholesky = torch.linalg.cholesky(z.T @ z / n)
        return torch.linalg.solve_triangular(cholesky, z.T, upper=False).T * scales

    signal_features, plain_features = whitened(n_pairs), whitened(n_plain)
    genuine = torch.cat([signal_features, signal_features, plain_features])
    sign = torch.cat([torch.ones(n_pairs), -torch.ones(n_pairs), torch.zeros(n_plain)]).to(torch.int64)
    x = torch.cat([alpha * sign[:, None].to(torch.float64), genuine], dim=1)
    y = genuine @ beta + offset * sign.abs().to(torch.float64)
    return x.to(dtype), y.to(dtype), sign


class TwoLayerLinear(nn.Module):
    """f(x) = bᵀ A x, A [width, in_features], b [width]; forward returns [B, 1] (one output column).

    Both factors start i.i.d. N(0, init_scale²) (seeded): small and nearly balanced (AAᵀ ≈ bbᵀ up to
    O(init_scale²)), the regime in which a deep linear net learns its target's directions one at a time.
    """

    def __init__(self, in_features, width=10, init_scale=0.01, seed=0, dtype=torch.float64):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(init_scale * torch.randn(width, in_features, generator=generator, dtype=dtype))
        self.b = nn.Parameter(init_scale * torch.randn(width, generator=generator, dtype=dtype))

    def forward(self, x):
        return (x @ self.A.T @ self.b).unsqueeze(-1)


def regression_loss(outputs, targets):
    """Per-example squared error of a scalar output: ½ (outputs[i, 0] − targets[i])².
    [B, 1], [B] -> [B]."""
    return 0.5 * (outputs[:, 0] - targets).pow(2)


def opposing_weight(model, feature=0):
    """The end-to-end weight of a TwoLayerLinear on input `feature`: w_o = (A e_o)·b (a float)."""
    with torch.no_grad():
        return float(model.A[:, feature] @ model.b)


def predicted_sharpness(model, signal_moment, feature=0):
    """Our prediction of the top Hessian eigenvalue of a TwoLayerLinear: E[x_o²] (|A e_o|² + |b|²).

    signal_moment = E[x_o²] over the training set (p α² for make_opposing_signal_data). This is the
    Gauss-Newton curvature along the opposing direction θ_o = (b e_oᵀ, A e_o) (derivation at the top of
    this section, OUR RECONSTRUCTION); it is the sharpness when E[x_o²] dominates the genuine features'
    second moments and the residual term (norm |∇_w L|) is smaller than it. Returns a float.
    """
    with torch.no_grad():
        a, b = model.A[:, feature], model.b
        return float(signal_moment * (a @ a + b @ b))


def opposing_rayleigh_quotient(model, x, y, feature=0):
    """Exact curvature of the mean squared error of a TwoLayerLinear along the opposing direction θ_o.

    θ_o = (b e_oᵀ, A e_o)/√S, S = |A e_o|² + |b|² (unit norm). With Σ = xᵀx/N, g = xᵀr/N
    (r = f(x) − y) and ẇ = (|b|² e_o + Aᵀ A e_o)/√S:  θ_oᵀ H θ_o = ẇᵀ Σ ẇ + 2 w_o g_o / S,
    the Gauss-Newton and residual terms of this section's derivation with nothing dropped (for
    make_opposing_signal_data it equals p α² S + |Σ_g^½ A_gᵀa|²/S + 2 p α² w_o²/S). A lower bound
    on the sharpness (Courant-Fischer) that is tight when θ_o is the top eigenvector. x [N, d], y [N].
    Returns a float.
    """
    with torch.no_grad():
        a, b = model.A[:, feature], model.b
        norm_sq = a @ a + b @ b
        w_dot = (model.A.T @ a) / norm_sq.sqrt()
        w_dot[feature] += (b @ b) / norm_sq.sqrt()
        residual = model(x)[:, 0] - y
        gradient = residual @ x / len(x)
        second_moment = x.T @ x / len(x)
        return float(w_dot @ second_moment @ w_dot + 2 * (a @ b) * gradient[feature] / norm_sq)


def linear_state(model, x, y, sign, feature=0):
    """What the derivation predicts and needs, for a TwoLayerLinear on (x, y) with groups sign [N] (+1, −1, 0):
    opposing_weight, prediction (`predicted_sharpness`), rayleigh_quotient (`opposing_rayleigh_quotient`),
    loss_plus and loss_minus (the two groups' mean losses), b_norm_sq = |b|², genuine_norm = |A_gᵀb| (the
    learned genuine weights) and residual_term_norm = |∇_w L| (the residual term's scale). A dict of floats.
    Needs `opposing_weight`, `predicted_sharpness`, `opposing_rayleigh_quotient`, `regression_loss`."""
    with torch.no_grad():
        losses, keep = regression_loss(model(x), y), torch.arange(x.shape[1]) != feature
        return {"opposing_weight": opposing_weight(model, feature), "rayleigh_quotient":
                opposing_rayleigh_quotient(model, x, y, feature), "prediction": predicted_sharpness(
                    model, float((x[:, feature] ** 2).mean()), feature), "loss_plus": float(losses[sign > 0].mean()),
                "loss_minus": float(losses[sign < 0].mean()), "b_norm_sq": float(model.b @ model.b),
                "genuine_norm": float((model.A[:, keep].T @ model.b).norm()),
                "residual_term_norm": float(((model(x)[:, 0] - y) @ x / len(x)).norm())}


def flip_growth(opposing_weight, sharpness, lr, episode):
    """How fast the opposing weight grows once it flips, against the derivation's |1 − lr·λ| per step: the median
    over the first stretch of the `episode` (bool [T]), up to its largest swing, of |w_o(t+1)/w_o(t)| /
    |1 − lr·λ_t| (1: the predicted rate). opposing_weight, sharpness [T]. nan without an episode."""
    if not np.any(episode):
        return math.nan
    start = int(np.argmax(episode))
    stop = start + int(np.argmin(episode[start:])) if not np.all(episode[start:]) else len(episode)
    w, steps = np.asarray(opposing_weight), np.arange(start, start + int(np.argmax(np.abs(opposing_weight[start:stop]))))
    return float(np.median(np.abs(w[steps + 1] / w[steps]) / np.abs(1 - lr * np.asarray(sharpness)[steps])))


def period_two_fraction(values):
    """Fraction of consecutive triples that alternate in sign: mean over t of
    [v_t v_{t+1} < 0 and v_{t+1} v_{t+2} < 0].

    Unlike a single sign change (a slow drift through zero also makes one), two in a row is the
    signature of the period-2 oscillation of gradient descent along a direction with η λ > 1.
    values [T] -> float in [0, 1] (nan for T < 3).
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 3:
        return float("nan")
    flips = values[1:] * values[:-1] < 0
    return float(np.mean(flips[1:] & flips[:-1]))


def oscillation_episode(group_loss_plus, group_loss_minus, sharpness, threshold, rel_gap=0.1):
    """Steps of an edge-of-stability episode in which the two opposing groups' losses visibly split.

    A step t belongs to it when t is at or after the first step with sharpness[t] >= threshold (2/lr)
    and |L+ − L−| >= rel_gap · (L+ + L−)/2, i.e. the opposing weight moves the two groups' mean losses
    apart by at least rel_gap (10%) of their average. All arrays [T] (per step). Returns a bool mask [T]
    (all False if the sharpness never crosses the threshold).
    """
    plus, minus, sharpness = (np.asarray(v, dtype=np.float64)
                              for v in (group_loss_plus, group_loss_minus, sharpness))
    crossed = np.nonzero(sharpness >= threshold)[0]
    mask = np.zeros(len(plus), dtype=bool)
    if len(crossed):
        gap = np.abs(plus - minus) >= rel_gap * (plus + minus) / 2
        mask[crossed[0]:] = gap[crossed[0]:]
    return mask


def consecutive_sign_changes(values, mask):
    """Among consecutive steps (t, t+1) both inside `mask`, the fraction where values changes sign.

    values, mask [T]. Returns (fraction float, number of pairs int); fraction is nan with no pairs.
    """
    values, mask = np.asarray(values, dtype=np.float64), np.asarray(mask, dtype=bool)
    pairs = mask[1:] & mask[:-1]
    if not pairs.any():
        return float("nan"), 0
    return float(np.mean((values[1:] * values[:-1] < 0)[pairs])), int(pairs.sum())


# ----------------------------------------------------------------------------- 6. Toy network
#
# OUR RECONSTRUCTION of the paper's toy example. The data are those of section 5: a rare coordinate
# x_0 = ±α on a fraction p of the examples, no information about y in its sign, and a target offset
# that depends on |x_0| only. A one-hidden-layer ReLU network f(x) = vᵀ relu(U x + c) + c_2 trained by
# full-batch GD on the squared error starts with every ReLU active on both signs of x_0 (small U,
# positive c), i.e. linear in x_0, and can only use x_0 through its odd part f(α e_0) − f(−α e_0)
# until some units are gated off for one sign. Along the x_0 column of U the Gauss-Newton curvature is
#     δuᵀ M δu,   M_jk = (1/N) Σ_i x_{i,0}² v_j v_k 1[unit j active on x_i] 1[unit k active on x_i],
# which for units active on all outliers is M = p α² v vᵀ: the linear model's p α² |b|² with b the
# output weights. So the same depth effect sharpens the network as it learns the genuine features, and
# at 2/lr the odd part, i.e. the network's output on a pure-x_0 probe, oscillates with period 2.
# Under squared error this curvature stays as long as units see both signs, whatever the fit. Under
# two-class cross-entropy (classify the sign of the target) each example's curvature is weighted by
# p_i(1 - p_i): once the network computes |x_0| and fits the outliers with growing margins, the
# curvature along the x_0 column, and with it the sharpness, falls below 2/lr.


def make_toy_network(in_features, width=16, weight_scale=0.05, output_scale=0.1, hidden_bias=0.7, seed=0,
                     num_outputs=1, dtype=torch.float64):
    """A one-hidden-layer ReLU network, nn.Sequential(Linear, ReLU, Linear), that starts linear in the opposing
    input.

    num_outputs: 1 for the squared-error toy, 2 for its two-class cross-entropy version. PyTorch's
    default init, then: first-layer weights times weight_scale, output weights times output_scale (a
    small init, so the network learns its features progressively), hidden biases set to hidden_bias
    > 0 and output biases 0. With weight_scale·α well below hidden_bias every unit is active on both
    signs of x_0 at init.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_outputs)).to(dtype)
    hidden, output = model[0], model[2]
    with torch.no_grad():
        hidden.weight.mul_(weight_scale)
        hidden.bias.fill_(hidden_bias)
        output.weight.mul_(output_scale)
        output.bias.zero_()
    return model


def opposing_probes(alpha, in_features, points=41, span=2.0, dtype=torch.float64):
    """Pure-x_0 probe inputs: x_0 on a grid of `points` values in [−span α, span α], all other inputs 0.

    With the defaults (41 points, span 2) the grid steps by α/10, so −α, 0 and α lie on it exactly.
    Returns probes [points, in_features] and the grid [points].
    """
    grid = alpha * torch.linspace(-span, span, points, dtype=dtype)
    probes = torch.zeros(points, in_features, dtype=dtype)
    probes[:, 0] = grid
    return probes, grid


def odd_even_parts(probe_outputs, grid, alpha):
    """Split the network's use of x_0 into its linear (odd) and |x_0| (even) parts, from probe outputs.

    probe_outputs [T, P] (outputs on `opposing_probes` over T steps), grid [P]. With f± = f(±α e_0)
    and f0 = f(0): odd = (f+ − f−)/2, the part of the output that flips with the sign of x_0 (α w_o for
    the linear model), and even = (f+ + f−)/2 − f0, the part that depends on |x_0| only. The grid
    points nearest to ±α and 0 are used. Returns (odd [T], even [T]) numpy float64.
    """
    outputs, grid = np.asarray(probe_outputs, dtype=np.float64), np.asarray(grid, dtype=np.float64)
    plus, minus, zero = (int(np.argmin(np.abs(grid - value))) for value in (alpha, -alpha, 0.0))
    return ((outputs[:, plus] - outputs[:, minus]) / 2,
            (outputs[:, plus] + outputs[:, minus]) / 2 - outputs[:, zero])


def opposing_curvature(model, x, feature=0):
    """Top eigenvalue of M, the Gauss-Newton curvature of the first-layer column that reads x_feature.

    For f(x) = Vᵀ relu(U x + c) + c_2 (`make_toy_network`) with one output
    v (squared error): M_jk = (1/N) Σ_i x_{i,f}² v_j v_k 1_j(x_i) 1_k(x_i), 1_j(x) = [unit j is active
    on x]. Its top eigenvalue is the curvature of the mean loss along the best direction of U[:, f];
    it equals p α² |v|² when every unit is active on every outlier (the linear model's prediction
    with b = v), and is smaller when units are gated off for one sign. With two outputs (two-class
    cross-entropy) the loss depends on the logit difference only, with curvature p_i(1 - p_i)
    (p_i = softmax probability): v becomes v_1 - v_0 and example i is weighted by p_i(1 - p_i), which
    goes to 0 as the example is fit with a large margin. OUR RECONSTRUCTION. Returns a float.
    """
    hidden, output = model[0], model[2]
    with torch.no_grad():
        active = (x @ hidden.weight.T + hidden.bias > 0).to(x.dtype)            # [N, width]
        if output.weight.shape[0] == 1:
            direction, weight = output.weight[0], torch.ones(len(x), dtype=x.dtype)
        else:
            direction = output.weight[1] - output.weight[0]
            probability = torch.softmax(model(x), dim=-1)[:, 1]
            weight = probability * (1 - probability)
        # ∂(f or f_1 - f_0)/∂U[j, f]
        rows = x[:, feature:feature + 1] * active * direction * weight.sqrt()[:, None]
        return float(torch.linalg.eigvalsh(rows.T @ rows / len(x))[-1])


def toy_state(model, loss_fn, x, y, sign, probes):
    """The toy network's state on data with groups sign [N] (+1, −1, 0): loss_plus and loss_minus (the groups' mean
    losses), opposing_curvature (`opposing_curvature`), column_cosine (cosine of the two groups' gradients on the
    first-layer column that reads x_0, `group_gradients`), active_both (fraction of units active on both an
    x_0 = +α example and its −α twin) and probe_output (outputs on `opposing_probes`, or for two classes the
    logit difference f_1 − f_0). Needs `opposing_curvature`, `group_gradients`, `preserved`."""
    grads = group_gradients(model, loss_fn, x, y, [sign > 0, sign < 0])
    column = [g[:model[0].weight.numel()].view_as(model[0].weight)[:, 0] for g in grads]   # U[:, 0] reads x_0
    with torch.no_grad():
        losses, active, outputs = loss_fn(model(x), y), model[0](x) > 0, model(probes)
        return {"loss_plus": float(losses[sign > 0].mean()), "loss_minus": float(losses[sign < 0].mean()),
                "opposing_curvature": opposing_curvature(model, x),
                "column_cosine": float(column[0] @ column[1] / (column[0].norm() * column[1].norm() + 1e-300)),
                "active_both": float((active[sign > 0] & active[sign < 0]).float().mean()),
                "probe_output": (outputs[:, -1] - (outputs[:, 0] if outputs.shape[1] == 2 else 0)).numpy()}


def late_fall(sharpness):
    """1 − (mean sharpness over the last 10% of steps) / (maximum sharpness): how far it has fallen back."""
    sharpness = np.asarray(sharpness)
    return float(1 - sharpness[int(0.9 * len(sharpness)):].mean() / sharpness.max())


def half_learned_step(even):
    """First step at which the network's |x_0| (even) response reaches half its final value.

    even [T]: the even part from `odd_even_parts`. For the squared-error toy the final value is about
    the target offset; for the cross-entropy toy it is the margin the network ends with. Returns T
    (never) when the final value is not positive.
    """
    even = np.asarray(even, dtype=np.float64)
    learned = even >= even[-1] / 2 if even[-1] > 0 else np.zeros(len(even), dtype=bool)
    return int(np.argmax(learned)) if learned.any() else len(even)

# ----------------------------------------------------------------------------- 7. Adam versus SGD
#
# Adam divides each coordinate's step by the running RMS of its gradient; plain SGD does not. What an
# optimizer "sees" as sharpness is then the top eigenvalue of P^-1/2 H P^-1/2, P its diagonal
# preconditioner (`top_eigenvalues(..., preconditioner=P)`), to be compared with its own stability
# threshold. Opposing signals produce large, sign-flipping gradients in a few parameters; SplitSGD
# (OUR RECONSTRUCTION of the paper's proposal) gives Adam's step only to those coordinates. The last
# function says how strongly the groups of examples whose losses move most keep oscillating under
# minibatch noise.


def adam_denominator(exp_avg_sq, step, beta2, eps):
    """Adam's per-coordinate divisor sqrt(v̂) + ε, v̂ = v / (1 − β2^t) the bias-corrected running second
    moment after t steps, in torch.optim.Adam's operation order (so results match it to the last bit)."""
    return exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** float(step)) + eps


def top_quantile_mask(values, quantile):
    """Boolean mask of the round(quantile · n) largest entries of `values` (any shape, n entries).

    quantile 0 selects nothing and 1 everything; ties at the boundary are broken by torch.topk, so
    exactly round(quantile · n) entries are selected. Returns bool, the shape of `values`.
    """
    count = int(round(quantile * values.numel()))
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count >= values.numel():
        mask[:] = True
    elif count > 0:
        mask[torch.topk(values.reshape(-1), count, sorted=False).indices] = True
    return mask.view_as(values)


class SplitSGD(torch.optim.Optimizer):
    """SGD with momentum, except that the most "spiky" coordinates of each tensor take Adam's step.

    OUR RECONSTRUCTION of the paper's split-update proposal (its exact rule is not available to us).
    Per parameter tensor, with gradient g_t, at step t = 1, 2, ...:
        b_t = μ b_{t-1} + g_t  (b_1 = g_1)                 heavy-ball buffer, as torch.optim.SGD
        m_t = β1 m_{t-1} + (1 − β1) g_t,  v_t = β2 v_{t-1} + (1 − β2) g_t²   (m_0 = v_0 = 0), as Adam
        N_t = the round(q · n) coordinates of the tensor with the largest v_t (`top_quantile_mask`)
        θ ← θ − normalized_lr · m̂_t / (sqrt(v̂_t) + ε)   on N_t,
            m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t)
        θ ← θ − lr · b_t                                   elsewhere.
    All three statistics are kept for every coordinate so that a coordinate can move between the two
    sets. q = 0 is exactly torch.optim.SGD(lr, momentum=μ); q = 1 is Adam(normalized_lr, (β1, β2), ε).
    A large running second moment marks the coordinates with large gradients; where those gradients keep
    flipping sign (opposing signals), SGD's steps overshoot and Adam's normalization damps them.
    Needs `adam_denominator`, `top_quantile_mask`.
    """

    def __init__(self, params, lr, normalized_lr=1e-3, quantile=0.1, momentum=0.9, betas=(0.9, 0.999),
                 eps=1e-8):
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile {quantile} must be in [0, 1]")
        super().__init__(params, dict(lr=lr, normalized_lr=normalized_lr, quantile=quantile,
                                      momentum=momentum, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient (see the class docstring for the maths)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["momentum_buffer"] = g.clone()
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = adam_denominator(state["exp_avg_sq"], t, beta2, group["eps"])
                normalized_step = state["exp_avg"] / denom * (group["normalized_lr"] / (1 - beta1 ** t))
                state["normalized"] = top_quantile_mask(state["exp_avg_sq"], group["quantile"])
                p.sub_(torch.where(state["normalized"], normalized_step,
                                   group["lr"] * state["momentum_buffer"]))
        return loss

    @torch.no_grad()
    def preconditioner(self):
        """Per-coordinate P, flat over all parameters in order, such that the update is ≈ lr · P^{-1} b.

        Writing Adam's EMA momentum as a heavy-ball buffer (m = (1 − β1) b for a constant gradient,
        and bias corrections → 1), the normalized coordinates move by
        normalized_lr · (1 − β1) / (sqrt(v̂) + ε) · b, so relative to the SGD coordinates' lr · b
        P = lr · (sqrt(v̂) + ε) / (normalized_lr · (1 − β1)) on the normalized set and 1 elsewhere,
        with the set of the last step. Then λ_max(P^{-1/2} H P^{-1/2}) < (2 + 2μ) / lr is the quadratic
        stability condition (exact for μ = β1). Returns None before the first step.
        """
        parts = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    return None
                rms = adam_denominator(state["exp_avg_sq"], state["step"], beta2, group["eps"])
                scaled = group["lr"] * rms / (group["normalized_lr"] * (1 - beta1))
                parts.append(torch.where(state["normalized"], scaled, torch.ones_like(rms)).reshape(-1))
        return torch.cat(parts)


@torch.no_grad()
def adaptive_preconditioner(optimizer):
    """The diagonal preconditioner P of an adaptive optimizer, flat over its parameters in order.

    torch.optim.Adam: P = sqrt(v̂) + ε (`adam_denominator`, bias-corrected as in Cohen et al., 2022);
    Adam's update is lr · m̂ / P. SplitSGD: its own `preconditioner()`. Any other optimizer: None
    (it has no preconditioner); also None before the first step.
    Needs `adam_denominator`, `top_quantile_mask`, `SplitSGD`.
    """
    if isinstance(optimizer, SplitSGD):
        return optimizer.preconditioner()
    if not isinstance(optimizer, torch.optim.Adam):
        return None
    parts = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                return None
            parts.append(adam_denominator(state["exp_avg_sq"], state["step"], group["betas"][1],
                                          group["eps"]).reshape(-1))
    return torch.cat(parts)

def opposing_group_oscillation(per_example_loss, top=40, window=30, start=0, stride=None):
    """How strongly the examples whose losses move most keep oscillating under minibatch noise, against
    loss-matched control groups. OUR RECONSTRUCTION for stochastic runs, where no single step defines the groups.

    per_example_loss [R, N]: every training example's loss at R record times (every k steps; take k odd, so that
    a period-2 oscillation still alternates between records). Selection at record r: Δ_i = ℓ_i(r+1) − ℓ_i(r);
    the `top` examples by |Δ_i|, split by its sign. Control: for each member in turn, the remaining example
    whose loss at record r+1 is nearest (high-loss examples move more whatever the optimizer does). Measured over
    the `window` record intervals from r+2 (record r+1, where the selecting change ended, is left out): a group's
    amplitude is mean_t |ℓ̄(t+1) − ℓ̄(t)|, ℓ̄ its mean loss; a pair's is the mean of its two groups'. Selections
    at r = start, start + stride, ... (stride: window). Returns a dict: record, amplitude, amplitude_matched,
    relative = amplitude / amplitude_matched [S] and median_relative (nan when S = 0). Needs `matched_examples`.
    """
    losses = np.asarray(per_example_loss, dtype=np.float64)
    rows = []

    def amplitude(span, members, up):
        return np.mean([np.abs(np.diff(span[:, members[side]].mean(1))).mean() for side in (up, ~up)])

    for r in range(start, len(losses) - window - 2, stride or window):
        change = losses[r + 1] - losses[r]
        chosen = np.argsort(-np.abs(change))[:top]
        up = change[chosen] > 0
        if up.all() or not up.any():
            continue
        span = losses[r + 2:r + 3 + window]
        rows.append((r, amplitude(span, chosen, up), amplitude(span, matched_examples(losses[r + 1], chosen), up)))
    record, groups, control = (np.asarray([row[j] for row in rows], dtype=np.float64) for j in range(3))
    relative = groups / np.maximum(control, 1e-300)
    return {"record": record, "amplitude": groups, "amplitude_matched": control, "relative": relative,
            "median_relative": float(np.median(relative)) if rows else math.nan}

# ----------------------------------------------------------------------------- Appendix A. The larger models

class MLP(nn.Module):
    """Fully connected network: flatten -> depth x [Linear(width), activation] -> Linear(num_classes)."""

    def __init__(self, in_features=3072, width=200, depth=2, num_classes=10, activation="relu"):
        super().__init__()
        activations = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}
        layers, fan_in = [nn.Flatten()], in_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), activations[activation]()]
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, ReLU, 2x2 max-pool), global average pool, linear head."""

    def __init__(self, in_channels=3, channels=32, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def small_output_init(model, body_gain, zero_last_conv_of_blocks=False):
    """Initialize a ReLU conv net without batch norm so that its output starts at zero but its features carry
    signal: Kaiming-normal convs (fan_in, ReLU gain) times body_gain with zero biases, a zero linear head and,
    for a ResNet, a zero last conv in every residual branch (each block starts as its shortcut). With PyTorch's
    default init the signal shrinks through the layers and GD stalls at the constant predictor; with plain
    Kaiming the outputs start large and GD at a usual step size diverges. With a zero head the MSE sharpness at
    init is about the squared norm of the mean penultimate feature, which body_gain sets. Returns the model.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                module.weight.mul_(0.0 if zero_last_conv_of_blocks and name.endswith("conv2") else body_gain)
                if module.bias is not None:
                    module.bias.zero_()
        model.head.weight.zero_()
        model.head.bias.zero_()
    return model


class VGG11(nn.Module):
    """VGG-11 for 32x32 inputs (8 conv layers, 5 max-pools, one linear head); no BN by default. Without BN it
    starts from `small_output_init` with body_gain 0.8·(16/width)^(1/16), which keeps the mean penultimate
    feature's norm near 2.5 on CIFAR-10 whatever the width (README: calibration). Needs `small_output_init`."""

    def __init__(self, num_classes=10, width=64, batch_norm=False, body_gain=None):
        super().__init__()
        layers, channels = [], 3
        for item in [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(channels, item * width, 3, padding=1),
                       nn.BatchNorm2d(item * width) if batch_norm else nn.Identity(), nn.ReLU()]
            channels = item * width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)
        if not batch_norm:
            small_output_init(self, 0.8 * (16 / width) ** (1 / 16) if body_gain is None else body_gain)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels, channels, stride, batch_norm):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=not batch_norm)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=not batch_norm)
        self.bn2 = norm(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=not batch_norm),
                                          norm(channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, four stages of two basic blocks, global average pool, linear head. Without BN it
    starts from `small_output_init` with zero residual branches (body_gain 0.69: mean penultimate feature norm near
    3 at widths 32 and 64; README: calibration). Needs `small_output_init`, `BasicBlock`."""

    def __init__(self, num_classes=10, width=64, batch_norm=True, body_gain=0.69):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=not batch_norm),
                                  nn.BatchNorm2d(width) if batch_norm else nn.Identity(), nn.ReLU())
        blocks, channels = [], width
        for stage, stride in enumerate([1, 2, 2, 2]):
            for block in range(2):
                blocks.append(BasicBlock(channels, width * 2 ** stage, stride if block == 0 else 1, batch_norm))
                channels = width * 2 ** stage
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)
        if not batch_norm:
            small_output_init(self, body_gain, zero_last_conv_of_blocks=True)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class LayerNorm(nn.Module):
    """LayerNorm written out: (x − mean) / sqrt(var + eps) · weight + bias over the last dimension."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


class Attention(nn.Module):
    """Multi-head self-attention written out (fused attention kernels have no double backward); with causal=True
    position t attends to positions <= t only, as a language model must."""

    def __init__(self, dim, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                  # x: [B, T, D]
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        if self.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LN transformer block, shared by the ViT and the GPT: h + attention(norm(h)), then + MLP(norm(h))."""

    def __init__(self, dim, heads, mlp_ratio, causal=False):
        super().__init__()
        self.norm1, self.attention = LayerNorm(dim), Attention(dim, heads, causal)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h):
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class ViT(nn.Module):
    """Small vision transformer: patch embedding + learned positions, pre-LN blocks, mean-pooled linear head.
    Needs `Block`, `Attention`, `LayerNorm`."""

    def __init__(self, num_classes=10, image_size=32, patch=4, dim=128, depth=4, heads=4, mlp_ratio=2):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):                                                  # x: [B, 3, H, W]
        p = self.patch
        h = self.embed(x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2))
        h = h + self.position
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))


class GPT(nn.Module):
    """A small character-level GPT: token and learned position embeddings, causal pre-LN blocks, a final LayerNorm
    and a linear head. tokens int64 [B, T <= context] -> logits [B, T, vocab_size]; the logits at position t
    predict token t + 1, so each (sequence, position) is one example. Needs `Block`, `Attention`, `LayerNorm`."""

    def __init__(self, vocab_size=65, context=64, dim=64, depth=2, heads=4, mlp_ratio=4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens):                                             # tokens: [B, T]
        if tokens.shape[1] > self.position.shape[1]:
            raise ValueError(f"GPT: sequences of {tokens.shape[1]} tokens, but the context is "
                             f"{self.position.shape[1]}: pass at most that many")
        h = self.embed(tokens) + self.position[:, :tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

# ----------------------------------------------------------------------------- Appendix B. The data

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_BYTES = 1115394


class DataError(Exception):
    """A data set is missing, cannot be downloaded, or is corrupted. The message says how to fix it."""


def load_cifar10(root=None, train=True, download=True):
    """CIFAR-10 in the official "python version" layout: images uint8 [N, 32, 32, 3] (HWC), labels int64 [N]
    (N = 50,000 train or 10,000 test). Reads root/cifar-10-batches-py/ (root: the argument, else $OSIG_DATA, else
    ./data), made from cifar-10-python.tar.gz (downloaded if allowed, md5-checked, extracted atomically) when
    absent. An extracted folder is checked by structure, not md5, so re-encoded copies load; its pickles are read
    by an unpickler that builds numpy arrays only. Raises DataError with one line that says how to fix it.
    Needs `DataError`, `cifar10_folder`, `read_cifar_batch` and theirs."""
    root = Path(root or os.environ.get("OSIG_DATA") or "data").expanduser()
    folder = cifar10_folder(root, download)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    batches = [read_cifar_batch(folder / name) for name in names]
    images = np.concatenate([data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for data, _ in batches])
    return torch.from_numpy(images), torch.from_numpy(np.concatenate([labels for _, labels in batches]))


def normalize(images, mean=None, std=None):
    """Per-channel standardization: uint8 [N, H, W, C] -> float32 [N, C, H, W], x = (images/255 − mean[c]) / std[c]
    with mean and std [C] over all pixels of these images unless given (pass the training set's to normalize
    test or probe images the same way). Returns (x, mean, std)."""
    x = images.permute(0, 3, 1, 2).float() / 255
    mean = x.mean(dim=(0, 2, 3)) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    std = x.std(dim=(0, 2, 3)) if std is None else torch.as_tensor(std, dtype=torch.float32)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), mean, std


def seeded_subset(n_total, n, seed=0):
    """Indices int64 [n] of a seeded subset: the first n entries of a fixed random permutation of n_total, so the
    subsets of one seed are nested (a small run sees the first examples of a large one)."""
    if not 0 < n <= n_total:
        raise ValueError(f"subset size n={n} must be between 1 and {n_total}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed={seed} must be in 0..2^63 - 1")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def load_tiny_shakespeare(root=None, download=True):
    """The tiny Shakespeare corpus (1,115,394 characters), as one str, from root/tinyshakespeare/input.txt (root:
    the argument, else $OSIG_DATA, else ./data), downloaded from karpathy/char-rnn when missing. The file is
    checked before it is read (a regular file of the right size, so a FIFO or a device cannot hang or exhaust
    memory), then its md5 and encoding. Raises DataError naming the fix. Needs `DataError`, `download_checked`."""
    path = Path(root or os.environ.get("OSIG_DATA") or "data").expanduser() / "tinyshakespeare" / "input.txt"
    fix = (f"delete it and put the file from {SHAKESPEARE_URL} there (or set OSIG_DATA to a folder holding "
           f"tinyshakespeare/input.txt)")
    if not path.exists():
        if not download:
            raise DataError(f"tiny Shakespeare not found at {path}: put the file from {SHAKESPEARE_URL} there, or "
                            f"set OSIG_DATA to a folder holding tinyshakespeare/input.txt")
        download_checked(SHAKESPEARE_URL, path, SHAKESPEARE_MD5)
    size = path.stat().st_size if path.is_file() else None
    if size != SHAKESPEARE_BYTES:
        raise DataError(f"{path} is " + ("not a regular file" if size is None else "empty" if size == 0 else
                        f"{size:,} bytes, not {SHAKESPEARE_BYTES:,} (truncated or a different file)") + f": {fix}")
    data = path.read_bytes()
    if hashlib.md5(data).hexdigest() != SHAKESPEARE_MD5:
        raise DataError(f"{path} is corrupted (md5 {hashlib.md5(data).hexdigest()}, expected {SHAKESPEARE_MD5}): {fix}")
    return data.decode("utf-8")


def encode_characters(text):
    """Character-level tokens: the sorted distinct characters of `text` are the vocabulary (65 for tiny
    Shakespeare), each character its index. Returns tokens int64 [len(text)] and the vocabulary (a str)."""
    vocabulary = "".join(sorted(set(text)))
    index = {character: i for i, character in enumerate(vocabulary)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64), vocabulary


def text_sequences(tokens, n, context, seed=0):
    """A fixed training set of n windows of the token stream at seeded random starts: inputs x [n, context] and
    targets y [n, context] = the next token of each position. Each (sequence, position) is one example:
    y[i, t] is predicted from x[i, :t + 1]."""
    if n < 1 or len(tokens) <= context + 1:
        raise ValueError(f"need n >= 1 sequences and more than context + 1 = {context + 1} tokens")
    starts = torch.randint(0, len(tokens) - context - 1, (n,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([tokens[s:s + context + 1] for s in starts.tolist()])
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def download_checked(url, path, md5, deadline=900, failed=set()):
    """Download `url` to `path` with progress on stderr: into path.part, md5-checked, then renamed into place, so
    `path` is either absent or complete and correct. A connection silent for 30 s, or a download that has not
    finished after `deadline` seconds, stops it; `failed` (a default shared by every call, on purpose) remembers
    the URLs that failed in this process, so a stalled network costs one wait, not one per experiment. Raises
    DataError naming the fix. Needs `DataError`."""
    fix = f"put the file at {path} yourself, or set OSIG_DATA to a folder that holds it"
    if url in failed:
        raise DataError(f"{path} is missing and its download from {url} already failed in this run: {fix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial, digest, start = path.with_name(path.name + ".part"), hashlib.md5(), time.time()
    print(f"downloading {url} to {path} ...", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
            total, done, shown = int(response.headers.get("Content-Length") or 0), 0, 0
            while block := response.read(1 << 20):
                f.write(block)
                digest.update(block)
                done += len(block)
                if time.time() - start > deadline:
                    raise DataError(f"the download of {url} did not finish within {deadline} s: {fix}")
                if done - shown >= 10 << 20:
                    shown = done
                    print(f"  {done >> 20} MB" + (f" of {total >> 20} MB" if total else "") +
                          f" in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        if digest.hexdigest() != md5:
            raise DataError(f"the download of {url} is corrupted (md5 {digest.hexdigest()}, expected {md5}): try "
                            f"again, or {fix}")
        os.replace(partial, path)
    except (OSError, DataError) as error:
        failed.add(url)
        raise error if isinstance(error, DataError) else DataError(
            f"{path} is missing and the download from {url} failed ({error}): {fix}") from None
    finally:
        partial.unlink(missing_ok=True)


def cifar10_folder(root, download=True):
    """root/cifar-10-batches-py, made from root/cifar-10-python.tar.gz when absent: the archive is downloaded when
    missing and allowed (`download_checked`), its md5 checked against CIFAR10_MD5, and it is unpacked into a
    temporary folder renamed into place only when complete. Raises DataError naming the fix.
    Needs `DataError`, `download_checked`."""
    folder, archive = root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz"
    if folder.is_dir():
        return folder
    if not archive.exists():
        if not download:
            raise DataError(f"CIFAR-10 not found in {root}: put cifar-10-python.tar.gz (from {CIFAR10_URL}) or its "
                            f"extracted cifar-10-batches-py/ folder there, or set OSIG_DATA to the folder holding it")
        download_checked(CIFAR10_URL, archive, CIFAR10_MD5)
    md5 = hashlib.md5()
    with open(archive, "rb") as f:
        while block := f.read(1 << 20):
            md5.update(block)
    if md5.hexdigest() != CIFAR10_MD5:
        raise DataError(f"{archive} is corrupted (md5 {md5.hexdigest()}, expected {CIFAR10_MD5}): delete it and "
                        f"download it again from {CIFAR10_URL}")
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".cifar10-extract-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")
        if not (staging / "cifar-10-batches-py").is_dir():
            raise DataError(f"{archive} does not contain cifar-10-batches-py/: delete it and download it again")
        os.replace(staging / "cifar-10-batches-py", folder)
    except (OSError, tarfile.TarError) as error:
        raise DataError(f"{archive} could not be extracted ({error}): delete it and download it again") from None
    finally:
        for path in sorted(staging.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        staging.rmdir()
    return folder


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batch files that builds numpy arrays and nothing else: a pickle can name any
    importable callable and call it while loading, so a tampered data file could run code. Only numpy's array
    reconstruction, numpy.ndarray, numpy.dtype and _codecs.encode (Python 2 byte strings) are resolved; every
    other name raises pickle.UnpicklingError."""
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
               ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
               ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0]}

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                                     f"lists and strings")


def read_cifar_batch(path):
    """One CIFAR-10 batch file: data uint8 [10000, 3072] (CHW rows) and labels int64 [10000], read with
    `CifarUnpickler` (no code in the file can run) after a size check (a real batch is about 31 MB) and checked by
    structure: keys, dtype, shape, integer labels in 0..9. Any damage raises DataError naming the file and the fix.
    Needs `DataError`, `CifarUnpickler`."""
    fix = f"delete {path.parent} and put a fresh copy of cifar-10-batches-py/ (or the archive) there"
    if not path.is_file():
        raise DataError(f"{path} is missing: {fix}")
    if not 30_000_000 <= path.stat().st_size <= 40_000_000:
        raise DataError(f"{path} is {path.stat().st_size:,} bytes, not a CIFAR-10 batch (about 31 MB): {fix}")
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
        labels_ok = isinstance(labels, (list, np.ndarray)) and len(labels) == 10000 and \
            all(isinstance(label, (int, np.integer)) and 0 <= label <= 9 for label in labels)
    except Exception as error:                 # a damaged pickle can raise almost anything while it is read
        raise DataError(f"{path} is unreadable ({type(error).__name__}: {str(error)[:100]}): {fix}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (10000, 3072):
        raise DataError(f"{path} is not a CIFAR-10 batch (data {getattr(data, 'dtype', type(data).__name__)} "
                        f"{getattr(data, 'shape', None)}, expected uint8 (10000, 3072)): {fix}")
    if not labels_ok:
        raise DataError(f"{path} is not a CIFAR-10 batch (labels must be 10,000 integers in 0..9): {fix}")
    return data, np.asarray(labels, dtype=np.int64)


def optimizer_summary(model, loss_fn, history, optimizer, x, y, x_test, y_test, top=40, window=20):
    """One minibatch run in numbers, from its `train` history with per-example losses recorded as "losses" and
    sharpness measurements: train_loss (on all of (x, y); inf if it diverged), test_accuracy, relative (the
    `opposing_group_oscillation` of the recorded losses from the first fifth on, median over selections), ratio
    (the preconditioned sharpness where recorded, else the plain one, over the optimizer's `stability_threshold`:
    median over the second half), early (the top eigenvector's share in the first third of the layers over their
    share of the parameters, mean after step 0) and curve (the mean training loss at the records).
    Needs `evaluate`, `measured`, `opposing_group_oscillation`, `stability_threshold`, `parameter_layers`,
    `early_layer_ratio` and theirs."""
    train_loss, test_accuracy = evaluate(model, loss_fn, x, y)[0], evaluate(model, loss_fn, x_test, y_test)[1]
    _, losses = measured(history, "losses")
    steps, plain = measured(history, "eigenvalues")
    _, preconditioned = measured(history, "preconditioned_eigenvalues")
    seen = (preconditioned if len(preconditioned) else plain)[:, 0] / stability_threshold(optimizer)
    _, shares = measured(history, "layer_shares")
    index = parameter_layers(model)[1]
    return {"train_loss": train_loss if history["diverged"] is None and math.isfinite(train_loss) else math.inf,
            "test_accuracy": test_accuracy, "ratio": float(np.nanmedian(seen[steps >= steps.max() / 2])),
            "relative": opposing_group_oscillation(losses, top, window, start=len(losses) // 5)["median_relative"],
            "early": early_layer_ratio(shares[steps > 0].mean(0), np.bincount(index) / len(index)),
            "curve": losses.mean(1)}
