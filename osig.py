"""
osig.py: a readable reproduction of "Outliers with Opposing Signals Have an Outsized Effect on Neural Network
Optimization" (Rosenfeld & Risteski, ICLR 2024). Each section uses only what came before it, but for the
data loaders' plumbing (Appendix B) and `stability_threshold`'s key for section 7's SplitSGD.
  1. Sharpness      the objective, measuring without side effects, Hessian-vector products, Lanczos.
  2. Training       one loop for GD and minibatch optimizers, one hook; the edge of stability, one time axis.
  3. Outliers       per-example losses, gradients, curvatures, per-layer sharpness; a GD step's outliers and
                    their opposing groups; spikes, anti-phase, matched examples and selection draws.
  4. Features       what the groups share: sky, backgrounds, colour probes, characters; null surrogates.
  5. Linear model   a two-layer linear network with an opposing feature: its sharpness in closed form.
  6. Toy network    a small ReLU network on a rare, large input: the mechanism end to end.
  7. Adam and SGD   preconditioned sharpness, split-update SGD, opposing groups under minibatch noise.
  Appendices        A: the larger models. B: the data files. C: scoring the claims (null draws, z, intervals).
A `loss_fn` maps (outputs [B, C], labels [B]) to per-example losses [B]; the objective is their mean. For a
language model, outputs [B, T, C] and labels [B, T]: each (sequence, position) is one example, and per-example
arrays are flat over B·T. Flat parameter vectors follow the trainable parameters in module order. Measurements
are of the deterministic objective (eval mode). Every public function works pasted alone with the imports
below and the helpers its docstring names after "Needs" (and theirs).
"""

import codecs
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------ 1. Sharpness

def mse_loss(outputs, labels):
    """Per-example squared error to one-hot targets, ½ Σ_c (outputs[i, c] − 1[c = labels[i]])², summed over
    classes as in Cohen et al.: [B, C], [B] -> [B]; [B, T, C], [B, T] -> [B, T]."""
    # a comparison rather than F.one_hot, which checks label values and so cannot run under vmap
    classes = torch.arange(outputs.shape[-1], device=outputs.device)
    return 0.5 * (outputs - (labels.unsqueeze(-1) == classes).to(outputs.dtype)).pow(2).sum(-1)

def cross_entropy_loss(outputs, labels):
    """Per-example −log softmax(outputs[i])[labels[i]]: [B, C], [B] -> [B]; [B, T, C], [B, T] -> [B, T]."""
    return F.cross_entropy(outputs.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)

def trainable(model):
    """The requires_grad parameters in module order; a ValueError when there are none or autograd is off."""
    if torch.is_inference_mode_enabled():
        raise ValueError("osig needs autograd, which torch.inference_mode() turns off: call it outside")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to differentiate")
    return params

def checked_forward(model, loss_fn, x, y):
    """model(x) and loss_fn(model(x), y), checked for what would pass silently: one label per example, integer
    labels 0..C−1 for C > 1 outputs (MSE makes others all-zero targets), one loss per label."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples and y {len(y)}: pass one label per example (N >= 1)")
    outputs = model(x)
    classes = outputs.shape[-1]
    if classes > 1 and (torch.is_floating_point(y) or int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"labels must be integer class indices 0..{classes - 1} for {classes} outputs, got "
                         f"{y.dtype} in {float(y.min()):g}..{float(y.max()):g} (for regression: one output)")
    losses = loss_fn(outputs, y)
    if losses.shape != y.shape:
        raise ValueError(f"loss_fn returned shape {tuple(losses.shape)} for labels {tuple(y.shape)}: it must "
                         f"return one loss per example (e.g. F.cross_entropy(..., reduction='none'))")
    return outputs, losses

@contextmanager
def preserved(model):
    """Inside: eval mode (dropout off, batch norm on running statistics: the deterministic objective),
    gradients on; on exit every module's train flag and the CPU and CUDA RNG states are restored."""
    modes = [(module, module.training) for module in model.modules()]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None
    model.eval()
    try:
        with torch.enable_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state_all(states[1])

def unflatten(vector, params):
    """Split a flat vector [sum of sizes] into tensors shaped like `params` (views, in order)."""
    return [part.view_as(p) for part, p in zip(torch.split(vector, [p.numel() for p in params]), params)]

@contextmanager
def shifted(model, vector):
    """The trainable parameters at θ + vector (flat [P]) inside, restored exactly on exit: a trial GD step is
    shifted(model, −lr·g). Needs `trainable`, `unflatten`."""
    params = trainable(model)
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
    """The Hessian H of the mean loss L = (1/N) Σ_i ℓ_i over (x, y) as v [P] -> H v [P], for use inside
    `preserved`. In one chunk g = ∇L is built once and each product is a backward pass of <g, v>; in chunks of
    rows each product sums d/dθ <∇(Σ_chunk ℓ_i)/N, v> (a forward, backward and double backward each), exact
    when examples do not interact. Needs `trainable`, `checked_forward`, `unflatten`."""
    params, n, chunk = trainable(model), y.numel(), chunk or len(x)

    def gradient(start):
        losses = checked_forward(model, loss_fn, x[start:start + chunk], y[start:start + chunk])[1]
        return torch.autograd.grad(losses.sum() / n, params, create_graph=True, materialize_grads=True)

    def flat(parts):
        return torch.cat([part.reshape(-1) for part in parts])

    if chunk >= len(x):
        grads = gradient(0)
        return lambda v: flat(torch.autograd.grad(grads, params, unflatten(v, params), retain_graph=True,
                                                  materialize_grads=True))
    return lambda v: sum(flat(torch.autograd.grad(gradient(start), params, unflatten(v, params),
                                                  materialize_grads=True))
                         for start in range(0, len(x), chunk))

def hvp(model, loss_fn, x, y, v, chunk=None):
    """H v (flat [P]) of the mean loss over (x, y), no side effects. Needs `hessian_operator`, `preserved`."""
    with preserved(model):
        return hessian_operator(model, loss_fn, x, y, chunk)(v)

def lanczos(matvec, dim, k=1, iters=100, tol=1e-6, seed=0, v0=None, dtype=torch.float64, device="cpu"):
    """The k largest (algebraic) eigenpairs of a symmetric operator matvec: [dim] -> [dim] by Lanczos: a
    Krylov basis from w = A q_j − α_j q_j − β_{j−1} q_{j−1}, α_j = q_j·A q_j, β_j = |w|, re-orthogonalized
    twice against every q; the Ritz values θ (eigenvalues of T = Qᵀ A Q) have residuals |A y − θ y| = β_m
    |s_m|. It stops when the top k residuals are <= tol·max|θ|, after `iters` products, or when the space
    fills R^dim; on breakdown it goes on from a random orthogonal vector, so a warm start v0 [dim] (or [dim,
    m], columns summed) that is an exact eigenvector still finds the others. Returns eigenvalues float64 [k]
    (descending), eigenvectors [dim, k], residuals [k]; a non-finite product raises FloatingPointError."""
    if not 1 <= k <= dim:
        raise ValueError(f"lanczos: k={k} eigenpairs of a {dim}-dimensional operator: need 1 <= k <= dim")
    iters, generator = min(max(iters, k), dim), torch.Generator().manual_seed(seed)

    def random_vector():
        return torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    if v0 is None:
        q = random_vector()
    else:
        v0 = v0.reshape(dim, -1).to(device=device, dtype=dtype)
        q = (v0 / v0.norm(dim=0).clamp_min(1e-30)).sum(dim=1)
    basis, alphas, betas = torch.zeros(iters, dim, dtype=dtype, device=device), [], []
    basis[0] = q / q.norm()
    for j in range(iters):
        w = matvec(basis[j]).to(dtype)
        alphas.append(float(w @ basis[j]))
        for _ in range(2):
            w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        beta = float(w.norm())
        if not (math.isfinite(alphas[-1]) and math.isfinite(beta)):
            raise FloatingPointError(f"lanczos: non-finite product at iteration {j}: the Hessian overflowed")
        theta, S = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        top = np.argsort(theta)[::-1][:k]
        residuals, scale = beta * np.abs(S[-1, top]), max(np.abs(theta).max(), 1e-300)
        breakdown = beta <= 1e-10 * scale
        if j + 1 == iters or (j + 1 >= k and not breakdown and np.all(residuals <= tol * scale)):
            break
        if breakdown:
            w, beta = random_vector(), 0.0
            for _ in range(2):
                w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
        betas.append(beta)
        basis[j + 1] = w / w.norm()
    eigenvectors = basis[:len(alphas)].T @ torch.as_tensor(S[:, top].copy(), dtype=dtype, device=device)
    return torch.as_tensor(theta[top].copy()), eigenvectors, torch.as_tensor(residuals.copy())

def top_eigenvalues(model, loss_fn, x, y, k=1, chunk=None, iters=100, tol=1e-3, seed=0, v0=None, scale=None):
    """Sharpness: the k largest eigenvalues of the Hessian H of the mean loss over (x, y); given a flat scale
    s [P], of diag(s) H diag(s): s = P^-1/2 gives the sharpness a diagonal preconditioner P sees (s ⊙ u is
    then a parameter direction), a 0/1 mask one block of H. Returns eigenvalues float64 [k], eigenvectors [P,
    k], residuals [k]. Needs `trainable`, `preserved`, `hessian_operator`, `lanczos`."""
    params = trainable(model)
    dim = sum(p.numel() for p in params)
    if not 1 <= k <= dim:
        raise ValueError(f"top_eigenvalues: k={k} but the model has {dim} parameters: need 1 <= k <= {dim}")
    with preserved(model):
        hessian_times = matvec = hessian_operator(model, loss_fn, x, y, chunk)
        if scale is not None:
            scale = scale.to(device=params[0].device, dtype=params[0].dtype)

            def matvec(u):
                return scale * hessian_times(scale * u)
        return lanczos(matvec, dim, k=k, iters=iters, tol=tol, seed=seed, v0=v0, dtype=params[0].dtype,
                       device=params[0].device)

def sharpness_measure(loss_fn, x, y, every=20, k=1, chunk=None, iters=100, tol=1e-3, preconditioner=None):
    """A `train` hook: every `every` steps the top-k Hessian eigenvalues over (x, y) as "eigenvalues"; given
    preconditioner (optimizer -> P [P] or None), those of P^-1/2 H P^-1/2 as "preconditioned_eigenvalues" (nan
    before P exists). A non-finite plain value raises FloatingPointError. Needs `top_eigenvalues`."""
    warm = {}

    def measure(step, model, optimizer):
        if step % every:
            return None
        values, warm["plain"], _ = top_eigenvalues(model, loss_fn, x, y, k, chunk, iters, tol,
                                                   v0=warm.get("plain"))
        record = {"eigenvalues": values.numpy()}
        if preconditioner is not None:
            P = preconditioner(optimizer)
            record["preconditioned_eigenvalues"] = np.full(k, np.nan) if P is None else top_eigenvalues(
                model, loss_fn, x, y, k, chunk, iters, tol, scale=P.rsqrt())[0].numpy()
        if not np.isfinite(record["eigenvalues"]).all():
            raise FloatingPointError(f"non-finite sharpness {record['eigenvalues'].tolist()}")
        return record

    return measure

# ------------------------------------------------------------ 2. Training

def full_batch_gradient(model, loss_fn, x, y, chunk):
    """∇L of the mean loss into p.grad, `chunk` rows at a time. Returns every example's loss [N] (flat over
    B·T) and the accuracy (nan for one output). Needs `checked_forward`."""
    losses, correct = [], []
    for start in range(0, len(x), chunk):
        rows = slice(start, start + chunk)
        outputs, chunk_losses = checked_forward(model, loss_fn, x[rows], y[rows])
        (chunk_losses.sum() / y.numel()).backward()
        losses.append(chunk_losses.detach().reshape(-1))
        correct.append((outputs.detach().argmax(-1) == y[rows]).reshape(-1))
    return torch.cat(losses), float(torch.cat(correct).float().mean()) if outputs.shape[-1] > 1 else math.nan

def minibatches(n, batch_size, generator):
    """Endless batches: full batch_size slices of a new seeded permutation of range(n) each epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]

def stability_threshold(optimizer):
    """The sharpness above which an optimizer is unstable on a quadratic (Cohen et al. 2021, 2022): GD 2/lr;
    heavy-ball momentum μ (SGD, SplitSGD on its preconditioned sharpness) (2 + 2μ)/lr; Adam (2 + 2β1)/((1 −
    β1) lr) on the sharpness of P^-1/2 H P^-1/2, P = sqrt(v̂) + ε; else nan."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.Adam):
        return (2.0 + 2.0 * group["betas"][0]) / ((1.0 - group["betas"][0]) * group["lr"])
    if isinstance(optimizer, torch.optim.SGD) or "normalized_lr" in group:        # SGD or SplitSGD
        return (2.0 + 2.0 * group["momentum"]) / group["lr"]
    return math.nan

def train(model, x, y, loss_fn, optimizer, steps, batch_size=None, chunk=None, measure=None, seed=0,
          log=print):
    """Train `model` on (x, y) with a torch `optimizer` for `steps` steps. Full batch (batch_size None): the
    gradient of L(θ) = (1/N) Σ_i ℓ_i(θ), so SGD(lr) is GD and every ℓ_i(θ_t) comes free (per_example_loss [T,
    N]); minibatch: the next batch_size examples of a seeded reshuffle, loss and accuracy the minibatch's.
    measure(step, model, optimizer) -> dict or None runs at θ_t before the update, gradient in p.grad, inside
    `preserved`; its dicts go to history["measured"] with their step.

    A non-finite loss, or a FloatingPointError from measure, ends the run with history["diverged"], a message
    naming the `stability_threshold`; unrun steps stay nan in loss, accuracy, grad_norm [T] and
    per_example_loss [T, N] (empty for minibatches). Needs `trainable`, `full_batch_gradient`, `minibatches`,
    `checked_forward`, `preserved`, `stability_threshold`."""
    params, chunk = trainable(model), chunk or len(x)
    if steps < 0 or chunk < 1 or (batch_size is not None and not 1 <= batch_size <= len(x)):
        raise ValueError(f"train: need steps >= 0 (got {steps}), chunk >= 1 (got {chunk}) and batch_size "
                         f"None (full batch) or in 1..{len(x)} (got {batch_size})")
    batches = minibatches(len(x), batch_size or len(x), torch.Generator().manual_seed(seed))
    history = {key: np.full(steps, np.nan) for key in ("loss", "accuracy", "grad_norm")}
    rows = steps if batch_size is None else 0          # per-example losses come free in full batch only
    history.update(per_example_loss=np.full((rows, y.numel()), np.nan, np.float32), measured=[],
                   diverged=None)
    started = time.time()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if batch_size is None:
            losses, accuracy = full_batch_gradient(model, loss_fn, x, y, chunk)
            history["per_example_loss"][step] = losses.float().cpu().numpy()
        else:
            batch = next(batches).to(x.device)
            outputs, losses = checked_forward(model, loss_fn, x[batch], y[batch])
            losses.mean().backward()
            correct = (outputs.argmax(-1) == y[batch]).float().mean()
            accuracy = float(correct) if outputs.shape[-1] > 1 else math.nan
        history["loss"][step], history["accuracy"][step] = float(losses.detach().mean()), accuracy
        history["grad_norm"][step] = float(torch.stack([p.grad.norm() for p in params if p.grad is not None])
                                           .norm())
        try:
            if not math.isfinite(history["loss"][step] + history["grad_norm"][step]):
                raise FloatingPointError(
                    f"loss {history['loss'][step]}, gradient norm {history['grad_norm'][step]}")
            with preserved(model):
                record = measure(step, model, optimizer) if measure else None
            history["measured"] += [dict(record, step=step)] if record else []
        except FloatingPointError as error:
            history["diverged"] = (f"training diverged at step {step} ({error}); {type(optimizer).__name__} "
                                   f"at lr {optimizer.param_groups[0]['lr']:g} is stable up to a sharpness "
                                   f"of {stability_threshold(optimizer):.4g}: lower the learning rate")
            if log:
                log(history["diverged"])
            break
        optimizer.step()
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            elapsed = time.time() - started
            first = elapsed if step == 0 else first     # step 0 pays for warm-up and a cold eigensolver
            eta = f"{(elapsed - first) / step * (steps - step - 1):6.1f}s" if step else "after more steps"
            log(f"step {step:5d} | loss {history['loss'][step]:.4f} | acc {accuracy:.3f} | {elapsed:6.1f}s, "
                f"ETA {eta}")
    return history

def measured(history, key):
    """The steps [M] and values [M, ...] (numpy) of `key` in the measure records of a `train` history."""
    records = [m for m in history["measured"] if key in m]
    return (np.asarray([m["step"] for m in records], dtype=np.int64),
            np.asarray([np.asarray(m[key], dtype=np.float64) for m in records]))

def evaluate(model, loss_fn, x, y, chunk=1024):
    """Mean loss and accuracy (nan for one output) on (x, y), without gradients or side effects. Needs
    `checked_forward`, `preserved`."""
    with preserved(model), torch.no_grad():
        parts = [checked_forward(model, loss_fn, x[s:s + chunk], y[s:s + chunk])
                 for s in range(0, len(x), chunk)]
    outputs, losses = (torch.cat([part[j] for part in parts]) for j in (0, 1))
    accuracy = float((outputs.argmax(-1) == y).float().mean()) if outputs.shape[-1] > 1 else math.nan
    return float(losses.mean()), accuracy

def first_reach(steps, values, level):
    """The first step at which `values` [E], measured at `steps` [E], reach `level`, linearly interpolated
    (steps[0] if the first does); nan if never."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    above = np.flatnonzero(values >= level)
    if len(above) == 0:
        return math.nan
    i = above[0]
    if i == 0:
        return float(steps[0])
    fraction = (level - values[i - 1]) / (values[i] - values[i - 1])
    return float(steps[i - 1] + fraction * (steps[i] - steps[i - 1]))

def edge_of_stability(steps, sharpness, threshold, length):
    """The time axis of a run of `length` steps, sharpness [E] measured at `steps` [E]: crossing, when it
    first reaches the threshold (2/lr for GD; interpolated, nan if never); after, the first measured step at
    or past it (`length` if never); approach, the steps from 0.8 x threshold to the crossing; start_ratio,
    λ(steps[0]) / threshold; hover, the median |λ / threshold − 1| from `after` on. Needs `first_reach`."""
    steps, sharpness = np.asarray(steps), np.asarray(sharpness, dtype=np.float64)
    crossing = first_reach(steps, sharpness, threshold) if len(steps) else math.nan
    after = int(steps[np.searchsorted(steps, crossing)]) if math.isfinite(crossing) else length
    hover = np.abs(sharpness[steps >= after] / threshold - 1)
    approach = crossing - first_reach(steps, sharpness, 0.8 * threshold)
    return {"crossing": crossing, "after": after, "approach": approach,
            "start_ratio": float(sharpness[0] / threshold) if len(steps) else math.nan,
            "hover": float(np.median(hover)) if len(hover) else math.nan}

def measurable(steps, start, stop, length, span=0):
    """Measurements (steps [E]) in [start, stop) with `span` steps left before `length`: bool [E]."""
    steps = np.asarray(steps)
    return (steps >= start) & (steps < stop) & (steps + span <= length)

def sharpening_rate(steps, sharpness, start, stop):
    """Progressive sharpening over [start, stop]: (λ(stop) − λ(start)) / (stop − start) · 100, the rise per
    100 steps, λ interpolated (steps [E], sharpness [E]); nan for an empty window."""
    if not stop > start:
        return math.nan
    rise = np.interp(stop, steps, sharpness) - np.interp(start, steps, sharpness)
    return float(rise / (stop - start) * 100)

# ------------------------------------------------------------ 3. Outliers and opposing groups

def per_example_losses(model, loss_fn, x, y, chunk=1024):
    """loss_fn(model(x), y) per example, without gradients or side effects: [N], flat over B·T for a language
    model. Needs `checked_forward`, `preserved`."""
    with preserved(model), torch.no_grad():
        return torch.cat([checked_forward(model, loss_fn, x[s:s + chunk], y[s:s + chunk])[1].reshape(-1)
                          for s in range(0, len(x), chunk)])

def per_example_grads(model, loss_fn, x, y, chunk=256, positions=None):
    """G[i] = ∇θ loss_fn(model(x[i:i+1]), y[i:i+1]): [n, P], by vmap of grad; a language model's row i counts
    position positions[i] (None: all). Needs `trainable`, `checked_forward`, `preserved`."""
    from torch.func import functional_call, grad, vmap
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    first, per_row = trainable(model)[0], y[0].numel()
    positions = torch.full((len(x),), -1) if positions is None else torch.as_tensor(positions).reshape(-1)
    if len(positions) != len(x) or not (-1 <= positions).all() or (positions >= per_row).any():
        raise ValueError(f"positions must give one position in 0..{per_row - 1} per example ({len(x)}), or "
                         f"be None for each row's summed losses")

    def example_loss(params, buffers, xi, yi, ti):
        losses = loss_fn(functional_call(model, (params, buffers), (xi[None],)), yi[None]).reshape(-1)
        counted = (torch.arange(len(losses), device=losses.device) == ti) | (ti < 0)       # −1: the whole row
        return (losses * counted).sum()

    size, positions = sum(p.numel() for p in params.values()), positions.to(x.device)
    result = torch.empty(len(x), size, dtype=first.dtype, device=first.device)
    with preserved(model):
        checked_forward(model, loss_fn, x[:1], y[:1])
        buffers = {name: b.detach() for name, b in model.named_buffers()}
        for start in range(0, len(x), chunk):
            rows = slice(start, start + chunk)
            grads = vmap(grad(example_loss), in_dims=(None, None, 0, 0, 0))(params, buffers, x[rows], y[rows],
                                                                             positions[rows])
            result[rows] = torch.cat([g.flatten(1) for g in grads.values()], dim=1)
    return result

def per_example_curvature(model, loss_fn, x, y, v, chunk=1024):
    """c_i = d²/dt² ℓ_i(θ + t v) at t = 0 along a unit direction v [P], so that vᵀ H v = (1/N) Σ_i c_i, by jvp
    of jvp: float64 [N] (flat over B·T). Needs `trainable`, `checked_forward`, `preserved`, `unflatten`."""
    from torch.func import functional_call, jvp
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for p in trainable(model)]
    directions = dict(zip(names, unflatten(v.to(params[0].dtype), params)))
    zero = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    result = []
    with preserved(model):
        checked_forward(model, loss_fn, x[:1], y[:1])
        buffers = {name: b.detach() for name, b in model.named_buffers()}
        for start in range(0, len(x), chunk):
            def losses_at(t):
                moved = {name: p + t * directions[name] for name, p in zip(names, params)}
                return loss_fn(functional_call(model, (moved, buffers), (x[start:start + chunk],)),
                               y[start:start + chunk])

            def slope(t):
                return jvp(losses_at, (t,), (torch.ones_like(zero),))[1]

            result.append(jvp(slope, (zero,), (torch.ones_like(zero),))[1].detach().reshape(-1))
    return torch.cat(result).double().cpu().numpy()

def group_gradients(model, loss_fn, x, y, groups):
    """Each group's share g_k = ∇θ (Σ_{i in k} ℓ_i) / N of ∇L, flat [P], per bool mask [N] (flat over B·T);
    disjoint groups covering the data sum to ∇L. Needs `trainable`, `checked_forward`, `preserved`."""
    params = trainable(model)
    with preserved(model):
        losses = checked_forward(model, loss_fn, x, y)[1].reshape(-1)
        sums = [losses[torch.as_tensor(mask, device=losses.device)].sum() / len(losses) for mask in groups]
        return [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            part, params, retain_graph=True, materialize_grads=True)]) for part in sums]

def parameter_layers(model):
    """The trainable parameters' layers, from the input side: a module's name up to the part after its first
    all-digit part ("blocks.0.mlp"), or its own name ("embed", "head"), in module order, and last all norms in
    one "norms" (they scale every layer). Returns (names [L], each flat entry's layer int64 [P])."""
    names, index = [], []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            parts = module_name.split(".")
            digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
            layer = "norms" if "Norm" in type(module).__name__ else (
                ".".join(parts[:digit + 2]) if digit is not None else module_name or name)
            names += [layer] if layer not in names else []
            index.append(np.full(p.numel(), names.index(layer), dtype=np.int64))
    order = sorted(range(len(names)), key=lambda k: names[k] == "norms")
    return [names[k] for k in order], np.argsort(order)[np.concatenate(index)]

def layer_sharpness(model, loss_fn, x, y, scale=None, iters=30, tol=1e-2):
    """The top eigenvalue of each layer's diagonal Hessian block (with scale [P], e.g. P^-1/2, of the scaled
    Hessian): float64 [L] in `parameter_layers` order. Needs `parameter_layers`, `top_eigenvalues`."""
    trainable(model)
    names, index = parameter_layers(model)
    scale = torch.ones(len(index)) if scale is None else scale.cpu()
    masks = [scale * torch.as_tensor(index == layer, dtype=scale.dtype) for layer in range(len(names))]
    return np.array([float(top_eigenvalues(model, loss_fn, x, y, iters=iters, tol=tol, scale=mask)[0][0])
                     for mask in masks])

def loss_change(model, loss_fn, x, y, lr):
    """The GD step on trial: Δℓ_i = ℓ_i(θ − lr·g) − ℓ_i(θ) (float64 [N], flat over B·T) and g = ∇L [P]. Needs
    `trainable`, `checked_forward`, `preserved`, `shifted`."""
    with preserved(model):
        losses = checked_forward(model, loss_fn, x, y)[1]
        gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses.mean(), trainable(model))])
        with shifted(model, -lr * gradient), torch.no_grad():
            return (loss_fn(model(x), y) - losses.detach()).reshape(-1).double(), gradient

def opposing_groups(loss_change, top):
    """A step's outliers: the `top` examples by |Δℓ_i| (loss_change [N]), largest first, and up, whether each
    one's loss rose: (index int64 [top], up bool [top])."""
    change = torch.as_tensor(loss_change)
    index = torch.argsort(change.abs(), descending=True, stable=True)[:top]
    return index.cpu().numpy(), (change[index] > 0).cpu().numpy()

def outlier_state(model, loss_fn, x, y, lr, eigenvalues, eigenvectors, top=30, bands=3, random=30, seed=0):
    """What only the parameters at step t tell about its outliers. The step is taken on trial (`loss_change`);
    the candidates are its outliers (`opposing_groups`) and, per class and sign of Δℓ among them, the next
    bands x as many by |Δℓ| (topped up with the next ranks), the pool for matched draws. They and `random`
    others get gradients g_i.

    Returns candidates [C = (1 + bands)·top], their change [C] (Δℓ), random [R]; unstable [C + R], |Vᵀ g_i| /
    |g_i| with V the top-k eigenvectors [P, k] (one subspace size before and after the crossing; under MSE
    several eigenvalues reach 2/lr together); gram [C, C] = <h_i, h_j>, h_i the first layer's part of g_i with
    that of g and v_1 projected out (selection by |Δℓ| ≈ lr|g_i·g| would oppose the groups by construction);
    curvature [N], each v_1ᵀ H_i v_1. Needs `loss_change`, `opposing_groups`, `per_example_grads`,
    `per_example_curvature`, `parameter_layers`."""
    change, gradient = loss_change(model, loss_fn, x, y, lr)
    index, up = opposing_groups(change, top)
    keys = y.reshape(-1).cpu().numpy() * 2 + (change > 0).cpu().numpy()
    order = np.argsort(-np.abs(change.cpu().numpy()), kind="stable")[len(index):]
    pool = [order[keys[order] == key][:bands * count] for key, count in zip(*np.unique(keys[index],
                                                                                      return_counts=True))]
    pool = np.sort(np.concatenate(pool)) if pool else np.zeros(0, dtype=np.int64)
    pool = np.concatenate([pool, order[~np.isin(order, pool)][:bands * top - len(pool)]])
    candidates = np.concatenate([index, pool[np.argsort(-np.abs(change.cpu().numpy()[pool]), kind="stable")]])
    others = np.setdiff1d(np.arange(len(change)), candidates)
    others = np.random.default_rng(seed).choice(others, min(random, len(others)), replace=False)
    chosen, per_row = np.concatenate([candidates, others]), len(change) // len(x)   # T per row (text)
    g = per_example_grads(model, loss_fn, x[chosen // per_row], y[chosen // per_row],
                          positions=chosen % per_row if per_row > 1 else None)
    V = eigenvectors.to(g.dtype)
    first = torch.as_tensor(parameter_layers(model)[1] == 0, device=g.device)
    h, basis = g[:len(candidates), first], torch.linalg.qr(torch.stack([gradient, V[:, 0]], 1)[first])[0]
    h = h - (h @ basis) @ basis.T
    return {"candidates": candidates, "change": change[candidates].cpu().numpy(), "random": others,
            "unstable": ((g @ V).norm(dim=1) / g.norm(dim=1).clamp_min(1e-30)).double().cpu().numpy(),
            "gram": (h @ h.T).double().cpu().numpy(),
            "curvature": per_example_curvature(model, loss_fn, x, y, eigenvectors[:, 0])}

def loss_spikes(loss, rise, lookback=20):
    """Loss spikes: maximal runs of steps t with loss[t] − min(loss[t − lookback:t]) > rise, one event per
    run. loss [T] -> int64 [events, 2], each one's first and last step."""
    loss = np.asarray(loss, dtype=np.float64)
    high = [loss[t] - loss[t - lookback:t].min() > rise for t in range(lookback, len(loss))]
    edges = np.diff(np.concatenate([[0], np.asarray(high, dtype=np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return np.stack([starts, ends], axis=1).astype(np.int64) + lookback

def top_fraction_share(loss_change, fraction=0.01):
    """The share of the total |loss change| carried by the top `fraction` of examples, [..., N] -> [...];
    i.i.d. Gaussian changes give about 0.036 for fraction 0.01, Laplace 0.056."""
    magnitude = np.abs(np.asarray(loss_change, dtype=np.float64))
    top = max(1, math.ceil(fraction * magnitude.shape[-1]))
    return -np.sort(-magnitude, axis=-1)[..., :top].sum(-1) / np.maximum(magnitude.sum(-1), 1e-300)

def antiphase(series, first, second):
    """corr(diff(mean of series[:, first]), diff(mean of series[:, second])), series [T, N]; groups are index
    arrays [m] or bool masks [N], or index arrays [D, m] for D pairs -> [D]. −1: one rises exactly when the
    other falls; nan for an empty group, T < 3 or a flat mean."""
    values = np.asarray(series, dtype=np.float64)
    first, second = (np.flatnonzero(g) if np.asarray(g).dtype == bool else np.asarray(g)
                     for g in (first, second))
    if len(values) < 3 or first.shape[-1] == 0 or second.shape[-1] == 0:
        return math.nan
    da, db = (np.diff(values[:, group].mean(-1), axis=0) for group in (first, second))
    da, db = da - da.mean(0), db - db.mean(0)
    with np.errstate(all="ignore"):
        correlation = (da * db).sum(0) / np.sqrt((da ** 2).sum(0) * (db ** 2).sum(0))
    return float(correlation) if np.ndim(correlation) == 0 else correlation

def matched_examples(values, chosen, labels=None):
    """A control for `chosen`: for each in turn, the nearest example in `values` [N] or [N, F] (standardized)
    neither chosen nor taken, of the same label given labels [N]: int64 [len(chosen)], −1 if none."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    values = (values - values.mean(0)) / np.maximum(values.std(0), 1e-300)
    available, result = np.ones(len(values), dtype=bool), []
    available[np.asarray(chosen)] = False
    for i in chosen:
        candidates = np.flatnonzero(available & (True if labels is None else np.asarray(labels) == labels[i]))
        result.append(candidates[np.argmin(((values[candidates] - values[i]) ** 2).sum(1))] if len(candidates)
                      else -1)
        available[max(result[-1], 0)] &= result[-1] < 0
    return np.asarray(result, dtype=np.int64)

def selection_draws(keys, index, pool, draws=1000, seed=0):
    """Null groups that pass the same selection as `index`: each draw replaces them key by key (keys [N], e.g.
    class and sign of Δℓ) by as many of that key from `pool` (e.g. the next ranks by |Δℓ|), without
    replacement unless too few. Returns int64 [draws, len(index)], all −1 when a key has none in the pool."""
    keys, index, pool = np.asarray(keys), np.asarray(index), np.asarray(pool)
    result, rng = np.full((draws, len(index)), -1, dtype=np.int64), np.random.default_rng(seed)
    slots = {key: np.flatnonzero(keys[index] == key) for key in np.unique(keys[index])}
    members = {key: pool[keys[pool] == key] for key in slots}
    if all(len(members[key]) for key in slots):
        for row in result:
            for key, where in slots.items():
                row[where] = rng.choice(members[key], len(where), replace=len(members[key]) < len(where))
    return result

# ------------------------------------------------------------ 4. Features the groups share
#
# A pixel rule defines the sky groups, from the images, not the network. Planted, pasted and swapped
# backgrounds put the feature where we control it; uniform colour probes show how the network uses the colour;
# Gaussian and Markov surrogates keep the class statistics and drop every shared feature.

def sky_pixels(images):
    """The sky rule per pixel: B > R + 10, B >= G, B > 80 (0..255). uint8 [N, H, W, 3] -> bool [N, H, W]."""
    red, green, blue = images.to(torch.int32).unbind(-1)
    return (blue > red + 10) & (blue >= green) & (blue > 80)

def sky_groups(images, sky_at=0.7, clear_below=0.1, flat_below=20.0, rows=0.25):
    """Images with a sky (>= sky_at of the top `rows` are `sky_pixels`) and images clearly without (<=
    clear_below and top luminance std >= flat_below): (sky, no_sky) bool [N]. Needs `sky_pixels`."""
    top = images[:, :max(1, round(rows * images.shape[1]))]
    fraction = sky_pixels(top).flatten(1).float().mean(1)
    luminance_std = (top.float() @ torch.tensor([0.299, 0.587, 0.114])).flatten(1).std(1)
    return fraction >= sky_at, (fraction <= clear_below) & (luminance_std >= flat_below)

def sky_pair(labels, sky, no_sky, first=(0,), second=(2, 8)):
    """The sky pair and its controls, bool [N]: sky images of the `first` classes (airplanes) and the `second`
    (birds, ships), then the `sky_groups` no-sky images of the same classes."""
    a, b = np.isin(labels, first), np.isin(labels, second)
    return sky & a, sky & b, no_sky & a, no_sky & b

def make_planted_images(n=1000, num_classes=10, image_size=32, planted_classes=(0, 2), planted_fraction=0.25,
                        planted_strength=1.0, class_signal=5.0, noise=60.0, seed=0):
    """Synthetic images with planted opposing signals: class c is 128 + class_signal·T_c + noise·z (T_c a
    smooth random pattern, z Gaussian; class_signal 5 against noise 60 is hard, 30 easy). A `planted_fraction`
    of each of `planted_classes` gets a sky-blue border (RGB 80, 150, 255 plus noise) blended in with weight
    planted_strength: large, rare, and no evidence between those classes. Returns images uint8 [n, H, W, 3],
    labels [n], planted [n] (0: none; k: on planted_classes[k − 1])."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
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

def background_swap(images, masks, donors):
    """Copies of images uint8 [N, H, W, 3] in which each i with donors[i] >= 0 takes image donors[i]'s pixels
    at masks[i] [H, W]: a sky replaced by another photograph's, not by a flat colour."""
    swapped, masks = images.clone(), torch.as_tensor(masks, dtype=torch.bool)
    for i in np.flatnonzero(np.asarray(donors) >= 0):
        swapped[i][masks[i]] = images[donors[i]][masks[i]]
    return swapped

def paste_top(images, rgb, rows=0.25, members=None):
    """Copies of `images` whose top `rows` of rows is the colour `rgb` (0..255), on all or on `members`."""
    images, members = images.clone(), slice(None) if members is None else torch.as_tensor(members).long()
    images[members, :max(1, round(rows * images.shape[1]))] = torch.tensor(rgb).round().to(torch.uint8)
    return images

def uniform_probe(rgb, mean, std, size=32):
    """A uniform image of colour `rgb` (0..255), normalized by mean, std [3]: float32 [1, 3, size, size]."""
    colour = torch.as_tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).round() / 255
    return ((colour - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).expand(1, 3, size, size).contiguous()

def matched_probe(probe, x):
    """The control of a uniform probe [1, 3, H, W] in normalized space: a uniform image whose channel vector
    c' has the probe's norm |c| and variance c'ᵀ M c' = cᵀ M c (M [3, 3] the covariance of the per-channel
    sums of x [N, 3, H, W]), as nearly orthogonal to c as that allows."""
    c, sums = probe[0, :, 0, 0].double(), x.double().sum((2, 3))
    M = torch.cov(sums.T)
    u = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True) * c.norm()
    variance = ((u @ M) * u).sum(1)
    target = c @ M @ c
    ok = (variance - target).abs() <= 0.01 * target
    cosine = (u @ c).abs() / c.norm() ** 2 + 2.0 * ~ok          # far from the sky axis, among the matched
    return u[cosine.argmin()].to(probe.dtype).view(1, 3, 1, 1).expand_as(probe).contiguous()

def token_features(x, y, vocabulary):
    """Named features of every token example, flat over B·T: its target ("target 'e'") and input ("after ' '")
    character. Returns (names [F], bool masks [F, B·T])."""
    inputs, targets = x.reshape(-1).numpy(), y.reshape(-1).numpy()
    names = [f"target {vocabulary[c]!r}" for c in np.unique(targets)] + [f"after {vocabulary[c]!r}"
                                                                          for c in np.unique(inputs)]
    masks = [targets == c for c in np.unique(targets)] + [inputs == c for c in np.unique(inputs)]
    return names, np.stack(masks)

def unit_features(features):
    """Features [N, ...] centred on their mean over examples and scaled to unit length: float32 [N, D]."""
    centred = torch.as_tensor(np.asarray(features), dtype=torch.float32).flatten(1)
    centred = centred - centred.mean(0)
    return (centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-30)).numpy()

def gaussian_surrogate(images, labels, components=300, seed=0):
    """The images with their second-order statistics only: the class mean plus a Gaussian draw with the pooled
    within-class covariance on its top `components` principal components and an isotropic rest (mean of the
    remaining eigenvalues), clipped to 0..255; the null world. uint8 [N, H, W, 3] -> the same."""
    x, labels = images.reshape(len(images), -1).double(), torch.as_tensor(labels)
    means = torch.zeros(int(labels.max()) + 1, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    means = means / torch.bincount(labels, minlength=len(means)).clamp_min(1)[:, None].double()
    _, singular, basis = torch.linalg.svd(x - means[labels], full_matrices=False)
    k, variances = min(components, len(singular)), singular ** 2 / len(x)
    rest = variances[k:].sum() / max(x.shape[1] - k, 1)
    generator = torch.Generator().manual_seed(seed)
    draw = torch.randn(len(x), k, generator=generator, dtype=torch.float64) * variances[:k].sqrt() @ basis[:k]
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    draw = draw + rest.sqrt() * (noise - noise @ basis[:k].T @ basis[:k])
    return (means[labels] + draw).clamp(0, 255).round().to(torch.uint8).view_as(images)

def markov_surrogate(tokens, n, length, seed=0):
    """n sequences [n, length] with the unigram and bigram statistics of `tokens` [L] and nothing
    longer-range: a Markov chain on the bigram frequencies, started from the unigram ones."""
    vocabulary = int(tokens.max()) + 1
    unigram = torch.bincount(tokens, minlength=vocabulary).double()
    bigram = torch.zeros(vocabulary, vocabulary, dtype=torch.float64).index_put_(
        (tokens[:-1], tokens[1:]), torch.ones(len(tokens) - 1, dtype=torch.float64), accumulate=True)
    bigram[bigram.sum(1) == 0] = unigram                     # a character seen only at the very end
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.multinomial(unigram.expand(n, -1), 1, generator=generator)]
    for _ in range(length - 1):
        sequences.append(torch.multinomial(bigram[sequences[-1][:, 0]], 1, generator=generator))
    return torch.cat(sequences, dim=1)

# ------------------------------------------------------------ 5. Two-layer linear model
#
# OUR RECONSTRUCTION of the paper's two-layer linear model, derived by us and checked against simulation. f(x)
# = bᵀA x, A [h, d], b [h], w = Aᵀb; L = (1/N) Σ_i ½ (f(x_i) − y_i)², r_i = f(x_i) − y_i, Σ = (1/N) Σ_i x_i
# x_iᵀ, g = ∇_w L = (1/N) Σ_i r_i x_i.
#
# Hessian. Along (Ȧ, ḃ) the output moves by ḟ_i = ẇᵀx_i with ẇ = Ȧᵀb + Aᵀḃ, and f̈_i = 2 ḃᵀȦ x_i, so
#     (Ȧ, ḃ)ᵀ H (Ȧ, ḃ) = ẇᵀ Σ ẇ + 2 ḃᵀȦ g        (Gauss-Newton + residual term, of eigenvalues ±|g|).
# Data (`make_opposing_signal_data`): x = (x_o, x_g) with Σ = diag(p α², scales²), p the fraction of examples
# carrying x_o = ±α. Along θ_o = (b e_oᵀ, a)/√S, a = A e_o, S = |a|² + |b|², with w_o = aᵀb and g_o = p α²
# w_o:   θ_oᵀ H θ_o = p α² S + |Σ_g^½ A_gᵀ a|² / S + 2 p α² w_o² / S. x_o carries no signal and its gradient
# ∇_a L = p α² w_o b only shrinks w_o, so |a| stays small, and so do the last two terms: when p α² exceeds the
# genuine scales, θ_o is the top eigenvector and the sharpness is ≈ p α² (|b|² + |A e_o|²) ≈ p α² |b|². Depth
# makes it grow: under gradient flow AAᵀ − bbᵀ is conserved, so from a small init A ≈ b uᵀ, w = |b|² u and
# |b|² = |w|: the sharpness grows with the learned genuine signal up to p α² |β| (progressive sharpening).
#
# Edge of stability. Where the genuine part is fit, one GD step of size η moves only the opposing block,
# exactly
#     w_o -> (1 − η λ + (η p α² w_o)²) w_o,     S -> S − η p α² w_o² (4 − η λ),     λ = p α² S.
# Once λ > 2/η, w_o flips sign every step and grows by |1 − η λ|; the groups s = ±1 see outputs shifted by ±α
# w_o, so their losses alternate (L+ − L− = −2 α offset w_o); for 2 < η λ < 4 the oscillation shrinks S by ∝
# w_o², so the sharpness falls back towards 2/η (self-stabilization).

def make_opposing_signal_data(n_pairs=200, n_plain=800, alpha=7.0, scales=(1.0, 0.7, 0.5, 0.35, 0.25),
                              beta=None, offset=0.5, seed=0, dtype=torch.float64):
    """Regression data with one large, rare feature that opposes itself (OUR RECONSTRUCTION). x = (x_o, x_g)
    [N, 1 + k]: x_g whitened to second moment exactly diag(scales²) on both kinds of example; x_o = α s, s =
    ±1 on each of n_pairs signal-bearing x_g and 0 on n_plain others, so E[x_o] = E[x_o x_g] = E[x_o y] = 0
    and E[x_o²] = p α², p = 2 n_pairs / N. y = βᵀx_g + offset·|s|, which no linear function fits: a weight on
    x_o helps one group and hurts the other. Returns x, y, sign [N]."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.as_tensor(scales, dtype=torch.float64)
    beta = torch.ones(len(scales)) if beta is None else torch.as_tensor(beta)
    beta = beta.to(torch.float64)

    def whitened(n):
        z = torch.randn(n, len(scales), generator=generator, dtype=torch.float64)
        z = z - z.mean(0)
        return torch.linalg.solve_triangular(torch.linalg.cholesky(z.T @ z / n), z.T, upper=False).T * scales

    signal_features, plain_features = whitened(n_pairs), whitened(n_plain)
    genuine = torch.cat([signal_features, signal_features, plain_features])
    sign = torch.cat([torch.ones(n_pairs), -torch.ones(n_pairs), torch.zeros(n_plain)]).to(torch.int64)
    x = torch.cat([alpha * sign[:, None].to(torch.float64), genuine], dim=1)
    return x.to(dtype), (genuine @ beta + offset * sign.abs().to(torch.float64)).to(dtype), sign

class TwoLayerLinear(nn.Module):
    """f(x) = bᵀ A x, A [width, in_features], b [width]; forward returns [B, 1]. Both start i.i.d. N(0,
    init_scale²), small and nearly balanced."""

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
    """Our prediction of a TwoLayerLinear's top Hessian eigenvalue, E[x_o²] (|A e_o|² + |b|²), signal_moment =
    E[x_o²] = p α²: the Gauss-Newton curvature along θ_o, the sharpness while E[x_o²] dominates the genuine
    second moments and the residual term |∇_w L| is smaller."""
    with torch.no_grad():
        a, b = model.A[:, feature], model.b
        return float(signal_moment * (a @ a + b @ b))

def opposing_rayleigh_quotient(model, x, y, feature=0):
    """A TwoLayerLinear's exact MSE curvature along θ_o = (b e_oᵀ, A e_o)/√S: with Σ = xᵀx/N, g = xᵀr/N and ẇ
    = (|b|² e_o + Aᵀ A e_o)/√S, θ_oᵀ H θ_o = ẇᵀ Σ ẇ + 2 w_o g_o / S; a lower bound on the sharpness."""
    with torch.no_grad():
        a, b = model.A[:, feature], model.b
        norm_sq = a @ a + b @ b
        w_dot = (model.A.T @ a) / norm_sq.sqrt()
        w_dot[feature] += (b @ b) / norm_sq.sqrt()
        gradient = (model(x)[:, 0] - y) @ x / len(x)
        return float(w_dot @ (x.T @ x / len(x)) @ w_dot + 2 * (a @ b) * gradient[feature] / norm_sq)

def linear_state(model, x, y, sign, feature=0):
    """A TwoLayerLinear with groups sign [N]: opposing_weight, prediction, rayleigh_quotient, loss_plus,
    loss_minus, b_norm_sq, genuine_norm = |A_gᵀb|, residual_term_norm = |∇_w L|. Needs `opposing_weight`,
    `predicted_sharpness`, `opposing_rayleigh_quotient`, `regression_loss`."""
    with torch.no_grad():
        losses, keep = regression_loss(model(x), y), torch.arange(x.shape[1]) != feature
        return {"opposing_weight": opposing_weight(model, feature),
                "prediction": predicted_sharpness(model, float((x[:, feature] ** 2).mean()), feature),
                "rayleigh_quotient": opposing_rayleigh_quotient(model, x, y, feature),
                "loss_plus": float(losses[sign > 0].mean()), "loss_minus": float(losses[sign < 0].mean()),
                "b_norm_sq": float(model.b @ model.b),
                "genuine_norm": float((model.A[:, keep].T @ model.b).norm()),
                "residual_term_norm": float(((model(x)[:, 0] - y) @ x / len(x)).norm())}

# ------------------------------------------------------------ 6. Toy network
#
# OUR RECONSTRUCTION of the paper's toy example, on the data of section 5. A ReLU network f(x) = vᵀ relu(U x +
# c) + c_2 starts with every unit active on both signs of x_0 (small U, positive c), i.e. linear in x_0, and
# uses x_0 only through its odd part f(α e_0) − f(−α e_0) until units gate off for one sign. Along U's x_0
# column the Gauss-Newton curvature is δuᵀ M δu, M_jk = (1/N) Σ_i x_{i,0}² v_j v_k 1[j active on x_i] 1[k
# active on x_i], = p α² v vᵀ while units see both signs: the linear model's p α² |b|² with b = v. So it
# sharpens as it learns, and at 2/lr its output on a pure-x_0 probe oscillates with period 2. Under two-class
# cross-entropy each example's curvature is weighted by p_i(1 − p_i), so once the network computes |x_0| and
# fits the outliers with growing margins, the sharpness falls below 2/lr.

def make_toy_network(in_features, width=16, weight_scale=0.05, output_scale=0.1, hidden_bias=0.7, seed=0,
                     num_outputs=1, dtype=torch.float64):
    """Linear-ReLU-Linear nn.Sequential, linear in x_0 at first: default init, first layer times weight_scale,
    output times output_scale, hidden biases hidden_bias > 0, output biases 0; num_outputs 1 or 2."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_outputs)).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(weight_scale)
        model[0].bias.fill_(hidden_bias)
        model[2].weight.mul_(output_scale)
        model[2].bias.zero_()
    return model

def opposing_probes(alpha, in_features, points=41, span=2.0, dtype=torch.float64):
    """Pure-x_0 probes [points, in_features]: x_0 on a grid [points] over [−span α, span α] (by default
    through −α, 0 and α), other inputs 0. Returns (probes, grid)."""
    grid = alpha * torch.linspace(-span, span, points, dtype=dtype)
    probes = torch.zeros(points, in_features, dtype=dtype)
    probes[:, 0] = grid
    return probes, grid

def odd_even_parts(probe_outputs, grid, alpha):
    """From outputs on `opposing_probes` [T, P] (grid [P]), with f± = f(±α e_0), f0 = f(0): odd = (f+ − f−)/2
    (α w_o in the linear model), even = (f+ + f−)/2 − f0. Returns (odd [T], even [T])."""
    outputs, grid = np.asarray(probe_outputs, dtype=np.float64), np.asarray(grid, dtype=np.float64)
    plus, minus, zero = (int(np.argmin(np.abs(grid - value))) for value in (alpha, -alpha, 0.0))
    odd = (outputs[:, plus] - outputs[:, minus]) / 2
    return odd, (outputs[:, plus] + outputs[:, minus]) / 2 - outputs[:, zero]

def opposing_curvature(model, x, feature=0):
    """Top eigenvalue of M, the Gauss-Newton curvature of the first-layer column reading x_feature: M_jk =
    (1/N) Σ_i x_{i,f}² v_j v_k 1_j(x_i) 1_k(x_i) (1_j: unit j active), p α² |v|² while all units see every
    outlier. With two outputs v = v_1 − v_0 and example i weighs p_i(1 − p_i). OUR RECONSTRUCTION."""
    hidden, output = model[0], model[2]
    with torch.no_grad():
        active = (x @ hidden.weight.T + hidden.bias > 0).to(x.dtype)            # [N, width]
        if output.weight.shape[0] == 1:
            direction, weight = output.weight[0], torch.ones(len(x), dtype=x.dtype)
        else:
            direction, probability = output.weight[1] - output.weight[0], torch.softmax(model(x), -1)[:, 1]
            weight = probability * (1 - probability)
        rows = x[:, feature:feature + 1] * active * direction * weight.sqrt()[:, None]   # ∂f/∂U[j, f]
        return float(torch.linalg.eigvalsh(rows.T @ rows / len(x))[-1])

def toy_state(model, loss_fn, x, y, sign, probes):
    """With groups sign [N]: loss_plus, loss_minus, opposing_curvature, column_cosine (of the groups'
    gradients on U[:, 0]), active_both (units on for both twins), probe_output (f_1 − f_0 for two classes).
    Needs `opposing_curvature`, `group_gradients`."""
    grads = group_gradients(model, loss_fn, x, y, [sign > 0, sign < 0])
    column = [g[:model[0].weight.numel()].view_as(model[0].weight)[:, 0] for g in grads]   # U[:, 0] reads x_0
    with torch.no_grad():
        losses, active, outputs = loss_fn(model(x), y), model[0](x) > 0, model(probes)
        return {"loss_plus": float(losses[sign > 0].mean()), "loss_minus": float(losses[sign < 0].mean()),
                "opposing_curvature": opposing_curvature(model, x),
                "column_cosine": float(column[0] @ column[1] / (column[0].norm() * column[1].norm()
                                                                 + 1e-300)),
                "active_both": float((active[sign > 0] & active[sign < 0]).float().mean()),
                "probe_output": (outputs[:, -1] - (outputs[:, 0] if outputs.shape[1] == 2 else 0)).numpy()}

# ------------------------------------------------------------ 7. Adam versus SGD
#
# Adam divides each coordinate's step by its running gradient RMS, so it sees the sharpness of P^-1/2 H P^-1/2
# against its own `stability_threshold`. SplitSGD (OUR RECONSTRUCTION) gives Adam's step only to the few
# coordinates with the large, sign-flipping gradients of opposing signals.

def adam_denominator(exp_avg_sq, step, beta2, eps):
    """Adam's divisor sqrt(v̂) + ε, v̂ = v / (1 − β2^t) after t steps, bit for bit as in torch.optim.Adam."""
    return exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** float(step)) + eps

def top_quantile_mask(values, quantile):
    """Bool mask of the round(quantile·n) largest entries of `values` (any shape; ties by torch.topk)."""
    count = int(round(quantile * values.numel()))
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if count >= values.numel():
        mask[:] = True
    elif count > 0:
        mask[torch.topk(values.reshape(-1), count, sorted=False).indices] = True
    return mask.view_as(values)

class SplitSGD(torch.optim.Optimizer):
    """SGD with momentum whose most "spiky" coordinates take Adam's step (OUR RECONSTRUCTION). Per tensor at
    step t: the heavy-ball buffer b_t = μ b_{t−1} + g_t, Adam's m_t and v_t; the round(q·n) coordinates with
    the largest v_t move by normalized_lr · m̂_t / (sqrt(v̂_t) + ε), the others by lr · b_t. Every coordinate
    keeps all three, so it can change sets; q = 0 is exactly SGD(lr, μ), q = 1 Adam(normalized_lr). Needs
    `adam_denominator`, `top_quantile_mask`."""

    def __init__(self, params, lr, normalized_lr=1e-3, quantile=0.1, momentum=0.9, betas=(0.9, 0.999),
                 eps=1e-8):
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile {quantile} must be in [0, 1]")
        super().__init__(params, dict(lr=lr, normalized_lr=normalized_lr, quantile=quantile,
                                      momentum=momentum, betas=betas, eps=eps))

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
                state["exp_avg"].lerp_(g, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denominator = adam_denominator(state["exp_avg_sq"], state["step"], beta2, group["eps"])
                corrected_lr = group["normalized_lr"] / (1 - beta1 ** state["step"])
                normalized = state["exp_avg"] / denominator * corrected_lr
                state["normalized"] = top_quantile_mask(state["exp_avg_sq"], group["quantile"])
                p.sub_(torch.where(state["normalized"], normalized, group["lr"] * state["momentum_buffer"]))
        return loss

    @torch.no_grad()
    def preconditioner(self):
        """The flat P with update ≈ lr·P^-1 b: lr·(sqrt(v̂) + ε) / (normalized_lr·(1 − β1)) on the normalized
        set (Adam's momentum as a heavy-ball buffer), 1 elsewhere; None before the first step."""
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
    """The diagonal P: Adam's sqrt(v̂) + ε (bias-corrected, as in Cohen et al. 2022), SplitSGD's own; else or
    before the first step None. Needs `SplitSGD`."""
    if isinstance(optimizer, SplitSGD):
        return optimizer.preconditioner()
    params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(optimizer, torch.optim.Adam) or not all(optimizer.state[p] for p, _ in params):
        return None
    return torch.cat([adam_denominator(optimizer.state[p]["exp_avg_sq"], optimizer.state[p]["step"],
                                       group["betas"][1], group["eps"]).reshape(-1) for p, group in params])

def opposing_group_oscillation(per_example_loss, labels, in_batch, top=40, intervals=20):
    """How much the examples whose losses move most keep oscillating, against same-selection controls (OUR
    RECONSTRUCTION). per_example_loss [R, N] is recorded every k steps (k odd), labels [N] are classes or
    target tokens, in_batch bool [R, N] is minibatch membership between records r and r + 1.

    Every `intervals` records r, the `top` examples by |Δℓ| = |ℓ(r+1) − ℓ(r)| split by sign; each one's
    control is the nearest in |Δℓ| of the same label, sign and membership. Over the `intervals` intervals from
    r + 2 a group's amplitude is the mean |Δ| of its mean loss, a pair's the mean of its two. Returns
    amplitude, amplitude_matched [S], median_relative (their median ratio). Needs `matched_examples`."""
    losses, labels, rows = np.asarray(per_example_loss, dtype=np.float64), np.asarray(labels).reshape(-1), []

    def amplitude(span, members, up):
        return np.mean([np.abs(np.diff(span[:, members[side]].mean(1))).mean() for side in (up, ~up)])

    for r in range(0, len(losses) - intervals - 2, intervals):
        change = losses[r + 1] - losses[r]
        chosen = np.argsort(-np.abs(change), kind="stable")[:top]
        keys = (labels * 2 + (change > 0)) * 2 + np.asarray(in_batch[r])
        control = matched_examples(np.abs(change), chosen, keys)
        chosen, control = chosen[control >= 0], control[control >= 0]
        up = change[chosen] > 0
        if up.all() or not up.any():
            continue
        span = losses[r + 2:r + 3 + intervals]
        rows.append((amplitude(span, chosen, up), amplitude(span, control, up)))
    groups, matched = (np.asarray([row[j] for row in rows], dtype=np.float64) for j in (0, 1))
    return {"amplitude": groups, "amplitude_matched": matched,
            "median_relative": float(np.median(groups / np.maximum(matched, 1e-300))) if rows else math.nan}

def optimizer_summary(model, loss_fn, history, optimizer, x, y, x_test, y_test, in_batch, top=40,
                      intervals=20):
    """One run in numbers; its measure hook recorded every example's loss as "losses" and the sharpness
    (`sharpness_measure`, `adaptive_preconditioner`). Returns train_loss (inf if diverged), test_accuracy,
    relative (`opposing_group_oscillation` from the first fifth of records on; in_batch [R, N]), ratio (median
    over the second half of the sharpness the optimizer sees over its `stability_threshold`) and curve (mean
    loss per record). Needs `evaluate`, `measured`, `opposing_group_oscillation`, `stability_threshold`."""
    train_loss, test_accuracy = evaluate(model, loss_fn, x, y)[0], evaluate(model, loss_fn, x_test, y_test)[1]
    _, losses = measured(history, "losses")
    steps, plain = measured(history, "eigenvalues")
    preconditioned = measured(history, "preconditioned_eigenvalues")[1]
    seen = ((preconditioned if np.isfinite(preconditioned).any() else plain)[:, 0]
            / stability_threshold(optimizer))
    start, stable = len(losses) // 5, history["diverged"] is None and math.isfinite(train_loss)
    oscillation = opposing_group_oscillation(losses[start:], y.cpu().numpy(), in_batch[start:], top,
                                             intervals)
    return {"train_loss": train_loss if stable else math.inf, "test_accuracy": test_accuracy,
            "relative": oscillation["median_relative"], "curve": losses.mean(1),
            "ratio": float(np.nanmedian(seen[steps >= steps.max() / 2]))}

# ------------------------------------------------------------ Appendix A. The larger models

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
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))

def small_output_init(model, body_gain, zero_last_conv_of_blocks=False):
    """Zero output, live features, for a ReLU conv net without batch norm: Kaiming convs times body_gain, zero
    biases and head, (ResNet) a zero last conv per residual branch. PyTorch's default init stalls GD, plain
    Kaiming diverges; the MSE sharpness at init is about |mean penultimate feature|²."""
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
    """VGG-11 for 32x32 (8 convs, 5 pools, linear head); without BN, `small_output_init`, body_gain
    0.8·(16/width)^(1/16): mean penultimate feature norm ≈ 2.5 at any width. Needs `small_output_init`."""

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
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=not batch_norm),
                                          norm(channels))

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))

class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, four stages of two basic blocks, average pool, linear head; without BN,
    `small_output_init` with zero residual branches. Needs `small_output_init`, `BasicBlock`."""

    def __init__(self, num_classes=10, width=64, batch_norm=True, body_gain=0.69):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=not batch_norm),
                                  nn.BatchNorm2d(width) if batch_norm else nn.Identity(), nn.ReLU())
        blocks, channels = [], width
        for stage, stride in enumerate([1, 2, 2, 2]):
            for block in range(2):
                first_stride = stride if block == 0 else 1
                blocks.append(BasicBlock(channels, width * 2 ** stage, first_stride, batch_norm))
                channels = width * 2 ** stage
        self.blocks, self.head = nn.Sequential(*blocks), nn.Linear(channels, num_classes)
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
        variance = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(variance + self.eps) * self.weight + self.bias

class Attention(nn.Module):
    """Multi-head self-attention written out (for double backward); causal: t attends to <= t only."""

    def __init__(self, dim, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):                                                  # x: [B, T, D]
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)
        if self.causal:
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return self.proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, D))

class Block(nn.Module):
    """Pre-LN transformer block: h + attention(norm(h)), + MLP(norm(h)). Needs `Attention`, `LayerNorm`."""

    def __init__(self, dim, heads, mlp_ratio, causal=False):
        super().__init__()
        self.norm1, self.attention, self.norm2 = LayerNorm(dim), Attention(dim, heads, causal), LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h):
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))

class ViT(nn.Module):
    """Small vision transformer: patch embedding + learned positions, pre-LN blocks, mean-pooled linear head.
    Needs `Block`, `Attention`, `LayerNorm`."""

    def __init__(self, num_classes=10, image_size=32, patch=4, dim=128, depth=4, heads=4, mlp_ratio=2):
        super().__init__()
        self.patch, self.embed = patch, nn.Linear(3 * patch * patch, dim)
        self.position = nn.Embedding((image_size // patch) ** 2, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm, self.head = LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):                                                  # x: [B, 3, H, W]
        p = self.patch
        h = self.embed(x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2))
        h = h + self.position.weight
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))

class GPT(nn.Module):
    """Character GPT: token and position embeddings, causal pre-LN blocks, a linear head; tokens [B, T <=
    context] -> logits [B, T, vocab_size] for token t + 1. Needs `Block`, `Attention`, `LayerNorm`."""

    def __init__(self, vocab_size=65, context=64, dim=64, depth=2, heads=4, mlp_ratio=4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(context, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm, self.head = LayerNorm(dim), nn.Linear(dim, vocab_size)

    def forward(self, tokens):                                             # tokens: [B, T]
        if tokens.shape[1] > self.position.num_embeddings:
            raise ValueError(f"GPT: sequences of {tokens.shape[1]} tokens, but the context is "
                             f"{self.position.num_embeddings}: pass at most that many")
        h = self.embed(tokens) + self.position.weight[:tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

# ------------------------------------------------------------ Appendix B. The data

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5, SHAKESPEARE_BYTES = "6fb458f1232090904fb40fe944165e91", 1115394

class DataError(Exception):
    """A data set is missing, cannot be downloaded or written, or is corrupted; the message says the fix."""

def load_cifar10(root=None, train=True, download=True):
    """CIFAR-10 images uint8 [N, 32, 32, 3], labels int64 [N] from root (else $OSIG_DATA, else ./data). Needs
    `cifar10_folder`, `read_cifar_batch`."""
    folder = cifar10_folder(Path(root or os.environ.get("OSIG_DATA") or "data").expanduser(), download)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    batches = [read_cifar_batch(folder / name) for name in names]
    images = np.concatenate([data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for data, _ in batches])
    return torch.from_numpy(images), torch.from_numpy(np.concatenate([labels for _, labels in batches]))

def normalize(images, mean=None, std=None):
    """uint8 [N, H, W, C] -> float32 [N, C, H, W], (images/255 − mean[c]) / std[c], mean, std [C] of these
    images unless given (pass the training set's for test images). Returns (x, mean, std)."""
    x = images.permute(0, 3, 1, 2).float() / 255
    mean = x.mean(dim=(0, 2, 3)) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    std = x.std(dim=(0, 2, 3)) if std is None else torch.as_tensor(std, dtype=torch.float32)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), mean, std

def seeded_subset(n_total, n, seed=0):
    """Indices [n]: the first n of a seeded permutation of n_total, so that one seed's subsets are nested."""
    if not 0 < n <= n_total or not 0 <= seed < 2 ** 63:
        raise ValueError(f"a subset of {n} of {n_total} with seed {seed}: need 0 < n <= {n_total}, seed >= 0")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]

def load_tiny_shakespeare(root=None, download=True):
    """Tiny Shakespeare (str) from root or $OSIG_DATA or ./data, downloaded if missing, size and md5 checked.
    Needs `download_checked`, `SHAKESPEARE_URL`, `SHAKESPEARE_MD5`, `SHAKESPEARE_BYTES`."""
    path = Path(root or os.environ.get("OSIG_DATA") or "data").expanduser() / "tinyshakespeare" / "input.txt"
    fix = f"put the file from {SHAKESPEARE_URL} there, or set OSIG_DATA to a folder with tinyshakespeare/"
    if not path.exists() and not download:
        raise DataError(f"tiny Shakespeare not found at {path}: {fix}")
    if not path.exists():
        download_checked(SHAKESPEARE_URL, path, SHAKESPEARE_MD5)
    if not path.is_file() or path.stat().st_size != SHAKESPEARE_BYTES or \
            hashlib.md5(path.read_bytes()).hexdigest() != SHAKESPEARE_MD5:
        raise DataError(f"{path} is not the {SHAKESPEARE_BYTES:,}-byte file of md5 {SHAKESPEARE_MD5}: "
                        f"delete it and {fix}")
    return path.read_text(encoding="utf-8")

def encode_characters(text):
    """Tokens int64 [len(text)] and the vocabulary, the sorted distinct characters (str)."""
    vocabulary = "".join(sorted(set(text)))
    index = {character: i for i, character in enumerate(vocabulary)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64), vocabulary

def text_sequences(tokens, n, context, seed=0):
    """n seeded random windows: x [n, context] and targets y [n, context], y[i, t] the token after x[i, t]."""
    if n < 1 or len(tokens) <= context + 1:
        raise ValueError(f"need n >= 1 sequences and more than context + 1 = {context + 1} tokens")
    starts = torch.randint(0, len(tokens) - context - 1, (n,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([tokens[s:s + context + 1] for s in starts.tolist()])
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

def download_checked(url, path, md5):
    """`url` to `path` via a unique partial file, renamed into place once md5-checked. Needs `DataError`."""
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    print(f"downloading {url} to {path} ...", flush=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
        if hashlib.md5(partial.read_bytes()).hexdigest() != md5:
            raise OSError("md5 mismatch: the file is corrupted")
        os.replace(partial, path)
    except OSError as error:
        raise DataError(f"{path} could not be downloaded from {url} ({error}): put it there yourself, or set "
                        f"OSIG_DATA to a writable folder that holds it") from None
    finally:
        if partial.exists():                     # false, not an error, when path's folder is a file
            partial.unlink()

def cifar10_folder(root, download=True):
    """root/cifar-10-batches-py, extracted if absent from the md5-checked archive (downloaded if allowed) via
    a staging folder. Needs `download_checked`, `CIFAR10_URL`, `CIFAR10_MD5`."""
    folder, archive = root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz"
    try:
        for stale in root.glob(".cifar10-staging-*") if root.is_dir() and not folder.is_dir() else []:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        if not folder.is_dir() and not archive.exists() and not download:
            raise DataError(f"CIFAR-10 not found in {root}: put cifar-10-python.tar.gz (from {CIFAR10_URL}) "
                            f"or cifar-10-batches-py/ there, or set OSIG_DATA to the folder holding it")
        if not folder.is_dir() and not archive.exists():
            download_checked(CIFAR10_URL, archive, CIFAR10_MD5)
        if not folder.is_dir() and hashlib.md5(archive.read_bytes()).hexdigest() != CIFAR10_MD5:
            raise DataError(f"{archive} is corrupted: delete it and download it again from {CIFAR10_URL}")
        staging = root / f".cifar10-staging-{uuid.uuid4().hex}"
        try:
            if not folder.is_dir():
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(staging, filter="data")
                os.replace(staging / "cifar-10-batches-py", folder)
        except OSError:
            if not folder.is_dir():              # not another process's complete folder: a real failure
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except (OSError, tarfile.TarError) as error:
        raise DataError(f"CIFAR-10 could not be prepared in {root} ({error}): make it a writable folder with "
                        f"cifar-10-python.tar.gz or cifar-10-batches-py/, or set OSIG_DATA to one") from None
    return folder

class CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy arrays, dtypes and _codecs.encode, so no code can run; any other
    name raises pickle.UnpicklingError."""
    rebuild = np.ndarray.__reduce__(np.zeros(1))[0]
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"):
               codecs.encode, ("numpy.core.multiarray", "_reconstruct"): rebuild,
               ("numpy._core.multiarray", "_reconstruct"): rebuild}

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")

def read_cifar_batch(path):
    """One batch file (data uint8 [10000, 3072], labels [10000]), checked; damage raises DataError. Needs
    `DataError`, `CifarUnpickler`."""
    try:
        if not 30_000_000 <= path.stat().st_size <= 40_000_000:
            raise ValueError(f"{path.stat().st_size:,} bytes, not about 31 MB")
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], np.asarray(batch[b"labels"])
        if data.dtype != np.uint8 or data.shape != (10000, 3072) or labels.shape != (10000,) or \
                labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
            raise ValueError("not the arrays of a CIFAR-10 batch")
    except Exception as error:                  # a damaged pickle can raise almost anything while it loads
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({type(error).__name__}: {str(error)[:80]})"
                        f": delete {path.parent} and put a fresh cifar-10-batches-py/ (or the archive) there")
    return data, labels.astype(np.int64)

# ------------------------------------------------------------ Appendix C. Scoring the claims
#
# What run_all.py's claims call: sign and episode helpers, one null test (z, p) for the selection statistics,
# the selection and look-alike tests, spike, tail, alignment, probe and text statistics, t intervals and
# power.

def oscillation_episode(group_loss_plus, group_loss_minus, sharpness, threshold, rel_gap=0.1):
    """Steps from the first with sharpness >= threshold where |L+ − L−| >= rel_gap·(L+ + L−)/2: bool [T]."""
    plus, minus, sharpness = (np.asarray(v, dtype=np.float64)
                              for v in (group_loss_plus, group_loss_minus, sharpness))
    crossed, mask = np.flatnonzero(sharpness >= threshold), np.zeros(len(plus), dtype=bool)
    if len(crossed):
        mask[crossed[0]:] = (np.abs(plus - minus) >= rel_gap * (plus + minus) / 2)[crossed[0]:]
    return mask

def period_two_fraction(values):
    """Share of triples with v_t v_{t+1} < 0 and v_{t+1} v_{t+2} < 0: [T] -> float, nan for T < 3."""
    values = np.asarray(values, dtype=np.float64)
    flips = values[1:] * values[:-1] < 0
    return float(np.mean(flips[1:] & flips[:-1])) if len(flips) >= 2 else math.nan

def consecutive_sign_changes(values, mask):
    """Of steps (t, t+1) both in `mask` [T], the fraction where `values` [T] changes sign (nan if none)."""
    values, mask = np.asarray(values, dtype=np.float64), np.asarray(mask, dtype=bool)
    pairs = mask[1:] & mask[:-1]
    return float(np.mean((values[1:] * values[:-1] < 0)[pairs])) if pairs.any() else math.nan

def flip_growth(opposing_weight, sharpness, lr, episode):
    """How fast the opposing weight grows once it flips: the median over the first stretch of `episode` (bool
    [T]), up to its largest swing, of |w_o(t+1)/w_o(t)| / |1 − lr·λ_t| (1: as derived); opposing_weight,
    sharpness [T]; nan without an episode."""
    if not np.any(episode):
        return math.nan
    start = int(np.argmax(episode))
    stop = start + int(np.argmin(episode[start:])) if not np.all(episode[start:]) else len(episode)
    w = np.asarray(opposing_weight)
    steps = np.arange(start, start + int(np.argmax(np.abs(w[start:stop]))))
    return float(np.median(np.abs(w[steps + 1] / w[steps]) / np.abs(1 - lr * np.asarray(sharpness)[steps])))

def half_learned_step(even):
    """The first step at which `even` [T] reaches half its final value; T if never or that value is <= 0."""
    even = np.asarray(even, dtype=np.float64)
    learned = even >= even[-1] / 2 if even[-1] > 0 else np.zeros(len(even), dtype=bool)
    return int(np.argmax(learned)) if learned.any() else len(even)

def late_fall(sharpness):
    """1 − (mean sharpness over the last 10% of steps) / (its maximum)."""
    sharpness = np.asarray(sharpness, dtype=np.float64)
    return float(1 - sharpness[int(0.9 * len(sharpness)):].mean() / np.nanmax(sharpness))

def null_test(observed, null, alternative="greater"):
    """Observed [S] against null draws [S, D]: the mean over the measurable selections (finite, with finite
    draws) against each draw's mean over them, valid however the selections depend on each other. (z, p): z =
    (observed − mean of draw means) / their sd, signed so the alternative ("greater" or "less") is positive; p
    = (1 + #draws as extreme or more) / (1 + D); (nan, nan) if none."""
    observed, null = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64)
    used = np.isfinite(observed) & np.isfinite(null).all(1) if len(observed) else np.zeros(0, dtype=bool)
    if not used.any():
        return math.nan, math.nan
    sign, means, value = (1 if alternative == "greater" else -1), null[used].mean(0), observed[used].mean()
    z = sign * (value - means.mean()) / max(means.std(), 1e-300)
    return float(z), float((1 + np.sum(sign * (means - value) >= 0)) / (1 + len(means)))

def gram_mean(gram, first, second):
    """The mean entry of a Gram matrix [C, C] between groups of positions [..., m1] and [..., m2] -> [...]:
    with unit features, the groups' mean cosine (their coherence)."""
    first, second = np.asarray(first), np.asarray(second)
    return gram[first[..., :, None], second[..., None, :]].mean((-2, -1))

def gram_cosine(gram, first, second):
    """Cosine of two groups' summed vectors from their Gram matrix [C, C] (positions [..., m1], [..., m2]):
    Σ_ab G / sqrt(Σ_aa G · Σ_bb G) -> [...]. Needs `gram_mean`."""
    first, second = np.asarray(first), np.asarray(second)
    cross = gram_mean(gram, first, second) * first.shape[-1] * second.shape[-1]
    return cross / np.sqrt(gram_mean(gram, first, first) * gram_mean(gram, second, second)) / (
        first.shape[-1] * second.shape[-1])

def selection_test(grams, change, keys, top, statistic=gram_mean, draws=1000, seed=0, alternative="greater"):
    """A selection statistic against selection-matched draws over S selections from `outlier_state`: change
    [S, C] (Δℓ, candidates by |Δℓ|), keys [S, C] (classes), Gram matrices [S, C, C]. The outliers, the first
    `top` split by sign, against draws of later candidates of the same key and sign; statistic(gram, up, down)
    on positions. Returns `null_test`'s (z, p). Needs `selection_draws`, `null_test`, `gram_mean`."""
    observed, null = np.full(len(change), np.nan), np.full((len(change), draws), np.nan)
    for s, (gram, delta, key) in enumerate(zip(grams, change, keys)):
        positions, up = np.arange(len(delta)), delta[:top] > 0
        key = np.asarray(key) * 2 + (delta > 0)
        rows = selection_draws(key, positions[:top], positions[top:], draws, seed + s)
        if up.any() and not up.all() and rows[0, 0] >= 0:
            observed[s] = statistic(gram, positions[:top][up], positions[:top][~up])
            null[s] = statistic(gram, rows[:, up], rows[:, ~up])
    return null_test(observed, null, alternative)

def lookalike_test(per_example_loss, steps, candidates, change, labels, unit, top, tested, length=40, gap=2,
                   draws=1000, seed=0):
    """Do the groups oppose for what they share, or for being chosen? At each tested step s (tested bool [E];
    steps [E], candidates, change [E, C] from `outlier_state`), each group's look-alikes are examples never
    among the outliers with the largest cosine (unit [N, D]) to its mean feature, as many per class. Their
    `antiphase` over steps s + gap .. s + gap + length (per_example_loss [T, N]) is tested against draws of
    the same class, sign of Δℓ at s and half of |Δℓ| in the class. Returns `null_test`'s (z, p), z > 0: more
    anti-phase. Needs `antiphase`, `selection_draws`, `null_test`."""
    losses, labels = np.asarray(per_example_loss, dtype=np.float64), np.asarray(labels).reshape(-1)
    never = np.ones(losses.shape[1], dtype=bool)
    never[np.asarray(candidates)[:, :top].reshape(-1)] = False
    steps, candidates, change = (np.asarray(a)[np.asarray(tested, dtype=bool)]
                                 for a in (steps, candidates, change))
    observed, null = np.full(len(steps), np.nan), np.full((len(steps), draws), np.nan)
    for s, step in enumerate(steps):
        members, up, free = candidates[s][:top], change[s][:top] > 0, never.copy()
        if up.all() or not up.any() or step + gap + length > len(losses):
            continue
        groups = []
        for side in (up, ~up):
            score, group = unit @ unit[members[side]].mean(0), []
            for c, count in zip(*np.unique(labels[members[side]], return_counts=True)):
                pool = np.flatnonzero(free & (labels == c))
                group += list(pool[np.argsort(-score[pool])[:count]])
            free[group] = False
            groups.append(np.asarray(group, dtype=np.int64))
        delta = losses[step + 1] - losses[step]
        half = np.zeros(len(delta), dtype=np.int64)
        for c in np.unique(labels):
            where = np.flatnonzero(labels == c)
            half[where] = np.argsort(np.argsort(np.abs(delta[where]))) * 2 // len(where)
        keys, chosen = (labels * 2 + (delta > 0)) * 2 + half, np.concatenate(groups)
        rows = selection_draws(keys, chosen, np.flatnonzero(free), draws, seed + s)
        span, split = losses[step + gap:step + gap + length], len(groups[0])
        if rows[0, 0] >= 0 and min(map(len, groups)) > 0:
            observed[s] = antiphase(span, groups[0], groups[1])
            null[s] = antiphase(span, rows[:, :split], rows[:, split:])
    return null_test(observed, null, "less")

def pair_contrast(series, first, second, first_pool, second_pool, draws=200, seed=0):
    """How much more a pair of groups moves in anti-phase than size-matched control pairs from the pools:
    pair, control (medians of `antiphase`), contrast = control − pair (> 0: more opposed), low and high (2.5,
    97.5 percentiles). Needs `antiphase`."""
    groups = [np.flatnonzero(g) for g in (first, second, first_pool, second_pool)]
    if min(len(g) for g in groups) == 0:
        return dict.fromkeys(("pair", "control", "contrast", "low", "high"), math.nan)
    rng, values = np.random.default_rng(seed), []
    sizes = [min(len(groups[k]), len(groups[k + 2])) for k in (0, 1)]
    for pair in (groups[:2], groups[2:]):
        draw = [np.stack([rng.choice(g, size, replace=False) for _ in range(draws)])
                for g, size in zip(pair, sizes)]
        values.append(antiphase(series, *draw))
    low, high = np.nanpercentile(values[1] - values[0], [2.5, 97.5])
    pair, control = np.nanmedian(values, 1)
    return {"pair": float(pair), "control": float(control), "contrast": float(control - pair),
            "low": float(low), "high": float(high)}

def spike_rate(loss, after, k=5.0, lookback=20):
    """Loss spikes per 100 steps from `after`: rises over the running minimum of `lookback` steps above k x
    the median |ΔL| from `after` (`loss_spikes`); nan with fewer steps after it. Needs `loss_spikes`."""
    loss = np.asarray(loss, dtype=np.float64)
    if len(loss) - after < lookback:
        return math.nan
    events = loss_spikes(loss, k * np.median(np.abs(np.diff(loss[after:]))), lookback)
    return 100 * float(np.sum(events[:, 0] >= after)) / (len(loss) - after)

def tail_share(per_example_loss, start, stop, count=10, fraction=0.01):
    """The median `top_fraction_share` of per-example loss changes (per_example_loss [T, N]) at the `count`
    steps in [start, stop) where the mean loss rises most; nan if empty. Needs `top_fraction_share`."""
    losses = np.asarray(per_example_loss, dtype=np.float64)
    if not (math.isfinite(start) and math.isfinite(stop)):
        return math.nan
    start, stop = max(int(math.ceil(start)), 0), min(int(stop), len(losses) - 1)
    if stop <= start:
        return math.nan
    rises = start + np.argsort(-np.diff(losses.mean(1))[start:stop])[:count]
    return float(np.median(top_fraction_share(losses[rises + 1] - losses[rises], fraction)))

def excess_alignment(unstable, top, count):
    """How much more the outliers' gradients lie in the oscillating directions than random examples': median
    of unstable[:, :top] minus that of unstable[:, count:] (`outlier_state`'s [E, C + R]) -> [E]."""
    unstable = np.asarray(unstable, dtype=np.float64)
    return np.median(unstable[:, :top], 1) - np.median(unstable[:, count:], 1)

def probe_swing(outputs, classes, probe=0, controls=(1, 2)):
    """How much a probe's output on `classes` swings against control probes: its mean |Δ| of the mean over
    `classes` of outputs [T, P, C], over the controls' largest."""
    swing = np.abs(np.diff(np.asarray(outputs)[:, :, list(classes)].mean(-1), axis=0)).mean(0)
    return float(swing[probe] / np.max(swing[list(controls)]))

def paste_swing(shift, after, reference=40, window=50, control=1):
    """How much more the sky paste's effect swings after the crossing than before the edge: log of the mean
    |Δ| of shift [T, P] over the `window` steps from `after` over that in steps 0..reference, column 0 (sky)
    minus column `control`; nan if the run is short."""
    change = np.abs(np.diff(np.asarray(shift, dtype=np.float64), axis=0))
    if after + window > len(change):
        return math.nan
    ratio = change[after:after + window].mean(0) / np.maximum(change[:reference].mean(0), 1e-300)
    return float(np.log(ratio[0]) - np.log(ratio[control]))

def intervention_endpoints(history, lr, pair, window=50):
    """From a `train` history (sharpness as "eigenvalues"): crossing and approach (`edge_of_stability`),
    antiphase, the pair's (bool masks [N]) mean |Δ(L_first − L_second)| over the `window` steps from the
    first measured step after the crossing (nan if under 10), curve, the sharpness per step. Needs `measured`,
    `edge_of_stability`."""
    steps, sharpness = measured(history, "eigenvalues")
    losses = history["per_example_loss"].astype(np.float64)
    eos = edge_of_stability(steps, sharpness[:, 0], 2 / lr, len(losses))
    span = losses[eos["after"]:eos["after"] + window]
    gap = span[:, pair[0]].mean(1) - span[:, pair[1]].mean(1)
    curve = np.full(len(losses), np.nan)
    curve[steps] = sharpness[:, 0]
    return {"crossing": eos["crossing"], "approach": eos["approach"], "curve": curve,
            "antiphase": float(np.abs(np.diff(gap)).mean()) if len(gap) >= 10 else math.nan}

def feature_shares(features, index, loss_change):
    """Each feature's (bool masks [F, N]) share of the outliers' summed |Δℓ| over the selections (index,
    loss_change [S, top]), and its base rate: ([F], [F])."""
    mass = np.zeros(features.shape[1])
    magnitude = np.abs(np.asarray(loss_change, dtype=np.float64)).reshape(-1)
    np.add.at(mass, np.asarray(index).reshape(-1), magnitude)
    return features @ mass / max(mass.sum(), 1e-300), features.mean(1)

def top_feature(features, index, loss_change, min_base=0.01):
    """The feature the outliers carry most over its base rate (base rate >= min_base): (index, ratio). Needs
    `feature_shares`."""
    share, base = feature_shares(features, index, loss_change)
    ratio = np.where(base >= min_base, share / np.maximum(base, 1e-300), -np.inf)
    return int(np.argmax(ratio)), float(np.max(ratio))

def early_layer_ratio(layer_values):
    """The largest per-layer sharpness ([L]) in the first third of layers (rounded up) over the rest's."""
    early = math.ceil(len(layer_values) / 3)
    return float(np.max(layer_values[:early]) / np.max(layer_values[early:]))

def t_quantile(q, dof):
    """The q-quantile of Student's t with `dof` degrees of freedom, by integrating its density from 0."""
    grid = np.linspace(0, 200, 400001)
    density = np.exp(torch.distributions.StudentT(float(dof)).log_prob(torch.as_tensor(grid)).numpy())
    cdf = 0.5 + np.concatenate([[0], np.cumsum((density[1:] + density[:-1]) / 2 * (grid[1] - grid[0]))])
    return float(np.sign(q - 0.5) * grid[min(np.searchsorted(cdf, max(q, 1 - q)), len(grid) - 1)])

def t_interval(values, level=0.95):
    """Mean of the finite `values` and its t interval mean ± q·sd/√n, q the (1 + level)/2 quantile of t with n
    − 1 dof: (mean, low, high), low, high nan below 2 values. Needs `t_quantile`."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return (float(values.mean()) if len(values) else math.nan), math.nan, math.nan
    half = t_quantile((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)

def detectable_effect(sd, n, power=0.8, level=0.95):
    """The smallest mean paired difference n seeds of sd `sd` detect with probability `power`: (t_(1+level)/2
    + t_power) · sd / √n, t with n − 1 dof; nan for n < 2. Needs `t_quantile`."""
    if n < 2:
        return math.nan
    return (t_quantile((1 + level) / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)
