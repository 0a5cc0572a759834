"""
osig.py: a small, readable reproduction of "Outliers with Opposing Signals Have an Outsized Effect on Neural Network
Optimization" (Rosenfeld & Risteski, ICLR 2024). Read it top to bottom: each section uses only what came before it.
  1. Sharpness      the objective, measuring without side effects, Hessian-vector products, Lanczos, power iteration.
  2. Training       one loop for GD and minibatch optimizers with one measurement hook; the edge of stability.
  3. Outliers       per-example losses, gradients and curvatures; the examples one GD step moves most, split into
                    opposing groups, against null groups that pass the same selection; one null test for all.
  4. Features       what the groups share: the sky rule, planted skies, recolouring, uniform probes, characters.
  5. Linear model   a two-layer linear network with an opposing feature: its sharpness in closed form.
  6. Toy network    a small ReLU network on a rare, large input: the mechanism end to end.
  7. Adam and SGD   preconditioned sharpness, split-update SGD, opposing groups under minibatch noise.
  Appendices        A: the larger models (MLP, CNN, VGG-11, ResNet-18, ViT, GPT); B: the data files.
A `loss_fn` maps (outputs [B, C], labels [B]) to per-example losses [B]; the objective is their mean. For a language
model outputs are [B, T, C] and labels [B, T], each (sequence, position) is one example, and per-example arrays are
flat over B·T. Flat parameter vectors follow model.parameters() (trainable ones) in order. Measurements are of the
deterministic objective (dropout off, `preserved`). Every public function works when pasted elsewhere with the imports
below and the helpers its docstring names after "Needs" (and theirs).
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
    """Per-example squared error to one-hot targets, ½ Σ_c (outputs[i, c] − 1[c = labels[i]])², summed (not averaged)
    over classes as in Cohen et al.: outputs [B, C], integer class labels [B] -> [B]."""
    if outputs.shape[:-1] != labels.shape or torch.is_floating_point(labels):
        raise ValueError(f"mse_loss: outputs {tuple(outputs.shape)} need integer class labels of shape "
                         f"{tuple(outputs.shape[:-1])}, got {labels.dtype} {tuple(labels.shape)}")
    # a comparison rather than F.one_hot, which checks label values and so cannot run under vmap
    one_hot = (labels.unsqueeze(-1) == torch.arange(outputs.shape[-1], device=outputs.device)).to(outputs.dtype)
    return 0.5 * (outputs - one_hot).pow(2).sum(-1)

def cross_entropy_loss(outputs, labels):
    """Per-example cross-entropy −log softmax(outputs[i])[labels[i]]: [B, C], [B] -> [B]; [B, T, C] -> [B, T]."""
    if outputs.shape[:-1] != labels.shape or torch.is_floating_point(labels):
        raise ValueError(f"cross_entropy_loss: outputs {tuple(outputs.shape)} need integer class labels of shape "
                         f"{tuple(outputs.shape[:-1])}, got {labels.dtype} {tuple(labels.shape)}")
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1), reduction="none").view(labels.shape)

def check_examples(x, y, outputs=None, losses=None):
    """Raise ValueError, naming what to pass, unless x and y hold the same N >= 1 examples, `losses` (of the first
    examples' `outputs`) has one entry per label (an averaging loss_fn would make N examples one), and class scores (C >
    1 outputs) come with integer labels in 0..C−1 (MSE would make others all-zero targets)."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples and y {len(y)}: pass one label per example (N >= 1)")
    if losses is not None and (losses.dim() == 0 or losses.shape != y[:losses.shape[0]].shape):
        raise ValueError(f"loss_fn returned shape {tuple(losses.shape)} for {len(outputs)} examples: it must return "
                         f"one loss per example, not their mean (e.g. F.cross_entropy(outputs, labels, reduction='none'))")
    if outputs is not None and outputs.shape[-1] > 1:
        if torch.is_floating_point(y):
            raise ValueError(f"labels are {y.dtype} but the model outputs {outputs.shape[-1]} class scores: pass integer "
                             f"class indices 0..{outputs.shape[-1] - 1} (for regression, one output)")
        if int(y.min()) < 0 or int(y.max()) >= outputs.shape[-1]:
            raise ValueError(f"labels range over {int(y.min())}..{int(y.max())} but the model has {outputs.shape[-1]} "
                             f"outputs: labels must be class indices 0..{outputs.shape[-1] - 1}")

@contextmanager
def preserved(model):
    """Measure without side effects: inside, gradients on and dropout off (the deterministic objective; batch norm keeps
    its mode); on exit every module's own train flag, every buffer and the CPU and CUDA random states are restored, so
    measuring changes nothing in training."""
    modes, buffers = [(m, m.training) for m in model.modules()], [b.detach().clone() for b in model.buffers()]
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
    """The trainable parameters moved to θ + vector (flat [P]) inside, restored exactly on exit: a trial
    gradient-descent step is shifted(model, −lr·g). Needs `unflatten`."""
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
    """The Hessian H of the mean loss L = (1/N) Σ_i ℓ_i over (x, y) as a function v [P] -> H v [P]. In one chunk (chunk
    None or >= len(x)) the gradient graph g = ∇L is built once and each product is one backward pass of <g, v>;
    otherwise every chunk adds d/dθ <∇(Σ_chunk ℓ_i / N), v> (a forward, a backward and a double backward each), exactly
    H v when examples do not interact. N counts every example (B·T for a language model); batch norm in train mode
    normalizes each chunk by itself. Use inside `preserved`. Needs `check_examples`, `unflatten`."""
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
    """One Hessian-vector product H v (flat [P]) of the mean loss over (x, y), without side effects. Needs
    `hessian_operator`, `preserved`."""
    with preserved(model):
        return hessian_operator(model, loss_fn, x, y, chunk)(v)

def lanczos(matvec, dim, k=1, iters=100, tol=1e-6, seed=0, v0=None, dtype=torch.float64, device="cpu"):
    """The k largest (algebraic) eigenpairs of a symmetric operator matvec: [dim] -> [dim], by Lanczos: an orthonormal
    Krylov basis of span{v0, A v0, A² v0, ...} by the recurrence w = A q_j − α_j q_j − β_{j−1} q_{j−1}, α_j = q_j·A q_j,
    β_j = |w|, re-orthogonalized twice against every q ("twice is enough") so rounding never brings back converged
    directions. The eigenvalues θ of T = Qᵀ A Q (Ritz values) approximate the extreme eigenvalues, with residual |A y −
    θ y| = β_m |s_m| for free. Stops when the top k residuals are <= tol·max|θ|, after `iters` products, or when the
    space fills R^dim; on breakdown (an invariant subspace) it restarts from a random orthogonal vector, so a warm start
    v0 [dim] (or [dim, m], columns summed) that is an exact eigenvector still finds the others. Raises
    FloatingPointError on a non-finite product. Returns eigenvalues float64 [k] (descending), eigenvectors [dim, k],
    residuals [k]."""
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
    """Top eigenvalue by power iteration v <- A v / |A v|, the baseline for `lanczos`: converges at the rate |λ_2 / λ_1|
    per product, stopping when |A v − λ v| <= tol·|λ| (λ = v·A v). Returns (λ, v, converged, products)."""
    if dim < 1:
        raise ValueError(f"power_iteration: dim={dim} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype) \
        if v0 is None else v0.reshape(-1).to(device=device, dtype=dtype).clone()
    v, eigenvalue = v / v.norm(), 0.0
    for step in range(1, iters + 1):
        w = matvec(v).to(dtype)
        eigenvalue = float(v @ w)
        if not math.isfinite(eigenvalue):
            raise FloatingPointError(f"power_iteration: non-finite Rayleigh quotient at product {step}")
        if float((w - eigenvalue * v).norm()) <= tol * abs(eigenvalue):
            return eigenvalue, v, True, step
        v = w / w.norm()
    return eigenvalue, v, False, iters

def top_eigenvalues(model, loss_fn, x, y, k=1, chunk=None, iters=100, tol=1e-3, seed=0, v0=None, preconditioner=None):
    """Sharpness: the k largest eigenvalues of the Hessian of the mean loss over (x, y) (`lanczos` on
    `hessian_operator`, inside `preserved`). With a diagonal preconditioner P > 0 those of P^-1/2 H P^-1/2, the
    sharpness an adaptive optimizer sees (eigenvectors whitened: s ⊙ w, s = P^-1/2, is a parameter direction). Returns
    eigenvalues float64 [k], eigenvectors [P, k], residuals [k]. Needs `preserved`, `hessian_operator`, `lanczos`."""
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
    """Put ∇L of the mean loss into p.grad, `chunk` rows at a time (each adds ∇(Σ_chunk ℓ_i)/N). Returns (every
    example's loss [N], accuracy). Needs `check_examples`."""
    losses, correct = [], []
    for start in range(0, len(x), chunk):
        outputs = model(x[start:start + chunk])
        chunk_losses = loss_fn(outputs, y[start:start + chunk])
        if start == 0:
            check_examples(x, y, outputs, chunk_losses)
        (chunk_losses.sum() / (len(x) * chunk_losses[0].numel())).backward()
        losses.append(chunk_losses.detach().reshape(-1))
        correct.append((outputs.detach().argmax(-1) == y[start:start + chunk]).reshape(-1))
    return torch.cat(losses), float(torch.cat(correct).float().mean()) if outputs.shape[-1] > 1 else math.nan

def minibatches(n, batch_size, generator):
    """Endless minibatch indices: consecutive batch_size slices of a seeded permutation of range(n), a new one each
    epoch (a last, partial slice is skipped)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]

def stability_threshold(optimizer):
    """The sharpness above which an optimizer is unstable on a quadratic (Cohen et al. 2021, 2022): Adam, on λ(P^-1/2 H
    P^-1/2) with P = sqrt(v̂) + ε, (2 + 2β1) / ((1 − β1) lr); heavy ball (SGD; SplitSGD on its own preconditioned
    sharpness) (2 + 2μ)/lr, 2/lr for GD. Clipping only shortens steps."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.Adam):
        return (2.0 + 2.0 * group["betas"][0]) / ((1.0 - group["betas"][0]) * group["lr"])
    if isinstance(optimizer, torch.optim.SGD) or "normalized_lr" in group:        # SGD or SplitSGD
        return (2.0 + 2.0 * group["momentum"]) / group["lr"]
    raise ValueError(f"no stability threshold known for {type(optimizer).__name__}: use SGD, Adam or SplitSGD")

def train(model, x, y, loss_fn, optimizer, steps, batch_size=None, chunk=None, measure=None, clip_norm=None, seed=0,
          log=print):
    """Train `model` on (x, y) with a constructed torch `optimizer`. Full batch (batch_size None): the gradient of L(θ)
    = (1/N) Σ_i ℓ_i(θ) (`full_batch_gradient`), gradient descent with torch.optim.SGD(lr), whose forward pass gives
    every ℓ_i(θ_t) free (per_example_loss [T, N]). Minibatch: the next batch_size examples of a seeded reshuffle
    (`minibatches`); loss and accuracy are the minibatch's. clip_norm: rescale g to g·min(1, clip_norm/|g|).
    measure(step, model, optimizer) -> dict or None runs at θ_t with the gradient in p.grad, before the update, inside
    `preserved` (it cannot change modes, buffers or the random stream); its dicts are kept in history["measured"] with
    their step, and train never reads them. A non-finite loss or a FloatingPointError from measure stops the run with a
    message naming the optimizer's `stability_threshold`; earlier steps are kept. Returns step, loss, accuracy,
    grad_norm [T], per_example_loss, measured, diverged (None or the message). Needs `full_batch_gradient`,
    `minibatches`, `preserved`, `stability_threshold`."""
    check_examples(x, y)
    n, chunk = len(x), chunk or len(x)
    if steps < 0 or chunk < 1 or (batch_size is not None and not 1 <= batch_size <= n):
        raise ValueError(f"train: need steps >= 0 (got {steps}), chunk >= 1 (got {chunk}) and batch_size None (full "
                         f"batch) or in 1..{n} (got {batch_size})")
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
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
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
            history["diverged"] = (f"training diverged at step {step} ({problem}); {edge}: lower the learning rate. "
                                   f"Steps 0..{step} are kept in the history.")
            if log:
                log(history["diverged"])
            break
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            elapsed = time.time() - start_time
            first = elapsed if step == 0 else first    # step 0 pays for warm-up and a cold eigensolver: not a rate
            log(f"step {step:5d} | loss {loss:.4f} | acc {accuracy:.3f} | {elapsed:6.1f}s, " + (
                f"ETA {(elapsed - first) / step * (steps - step - 1):6.1f}s" if step else "ETA after more steps"))
    result = {key: np.asarray(history[key], dtype=np.float64) for key in ("loss", "accuracy", "grad_norm")}
    result["per_example_loss"] = (torch.stack(history["per_example_loss"]).numpy() if history["per_example_loss"]
                                  else np.zeros((0, n), np.float32))
    return dict(result, step=np.asarray(history["step"], dtype=np.int64), measured=history["measured"],
                diverged=history["diverged"])

def measured(history, key):
    """The steps [M] and values [M, ...] (numpy) of `key` in a train history's measure records that have it."""
    records = [m for m in history["measured"] if key in m]
    return (np.asarray([m["step"] for m in records], dtype=np.int64),
            np.asarray([np.asarray(m[key], dtype=np.float64) for m in records]))

def evaluate(model, loss_fn, x, y, chunk=1024):
    """Mean loss and accuracy (nan for a single output) on (x, y), without gradients or side effects. Needs
    `check_examples`, `preserved`."""
    check_examples(x, y)
    with preserved(model), torch.no_grad():
        outputs = torch.cat([model(x[s:s + chunk]) for s in range(0, len(x), chunk)])
        losses = loss_fn(outputs, y)
    check_examples(x, y, outputs, losses)
    return float(losses.mean()), float((outputs.argmax(-1) == y).float().mean()) if outputs.shape[-1] > 1 else math.nan

def edge_of_stability(steps, sharpness, threshold):
    """Progressive sharpening to a threshold (2/lr for GD) and the hover there, from λ [E] at steps [E]: crossing, the
    first time λ reaches it, interpolated between measurements (nan if never): the one definition; start_ratio =
    λ(steps[0]) / threshold; hover, the median |λ / threshold − 1| from the crossing on."""
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
    """Progressive sharpening over a fixed window from the start, (λ(window) − λ(steps[0])) / window · 100: the rise per
    100 steps, λ interpolated between measurements (steps [E], sharpness [E])."""
    return float((np.interp(window, steps, sharpness) - sharpness[0]) / window * 100)

# ----------------------------------------------------------------------------- 3. Outliers and opposing groups

def per_example_losses(model, loss_fn, x, y, chunk=1024):
    """loss_fn(model(x), y) for every example, without gradients or side effects: [N] (flat over B·T for a language
    model). `train` records these at no cost during full-batch training. Needs `check_examples`, `preserved`."""
    check_examples(x, y)
    with preserved(model), torch.no_grad():
        outputs = model(x[:chunk])
        check_examples(x, y, outputs, loss_fn(outputs, y[:chunk]))
        return torch.cat([loss_fn(model(x[s:s + chunk]), y[s:s + chunk]).reshape(-1) for s in range(0, len(x), chunk)])

def per_example_grads(model, loss_fn, x, y, chunk=256, positions=None):
    """G[i] = ∇θ loss_fn(model(x[i:i+1]), y[i:i+1]): [N, P], by vmap of grad of a functional_call, `chunk` examples at a
    time. A language model's row i counts position positions[i] (None: the row's summed losses). Batch norm must be in
    eval mode; dropout is off. Needs `check_examples`, `preserved`."""
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
        raise ValueError(f"positions must give one position in 0..{per_row - 1} per example ({len(x)}), or be None "
                         f"for each row's summed losses")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    def example_loss(params, xi, yi, ti):
        losses = loss_fn(functional_call(model, (params, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0)).reshape(-1)
        return (losses * ((torch.arange(len(losses), device=losses.device) == ti) | (ti < 0))).sum()   # −1: the row
    grad_per_example, positions = vmap(grad(example_loss), in_dims=(None, 0, 0, 0)), positions.to(x.device)
    sizes, first = [p.numel() for p in params.values()], next(iter(params.values()))
    result = torch.empty(len(x), sum(sizes), dtype=first.dtype, device=first.device)
    with preserved(model):
        for start in range(0, len(x), chunk):
            grads = grad_per_example(params, x[start:start + chunk], y[start:start + chunk],
                                     positions[start:start + chunk])
            for column, g in zip(np.cumsum([0] + sizes[:-1]), grads.values()):
                result[start:start + len(g), column:column + g[0].numel()] = g.reshape(len(g), -1)
    return result

def per_example_curvature(model, loss_fn, x, y, v, chunk=1024):
    """Each example's curvature along a unit direction v: vᵀHv = (1/N) Σ_i c_i, c_i = d²/dt² ℓ_i(f_i(θ + t v)) = (J_i
    v)ᵀ ∇²_f ℓ_i (J_i v) (Gauss-Newton) + Σ_c ∂ℓ_i/∂f_c vᵀ∇²f_{i,c} v (residual), for every example at once by
    forward-mode products: J v one jvp of the outputs, the total a jvp of that through the loss, the Gauss-Newton part
    the second derivative of ℓ_i(f_i + s J_i v) in s. Buffers are read only (BN: eval mode). Returns float64 [N] arrays
    total, gauss_newton, residual. Needs `check_examples`, `unflatten`."""
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
    """Each group's share g_k = ∇θ (Σ_{i in k} ℓ_i) / N of the full-batch gradient, one backward pass per bool mask [N]
    (flat over B·T); disjoint groups covering the data sum to ∇L. Flat [P]; nothing else touched. Needs
    `check_examples`, `preserved`."""
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
    """Group the trainable tensors into layers, in module order: a tensor's layer is its name up to its first all-digit
    part ("net.1.weight" -> "net.1", "blocks.2.attention.qkv.weight" -> "blocks.2", a whole block), else its name
    without the last part ("embed.weight" -> "embed"). Returns (names [L], layer of every entry [P])."""
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
    """Each layer's share of a flat parameter vector's squared norm, [L] summing to 1 (`parameter_layers`). A random
    direction puts each layer's share of the parameters there. Needs `parameter_layers`."""
    names, index = parameter_layers(model)
    shares = np.bincount(index, weights=vector.detach().double().pow(2).cpu().numpy(), minlength=len(names))
    return shares / max(shares.sum(), 1e-300)

def early_layer_ratio(shares, parameter_shares):
    """How much more of a direction the early layers (the first third, rounded up: those that read the input) hold than
    their size: their `layer_shares` [L] over their share of the parameters [L]; 1 for a random direction."""
    early = math.ceil(len(parameter_shares) / 3)
    return float(np.sum(shares[:early]) / np.sum(parameter_shares[:early]))

def opposing_groups(model, loss_fn, x, y, lr, eigenvectors, top=30):
    """The examples one gradient-descent step moves most, and the way each moves: the step θ − lr·g is taken on trial
    (`shifted`) and every Δℓ_i = ℓ_i(θ − lr·g) − ℓ_i(θ) measured; the outliers are the `top` examples by |Δℓ_i| and "up"
    marks those whose loss rose, the two opposing groups. With V = eigenvectors [P, k] (the sharp subspace) and u = V
    Vᵀg / |Vᵀg|, Δℓ_i ≈ −lr·|Vᵀg|·<g_i, u> to first order; how often <g_i, u> < 0 predicts "up" (balanced accuracy)
    checks the linearization, it is not evidence. Returns index, loss_change, up, cos_subspace = |Vᵀg_i|/|g_i|, cos_top
    = |<g_i, v_1>|/|g_i| [top], linearization, loss_change_all [N], gradient [P]. Needs `shifted`, `per_example_grads`.
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
    recalls = [float((predicted_up[up == side] == side).float().mean()) for side in (True, False) if (up == side).any()]
    return {"index": index.cpu().numpy(), "loss_change": change[index].cpu().numpy(), "up": up.cpu().numpy(),
            "cos_subspace": ((g @ V).norm(dim=1) / norms).double().cpu().numpy(),
            "cos_top": ((g @ V[:, 0]).abs() / norms).double().cpu().numpy(),
            "linearization": float(np.mean(recalls)), "loss_change_all": change.cpu().numpy(), "gradient": gradient}

def selection_matched_draws(loss_change, labels, index, draws=50, band=10, seed=0):
    """Null groups that pass the same selection as the outliers `index`: each draw replaces the outliers of every class
    (labels [N]; text: the target tokens) and sign of Δℓ by as many examples of that class and sign from the next band x
    as many by |Δℓ|, without replacement: movers of the same classes, split the same way, that just missed the cut
    (random examples would credit the outliers with what selection alone gives). Returns int64 [draws, top] mirroring
    index; rows of −1 where no draw is possible."""
    change, labels, index = np.asarray(loss_change), np.asarray(labels).reshape(-1), np.asarray(index)
    keys, order = labels * 2 + (change > 0), np.argsort(-np.abs(change), kind="stable")
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
    """Cosine of two groups' summed-loss gradients on the flat entries `columns` (e.g. the first layer): far from a
    null's when the groups share (> 0) or oppose (< 0) an input feature. Needs `group_gradients`."""
    per_row = y[0].numel()
    members = np.concatenate([first, second]).astype(np.int64)
    rows = np.unique(members // per_row)
    local = np.searchsorted(rows, members // per_row) * per_row + members % per_row
    masks = [np.isin(np.arange(len(rows) * per_row), part) for part in np.split(local, [len(first)])]
    a, b = (g[torch.as_tensor(columns, device=g.device)] for g in group_gradients(model, loss_fn, x[rows], y[rows], masks))
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))

def outlier_analysis(model, loss_fn, x, y, lr, eigenvectors, top=30, draws=50, band=10, seed=0, chunk=1024):
    """Everything measured about the outliers of one full-batch GD step, one flat dict: the step's groups
    (`opposing_groups`); null_index [draws, top] (`selection_matched_draws`); grad_cosine and grad_cosine_null [draws],
    the first-layer `pair_gradient_cosine` of the up and down groups and of each null pair (nan when one side is empty);
    top1_share, outlier_share, residual_share of vᵀHv along the top eigenvector (the top 1% of examples, selection-free;
    the outliers; the residual term: `per_example_curvature`); midpoint, the sharpness at θ − lr·g/2 (the loss is not
    quadratic at the scale of a step). Needs `opposing_groups`, `selection_matched_draws`, `pair_gradient_cosine`,
    `per_example_curvature`, `parameter_layers`, `top_eigenvalues`."""
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
    """The `measure` hook for `train`: every `every` steps the top-k Hessian eigenvalues over (x, y), warm-started, as
    "eigenvalues", and the top eigenvector's "layer_shares"; with preconditioner (optimizer -> P or None,
    `adaptive_preconditioner`) also "preconditioned_eigenvalues" (nan before the first step); with top > 0 (full-batch
    GD at step size lr) also the step's `outlier_analysis`. A non-finite sharpness raises FloatingPointError
    (divergence). Needs `top_eigenvalues`, `layer_shares`, `outlier_analysis`."""
    warm = {}
    def measure(step, model, optimizer):
        if step % every:
            return None
        values, vectors, _ = top_eigenvalues(model, loss_fn, x, y, k, chunk, iters, tol, v0=warm.get("plain"))
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"non-finite sharpness {values.tolist()}")
        warm["plain"], record = vectors, {"eigenvalues": values.numpy(), "layer_shares": layer_shares(vectors[:, 0], model)}
        P = preconditioner(optimizer) if preconditioner is not None else None
        if preconditioner is not None:
            record["preconditioned_eigenvalues"] = np.full(k, np.nan)
        if P is not None:
            values, warm["preconditioned"], _ = top_eigenvalues(model, loss_fn, x, y, k, chunk, iters, tol,
                                                                v0=warm.get("preconditioned"), preconditioner=P)
            record["preconditioned_eigenvalues"] = values.numpy()
        if top:
            record.update(outlier_analysis(model, loss_fn, x, y, lr, vectors, top, draws, seed=step, chunk=chunk or 1024))
        return record
    return measure

def loss_spikes(loss, window=20, factor=1.1):
    """Loss spike events: maximal runs of consecutive steps t with loss[t] > factor·min(loss[t−window:t]) (events, not
    steps, so one long spike counts once). loss [T] -> int64 [events, 2], the first and last step of each."""
    loss = np.asarray(loss, dtype=np.float64)
    high = np.array([loss[t] > factor * loss[t - window:t].min() for t in range(window, len(loss))], dtype=bool)
    edges = np.diff(np.concatenate([[0], high.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return np.stack([starts + window, ends + window], axis=1).astype(np.int64) if len(starts) else \
        np.zeros((0, 2), dtype=np.int64)

def top_fraction_share(loss_change, fraction=0.01, members=None):
    """Share of the total |loss change| carried by the top `fraction` of examples (or by the bool `members` [N]): [...,
    N] -> [...]. I.i.d. Gaussian changes give about 0.036 for fraction 0.01, Laplace ones 0.056."""
    magnitude = np.abs(np.asarray(loss_change, dtype=np.float64))
    if members is not None:
        return magnitude[..., np.asarray(members, dtype=bool)].sum(-1) / np.maximum(magnitude.sum(-1), 1e-300)
    top = max(1, int(math.ceil(fraction * magnitude.shape[-1])))
    return -np.sort(-magnitude, axis=-1)[..., :top].sum(-1) / np.maximum(magnitude.sum(-1), 1e-300)

def spike_tail_ratio(per_example_loss, crossing, count=10, fraction=0.01, members=None):
    """Heavy tail at the loss spikes: the median `top_fraction_share` of the per-example loss changes over the `count`
    steps after the crossing where the total loss rises most, over its median at the run's own pre-EoS steps crossing/2
    .. crossing. per_example_loss [T, N]; nan without a crossing. Needs `top_fraction_share`."""
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
    """Anti-phase of two groups: the correlation of the step changes of their mean series, corr(diff(mean of series[:,
    first]), diff(mean of series[:, second])); series [T, N], groups index arrays or bool masks [N]. −1: one rises
    exactly when the other falls. nan when a group is empty, T < 3 or a series is flat."""
    values = np.asarray(series, dtype=np.float64)
    first, second = (np.flatnonzero(g) if np.asarray(g).dtype == bool else np.asarray(g) for g in (first, second))
    if len(values) < 3 or len(first) == 0 or len(second) == 0:
        return math.nan
    da, db = np.diff(values[:, first].mean(1)), np.diff(values[:, second].mean(1))
    return float(np.corrcoef(da, db)[0, 1]) if da.std() > 0 and db.std() > 0 else math.nan

def null_p(observed, null, alternative="less"):
    """p-value of `observed` against the same statistic on null draws [D]: (1 + #{null as or more extreme}) / (1 +
    #finite null); "less": as small or smaller, "greater": as large or larger, "two-sided": twice the smaller, at most
    1. nan, never significant, when observed is nan or no null value is finite."""
    null = np.asarray(null, dtype=np.float64)
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or len(null) == 0:
        return math.nan
    less, greater = [(1 + np.sum(side)) / (1 + len(null)) for side in (null <= observed, null >= observed)]
    return float({"less": less, "greater": greater, "two-sided": min(1.0, 2 * min(less, greater))}[alternative])

def combined_p(observed, null, alternative="less"):
    """One test over S selections, observed [S] against null [S, D]: the observed mean over the measurable selections
    against each draw's mean over the same ones (`null_p`), exchangeable whatever the dependence between selections.
    Returns (p, observed mean, median null mean, selections used). Needs `null_p`."""
    observed, null = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64).reshape(len(observed), -1)
    used = np.isfinite(observed) & np.isfinite(null).any(1)
    if not used.any():
        return math.nan, math.nan, math.nan, 0
    with np.errstate(all="ignore"):
        means = np.nanmean(null[used], axis=0)
    return null_p(observed[used].mean(), means, alternative), float(observed[used].mean()), \
        float(np.nanmedian(means)), int(used.sum())

def null_false_positive_rate(null, alternative="less", level=0.05):
    """The false-positive rate of `combined_p` where the null holds by construction: each draw of null [S, D] in turn
    plays the observation against the other draws (same rule, nothing planted). Returns the fraction with p < level; a
    calibrated test gives about `level`. Needs `combined_p`."""
    null = np.asarray(null, dtype=np.float64)
    p = [combined_p(null[:, d], np.delete(null, d, axis=1), alternative)[0] for d in range(null.shape[1])]
    return float(np.mean(np.asarray(p) < level)) if null.shape[1] > 1 else math.nan

def pair_statistics(per_example_loss, steps, index, up, null_index, features=None, length=40, gap=2):
    """Each selection's opposing pair and its null draws, measured after the selection: antiphase (`antiphase` of the up
    and down groups' losses over steps[s] + gap .. + length) and, given features [N, F], coherence (mean cosine between
    up and down members' features centred on the mean: large when they share a feature beyond their classes, negative
    when they carry it with opposite signs). index, up [S, top], null_index [S, D, top]. Returns {name: (observed [S],
    null [S, D])}, nan where not measurable. Needs `antiphase`."""
    losses, unit = np.asarray(per_example_loss, dtype=np.float64), None
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
                result[name][0 if d == 0 else 1][(s,) if d == 0 else (s, d - 1)] = value
    return result

def pair_contrast(series, first, second, first_pool, second_pool, draws=200, seed=0):
    """How much more a pair of groups moves in anti-phase than size-matched control pairs from the pools (each draw
    subsamples a group and its pool to the smaller size): pair, control (medians of `antiphase`), contrast = control −
    pair (> 0: more opposed), low, high (2.5 and 97.5 percentiles). Needs `antiphase`."""
    groups = [np.flatnonzero(g) if np.asarray(g).dtype == bool else np.asarray(g)
              for g in (first, second, first_pool, second_pool)]
    if min(len(g) for g in groups) == 0:
        return dict.fromkeys(("pair", "control", "contrast", "low", "high"), math.nan)
    rng, sizes = np.random.default_rng(seed), [min(len(groups[0]), len(groups[2])), min(len(groups[1]), len(groups[3]))]
    values = np.array([[antiphase(series, rng.choice(groups[j], sizes[0], replace=False),
                                  rng.choice(groups[j + 1], sizes[1], replace=False)) for j in (0, 2)]
                       for _ in range(draws)])
    (low, high), (pair, control) = np.nanpercentile(values[:, 1] - values[:, 0], [2.5, 97.5]), np.nanmedian(values, 0)
    return {"pair": float(pair), "control": float(control), "contrast": float(control - pair), "low": float(low),
            "high": float(high)}

def t_interval(values, level=0.95):
    """Mean of the finite `values` and its Student t interval mean ± q·sd/√n, q the (1 + level)/2 quantile of t with n −
    1 degrees of freedom (integrated numerically from its density). Returns (mean, low, high), low and high nan for
    fewer than 2 values."""
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
    """A matched control for the examples `chosen`: for each in turn, the example not chosen nor taken (of the same
    label, given labels [N]) nearest in `values` [N] or [N, F] (columns standardized), without replacement. Returns
    int64 [len(chosen)], −1 where no candidate is left."""
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
    """A causal-test run's endpoints from its history: crossing (`edge_of_stability`) and after (its ceiling; the run's
    length when never), rate (`sharpening_rate` over 0..rate_steps), antiphase (the pair's mean |Δ(L_first − L_second)|
    after the crossing), spikes (`loss_spikes` per 100 steps after it), final (last loss), curve (sharpness per step,
    nan unmeasured). Needs `measured`, `edge_of_stability`, `sharpening_rate`, `loss_spikes`."""
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
# A pixel rule defines the sky groups (they come from the images, not the network); synthetic images plant the feature
# where we control it; uniform probes show how the network uses the colour itself.

def sky_pixels(images):
    """The sky rule per pixel, blue-dominant and not dark: B > R + 10, B >= G and B > 80 (0..255). images uint8 [N, H,
    W, 3] -> bool [N, H, W]."""
    pixels = images.to(torch.int32)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return (blue > red + 10) & (blue >= green) & (blue > 80)

def sky_groups(images, sky_at=0.7, clear_below=0.1, flat_below=20.0, rows=0.25):
    """Images with a sky background (>= sky_at of the top `rows` are `sky_pixels`) and images clearly without (<=
    clear_below, and a top with luminance std >= flat_below, so grey and flat backgrounds stay out of the control);
    ambiguous images are in neither. Returns (sky, no_sky) bool [N]. Needs `sky_pixels`."""
    top = images[:, :max(1, int(round(rows * images.shape[1])))]
    fraction = sky_pixels(top).flatten(1).float().mean(1)
    luminance_std = (top.float() @ torch.tensor([0.299, 0.587, 0.114])).flatten(1).std(1)
    return fraction >= sky_at, (fraction <= clear_below) & (luminance_std >= flat_below)

def sky_pair(labels, sky, no_sky, first=(0,), second=(2, 8)):
    """The sky pair and its controls, bool [N] each: sky images of the `first` classes (CIFAR-10: airplanes) and of the
    `second` (birds and ships), then the clearly-no-sky images of the same classes (`sky_groups`)."""
    a, b = np.isin(labels, first), np.isin(labels, second)
    return sky & a, sky & b, no_sky & a, no_sky & b

def make_planted_images(n=1000, num_classes=10, image_size=32, planted_classes=(0, 2), planted_fraction=0.25,
                        planted_strength=1.0, class_signal=5.0, noise=60.0, seed=0):
    """Synthetic images with a planted pair of opposing signals: class c is 128 + class_signal·T_c + noise·z (T_c a
    smooth random pattern, z Gaussian; class_signal 5 against noise 60 is weak evidence, 30 easy). A `planted_fraction`
    of each of the two `planted_classes` gets a sky-blue border (RGB 80, 150, 255 plus noise) blended in with weight
    planted_strength: on both classes, so it carries no label information, large and rare. Returns images uint8 [n, H,
    W, 3], labels [n] and planted [n] (0: none; 1, 2: on planted_classes[0], [1])."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=generator)]
    z = torch.randn(n, 3, image_size, image_size, generator=generator)
    images, planted = 128 + class_signal * templates[labels] + noise * z, torch.zeros(n, dtype=torch.int64)
    for group, cls in enumerate(planted_classes, start=1):
        members = torch.nonzero(labels == cls).flatten()
        planted[members[:round(planted_fraction * len(members))]] = group
    border, quarter = torch.ones(image_size, image_size, dtype=torch.bool), image_size // 4
    border[quarter:image_size - quarter, quarter:image_size - quarter] = False
    sky = torch.tensor([80.0, 150.0, 255.0]).view(3, 1, 1) + 10 * z[planted > 0]
    blended = (1 - planted_strength) * images[planted > 0] + planted_strength * sky
    images[planted > 0] = torch.where(border, blended, images[planted > 0])
    return images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous(), labels, planted

def recolour(images, masks):
    """Copies of images uint8 [N, H, W, 3] whose masks [N, H, W] pixels take the mean colour of the image's other
    pixels, and the fraction changed per image [N] (a no-op cannot pass unseen)."""
    images, masks = images.clone(), torch.as_tensor(masks, dtype=torch.bool)
    for image, mask in zip(images, masks):
        if mask.any() and (~mask).any():
            image[mask] = image[~mask].float().mean(0).round().to(torch.uint8)
    changed = masks & ~(masks.flatten(1).all(1) | ~masks.flatten(1).any(1)).view(-1, 1, 1)
    return images, changed.flatten(1).float().mean(1)

def paste_top(images, rgb, rows=0.25, members=None):
    """Copies of `images` whose top `rows` of rows is the uniform colour `rgb` (0..255; None: unchanged), on every image
    or on the `members` (indices): the sky rule in reverse."""
    images, members = images.clone(), slice(None) if members is None else torch.as_tensor(members, dtype=torch.long)
    if rgb is not None:
        images[members, :max(1, int(round(rows * images.shape[1])))] = torch.tensor(rgb).round().to(torch.uint8)
    return images

def uniform_probe(rgb, mean, std, size=32):
    """A uniform image of colour `rgb` (0..255) normalized like the training data (mean, std from `normalize`): float32
    [1, 3, size, size]."""
    colour = torch.as_tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).round() / 255
    return ((colour - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).expand(1, 3, size, size).contiguous()

def orthogonal_probe(probe):
    """The control of a uniform probe [1, 3, H, W] in normalized input space: a uniform image of the same norm whose
    channel vector c' ∝ c × (1, 1, 1) is orthogonal to the probe's c and to the grey axis: another hue, no change of
    brightness."""
    colour = probe[0, :, 0, 0]
    other = torch.linalg.cross(colour, torch.ones(3, dtype=colour.dtype))
    return (other * colour.norm() / other.norm().clamp_min(1e-30)).view(1, 3, 1, 1).expand_as(probe).contiguous()

def probe_swing(outputs, classes, probe=0, controls=(1, 3)):
    """How much a probe's output on `classes` moves from step to step against control probes: mean |Δ| of the mean over
    `classes` of outputs [T, P, C] for the probe, over the largest of the controls' (grey, `orthogonal_probe`)."""
    swing = np.abs(np.diff(np.asarray(outputs)[:, :, list(classes)].mean(-1), axis=0)).mean(0)
    return float(swing[probe] / np.max(swing[list(controls)]))

def probe_tracking(outputs, losses, labels, sky, no_sky, classes, probe=0, control=3):
    """Does the probe follow the feature? |corr| of the step changes of the probe's mean output on `classes` (outputs
    [T, P, C]) with those of L(sky members of classes) − L(no-sky members) (losses [T, N]), minus the same for the
    control probe. Needs `antiphase`."""
    members = np.isin(labels, classes)
    difference = losses[:, sky & members].mean(1) - losses[:, no_sky & members].mean(1)
    series = np.column_stack([np.asarray(outputs)[:, [probe, control]][:, :, list(classes)].mean(-1), difference])
    return abs(antiphase(series, [0], [2])) - abs(antiphase(series, [1], [2]))

def paste_swing(shift, crossing, span=50, controls=(1, 2, 3)):
    """log of how much more the sky paste's effect (shift [T, P], column 0) swings per step in the `span` steps after
    the crossing than before, minus the same for the largest control paste; nan without a crossing."""
    if not math.isfinite(crossing):
        return math.nan
    c, change = int(round(crossing)), np.abs(np.diff(np.asarray(shift, dtype=np.float64), axis=0))
    ratio = change[c:c + span].mean(0) / np.maximum(change[max(c - span, 0):c].mean(0), 1e-300)
    return float(np.log(ratio[0]) - np.log(np.max(ratio[list(controls)])))

def token_features(x, y, vocabulary):
    """Named features of every token example (sequence i, position t), flat over B·T: its target character ("target
    'e'") and its input, the previous character ("after ' '"). Returns (names [F], bool masks [F, B·T])."""
    inputs, targets = x.reshape(-1).numpy(), y.reshape(-1).numpy()
    names = [f"target {vocabulary[c]!r}" for c in np.unique(targets)] + [f"after {vocabulary[c]!r}"
                                                                          for c in np.unique(inputs)]
    return names, np.stack([targets == c for c in np.unique(targets)] + [inputs == c for c in np.unique(inputs)])

def feature_shares(features, index, loss_change):
    """Which features the outliers carry: each feature's (bool masks [F, N], e.g. "target ' '") share of the outliers'
    summed |Δℓ| over the selections (index, loss_change [S, top]) and its base rate. Returns ([F], [F])."""
    mass = np.zeros(features.shape[1])
    np.add.at(mass, np.asarray(index).reshape(-1), np.abs(np.asarray(loss_change, dtype=np.float64)).reshape(-1))
    return features @ mass / max(mass.sum(), 1e-300), features.mean(1)

def top_feature(features, index, loss_change, min_base=0.01):
    """The feature the outliers carry most over its base rate (`feature_shares`; base rate >= min_base). Returns (its
    index, that ratio). Needs `feature_shares`."""
    share, base = feature_shares(features, index, loss_change)
    ratio = np.where(base >= min_base, share / np.maximum(base, 1e-300), -np.inf)
    return int(np.argmax(ratio)), float(np.max(ratio))

def feature_pair(features, names, index, loss_change, min_base=0.01):
    """A text pair like sky airplanes against sky birds and ships: in the context ("after c", base >= min_base) carrying
    the most outlier |Δℓ|, its top target against all others; controls: the same targets elsewhere. Returns
    `pair_contrast`'s four masks [N] and a description. Needs `feature_shares`."""
    share, base = feature_shares(features, index, loss_change)
    context = max((i for i, name in enumerate(names) if str(name).startswith("after") and base[i] >= min_base),
                  key=lambda i: share[i])
    mass = np.zeros(features.shape[1])
    np.add.at(mass, np.asarray(index).reshape(-1), np.abs(np.asarray(loss_change, dtype=np.float64)).reshape(-1))
    target = max((i for i, name in enumerate(names) if str(name).startswith("target")),
                 key=lambda i: mass[features[i] & features[context]].sum())
    inside, main = features[context], features[target]
    return inside & main, inside & ~main, ~inside & main, ~inside & ~main, f"{names[target]} vs others, {names[context]}"

# ----------------------------------------------------------------------------- 5. Two-layer linear model
#
# OUR RECONSTRUCTION of the paper's two-layer linear model of opposing signals (its text is not available to us),
# derived from first principles and checked against simulation. f(x) = bᵀA x, A [h, d], b [h]; w = Aᵀb;
# L = (1/N) Σ_i ½ (f(x_i) − y_i)², r_i = f(x_i) − y_i, Σ = (1/N) Σ_i x_i x_iᵀ, g = ∇_w L = (1/N) Σ_i r_i x_i.
#
# Hessian. Along (Ȧ, ḃ) the output moves by ḟ_i = ẇᵀx_i with ẇ = Ȧᵀb + Aᵀḃ, and f̈_i = 2 ḃᵀȦ x_i, so
#     (Ȧ, ḃ)ᵀ H (Ȧ, ḃ) = ẇᵀ Σ ẇ + 2 ḃᵀȦ g        (Gauss-Newton + residual term, the latter of eigenvalues ±|g|).
# Data (`make_opposing_signal_data`): x = (x_o, x_g) with Σ = diag(p α², scales²) exactly, p the fraction that
# carries the opposing feature x_o = ±α. Along θ_o = (b e_oᵀ, a)/√S, a = A e_o, S = |a|² + |b|², with the opposing
# weight w_o = aᵀb and g_o = p α² w_o:   θ_oᵀ H θ_o = p α² S + |Σ_g^½ A_gᵀ a|² / S + 2 p α² w_o² / S.
# x_o carries no signal (its best weight is 0) and its gradient ∇_a L = p α² w_o b only ever shrinks w_o, so |a|
# stays at its initial scale and the last two terms are small: when p α² exceeds the genuine scales, θ_o is the top
# eigenvector and the sharpness is ≈ p α² (|b|² + |A e_o|²) ≈ p α² |b|². Depth makes it grow: under gradient flow
# AAᵀ − bbᵀ is conserved, so from a small init A ≈ b uᵀ, w = |b|² u and |b|² = |w|: the sharpness grows with the
# learned genuine signal up to p α² |β| (progressive sharpening by depth acting on the large feature).
#
# Edge of stability. Where the genuine part is fit, one GD step of size η moves only the opposing block, exactly
#     w_o -> (1 − η λ + (η p α² w_o)²) w_o,     S -> S − η p α² w_o² (4 − η λ),     λ = p α² S.
# Once λ > 2/η the opposing weight flips sign every step and grows by |1 − η λ|; the groups s = ±1 see their
# outputs shifted by ±α w_o, so their losses alternate (L+ − L− = −2 α offset w_o exactly); and for 2 < η λ < 4 the
# oscillation shrinks S by an amount ∝ w_o², so the sharpness falls back towards 2/η (self-stabilization).

def make_opposing_signal_data(n_pairs=200, n_plain=800, alpha=7.0, scales=(1.0, 0.7, 0.5, 0.35, 0.25), beta=None,
                              offset=0.5, seed=0, dtype=torch.float64):
    """Regression data with one large, rare feature that opposes itself (OUR RECONSTRUCTION). x = (x_o, x_g) [N, 1 + k]:
    genuine x_g whitened to second moment exactly diag(scales²) on both kinds of example (the identities hold over the
    data); x_o = α s, each of n_pairs signal-bearing x_g with s = +1 and with s = −1, the n_plain others s = 0, so
    E[x_o] = E[x_o x_g] = E[x_o y] = 0 and E[x_o²] = p α², p = 2 n_pairs / N. y = βᵀx_g + offset·|s|: the shared offset
    depends on |x_o| only, which no linear function fits, so a weight on x_o helps one group and hurts the other (a ReLU
    network can compute |x_o|). Returns x, y, sign [N]."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.as_tensor(scales, dtype=torch.float64)
    beta = torch.ones(len(scales), dtype=torch.float64) if beta is None else torch.as_tensor(beta, dtype=torch.float64)
    def whitened(n):
        z = torch.randn(n, len(scales), generator=generator, dtype=torch.float64)
        z = z - z.mean(0)
        cholesky = torch.linalg.cholesky(z.T @ z / n)
        return torch.linalg.solve_triangular(cholesky, z.T, upper=False).T * scales
    signal_features, plain_features = whitened(n_pairs), whitened(n_plain)
    genuine = torch.cat([signal_features, signal_features, plain_features])
    sign = torch.cat([torch.ones(n_pairs), -torch.ones(n_pairs), torch.zeros(n_plain)]).to(torch.int64)
    x = torch.cat([alpha * sign[:, None].to(torch.float64), genuine], dim=1)
    return x.to(dtype), (genuine @ beta + offset * sign.abs().to(torch.float64)).to(dtype), sign

class TwoLayerLinear(nn.Module):
    """f(x) = bᵀ A x, A [width, in_features], b [width]; forward returns [B, 1]. Both factors start i.i.d. N(0,
    init_scale²) (seeded): small and nearly balanced, so the net learns its target's directions one at a time."""

    def __init__(self, in_features, width=10, init_scale=0.01, seed=0, dtype=torch.float64):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(init_scale * torch.randn(width, in_features, generator=generator, dtype=dtype))
        self.b = nn.Parameter(init_scale * torch.randn(width, generator=generator, dtype=dtype))

    def forward(self, x):
        return (x @ self.A.T @ self.b).unsqueeze(-1)

def regression_loss(outputs, targets):
    """Per-example squared error of a scalar output, ½ (outputs[i, 0] − targets[i])²: [B, 1], [B] -> [B]."""
    return 0.5 * (outputs[:, 0] - targets).pow(2)

def opposing_weight(model, feature=0):
    """The end-to-end weight of a TwoLayerLinear on input `feature`: w_o = (A e_o)·b."""
    with torch.no_grad():
        return float(model.A[:, feature] @ model.b)

def predicted_sharpness(model, signal_moment, feature=0):
    """Our prediction of a TwoLayerLinear's top Hessian eigenvalue, E[x_o²] (|A e_o|² + |b|²) with signal_moment =
    E[x_o²] (p α²): the Gauss-Newton curvature along θ_o, the sharpness when E[x_o²] dominates the genuine second
    moments and the residual term (|∇_w L|) is smaller (derivation above)."""
    with torch.no_grad():
        a, b = model.A[:, feature], model.b
        return float(signal_moment * (a @ a + b @ b))

def opposing_rayleigh_quotient(model, x, y, feature=0):
    """The exact curvature of a TwoLayerLinear's mean squared error along the opposing direction θ_o = (b e_oᵀ, A
    e_o)/√S: with Σ = xᵀx/N, g = xᵀr/N and ẇ = (|b|² e_o + Aᵀ A e_o)/√S, θ_oᵀ H θ_o = ẇᵀ Σ ẇ + 2 w_o g_o / S, both terms
    of the derivation with nothing dropped. A lower bound on the sharpness, tight when θ_o is on top."""
    with torch.no_grad():
        a, b = model.A[:, feature], model.b
        norm_sq = a @ a + b @ b
        w_dot = (model.A.T @ a) / norm_sq.sqrt()
        w_dot[feature] += (b @ b) / norm_sq.sqrt()
        gradient = (model(x)[:, 0] - y) @ x / len(x)
        return float(w_dot @ (x.T @ x / len(x)) @ w_dot + 2 * (a @ b) * gradient[feature] / norm_sq)

def linear_state(model, x, y, sign, feature=0):
    """What the derivation predicts and needs for a TwoLayerLinear with groups sign [N]: opposing_weight, prediction,
    rayleigh_quotient, loss_plus, loss_minus, b_norm_sq, genuine_norm = |A_gᵀb|, residual_term_norm = |∇_w L|. Needs
    `opposing_weight`, `predicted_sharpness`, `opposing_rayleigh_quotient`, `regression_loss`."""
    with torch.no_grad():
        losses, keep = regression_loss(model(x), y), torch.arange(x.shape[1]) != feature
        return {"opposing_weight": opposing_weight(model, feature), "rayleigh_quotient":
                opposing_rayleigh_quotient(model, x, y, feature), "prediction": predicted_sharpness(
                    model, float((x[:, feature] ** 2).mean()), feature), "loss_plus": float(losses[sign > 0].mean()),
                "loss_minus": float(losses[sign < 0].mean()), "b_norm_sq": float(model.b @ model.b),
                "genuine_norm": float((model.A[:, keep].T @ model.b).norm()),
                "residual_term_norm": float(((model(x)[:, 0] - y) @ x / len(x)).norm())}

def oscillation_episode(group_loss_plus, group_loss_minus, sharpness, threshold, rel_gap=0.1):
    """The steps of an edge-of-stability episode, where the two groups' losses visibly split: from the first step with
    sharpness >= threshold (2/lr), those with |L+ − L−| >= rel_gap·(L+ + L−)/2. Arrays [T] -> bool [T]."""
    plus, minus, sharpness = (np.asarray(v, dtype=np.float64) for v in (group_loss_plus, group_loss_minus, sharpness))
    crossed, mask = np.flatnonzero(sharpness >= threshold), np.zeros(len(plus), dtype=bool)
    if len(crossed):
        mask[crossed[0]:] = (np.abs(plus - minus) >= rel_gap * (plus + minus) / 2)[crossed[0]:]
    return mask

def period_two_fraction(values):
    """Fraction of consecutive triples that alternate in sign, mean of [v_t v_{t+1} < 0 and v_{t+1} v_{t+2} < 0]: a
    drift through zero flips once, the period-2 oscillation of GD along a direction with η λ > 1 flips every step.
    values [T] -> float (nan for T < 3)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 3:
        return float("nan")
    flips = values[1:] * values[:-1] < 0
    return float(np.mean(flips[1:] & flips[:-1]))

def consecutive_sign_changes(values, mask):
    """Among consecutive steps (t, t+1) both inside `mask`, the fraction where `values` changes sign: values, mask [T]
    -> (fraction, number of pairs); nan with no pairs."""
    values, mask = np.asarray(values, dtype=np.float64), np.asarray(mask, dtype=bool)
    pairs = mask[1:] & mask[:-1]
    if not pairs.any():
        return float("nan"), 0
    return float(np.mean((values[1:] * values[:-1] < 0)[pairs])), int(pairs.sum())

def flip_growth(opposing_weight, sharpness, lr, episode):
    """How fast the opposing weight grows once it flips, against the derivation's |1 − lr·λ| per step: the median over
    the first stretch of the `episode` (bool [T]), up to its largest swing, of |w_o(t+1)/w_o(t)| / |1 − lr·λ_t| (1: the
    predicted rate). opposing_weight, sharpness [T]; nan without an episode."""
    if not np.any(episode):
        return math.nan
    start = int(np.argmax(episode))
    stop = start + int(np.argmin(episode[start:])) if not np.all(episode[start:]) else len(episode)
    w, steps = np.asarray(opposing_weight), np.arange(start, start + int(np.argmax(np.abs(opposing_weight[start:stop]))))
    return float(np.median(np.abs(w[steps + 1] / w[steps]) / np.abs(1 - lr * np.asarray(sharpness)[steps])))

# ----------------------------------------------------------------------------- 6. Toy network
#
# OUR RECONSTRUCTION of the paper's toy example, on the data of section 5 (a rare x_0 = ±α, no information in its
# sign, a target offset on |x_0|). A one-hidden-layer ReLU network f(x) = vᵀ relu(U x + c) + c_2 starts with every
# unit active on both signs of x_0 (small U, positive c), i.e. linear in x_0, and can use x_0 only through its odd
# part f(α e_0) − f(−α e_0) until units gate off for one sign. Along U's x_0 column the Gauss-Newton curvature is
# δuᵀ M δu, M_jk = (1/N) Σ_i x_{i,0}² v_j v_k 1[j active on x_i] 1[k active on x_i], = p α² v vᵀ while units see
# both signs: the linear model's p α² |b|² with b = v. So the same depth effect sharpens the network as it learns,
# and at 2/lr its output on a pure-x_0 probe oscillates with period 2. Under squared error this curvature stays while
# units see both signs; under two-class cross-entropy each example's curvature is weighted by p_i(1 − p_i), so once
# the network computes |x_0| and fits the outliers with growing margins, the sharpness falls below 2/lr.

def make_toy_network(in_features, width=16, weight_scale=0.05, output_scale=0.1, hidden_bias=0.7, seed=0,
                     num_outputs=1, dtype=torch.float64):
    """nn.Sequential(Linear, ReLU, Linear) that starts linear in the opposing input: default init, first layer times
    weight_scale and output times output_scale (small: features learned progressively), hidden biases hidden_bias > 0
    (every unit active on both signs of x_0), output biases 0; num_outputs 1 (MSE) or 2 (CE)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_outputs)).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(weight_scale)
        model[0].bias.fill_(hidden_bias)
        model[2].weight.mul_(output_scale)
        model[2].bias.zero_()
    return model

def opposing_probes(alpha, in_features, points=41, span=2.0, dtype=torch.float64):
    """Pure-x_0 probes: x_0 on a grid of `points` values in [−span α, span α] (by α/10 by default, so −α, 0 and α lie on
    it), all other inputs 0. Returns probes [points, in_features] and the grid [points]."""
    grid = alpha * torch.linspace(-span, span, points, dtype=dtype)
    probes = torch.zeros(points, in_features, dtype=dtype)
    probes[:, 0] = grid
    return probes, grid

def odd_even_parts(probe_outputs, grid, alpha):
    """The network's use of x_0 from its outputs on `opposing_probes` [T, P] (grid [P]): with f± = f(±α e_0) and f0 =
    f(0), odd = (f+ − f−)/2, the part that flips with the sign of x_0 (α w_o for the linear model), and even = (f+ +
    f−)/2 − f0, the part that depends on |x_0| only. Returns (odd [T], even [T])."""
    outputs, grid = np.asarray(probe_outputs, dtype=np.float64), np.asarray(grid, dtype=np.float64)
    plus, minus, zero = (int(np.argmin(np.abs(grid - value))) for value in (alpha, -alpha, 0.0))
    return (outputs[:, plus] - outputs[:, minus]) / 2, (outputs[:, plus] + outputs[:, minus]) / 2 - outputs[:, zero]

def opposing_curvature(model, x, feature=0):
    """Top eigenvalue of M, the Gauss-Newton curvature of the first-layer column reading x_feature of a
    `make_toy_network`: M_jk = (1/N) Σ_i x_{i,f}² v_j v_k 1_j(x_i) 1_k(x_i) (1_j: unit j active), p α² |v|² while all
    units see every outlier. With two outputs v is v_1 − v_0 and example i weighs p_i(1 − p_i), which vanishes as it is
    fit with a margin. OUR RECONSTRUCTION."""
    hidden, output = model[0], model[2]
    with torch.no_grad():
        active = (x @ hidden.weight.T + hidden.bias > 0).to(x.dtype)            # [N, width]
        if output.weight.shape[0] == 1:
            direction, weight = output.weight[0], torch.ones(len(x), dtype=x.dtype)
        else:
            direction = output.weight[1] - output.weight[0]
            probability = torch.softmax(model(x), dim=-1)[:, 1]
            weight = probability * (1 - probability)
        rows = x[:, feature:feature + 1] * active * direction * weight.sqrt()[:, None]    # ∂(f or f_1 − f_0)/∂U[j, f]
        return float(torch.linalg.eigvalsh(rows.T @ rows / len(x))[-1])

def toy_state(model, loss_fn, x, y, sign, probes):
    """The toy's state with groups sign [N]: loss_plus, loss_minus, opposing_curvature, column_cosine (of the two
    groups' gradients on the column reading x_0), active_both (units active on both twins) and probe_output (on
    `opposing_probes`; for two classes f_1 − f_0). Needs `opposing_curvature`, `group_gradients`."""
    grads = group_gradients(model, loss_fn, x, y, [sign > 0, sign < 0])
    column = [g[:model[0].weight.numel()].view_as(model[0].weight)[:, 0] for g in grads]   # U[:, 0] reads x_0
    with torch.no_grad():
        losses, active, outputs = loss_fn(model(x), y), model[0](x) > 0, model(probes)
        return {"loss_plus": float(losses[sign > 0].mean()), "loss_minus": float(losses[sign < 0].mean()),
                "opposing_curvature": opposing_curvature(model, x),
                "column_cosine": float(column[0] @ column[1] / (column[0].norm() * column[1].norm() + 1e-300)),
                "active_both": float((active[sign > 0] & active[sign < 0]).float().mean()),
                "probe_output": (outputs[:, -1] - (outputs[:, 0] if outputs.shape[1] == 2 else 0)).numpy()}

def half_learned_step(even):
    """The first step at which the |x_0| (even) response reaches half its final value (the target offset under squared
    error, the final margin under cross-entropy); T (never) when the final value is not positive."""
    even = np.asarray(even, dtype=np.float64)
    learned = even >= even[-1] / 2 if even[-1] > 0 else np.zeros(len(even), dtype=bool)
    return int(np.argmax(learned)) if learned.any() else len(even)

def late_fall(sharpness):
    """1 − (mean sharpness over the last 10% of steps) / (maximum sharpness): how far it has fallen back."""
    sharpness = np.asarray(sharpness)
    return float(1 - sharpness[int(0.9 * len(sharpness)):].mean() / sharpness.max())

# ----------------------------------------------------------------------------- 7. Adam versus SGD
#
# Adam divides each coordinate's step by its running gradient RMS, so it sees the sharpness of P^-1/2 H P^-1/2 (P its
# preconditioner) against its own `stability_threshold`. SplitSGD (OUR RECONSTRUCTION) gives Adam's step only to the
# few coordinates with large, sign-flipping gradients that opposing signals make.

def adam_denominator(exp_avg_sq, step, beta2, eps):
    """Adam's per-coordinate divisor sqrt(v̂) + ε, v̂ = v / (1 − β2^t) after t steps, in torch.optim.Adam's operation
    order (results match it to the last bit)."""
    return exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** float(step)) + eps

def top_quantile_mask(values, quantile):
    """Bool mask of the round(quantile·n) largest entries of `values` (any shape; ties broken by torch.topk)."""
    count = int(round(quantile * values.numel()))
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count >= values.numel():
        mask[:] = True
    elif count > 0:
        mask[torch.topk(values.reshape(-1), count, sorted=False).indices] = True
    return mask.view_as(values)

class SplitSGD(torch.optim.Optimizer):
    """SGD with momentum, except that the most "spiky" coordinates of each tensor take Adam's step (OUR RECONSTRUCTION
    of the paper's split-update proposal). Per tensor at step t: the heavy-ball buffer b_t = μ b_{t−1} + g_t as SGD,
    Adam's m_t and v_t; the round(q·n) coordinates with the largest v_t move by normalized_lr · m̂_t / (sqrt(v̂_t) + ε),
    the others by lr · b_t. Every coordinate keeps all three, so it can change sets: q = 0 is exactly SGD(lr, μ), q = 1
    Adam(normalized_lr). Needs `adam_denominator`, `top_quantile_mask`."""

    def __init__(self, params, lr, normalized_lr=1e-3, quantile=0.1, momentum=0.9, betas=(0.9, 0.999), eps=1e-8):
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile {quantile} must be in [0, 1]")
        super().__init__(params, dict(lr=lr, normalized_lr=normalized_lr, quantile=quantile, momentum=momentum,
                                      betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in (p for p in group["params"] if p.grad is not None):
                g, state = p.grad, self.state[p]
                if not state:
                    state.update(step=0, momentum_buffer=g.clone(), exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                state["step"] += 1
                t = state["step"]
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = adam_denominator(state["exp_avg_sq"], t, beta2, group["eps"])
                normalized_step = state["exp_avg"] / denom * (group["normalized_lr"] / (1 - beta1 ** t))
                state["normalized"] = top_quantile_mask(state["exp_avg_sq"], group["quantile"])
                p.sub_(torch.where(state["normalized"], normalized_step, group["lr"] * state["momentum_buffer"]))
        return loss

    @torch.no_grad()
    def preconditioner(self):
        """The flat P with update ≈ lr·P^-1 b: lr·(sqrt(v̂) + ε) / (normalized_lr·(1 − β1)) on the normalized set
        (Adam's momentum as a heavy-ball buffer), 1 elsewhere; None before the first step."""
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
    """The diagonal P of an adaptive optimizer: Adam's sqrt(v̂) + ε (bias-corrected, as in Cohen et al. 2022),
    SplitSGD's own; None otherwise or before the first step. Needs `SplitSGD`."""
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
            parts.append(adam_denominator(state["exp_avg_sq"], state["step"], group["betas"][1], group["eps"]).reshape(-1))
    return torch.cat(parts)

def opposing_group_oscillation(per_example_loss, top=40, window=30, start=0, stride=None):
    """How strongly the examples whose losses move most keep oscillating under minibatch noise, against loss-matched
    groups (OUR RECONSTRUCTION). per_example_loss [R, N] at records every k steps (k odd). At record r the `top`
    examples by |ℓ_i(r+1) − ℓ_i(r)| split by sign; the control takes for each the example whose loss at r+1 is nearest
    (`matched_examples`). Over `window` intervals from r+2 a group's amplitude is mean |Δ| of its mean loss, a pair's
    the mean of its two; r = start, start + stride, ... Returns record, amplitude, amplitude_matched, relative [S],
    median_relative (nan when S = 0). Needs `matched_examples`."""
    losses, rows = np.asarray(per_example_loss, dtype=np.float64), []
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

def optimizer_summary(model, loss_fn, history, optimizer, x, y, x_test, y_test, top=40, window=20):
    """One minibatch run in numbers (per-example losses recorded as "losses"): train_loss (inf if it diverged),
    test_accuracy, relative (`opposing_group_oscillation` from the first fifth on), ratio ((preconditioned) sharpness
    over `stability_threshold`, median over the second half), early (`early_layer_ratio`, mean after step 0), curve.
    Needs `evaluate`, `measured`, `opposing_group_oscillation`, `stability_threshold`, `parameter_layers`,
    `early_layer_ratio`."""
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

# ----------------------------------------------------------------------------- Appendix A. The larger models

class MLP(nn.Module):
    """Fully connected network: flatten -> depth x [Linear(width), activation] -> Linear(num_classes)."""

    def __init__(self, in_features=3072, width=200, depth=2, num_classes=10, activation="relu"):
        super().__init__()
        activations = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}
        layers, fan_in = [nn.Flatten()], in_features
        for _ in range(depth):
            layers, fan_in = layers + [nn.Linear(fan_in, width), activations[activation]()], width
        self.net = nn.Sequential(*layers, nn.Linear(fan_in, num_classes))

    def forward(self, x):
        return self.net(x)

class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, ReLU, 2x2 max-pool), global average pool, linear head."""

    def __init__(self, in_channels=3, channels=32, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))

def small_output_init(model, body_gain, zero_last_conv_of_blocks=False):
    """Zero output, live features, for a ReLU conv net without batch norm: Kaiming convs times body_gain, zero biases
    and head, and (ResNet) a zero last conv per residual branch. PyTorch's default init stalls GD at the constant
    predictor, plain Kaiming diverges; the MSE sharpness at init is about |mean penultimate feature|²."""
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
    """VGG-11 for 32x32 inputs (8 convs, 5 max-pools, a linear head). Without BN it starts from `small_output_init` with
    body_gain 0.8·(16/width)^(1/16): mean penultimate feature norm near 2.5 whatever the width (README)."""

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
        self.features, self.head = nn.Sequential(*layers), nn.Linear(channels, num_classes)
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
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=not batch_norm), norm(channels))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))

class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, four stages of two basic blocks, global average pool, linear head. Without BN it
    starts from `small_output_init` with zero residual branches (body_gain 0.69: mean penultimate feature norm near 3 at
    widths 32 and 64, README). Needs `small_output_init`, `BasicBlock`."""

    def __init__(self, num_classes=10, width=64, batch_norm=True, body_gain=0.69):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=not batch_norm),
                                  nn.BatchNorm2d(width) if batch_norm else nn.Identity(), nn.ReLU())
        blocks, channels = [], width
        for stage, stride in enumerate([1, 2, 2, 2]):
            for block in range(2):
                blocks.append(BasicBlock(channels, width * 2 ** stage, stride if block == 0 else 1, batch_norm))
                channels = width * 2 ** stage
        self.blocks, self.head = nn.Sequential(*blocks), nn.Linear(channels, num_classes)
        if not batch_norm:
            small_output_init(self, body_gain, zero_last_conv_of_blocks=True)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))

class LayerNorm(nn.Module):
    """LayerNorm written out, (x − mean) / sqrt(var + eps) · weight + bias over the last dimension (double backward)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias

class Attention(nn.Module):
    """Multi-head self-attention written out (fused kernels have no double backward); causal: position t attends to
    positions <= t only, as a language model must."""

    def __init__(self, dim, heads, causal=False):
        super().__init__()
        self.heads, self.causal, self.qkv, self.proj = heads, causal, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):                                                  # x: [B, T, D]
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        if self.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, D))

class Block(nn.Module):
    """Pre-LN transformer block, the ViT's and the GPT's: h + attention(norm(h)), then + MLP(norm(h))."""

    def __init__(self, dim, heads, mlp_ratio, causal=False):
        super().__init__()
        self.norm1, self.attention, self.norm2 = LayerNorm(dim), Attention(dim, heads, causal), LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h):
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))

class ViT(nn.Module):
    """Small vision transformer: patch embedding + learned positions, pre-LN blocks, mean-pooled linear head. Needs
    `Block`, `Attention`, `LayerNorm`."""

    def __init__(self, num_classes=10, image_size=32, patch=4, dim=128, depth=4, heads=4, mlp_ratio=2):
        super().__init__()
        self.patch, self.embed = patch, nn.Linear(3 * patch * patch, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm, self.head = LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):                                                  # x: [B, 3, H, W]
        p = self.patch
        h = self.embed(x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2))
        h = h + self.position
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))

class GPT(nn.Module):
    """A small character-level GPT: token and learned position embeddings, causal pre-LN blocks, a final LayerNorm and a
    linear head. tokens [B, T <= context] -> logits [B, T, vocab_size], those at position t predicting token t + 1: each
    (sequence, position) is one example. Needs `Block`, `Attention`, `LayerNorm`."""

    def __init__(self, vocab_size=65, context=64, dim=64, depth=2, heads=4, mlp_ratio=4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, context, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm, self.head = LayerNorm(dim), nn.Linear(dim, vocab_size)

    def forward(self, tokens):                                             # tokens: [B, T]
        if tokens.shape[1] > self.position.shape[1]:
            raise ValueError(f"GPT: sequences of {tokens.shape[1]} tokens, but the context is {self.position.shape[1]}: "
                             f"pass at most that many")
        h = self.embed(tokens) + self.position[:, :tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

# ----------------------------------------------------------------------------- Appendix B. The data

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5, SHAKESPEARE_BYTES = "6fb458f1232090904fb40fe944165e91", 1115394

class DataError(Exception):
    """A data set is missing, cannot be downloaded, or is corrupted. The message says how to fix it."""

def load_cifar10(root=None, train=True, download=True):
    """CIFAR-10 images uint8 [N, 32, 32, 3] and labels int64 [N] from root (else $OSIG_DATA, else ./data)
    /cifar-10-batches-py, made from the md5-checked archive (downloaded if allowed) when absent; batches checked by
    structure and read without running code. Raises DataError with the fix. Needs `cifar10_folder`, `read_cifar_batch`.
    """
    folder = cifar10_folder(Path(root or os.environ.get("OSIG_DATA") or "data").expanduser(), download)
    batches = [read_cifar_batch(folder / name) for name in
               ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"])]
    images = np.concatenate([data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for data, _ in batches])
    return torch.from_numpy(images), torch.from_numpy(np.concatenate([labels for _, labels in batches]))

def normalize(images, mean=None, std=None):
    """Per-channel standardization, uint8 [N, H, W, C] -> float32 [N, C, H, W]: x = (images/255 − mean[c]) / std[c],
    mean and std [C] over these images unless given (pass the training set's for test or probe images). Returns (x,
    mean, std)."""
    x = images.permute(0, 3, 1, 2).float() / 255
    mean = x.mean(dim=(0, 2, 3)) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    std = x.std(dim=(0, 2, 3)) if std is None else torch.as_tensor(std, dtype=torch.float32)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), mean, std

def seeded_subset(n_total, n, seed=0):
    """Indices [n]: the first n of a seeded permutation of n_total, so one seed's subsets are nested."""
    if not 0 < n <= n_total:
        raise ValueError(f"subset size n={n} must be between 1 and {n_total}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed={seed} must be in 0..2^63 - 1")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]

def load_tiny_shakespeare(root=None, download=True):
    """Tiny Shakespeare (1,115,394 characters) as a str from root (else $OSIG_DATA, else ./data)
    /tinyshakespeare/input.txt, downloaded when missing; it must be a regular file of the right size before it is read
    (a FIFO or device cannot hang), then match its md5. Raises DataError with the fix. Needs `download_checked`."""
    path = Path(root or os.environ.get("OSIG_DATA") or "data").expanduser() / "tinyshakespeare" / "input.txt"
    fix = f"put the file from {SHAKESPEARE_URL} there, or set OSIG_DATA to a folder holding tinyshakespeare/input.txt"
    if not path.exists():
        if not download:
            raise DataError(f"tiny Shakespeare not found at {path}: {fix}")
        download_checked(SHAKESPEARE_URL, path, SHAKESPEARE_MD5)
    size = path.stat().st_size if path.is_file() else None
    if size != SHAKESPEARE_BYTES:
        raise DataError(f"{path} is " + ("not a regular file" if size is None else "empty" if size == 0 else
                        f"{size:,} bytes, not {SHAKESPEARE_BYTES:,} (truncated or a different file)") + f": delete it and {fix}")
    data = path.read_bytes()
    if hashlib.md5(data).hexdigest() != SHAKESPEARE_MD5:
        raise DataError(f"{path} is corrupted (md5 {hashlib.md5(data).hexdigest()}, expected {SHAKESPEARE_MD5}): "
                        f"delete it and {fix}")
    return data.decode("utf-8")

def encode_characters(text):
    """Character tokens: the sorted distinct characters are the vocabulary (65 for tiny Shakespeare), each character its
    index. Returns tokens int64 [len(text)] and the vocabulary (a str)."""
    vocabulary = "".join(sorted(set(text)))
    index = {character: i for i, character in enumerate(vocabulary)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64), vocabulary

def text_sequences(tokens, n, context, seed=0):
    """n windows of the token stream at seeded random starts: inputs x [n, context] and targets y [n, context], the next
    token of each position (y[i, t] is predicted from x[i, :t + 1])."""
    if n < 1 or len(tokens) <= context + 1:
        raise ValueError(f"need n >= 1 sequences and more than context + 1 = {context + 1} tokens")
    starts = torch.randint(0, len(tokens) - context - 1, (n,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([tokens[s:s + context + 1] for s in starts.tolist()])
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

def download_checked(url, path, md5, deadline=900, failed=set()):
    """Download `url` to `path` (progress on stderr) via path.part, md5-checked, renamed only when complete. 30 s of
    silence or `deadline` seconds stop it; `failed`, shared by every call on purpose, remembers this process's failed
    URLs, so a stalled network costs one wait. Raises DataError with the fix. Needs `DataError`."""
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
            raise DataError(f"the download of {url} is corrupted (md5 {digest.hexdigest()}, expected {md5}): {fix}")
        os.replace(partial, path)
    except (OSError, DataError) as error:
        failed.add(url)
        raise error if isinstance(error, DataError) else DataError(
            f"{path} is missing and the download from {url} failed ({error}): {fix}") from None
    finally:
        partial.unlink(missing_ok=True)

def cifar10_folder(root, download=True):
    """root/cifar-10-batches-py, unpacked when absent from the md5-checked (and, if allowed, downloaded) archive into a
    temporary folder renamed into place when complete. Raises DataError. Needs `download_checked`."""
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
    """An unpickler that builds numpy arrays and nothing else: a pickle can call any importable function while it loads,
    so a tampered data file could run code. Only numpy's array reconstruction, ndarray, dtype and _codecs.encode (Python
    2 byte strings) resolve; any other name raises pickle.UnpicklingError."""
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
               ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
               ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0]}

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, "
                                     f"lists and strings")

def read_cifar_batch(path):
    """One batch file (data uint8 [10000, 3072], labels [10000]) after a size check, by `CifarUnpickler`, checked by
    structure; any damage raises DataError with the fix. Needs `DataError`, `CifarUnpickler`."""
    fix = f"delete {path.parent} and put a fresh copy of cifar-10-batches-py/ (or the archive) there"
    if not path.is_file() or not 30_000_000 <= path.stat().st_size <= 40_000_000:
        raise DataError(f"{path} is " + (f"{path.stat().st_size:,} bytes, not a CIFAR-10 batch (about 31 MB)"
                                         if path.is_file() else "missing") + f": {fix}")
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
        labels_ok = isinstance(labels, (list, np.ndarray)) and len(labels) == 10000 and \
            all(isinstance(label, (int, np.integer)) and 0 <= label <= 9 for label in labels)
    except Exception as error:                 # a damaged pickle can raise almost anything while it loads
        raise DataError(f"{path} is unreadable ({type(error).__name__}: {str(error)[:100]}): {fix}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (10000, 3072):
        raise DataError(f"{path} is not a CIFAR-10 batch (data {getattr(data, 'dtype', type(data).__name__)} "
                        f"{getattr(data, 'shape', None)}, expected uint8 (10000, 3072)): {fix}")
    if not labels_ok:
        raise DataError(f"{path} is not a CIFAR-10 batch (labels must be 10,000 integers in 0..9): {fix}")
    return data, np.asarray(labels, dtype=np.int64)
