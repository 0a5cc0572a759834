"""Tests for osig.py and run_all.py, in osig's order, then run_all, then the opt-in benchmark. Every check is
against an independent reference: dense Hessians of tiny models, explicit loops, numpy eigensolvers, finite
differences, closed forms, planted signals and surrogates that carry none."""

import ast
import builtins
import copy
import dataclasses
import hashlib
import importlib
import inspect
import io
import math
import multiprocessing
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian

import osig
import run_all

torch.set_num_threads(min(2, torch.get_num_threads()))   # CI has 2 cores; OMP_NUM_THREADS=1 is respected
HERE = Path(__file__).parent
SOURCE = ast.parse(inspect.getsource(osig))
DEFINED = {node.name: node for node in SOURCE.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
CONSTANTS = {name.id for node in SOURCE.body if isinstance(node, ast.Assign)
             for name in ast.walk(node.targets[0]) if isinstance(name, ast.Name)}
IMPORTS = {alias.asname or alias.name.split(".")[0] for node in SOURCE.body
           if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}

def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])

def dense_hessian(model, loss_fn, x, y):
    """Reference: the full Hessian of the mean loss by torch.func.hessian over the flat parameters."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    sizes = [math.prod(s) for s in shapes]
    buffers = dict(model.named_buffers())

    def mean_loss(theta):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return loss_fn(functional_call(model, (params, buffers), (x,)), y).mean()

    return hessian(mean_loss)(flat_params(model))

def tiny_models():
    torch.manual_seed(0)
    return {
        "mlp": (osig.MLP(in_features=12, width=5, depth=2, num_classes=3, activation="tanh"), (7, 3, 2, 2)),
        "cnn": (osig.SmallCNN(in_channels=3, channels=2, num_classes=3), (5, 3, 6, 6)),
        "vit": (osig.ViT(num_classes=3, image_size=4, patch=2, dim=8, depth=1, heads=2, mlp_ratio=2),
                (5, 3, 4, 4)),
    }

def symmetric_matrix(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues)) @ q.T

def small_problem(dtype=torch.float64, n=24):
    torch.manual_seed(0)
    x, y = torch.randn(n, 3, 2, 2, dtype=dtype), torch.randint(0, 3, (n,))
    model = osig.MLP(in_features=12, width=8, depth=2, num_classes=3).to(dtype)
    return model, x, y

def needs(name):
    """The helpers and constants `name`'s docstring names after "Needs", and theirs, in dependency order."""
    doc, found = getattr(osig, name).__doc__ or "", []
    for helper in (re.findall(r"`(\w+)`", doc.split("Needs", 1)[1]) if "Needs" in doc else []):
        found += [n for n in needs(helper) + [helper] if n not in found] if helper in DEFINED else [helper]
    return found

def pasted(name):
    """`name` exec'd alone with osig's imports and exactly what its docstring names (and theirs)."""
    header = "\n".join(line for line in inspect.getsource(osig).split("\n# ---")[0].splitlines()
                       if line.startswith(("import ", "from ")))
    namespace = {}
    exec(header + "\n" + "\n".join(inspect.getsource(getattr(osig, n)) if n in DEFINED else
                                   f"{n} = {getattr(osig, n)!r}" for n in needs(name) + [name]), namespace)
    return namespace[name]

@pytest.mark.parametrize("name", sorted(DEFINED))
def test_every_public_function_names_everything_it_uses(name):
    """The copy-paste promise: whatever of osig a definition reads is named after "Needs" (checked on its
    code)."""
    node = DEFINED[name]
    walked = list(ast.walk(node))
    loads = {n.id for n in walked if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    local = {n.id for n in walked if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    local |= {a.arg for n in walked if isinstance(n, ast.arguments)
              for a in n.args + n.kwonlyargs + n.posonlyargs}
    local |= {n.name for n in walked if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used = (loads - local - set(dir(builtins)) - IMPORTS) & (set(DEFINED) | CONSTANTS)
    assert used - {name} <= set(needs(name)), f"{name} uses {sorted(used - set(needs(name)) - {name})}"
    pasted(name)                                         # and what it names exists and compiles alone

def test_pasted_functions_run_alone():
    model, x, y = small_problem()
    v = torch.randn(flat_params(model).numel(), dtype=torch.float64)
    assert torch.allclose(pasted("hvp")(model, osig.mse_loss, x, y, v, chunk=5),
                          osig.hvp(model, osig.mse_loss, x, y, v, 5))
    values, vectors, _ = osig.top_eigenvalues(model, osig.mse_loss, x, y, k=2)
    arguments = (model, osig.mse_loss, x, y, 0.1, values, vectors, 3, 1, 4)
    state = pasted("outlier_state")(*arguments)
    assert np.array_equal(state["candidates"], osig.outlier_state(*arguments)["candidates"])
    history = pasted("train")(model, x, y, osig.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1), 3,
                              measure=pasted("sharpness_measure")(osig.mse_loss, x, y, every=2), log=None)
    assert len(history["measured"]) == 2 and np.isfinite(history["loss"]).all()
    images = osig.make_planted_images(n=40)[0]
    assert torch.equal(pasted("gaussian_surrogate")(images, torch.arange(40) % 10, 5),
                       osig.gaussian_surrogate(images, torch.arange(40) % 10, 5))

# ------------------------------------------------------------ 1. Sharpness

def tiny(name):                                # float64: a model of tiny_models() or a GPT, inputs and labels
    if name == "gpt":
        torch.manual_seed(0)
        return (osig.GPT(vocab_size=7, context=5, dim=8, depth=1, heads=2, mlp_ratio=2).double(),
                torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5)))
    model, shape = tiny_models()[name]
    return model.double(), torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))

def top(matrix, k):                                        # reference: the k largest eigenvalues, by numpy
    return np.sort(np.linalg.eigvalsh(np.asarray(matrix)))[::-1][:k]

def example_grads(model, loss_fn, x, y, positions=None):   # reference: one backward pass per example
    params, rows = [p for p in model.parameters() if p.requires_grad], []
    for i in range(len(x)):
        losses = loss_fn(model(x[i:i + 1]), y[i:i + 1]).reshape(-1)             # row i's loss at positions[i]
        loss = losses.sum() if positions is None or positions[i] < 0 else losses[positions[i]]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)

def example_curvatures(model, loss_fn, x, y, v):           # reference: vᵀ H_i v, each example's dense Hessian
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]

    def losses(theta, i):
        params = {n: t.view_as(p) for (n, p), t in zip(named, torch.split(theta, sizes))}
        return loss_fn(functional_call(model, params, (x[i:i + 1],)), y[i:i + 1]).reshape(-1)
    return np.concatenate([(hessian(losses)(flat_params(model), i) @ v @ v).numpy() for i in range(len(x))])

def hand_step(model, loss_fn, x, y, lr):       # reference: GD by hand on a copy: (ℓ(θ − lr·g) − ℓ(θ), g = ∇L)
    stepped = copy.deepcopy(model)
    before = loss_fn(stepped(x), y)
    grads = torch.autograd.grad(before.mean(), list(stepped.parameters()))
    with torch.no_grad():
        for p, g in zip(stepped.parameters(), grads):
            p -= lr * g
        return (loss_fn(stepped(x), y) - before).reshape(-1), torch.cat([g.reshape(-1) for g in grads])

def test_checked_forward_names_the_fix_for_each_wrong_call():
    model, x, y = small_problem()
    mse, averaged = osig.mse_loss, lambda outputs, labels: nn.functional.cross_entropy(outputs, labels)
    for inputs, labels, loss_fn, message in (
            (x, y[:-1], mse, "one label per example"), (x[:0], y[:0], mse, "N >= 1"),
            (x, y.double(), mse, "integer class indices 0..2"), (x, y + 1, mse, "integer class indices 0..2"),
            (x, y - 1, osig.cross_entropy_loss, "indices 0..2"), (x, y, averaged, "one loss per example")):
        with pytest.raises(ValueError, match=message):
            osig.checked_forward(model, loss_fn, inputs, labels)

RUNS_A_MODEL = ("trainable per_example_losses top_eigenvalues hvp per_example_grads per_example_curvature "
                "loss_change outlier_state group_gradients layer_sharpness sharpness_measure train").split()
@pytest.mark.parametrize("call, case", [(call, case) for call in RUNS_A_MODEL
                                        for case in ("frozen", "inference")])
def test_every_function_that_runs_a_model_names_the_missing_gradients(call, case):
    (m, x, y), mse = small_problem(n=6), osig.mse_loss
    v = flat_params(m) / flat_params(m).norm()
    args = {"trainable": (), "hvp": (mse, x, y, v), "per_example_curvature": (mse, x, y, v),
            "outlier_state": (mse, x, y, 0.1, torch.ones(1), v[:, None], 2, 1, 2),
            "loss_change": (mse, x, y, 0.1), "group_gradients": (mse, x, y, [y == 0])}
    run = {"sharpness_measure": lambda: osig.sharpness_measure(mse, x, y)(0, m, None),
           "train": lambda: osig.train(m, x, y, mse, torch.optim.SGD(m.parameters()), 2, log=None)}.get(
        call, lambda: getattr(osig, call)(m, *args.get(call, (mse, x, y))))
    m.requires_grad_(case != "frozen")
    with torch.inference_mode(case == "inference"):
        if call == "per_example_losses":                                        # it needs no gradients
            assert torch.allclose(run(), 0.5 * (m(x) - nn.functional.one_hot(y, 3)).pow(2).sum(1), rtol=1e-14)
            return
        with pytest.raises(ValueError, match="requires_grad=True" if case == "frozen" else "inference_mode"):
            run()

def test_preserved_measures_the_eval_objective_and_restores_flags_and_random_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 12, dtype=torch.float64), torch.randint(0, 3, (20,))
    model(x)                                                    # train mode: the running statistics move
    model[3].eval()
    flags, state = [m.training for m in model.modules()], torch.get_rng_state()
    with torch.no_grad(), osig.preserved(model):              # eval: dropout off, batch norm on running stats
        assert torch.is_grad_enabled() and not any(m.training for m in model.modules()) and torch.rand(1) < 1
    values = [osig.top_eigenvalues(model, osig.mse_loss, x, y, k=2, iters=200, tol=1e-9)[0] for _ in range(2)]
    assert [m.training for m in model.modules()] == flags and torch.equal(torch.get_rng_state(), state)
    reference = top(dense_hessian(model.eval(), osig.mse_loss, x, y), 2)
    assert torch.equal(*values) and np.allclose(values[0], reference, rtol=1e-8)

@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("call", ["eigenvalues", "per_example_grads", "outlier_state", "curvature"])
def test_measuring_batch_norm_in_train_mode_keeps_its_statistics_and_flags(call, frozen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    x, y, mse = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]), osig.mse_loss
    model.double()(x)                                           # running statistics away from their init
    model[1].train(not frozen)
    buffers, v = [b.clone() for b in model.buffers()], torch.randn(87, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(87, 2, dtype=torch.float64))[0]
    run = {"eigenvalues": lambda: osig.top_eigenvalues(model, mse, x, y, k=2, tol=1e-10)[0],
           "per_example_grads": lambda: osig.per_example_grads(model, mse, x, y),
           "outlier_state": lambda: osig.outlier_state(model, mse, x, y, 0.1, torch.ones(2), U, 1)["gram"],
           "curvature": lambda: osig.per_example_curvature(model, mse, x, y, v)}[call]
    result = run()
    assert model.training and model[0].training and model[1].training == (not frozen)
    assert all(torch.equal(b, saved) for b, saved in zip(model.buffers(), buffers))
    model.eval()                                                # the deterministic objective it measured
    assert np.allclose(result, run(), rtol=1e-10, atol=1e-14)

@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
@pytest.mark.parametrize("loss_fn", [osig.mse_loss, osig.cross_entropy_loss])
def test_hvp_matches_the_dense_hessian_in_any_chunk_and_shifted_restores_exactly(name, loss_fn):
    model, x, y = tiny(name)
    H, theta = dense_hessian(model, loss_fn, x, y), flat_params(model)
    v = torch.randn(len(theta), dtype=torch.float64)
    for chunk in (None, 1, 2, len(x)):
        result = osig.hvp(model, loss_fn, x, y, v, chunk=chunk)
        assert torch.linalg.norm(result - H @ v) / torch.linalg.norm(H @ v) < 1e-10, chunk
    with pytest.raises(KeyError), osig.shifted(model, 0.5 * v):
        assert torch.equal(flat_params(model), theta + 0.5 * v)
        raise KeyError("an error inside")
    assert torch.equal(flat_params(model), theta)

def test_lanczos_and_top_eigenvalues_match_numpy():
    rest = np.random.default_rng(3).uniform(-5, 5, 297)
    for leading in ([10.0, 8.0, 6.5], [10.0, 10.0 - 1e-3, 10.0 - 2e-3]):             # separated, clustered
        A = torch.from_numpy(symmetric_matrix(np.concatenate([leading, rest]), seed=4))
        values, vectors, residuals = osig.lanczos(lambda v: A @ v, 300, k=3, iters=300, tol=1e-12)
        assert np.max(np.abs(values.numpy() - top(A, 3)) / top(A, 3)) < 1e-8
        assert torch.allclose(vectors.T @ A @ vectors, torch.diag(values), atol=1e-7)   # orthonormal
    A = torch.diag(torch.tensor([5.0, 3.0, 1.0, -2.0], dtype=torch.float64))
    exact = torch.eye(4, dtype=torch.float64)[2]                   # eigenvalue 1: the residual is exactly 0
    assert np.allclose(osig.lanczos(lambda v: A @ v, 4, k=3, tol=1e-12, v0=exact)[0], [5, 3, 1], atol=1e-10)
    model, x, y = small_problem()                      # top_eigenvalues: plain, chunked, scaled, one block
    H, s = dense_hessian(model, osig.cross_entropy_loss, x, y), torch.rand(203, dtype=torch.float64) + 0.3
    mask = ((torch.arange(203) >= 104) & (torch.arange(203) < 176)).double()       # net.3: one diagonal block
    for chunk, scale, reference in ((None, None, H), (5, None, H), (None, s, s[:, None] * H * s),
                                    (None, mask, H[104:176, 104:176])):
        values = osig.top_eigenvalues(model, osig.cross_entropy_loss, x, y, k=3, chunk=chunk, iters=300,
                                      tol=1e-10, scale=scale)[0]
        assert np.allclose(values.numpy(), top(reference, 3), rtol=1e-7) and values[2] > 0

# ------------------------------------------------------------ 2. Training

def gd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)

def test_a_chunked_gd_step_equals_the_unchunked_one_and_the_hand_step():
    model, x, y = small_problem()
    state, runs = copy.deepcopy(model.state_dict()), []
    expected = flat_params(model) - 0.1 * hand_step(model, osig.mse_loss, x, y, 0.1)[1]
    for chunk, steps in ((None, 3), (5, 3), (7, 1)):
        model.load_state_dict(state)
        history = osig.train(model, x, y, osig.mse_loss, gd(model), steps, chunk=chunk, log=None)
        runs.append((history["per_example_loss"], flat_params(model)))
    assert torch.allclose(runs[0][1], runs[1][1], rtol=0, atol=1e-13) and np.allclose(runs[0][0], runs[1][0])
    assert torch.allclose(runs[2][1], expected, rtol=0, atol=1e-13)

@pytest.mark.parametrize("name", ["gd", "sgd", "adam"])
def test_seeded_runs_are_identical(name):
    runs = []
    for attempt in range(2):
        model, x, y = small_problem(torch.float32)
        torch.rand(attempt + 1)                              # another global random state: the seed decides
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01) if name == "adam" else gd(model, 0.05)
        measure = osig.sharpness_measure(osig.cross_entropy_loss, x, y, every=5)
        runs.append(osig.train(model, x, y, osig.cross_entropy_loss, optimizer, 12, measure=measure, seed=3,
                               batch_size=None if name == "gd" else 8, log=None))
    for key in ("loss", "grad_norm", "per_example_loss"):
        assert np.array_equal(runs[0][key], runs[1][key]), key
    assert np.array_equal(osig.measured(runs[0], "eigenvalues")[1], osig.measured(runs[1], "eigenvalues")[1])

def test_the_hooks_eigenvalues_every_few_steps_match_the_dense_hessian():
    model, x, y = small_problem()
    sharpness = osig.sharpness_measure(osig.mse_loss, x, y, every=2, k=2, iters=200, tol=1e-10)
    thetas = {"start": flat_params(model)}

    def measure(step, model, optimizer):
        thetas[step] = flat_params(model)
        return sharpness(step, model, optimizer)
    history = osig.train(model, x, y, osig.mse_loss, gd(model, 0.2), 5, measure=measure, log=None)
    steps, values = osig.measured(history, "eigenvalues")
    assert steps.tolist() == [0, 2, 4] and torch.equal(thetas[0], thetas["start"])      # before the update
    assert not torch.equal(thetas[0], thetas[2])
    for step, value in zip(steps, values):
        torch.nn.utils.vector_to_parameters(thetas[step], model.parameters())
        assert np.allclose(value, top(dense_hessian(model, osig.mse_loss, x, y), 2), rtol=1e-7)

def check_stopped_at(history, step, steps, finite=("loss", "accuracy", "grad_norm", "per_example_loss")):
    for key in ("loss", "accuracy", "grad_norm", "per_example_loss"):
        assert len(history[key]) == steps and np.isnan(history[key][step + 1:]).all(), key
        assert key not in finite or np.isfinite(history[key][:step]).all(), key

def diverging_run():                                # float32, lr 50, x·100: the gradient overflows at step 1
    model, x, y = small_problem(torch.float32)
    history = osig.train(model, x * 100, y, osig.mse_loss, gd(model, 50.0), 30, log=None)
    return history, int(history["diverged"].split("diverged at step ")[1].split()[0])

def test_divergence_ends_the_run_naming_the_stability_threshold():
    history, step = diverging_run()
    assert "SGD at lr 50 is stable up to a sharpness of 0.04: lower the learning rate" in history["diverged"]
    assert 0 < step < 29 and not np.isfinite(history["loss"][step] + history["grad_norm"][step])
    check_stopped_at(history, step, 30, finite=("loss", "accuracy", "grad_norm", "per_example_loss"))

def test_a_floating_point_error_in_the_sharpness_measure_ends_the_run_the_same_way():
    model, x, y = small_problem()
    sharpness = osig.sharpness_measure(osig.mse_loss, x, y, every=1)

    def measure(step, model, optimizer):
        model.net[1].weight.data.mul_(1e300 if step == 3 else 1.0)     # a finite loss, an overflowing Hessian
        return sharpness(step, model, optimizer)
    history = osig.train(model, x, y, osig.mse_loss, gd(model), 10, measure=measure, log=None)
    assert history["diverged"].startswith("training diverged at step 3 (lanczos: non-finite")
    assert "stable up to a sharpness of 20:" in history["diverged"] and np.isfinite(history["loss"][3])
    check_stopped_at(history, 3, 10)
    assert osig.measured(history, "eigenvalues")[0].tolist() == [0, 1, 2]

def test_the_eta_comes_from_the_steps_after_step_0(monkeypatch):
    clock, logged = [0.0], []
    monkeypatch.setattr(osig, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def measure(step, model, optimizer):
        clock[0] += 100.0 if step == 0 else 1.0                       # a slow first step, then 1 s a step
    model, x, y = small_problem()
    osig.train(model, x, y, osig.mse_loss, gd(model), 20, measure=measure, log=logged.append)
    expected = [f"step {s:5d}: {100 + s:6.1f}s, ETA {19 - s:6.1f}s" for s in [*range(2, 20, 2), 19]]
    assert logged[0].endswith("ETA after more steps")
    assert [line[:10] + ":" + line.split("|")[-1] for line in logged[1:]] == expected

def test_the_time_axis_against_hand_computations():
    steps, values = np.array([0, 10, 20, 30, 40]), np.array([1.0, 1.5, 2.5, 1.9, 2.1])
    assert osig.first_reach(steps, values, 2.0) == 15.0                               # 10 + 0.5 / 1.0 · 10
    assert osig.first_reach(steps, values, 0.5) == 0.0 and math.isnan(osig.first_reach(steps, values, 3.0))
    for peak, crossing, approach in ((2.5, 15.0, 15.0 - 11.0), (2.0, 20.0, 20.0 - 12.0)):  # 1.6 at 11, 12
        eos = osig.edge_of_stability(steps, [1.0, 1.5, peak, 1.9, 2.1], 2.0, length=50)   # after: past, at 20
        assert (eos["crossing"], eos["after"], eos["start_ratio"]) == (crossing, 20, 0.5)
        assert eos["approach"] == pytest.approx(approach) and eos["hover"] == pytest.approx(0.05)  # |λ/2 − 1|
    eos = osig.edge_of_stability(steps, [1.0, 1.7, 1.2, 1.3, 1.4], 2.0, length=50)    # never crosses
    assert np.isnan([eos["crossing"], eos["hover"], eos["approach"]]).all() and eos["after"] == 50
    assert osig.measurable(steps, 10, 40, 50, span=30).tolist() == [False, True, True, False, False]
    assert osig.sharpening_rate(steps, values, 5, 15) == pytest.approx((2.0 - 1.25) / 10 * 100)

# ------------------------------------------------------------ 3. Outliers and opposing groups

@pytest.mark.parametrize("name, loss_fn", [("mlp", osig.mse_loss)] + [(name, osig.cross_entropy_loss)
                                                                       for name in ("mlp", "cnn", "gpt")])
def test_per_example_grads_and_curvatures_match_explicit_loops(name, loss_fn):
    model, x, y = tiny(name)
    for positions in [None] + [[0, 4, 2], [-1, 3, 0]] * (name == "gpt"):        # -1: the row's summed losses
        grads = osig.per_example_grads(model, loss_fn, x, y, chunk=2, positions=positions)
        reference = example_grads(model, loss_fn, x, y, positions)
        assert ((grads - reference).norm(dim=1) / reference.norm(dim=1)).max() < 1e-10, positions
    for wrong in [[0, 5, 1], [0, -2, 1], [0, 1]] * (name == "gpt"):
        with pytest.raises(ValueError, match="positions must give one position in 0..4"):
            osig.per_example_grads(model, loss_fn, x, y, positions=wrong)
    v = nn.functional.normalize(torch.randn(len(flat_params(model)), dtype=torch.float64), dim=0)
    curvatures = osig.per_example_curvature(model, loss_fn, x, y, v, chunk=2)                 # flat over B·T
    assert np.allclose(curvatures, example_curvatures(model, loss_fn, x, y, v), rtol=1e-9, atol=1e-12)

@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_loss_change_group_gradients_and_opposing_groups_against_an_explicit_gd_step(name):
    model, x, y = tiny("gpt") if name == "gpt" else small_problem()
    theta, ce = flat_params(model), osig.cross_entropy_loss
    change, gradient = osig.loss_change(model, ce, x, y, 0.3)
    expected_change, expected_gradient = hand_step(model, ce, x, y, 0.3)
    assert change.dtype == torch.float64 and len(change) == y.numel() and (flat_params(model) == theta).all()
    assert torch.allclose(change, expected_change, rtol=1e-10, atol=1e-14)
    assert torch.allclose(gradient, expected_gradient, rtol=1e-10, atol=1e-14)
    order = sorted(range(len(change)), key=lambda i: -abs(float(expected_change[i])))[:7]
    for given in (change, change.numpy()):
        index, up = osig.opposing_groups(given, 7)
        assert index.tolist() == order and up.tolist() == [bool(expected_change[i] > 0) for i in order]
    groups = [torch.arange(y.numel()) % 3 == k for k in range(3)]                      # a partition, flat
    parts = osig.group_gradients(model, ce, x, y, [groups[0].numpy()] + groups[1:])
    assert torch.allclose(sum(parts), expected_gradient, rtol=1e-10, atol=1e-14) and len(parts) == 3
    if name == "mlp":                                                          # each is its examples' share
        assert torch.allclose(parts[1], example_grads(model, ce, x, y)[groups[1]].sum(0) / 24, rtol=1e-10)

def test_parameter_layers_and_layer_sharpness():
    torch.manual_seed(0)
    gpt = osig.GPT(vocab_size=7, context=5, dim=8, depth=2, heads=2, mlp_ratio=2)
    names, index = osig.parameter_layers(gpt)
    assert names == ["embed", "position", "blocks.0.attention", "blocks.0.mlp", "blocks.1.attention",
                     "blocks.1.mlp", "head", "norms"]
    layers = ["norms" if "norm" in n else ".".join(n.split(".")[:3 if n.startswith("blocks") else 1])
              for n, _ in gpt.named_parameters()]             # embed.weight, position.weight, ...
    expected = np.repeat([names.index(layer) for layer in layers], [p.numel() for p in gpt.parameters()])
    assert index.tolist() == expected.tolist() and len(index) == len(flat_params(gpt))
    model, x, y = small_problem()
    names, index = osig.parameter_layers(model)
    assert names == ["net.1", "net.3", "net.5"] and np.bincount(index).tolist() == [104, 72, 27]
    H, s = dense_hessian(model, osig.mse_loss, x, y), torch.rand(203, dtype=torch.float64) + 0.5
    for scale, reference in ((None, H), (s, s[:, None] * H * s)):   # each layer's diagonal block, by numpy
        result = osig.layer_sharpness(model, osig.mse_loss, x, y, scale=scale, iters=200, tol=1e-10)
        blocks = [reference[b:e, b:e] for b, e in ((0, 104), (104, 176), (176, 203))]
        assert np.allclose(result, [top(block, 1)[0] for block in blocks], rtol=1e-7)
    model.net[3].requires_grad_(False)                                          # flat vectors: trainable only
    names, index = osig.parameter_layers(model)
    assert names == ["net.1", "net.5"] and np.bincount(index).tolist() == [104, 27]

def test_outlier_state_against_explicit_gradients_projections_and_curvatures():
    (model, x, y), mse = small_problem(), osig.mse_loss
    values, vectors = (t.flip(-1)[..., :3] for t in torch.linalg.eigh(dense_hessian(model, mse, x, y)))
    lr = float(1.8 / (2 * values[0]))
    state = osig.outlier_state(model, mse, x, y, lr, values, vectors, top=2, bands=1, random=5)
    change, gradient = hand_step(model, mse, x, y, lr)
    order = np.argsort(-np.abs(change.numpy()))[:4]
    assert state["candidates"].tolist() == order.tolist()
    assert np.allclose(state["change"], change[order], rtol=1e-10)
    chosen = np.concatenate([state["candidates"], state["random"]])
    assert len(set(chosen.tolist())) == 9
    g, U = example_grads(model, mse, x, y)[chosen], vectors                 # the top-k subspace, k = 3
    assert np.allclose(state["unstable"], ((g @ U).norm(dim=1) / g.norm(dim=1)).numpy(), rtol=1e-10)
    span = torch.stack([gradient[:104], vectors[:104, 0]], dim=1)                    # net.1, the first layer
    h = g[:4, :104].T - span @ torch.linalg.lstsq(span, g[:4, :104].T).solution
    assert np.allclose(state["gram"], (h.T @ h).numpy(), rtol=1e-8, atol=1e-14)
    assert np.allclose(state["curvature"], example_curvatures(model, mse, x, y, vectors[:, 0]),
                       rtol=1e-9, atol=1e-12)

def test_loss_spikes_and_top_fraction_share_against_planted_signals():
    sawtooth = 0.0101 * (np.arange(300) % 50)                 # from step 20 of each tooth on: a rise of 0.202
    assert osig.loss_spikes(sawtooth, 0.2).tolist() == [[50 * k + 20, 50 * k + 49] for k in range(6)]
    gaussian = np.random.default_rng(0).standard_normal((4, 100000))
    assert abs(np.median(osig.top_fraction_share(gaussian)) - 0.0362) < 0.002           # 2φ(2.576) / √(2/π)
    gaussian[:, :1000] *= 20                                                        # a planted 1% big movers
    assert np.allclose(osig.top_fraction_share(gaussian), 20 / (20 + 99), atol=0.01)

def test_antiphase_is_the_correlation_of_the_group_means_changes():
    mixed = np.random.default_rng(1).standard_normal((30, 6))
    expected = np.corrcoef(np.diff(mixed[:, :2].mean(1)), np.diff(mixed[:, 2:].mean(1)))[0, 1]
    assert np.isclose(osig.antiphase(mixed, np.arange(6) < 2, [2, 3, 4, 5]), expected, rtol=1e-12)
    a, b = np.random.default_rng(2).integers(0, 6, (2, 4, 3))                            # index arrays [D, m]
    assert np.allclose(osig.antiphase(mixed, a, b), [osig.antiphase(mixed, *pair) for pair in zip(a, b)])
    mixed[:, 5] = 1.0
    for first, second, values in (([0], [5], mixed), ([0], [], mixed), ([0], [1], mixed[:2])):
        assert np.isnan(osig.antiphase(values, first, second))                            # flat, empty, T < 3

def test_matched_examples_and_selection_draws_by_hand():
    values, labels = np.array([0.0, 1.0, 1.1, 5.0, 1.05, 0.9]), np.array([0, 0, 0, 1, 1, 0])
    assert osig.matched_examples(values, [1], labels).tolist() == [5]     # 0.9 beats 1.1; 1.05 is class 1
    assert osig.matched_examples(values, [1, 2], labels).tolist() == [5, 0]      # 5 is taken: then 0
    assert osig.matched_examples(values, [3, 4], labels).tolist() == [-1, -1]    # nothing left in class 1
    keys, index, pool = np.random.default_rng(0).integers(0, 3, 200), np.arange(8), np.arange(8, 60)
    draws = osig.selection_draws(keys, index, pool, draws=50, seed=1)
    assert draws.shape == (50, 8) and (keys[draws] == keys[index]).all() and np.isin(draws, pool).all()
    assert all(len(set(row)) == 8 for row in draws) and len(np.unique(draws)) > 20
    keys[index[0]] = 7                                                          # a key with no pool member
    assert (osig.selection_draws(keys, index, pool, draws=3) == -1).all()

# ------------------------------------------------------------ 4. Features the groups share

def test_sky_rule_finds_planted_borders_and_leaves_ambiguous_images_out():
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 9, 9, 3), dtype=np.uint8))
    pixels[0, 0, 0] = torch.tensor([250, 100, 255])                     # R + 10 overflows a uint8: not sky
    r, g, b = pixels.long().unbind(-1)
    assert torch.equal(osig.sky_pixels(pixels), (b > r + 10) & (b >= g) & (b > 80))
    images, _, planted = osig.make_planted_images(n=200, seed=2, noise=20.0)
    assert torch.equal(osig.sky_groups(images)[0], planted > 0) and (planted > 0).sum() > 5
    images[:10, :8] = 200                                                   # a flat grey top: neither
    images[10:40, :8] = torch.tensor([250, 50, 50], dtype=torch.uint8)      # a flat red top: neither
    images[10:20, :4] = torch.tensor([80, 150, 255], dtype=torch.uint8)     # half of it blue: neither
    images[20:30, :8, ::2, 0] = 50                                          # a textured red top: no sky
    sky, no_sky = osig.sky_groups(images)
    assert not (sky | no_sky)[:20].any() and not (sky | no_sky)[30:40].any() and no_sky[20:30].all()
    assert not sky[20:30].any() and torch.equal(sky[40:], planted[40:] > 0)

def test_swap_paste_and_probe_change_exactly_what_they_name():
    rng, donors = np.random.default_rng(1), [2, -1, 0, 0, 3]        # 0 gives to 2 and 3 and is swapped too
    images = torch.from_numpy(rng.integers(0, 256, (5, 12, 7, 3), dtype=np.uint8))
    before, expected, masks = images.clone(), images.clone(), rng.random((5, 12, 7)) < 0.4
    for i, h, w in zip(*np.nonzero(masks)):
        expected[i, h, w] = before[donors[i], h, w] if donors[i] >= 0 else before[i, h, w]
    assert torch.equal(osig.background_swap(images, masks, donors), expected) and torch.equal(images, before)
    expected = images.clone()
    expected[[1, 3], :3] = torch.tensor([80, 150, 255], dtype=torch.uint8)             # round(0.25 · 12) rows
    assert torch.equal(osig.paste_top(images, (79.6, 150.2, 254.9), members=[1, 3]), expected)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.1])
    probe, colour = osig.uniform_probe((80.4, 150, 255), mean, std, 8), torch.tensor([80, 150, 255]) / 255
    assert probe.shape == (1, 3, 8, 8) and torch.allclose(probe, ((colour - mean) / std).view(1, 3, 1, 1))

@pytest.mark.parametrize("data", ["planted", "cifar"])
def test_matched_probe_has_the_norm_and_the_variance_of_the_probe_along_another_hue(data):
    images = osig.make_planted_images(300, planted_fraction=0.0)[0] if data == "planted" else real_cifar(0)[0]
    x, mean, std = osig.normalize(images[:2000])
    probe = osig.uniform_probe((80, 150, 255), mean, std)
    matched, M = osig.matched_probe(probe, x), np.cov(x.double().sum((2, 3)).numpy().T)
    c, m = probe[0, :, 0, 0].double().numpy(), matched[0, :, 0, 0].double().numpy()
    assert matched.shape == probe.shape and (matched == matched[:, :, :1, :1]).all()
    assert np.isclose(m @ m, c @ c) and abs(m @ M @ m / (c @ M @ c) - 1) <= 0.01      # the norm, the variance
    assert abs(m @ c) / (c @ c) < (0.5 if data == "planted" else 0.1)      # (isotropic noise allows no less)

def test_token_and_unit_features_and_coherence_against_explicit_definitions():
    x, y = torch.tensor([[0, 1, 1], [3, 0, 1]]), torch.tensor([[1, 1, 3], [0, 1, 0]])
    names, masks = osig.token_features(x, y, "abcd")
    for k, (i, t) in enumerate(np.ndindex(2, 3)):          # each column: its target and input characters
        pair = {f"target {'abcd'[y[i, t]]!r}", f"after {'abcd'[x[i, t]]!r}"}
        assert {names[f] for f in np.flatnonzero(masks[:, k])} == pair
    features = np.random.default_rng(3).normal(size=(12, 2, 5)) + 3.0
    centred = features.reshape(12, -1) - features.reshape(12, -1).mean(0)
    unit, first, second = osig.unit_features(features), [0, 3, 5], [1, 2, 7, 11]
    assert np.allclose(unit, centred / np.linalg.norm(centred, axis=1)[:, None], atol=1e-6)
    cosines = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a in centred[first] for b in centred[second]]
    assert osig.gram_mean(unit @ unit.T, first, second) == pytest.approx(np.mean(cosines), abs=1e-6)

def test_gaussian_surrogate_keeps_class_means_and_top_covariance_but_no_rare_subgroup():
    images, labels, planted = osig.make_planted_images(600, class_signal=20, noise=20, planted_strength=0.7)
    generator = torch.Generator().manual_seed(0)                      # and four genuine within-class factors
    factors = torch.randn(4, 3072, generator=generator) * torch.tensor([[16.0], [12.0], [8.0], [6.0]])
    flat = images.reshape(600, -1) + torch.randn(600, 4, generator=generator) @ factors
    images = flat.clamp(0, 255).round().to(torch.uint8).view_as(images)
    surrogate, statistics = osig.gaussian_surrogate(images, labels, seed=1), []
    for im in (images, surrogate):                 # the class means, the within-class spectrum, the pixels
        x = im.reshape(600, -1).double()
        means = torch.stack([x[labels == c].mean(0) for c in range(10)])
        statistics.append((means, torch.linalg.eigvalsh((x - means[labels]) @ (x - means[labels]).T), x))
    (m0, e0, x0), (m1, e1, x1) = statistics
    error = (e0.sum() / 600 / torch.bincount(labels)).sqrt()      # sampling error of a class mean of draws
    assert surrogate.dtype == torch.uint8 and ((m1 - m0).norm(dim=1) < 2.5 * error).all()
    assert ((m0 - m0.mean(0)).norm(dim=1) > 4 * error).all() and torch.allclose(e1[-5:], e0[-5:], rtol=0.15)
    pair = (labels == 0) | (labels == 2)     # the planted subgroup: two clusters along its direction; in the
    base = x0[pair & (planted == 0)].mean(0)         # surrogate one Gaussian, whose middle is populated
    direction = (x0[planted > 0].mean(0) - base) / (x0[planted > 0].mean(0) - base).norm() ** 2
    middle = [float((((x[pair] - base) @ direction - 0.5).abs() < 1 / 6).double().mean()) for x in (x0, x1)]
    assert middle[0] == 0 and middle[1] > 0.15

def test_markov_surrogate_keeps_bigrams_and_drops_longer_range_structure():
    words = [[0, 1, 2], [3, 1, 4]]                  # "xay" and "zaw": the successor of a is set by x or z
    tokens = torch.tensor([t for w in np.random.default_rng(0).integers(0, 2, 8000) for t in words[w]])
    sample, counts = osig.markov_surrogate(tokens, 400, 50, seed=1).numpy(), np.zeros((2, 5, 5))
    for k, s in [(0, s) for s in sample] + [(1, tokens.numpy())]:
        np.add.at(counts[k], (s[:-1], s[1:]), 1)
    frequencies = counts / counts.sum(2, keepdims=True)
    assert sample.shape == (400, 50) and np.abs(frequencies[0] - frequencies[1]).max() < 0.03
    after_xa = [s[t + 2] for s in sample for t in range(48) if s[t] == 0 and s[t + 1] == 1]
    assert np.mean(np.array(after_xa) == 4) > 0.4                   # never "xaw" in the corpus

# ------------------------------------------------------------ 5. Two-layer linear model

def learned_state(x, beta, width=4, init_scale=0.01, seed=1):      # a balanced fit of y = βᵀx_g: A = b uᵀ,
    generator, model = torch.Generator().manual_seed(seed), osig.TwoLayerLinear(3, width, init_scale, seed)
    with torch.no_grad():                                           # |b|² = |β|, plus init-scale noise
        b = torch.randn(width, generator=generator, dtype=torch.float64)
        model.b.copy_(b / b.norm() * math.sqrt(beta.norm()))
        model.A += torch.outer(model.b, torch.cat([torch.zeros(1).double(), beta]) / model.b.norm() ** 2)
    return model

def small_data(alpha=6.0):
    return osig.make_opposing_signal_data(20, 40, alpha, (1.0, 0.5), offset=0.5, seed=0)

def test_data_structure_sharpness_formula_and_rayleigh_quotient_against_the_exact_hessian():
    x, y, sign = small_data()                                  # p = 40/80 of the examples carry x_0 = ±6
    assert torch.allclose(x.T @ x / 80, torch.diag(torch.tensor([18.0, 1, 0.25]).double()), atol=1e-12)
    assert torch.equal(x[:, 0], 6.0 * sign.double()) and torch.allclose(x[sign > 0, 1:], x[sign < 0, 1:])
    assert torch.allclose(y, x[:, 1:].sum(1) + 0.5 * sign.abs().double(), atol=1e-12) and sign.sum() == 0
    model = learned_state(x, torch.tensor([1.0, 1.0], dtype=torch.float64))
    top = float(torch.linalg.eigvalsh(dense_hessian(model, osig.regression_loss, x, y))[-1])
    assert osig.predicted_sharpness(model, 18.0) == pytest.approx(top, rel=0.02)
    assert 18.0 * math.sqrt(2) == pytest.approx(top, rel=0.02)                      # p α² |β|
    far = osig.TwoLayerLinear(3, width=4, init_scale=0.7, seed=3)       # far from a fit: w_o, residual large
    H, A, b = dense_hessian(far, osig.regression_loss, x, y), far.A.detach(), far.b.detach()
    direction = torch.cat([torch.outer(b, torch.eye(3, dtype=torch.float64)[0]).reshape(-1), A[:, 0]])
    quotient = osig.opposing_rayleigh_quotient(far, x, y)        # along θ_o = (b e_oᵀ, A e_o) / √S
    assert quotient == pytest.approx(float(direction @ H @ direction / direction.norm() ** 2), rel=1e-10)
    assert quotient <= float(torch.linalg.eigvalsh(H)[-1]) + 1e-10

def test_one_step_on_the_opposing_block_matches_the_derivation():
    x, y, _ = small_data()            # at an exact fit of the genuine part only the opposing block moves
    model, lr = learned_state(x, torch.tensor([1.0, 1.0], dtype=torch.float64), init_scale=0.0), 0.05
    with torch.no_grad():
        model.A[:, 0] = 0.3 * model.b                                        # w_o = 0.3 |b|² != 0
        S, w_o = float(model.A[:, 0] @ model.A[:, 0] + model.b @ model.b), osig.opposing_weight(model)
    grads = torch.autograd.grad(osig.regression_loss(model(x), y).mean(), list(model.parameters()))
    with torch.no_grad():
        [p.sub_(lr * g) for p, g in zip(model.parameters(), grads)]
        assert float(model.A[:, 0] @ model.A[:, 0] + model.b @ model.b) == pytest.approx(
            S - lr * 18 * w_o ** 2 * (4 - lr * 18 * S), rel=1e-10)
    assert osig.opposing_weight(model) / w_o == pytest.approx(1 - lr * 18 * S + (lr * 18 * w_o) ** 2, 1e-10)

def run_gd(lr, steps):                  # plain GD from a small init: w_o, the predicted sharpness, L+ − L−
    x, y, sign = osig.make_opposing_signal_data(50, 100, 6.0, (1.0, 0.5), offset=0.5, seed=0)
    model, record = osig.TwoLayerLinear(x.shape[1], width=6, init_scale=0.01, seed=0), []
    for _ in range(steps):
        losses = osig.regression_loss(model(x), y)
        grads, losses = torch.autograd.grad(losses.mean(), list(model.parameters())), losses.detach()
        record.append([osig.opposing_weight(model), osig.predicted_sharpness(model, 18.0),
                       float(losses[sign > 0].mean() - losses[sign < 0].mean())])
        with torch.no_grad():
            [p.sub_(lr * g) for p, g in zip(model.parameters(), grads)]
    return np.array(record).T

def test_period_two_flips_for_large_lr_and_none_for_small_lr():
    # p α² |β| = 18·√2 = 25.5: above 2/lr = 15 for lr 0.133, below 1/lr = 33 for lr 0.03
    (w, sharp, gap), (w_small, sharp_small, gap_small) = run_gd(2 / 15, 400), run_gd(0.03, 1500)
    assert sharp.max() > 15 and osig.period_two_fraction(w) > 0.2
    edges = np.flatnonzero(np.diff(np.r_[0, (w[1:] * w[:-1] < 0).astype(int), 0]))
    assert (edges[1::2] - edges[::2]).max() >= 30                           # a sustained period-2 oscillation
    assert osig.period_two_fraction(w_small) == 0 and sharp_small[-1] == pytest.approx(18 * 2 ** 0.5, 0.02)
    assert np.allclose(gap, -6.0 * w) and np.allclose(gap_small, -6.0 * w_small)   # L+ − L− = −2 α offset w_o

# ------------------------------------------------------------ 6. Toy network

@pytest.mark.parametrize("outputs", [1, 2])
def test_toy_curvature_is_the_exact_hessian_block_of_the_x0_column(outputs):
    x, y, _ = small_data(alpha=8.0)  # f is piecewise linear in the first layer: the block is Gauss-Newton
    loss_fn, y = (osig.regression_loss, y) if outputs == 1 else (osig.cross_entropy_loss, (y > 0).long())
    model = osig.make_toy_network(3, width=6, weight_scale=1.0, hidden_bias=0.1, seed=1, num_outputs=outputs)
    call, weight = torch.func.functional_call, model[0].weight.detach()
    block = torch.func.hessian(lambda w: loss_fn(call(model, {"0.weight": w}, (x,)), y).mean())(weight)
    top = float(torch.linalg.eigvalsh(block[:, 0, :, 0].detach())[-1])
    assert osig.opposing_curvature(model, x) == pytest.approx(top, rel=1e-10)

def test_toy_network_starts_linear_in_x0_and_groups_oppose():
    x, y, sign = small_data(alpha=8.0)
    model, (probes, grid) = osig.make_toy_network(3, width=16), osig.opposing_probes(8.0, 3)
    with torch.no_grad():
        active, outputs = model[0](x) > 0, model(probes)[:, 0]
    assert bool((active[sign > 0] & active[sign < 0]).all())             # every unit sees both signs linearly
    odd, even = osig.odd_even_parts(outputs[None], grid, 8.0)
    assert abs(even[0]) < 1e-12 and odd[0] == pytest.approx(float(outputs[30] - outputs[10]) / 2)
    plus, minus = (g[:48].view(16, 3)[:, 0] for g in osig.group_gradients(      # on the column reading x_0
        model, osig.regression_loss, x, y, [sign > 0, sign < 0]))
    assert plus @ minus / (plus.norm() * minus.norm()) < -0.99         # a linear network's groups oppose

# ------------------------------------------------------------ 7. Adam versus SGD

@pytest.mark.parametrize("chunk", [None, 5])
def test_preconditioned_eigenvalues_match_dense(chunk):
    model, x, y = small_problem()
    scale = (10 * torch.from_numpy(np.random.default_rng(0).random(203)) + 0.1) ** -0.5        # P^-½
    H = scale[:, None] * dense_hessian(model, osig.cross_entropy_loss, x, y) * scale[None, :]
    values = osig.top_eigenvalues(model, osig.cross_entropy_loss, x, y, 3, chunk, 300, 1e-10, scale=scale)[0]
    assert np.allclose(values.numpy(), np.linalg.eigvalsh(H.numpy())[::-1][:3], rtol=1e-7)

@pytest.mark.parametrize("name, momentum", [("gd", 0.0), ("sgd", 0.9), ("adam", 0.9)])
def test_stability_threshold_on_a_quadratic(name, momentum):
    parameter, lr = [torch.zeros(1, requires_grad=True)], 0.1   # L = λθ²/2; Adam's preconditioner frozen at 1
    threshold = osig.stability_threshold(torch.optim.Adam(parameter, lr=lr) if name == "adam" else
                                         torch.optim.SGD(parameter, lr=lr, momentum=momentum))
    for factor, stable in ((0.97, True), (1.03, False)):    # the updates: heavy ball; Adam's bias-corrected m
        theta, buffer = 1.0, 0.0
        for t in range(1, 1001):                     # (bias correction makes Adam's first steps 10x larger)
            buffer = momentum * buffer + (0.1 if name == "adam" else 1.0) * factor * threshold * theta
            theta -= lr * buffer / (1 - 0.9 ** t if name == "adam" else 1.0)
        assert abs(theta) < 1e-3 if stable else abs(theta) > 1e3

def run_optimizer(make, steps=6):
    model, x, y = small_problem()
    opt = make(model.parameters())
    for t in range(steps):
        opt.zero_grad()
        osig.cross_entropy_loss(model(x[4 * t % 24:][:8]), y[4 * t % 24:][:8]).mean().backward()
        opt.step()
    return flat_params(model), opt

def test_split_sgd_top_quantile_and_adaptive_preconditioner():
    split = run_optimizer(lambda p: osig.SplitSGD(p, lr=0.05, normalized_lr=0.01, quantile=0.0))[0]
    sgd = run_optimizer(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))[0]
    assert torch.allclose(split, sgd, rtol=0, atol=1e-14)                  # the same steps up to the last bit
    split = run_optimizer(lambda p: osig.SplitSGD(p, 0.05, 0.01, 1.0, betas=(0.8, 0.99), eps=1e-7))[0]
    adam = run_optimizer(lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-7))[0]
    assert torch.allclose(split, adam, rtol=0, atol=1e-13) and not torch.allclose(split, sgd, atol=1e-3)
    opt = run_optimizer(lambda p: osig.SplitSGD(p, lr=0.05, normalized_lr=0.01, quantile=0.25))[1]
    states = [opt.state[p] for p in opt.param_groups[0]["params"]]
    for mask, v in ((state["normalized"], state["exp_avg_sq"]) for state in states):
        assert int(mask.sum()) == round(0.25 * v.numel()) and v[mask].min() >= v[~mask].max()
    mask, v = (torch.cat([state[key].flatten() for state in states]) for key in ("normalized", "exp_avg_sq"))
    P, expected = osig.adaptive_preconditioner(opt), 0.05 * ((v / (1 - 0.999 ** 6)).sqrt() + 1e-8) / 0.001
    assert torch.all(P[~mask] == 1) and torch.allclose(P[mask], expected[mask], rtol=1e-12)
    assert osig.stability_threshold(opt) == pytest.approx(76) and math.isnan(osig.stability_threshold(
        torch.optim.RMSprop([v])))                                                # (2 + 2·0.9)/0.05; unknown
    masks = [osig.top_quantile_mask(torch.tensor([[3.0, 1, 2], [5, 0, 4]]), q).tolist() for q in (0, 0.5, 1)]
    assert masks == [[[False] * 3] * 2, [[True, False, False], [True, False, True]], [[True] * 3] * 2]
    model, x, y = small_problem()
    opt, squares = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.9), eps=1e-6), 0.0
    assert osig.adaptive_preconditioner(opt) is osig.adaptive_preconditioner(torch.optim.SGD([x], 1)) is None
    for t in range(3):                               # Adam's P: the bias-corrected RMS + eps, after 3 steps
        opt.zero_grad()
        osig.cross_entropy_loss(model(x[8 * t:8 * t + 8]), y[8 * t:8 * t + 8]).mean().backward()
        squares = 0.9 * squares + 0.1 * torch.cat([p.grad.reshape(-1) for p in model.parameters()]) ** 2
        opt.step()
    assert torch.allclose(osig.adaptive_preconditioner(opt), (squares / (1 - 0.9 ** 3)).sqrt() + 1e-6, 1e-10)

def oscillation_reference(losses, labels, in_batch, top, intervals):
    rows = []                                          # opposing_group_oscillation's rule, spelled out
    for r in range(0, len(losses) - intervals - 2, intervals):
        change, pairs = losses[r + 1] - losses[r], []
        order = np.argsort(-np.abs(change))
        key = lambda j: (labels[j], change[j] > 0, in_batch[r, j])
        for i in order[:top]:       # the same label, sign and batch membership, nearest in |Δℓ|, not reused
            same = [j for j in order[top:] if key(j) == key(i) and j not in [c for _, c in pairs]]
            pairs += [(i, min(same, key=lambda j: abs(abs(change[j]) - abs(change[i]))))] if same else []
        chosen, control = (np.array([p[k] for p in pairs]) for k in (0, 1))
        up, span = change[chosen] > 0, losses[r + 2:r + 3 + intervals]
        if up.any() and not up.all():
            rows.append([np.mean([np.abs(np.diff(span[:, g[side]].mean(1))).mean() for side in (up, ~up)])
                         for g in (chosen, control)])
    return np.array(rows)

def test_opposing_group_oscillation_matches_label_sign_and_batch_and_finds_planted_antiphase():
    rng = np.random.default_rng(0)
    losses, labels = 1 + 0.05 * rng.standard_normal((80, 200)), rng.integers(0, 2, 200)
    in_batch = rng.random((80, 200)) < 0.5
    result = osig.opposing_group_oscillation(losses, labels, in_batch, 8, 10)
    expected = oscillation_reference(losses, labels, in_batch, 8, 10)
    assert len(expected) >= 3 and np.allclose([result["amplitude"], result["amplitude_matched"]], expected.T)
    losses, labels = 1 + 0.01 * rng.standard_normal((200, 1000)), rng.integers(0, 2, 1000)
    losses[:, :40] += 0.3 * (-1.0) ** np.arange(200)[:, None] * np.repeat([1, -1], 20)      # 20 against 20
    assert osig.opposing_group_oscillation(losses, labels, losses > 0, 40, 20)["median_relative"] > 10
    null = osig.opposing_group_oscillation(1 + 0.01 * rng.standard_normal((600, 1000)), labels,
                                           rng.random((600, 1000)) < 0.5, 40, 60)            # nothing planted
    assert 0.8 < null["median_relative"] < 1.25 and len(null["amplitude"]) >= 5

def test_optimizer_summary_of_a_short_sgd_run():
    model, x, y = small_problem(n=64)
    opt, loss = torch.optim.SGD(model.parameters(), 0.05, 0.9), osig.cross_entropy_loss
    sharpness = osig.sharpness_measure(loss, x, y, 4, iters=30, preconditioner=osig.adaptive_preconditioner)
    history = osig.train(model, x, y, loss, opt, 40, 8, log=None, measure=lambda step, model, opt: dict(
        sharpness(step, model, opt) or {}, losses=osig.per_example_losses(model, loss, x, y).numpy()))
    batches = osig.minibatches(64, 8, torch.Generator().manual_seed(0))
    in_batch = np.stack([np.isin(np.arange(64), next(batches)) for _ in range(40)])     # the batches it drew
    summary = osig.optimizer_summary(model, loss, history, opt, x, y, x, y, in_batch, 4, 5)
    losses, (steps, values) = osig.measured(history, "losses")[1], osig.measured(history, "eigenvalues")
    reference = oscillation_reference(losses[8:], y, in_batch[8:], 4, 5)
    assert summary["train_loss"] == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item())
    assert len(reference) >= 2 and summary["relative"] == pytest.approx(np.median(np.divide(*reference.T)))
    assert summary["ratio"] == pytest.approx(np.median(values[steps >= 18, 0]) * 0.05 / 3.8)    # 3.8/lr

# ------------------------------------------------------------ Appendix A. The larger models

@pytest.mark.parametrize("name", ["mlp", "cnn", "vgg11", "resnet18", "vit", "gpt"])
def test_every_model_is_twice_differentiable(name):
    torch.manual_seed(0)
    if name in ("vgg11", "resnet18"):                                         # VGG11 needs 32 x 32 images
        model = osig.VGG11(3, width=1) if name == "vgg11" else osig.ResNet18(3, width=1, batch_norm=False)
        size, y = 32 if name == "vgg11" else 16, torch.tensor([0, 2])
        model, x = model.double(), torch.randn(2, 3, size, size, dtype=torch.float64)
    else:
        model, x, y = tiny(name)
    u, v, w = torch.randn(3, len(flat_params(model)), dtype=torch.float64)
    torch.nn.utils.vector_to_parameters(flat_params(model) + 0.1 * w, model.parameters())  # off the zero init
    Hv, Hu = (osig.hvp(model, osig.cross_entropy_loss, x, y, z) for z in (v, u))
    assert torch.isfinite(Hv).all() and abs(u @ Hv - v @ Hu) <= 1e-10 * u.norm() * Hv.norm()
    if name in ("vgg11", "resnet18", "vit"):
        H = dense_hessian(model, osig.cross_entropy_loss, x, y)
        assert torch.linalg.norm(Hv - H @ v) / torch.linalg.norm(H @ v) < 1e-10

def test_the_gpt_is_causal_and_checks_its_context():
    model, x, _ = tiny("gpt")
    for t in range(5):
        changed = (x + (torch.arange(5) == t)) % 7                              # token t changed
        assert torch.equal(model(x)[:, :t], model(changed)[:, :t])
        assert not torch.allclose(model(x)[:, t], model(changed)[:, t])
    with pytest.raises(ValueError, match="context is 5"):
        model(torch.zeros(1, 6, dtype=torch.long))

# ------------------------------------------------------------ Appendix B. The data

def fake_archive(root, files):         # root/cifar-10-python.tar.gz holding cifar-10-batches-py/; its md5
    build = root.parent / f"{root.name}-build" / "cifar-10-batches-py"
    build.mkdir(parents=True), root.mkdir(exist_ok=True)
    [(build / name).write_bytes(data) for name, data in files.items()]
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(build, arcname="cifar-10-batches-py")
    return hashlib.md5((root / "cifar-10-python.tar.gz").read_bytes()).hexdigest()

def real_cifar(train):
    try:
        return osig.load_cifar10(train=train, download=False)
    except osig.DataError:
        pytest.skip('CIFAR-10 is absent: python ../shared/data/make_cifar10.py "$OSIG_DATA" builds it')

def test_cifar_loader_reads_the_official_format_never_runs_code_and_names_each_fix(tmp_path, monkeypatch):
    labels, data = np.arange(10000) * 7 % 10, np.add.outer(range(10000), range(3072)) % 256     # row i: i + k
    batch = pickle.dumps({b"data": data.astype(np.uint8), b"labels": labels.tolist(), b"batch_label": b"t"})
    monkeypatch.setattr(osig, "CIFAR10_MD5", fake_archive(tmp_path / "ok", {"test_batch": batch}))
    monkeypatch.setenv("OSIG_DATA", str(tmp_path / "ok"))
    images, got = osig.load_cifar10(train=False, download=False)
    i, h, w, c = np.ix_(range(50), range(32), range(32), range(3))          # channel-major rows, HWC images
    assert images.shape == (10000, 32, 32, 3) and got.dtype == torch.int64 and np.array_equal(got, labels)
    assert np.array_equal(images[:50], (i + c * 1024 + h * 32 + w) % 256) and images.dtype == torch.uint8
    assert sorted(os.listdir(tmp_path / "ok")) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    code = f"cposix\nsystem\n(S'touch {tmp_path}/ran'\ntR.".encode()          # a pickle that runs a command
    fake_archive(tmp_path / "bad", {"test_batch": b"x"})                    # its md5 is not CIFAR10_MD5
    for name, data in (("cut", batch[:-100]), ("code", code + bytes(31_000_000))):
        (tmp_path / name / "cifar-10-batches-py").mkdir(parents=True)
        (tmp_path / name / "cifar-10-batches-py" / "data_batch_1").write_bytes(data)
    for name, message in (("empty", "not found.*OSIG_DATA"), ("bad", "corrupted"), ("cut", "batch_1 is not"),
                          ("code", "batch_1 .*refusing")):
        with pytest.raises(osig.DataError, match=message):
            osig.load_cifar10(tmp_path / name, download=False)
    pickle.loads(code.replace(b"ran", b"control"))                  # the payload does run under plain pickle
    assert (tmp_path / "control").exists() and not (tmp_path / "ran").exists()
    monkeypatch.undo()                                  # the real data set, where $OSIG_DATA holds it
    for train, per_class in ((True, 5000), (False, 1000)):
        images, labels = real_cifar(train)
        assert images.shape == (10 * per_class, 32, 32, 3) and images[:100].float().std() > 30  # not constant
        assert torch.equal(torch.bincount(labels), torch.full((10,), per_class))

def test_tiny_shakespeare_loader_checks_size_regular_file_and_md5(tmp_path, monkeypatch):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(osig, "SHAKESPEARE_BYTES", len(text))
    monkeypatch.setattr(osig, "SHAKESPEARE_MD5", hashlib.md5(text.encode()).hexdigest())
    cases = {"good": text, "short": text[:-1], "other": text.upper(), "fifo": 0, "none": ""}
    for name, content in cases.items():
        (path := tmp_path / name / "tinyshakespeare" / "input.txt").parent.mkdir(parents=True)
        os.mkfifo(path) if content == 0 else path.write_text(content) if content else None
        if name == "good":
            assert osig.load_tiny_shakespeare(tmp_path / name, download=False) == text
        else:                                   # the wrong size or md5, not a regular file, or no file at all
            with pytest.raises(osig.DataError, match=f"{name}/tinyshakespeare/input.txt.*OSIG_DATA"):
                osig.load_tiny_shakespeare(tmp_path / name, download=False)
    monkeypatch.undo()                                  # the real text, where $OSIG_DATA holds it
    try:
        text = osig.load_tiny_shakespeare(download=False)
    except osig.DataError:
        pytest.skip("tiny Shakespeare is absent: copy ../shared/data/tinyshakespeare/input.txt to "
                    "$OSIG_DATA/tinyshakespeare/")
    assert len(text) == 1115394 and len(set(text)) == 65 and text.startswith("First Citizen")

@pytest.mark.parametrize("text", [False, True])
def test_os_errors_become_data_errors_that_name_the_fix(tmp_path, monkeypatch, text):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("OSIG_DATA", str(tmp_path / "a-file"))                 # OSIG_DATA naming a file
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: pytest.fail("nothing to download"))
    with pytest.raises(osig.DataError, match="OSIG_DATA"):
        osig.load_tiny_shakespeare() if text else osig.load_cifar10()
    monkeypatch.setattr(osig, "CIFAR10_MD5", fake_archive(tmp_path / "locked", {"test_batch": b"x"}))
    (tmp_path / "locked").chmod(0o555)                       # read-only, and the archive not yet extracted
    if os.access(tmp_path / "locked", os.W_OK):
        pytest.skip("running as root: a read-only folder is still writable")
    with pytest.raises(osig.DataError, match="writable folder"):
        osig.cifar10_folder(tmp_path / "locked", download=False)

def extract_together(root, barrier, queue):      # in a forked child: rename only once both have extracted
    replace = os.replace
    os.replace = lambda source, target: (barrier.wait(timeout=60), replace(source, target))
    queue.put(str(osig.cifar10_folder(root, download=False)))

def test_two_processes_extracting_at_once_both_get_the_folder_and_stale_staging_goes(tmp_path, monkeypatch):
    files = {f"data_batch_{i}": os.urandom(1 << 16) for i in range(1, 4)}
    monkeypatch.setattr(osig, "CIFAR10_MD5", fake_archive(tmp_path, files))
    for name, age in (("old", 7200), ("new", 600)):            # left by killed runs: over an hour ago, or not
        (tmp_path / f".cifar10-staging-{name}" / "cifar-10-batches-py").mkdir(parents=True)
        os.utime(tmp_path / f".cifar10-staging-{name}", (time.time() - age,) * 2)
    barrier, queue = (context := multiprocessing.get_context("fork")).Barrier(2), context.Queue()
    workers = [context.Process(target=extract_together, args=(tmp_path, barrier, queue)) for _ in range(2)]
    [worker.start() for worker in workers] + [worker.join(timeout=120) for worker in workers]
    assert [queue.get(timeout=1) for _ in workers] == [str(tmp_path / "cifar-10-batches-py")] * 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "cifar-10-batches-py").iterdir()} == files
    assert [p.name for p in tmp_path.glob(".cifar10-staging-*")] == [".cifar10-staging-new"]

def test_download_checked_writes_through_a_unique_part_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    payload, renames, replace = b"to be, or not to be\n" * 1000, [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renames.append((a.name, b)) or replace(a, b))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: socket.socket().makefile(
        "rb") if "drop" in url else io.BytesIO(payload))        # an unconnected socket: the connection drops
    target, md5 = tmp_path / "ok" / "input.txt", hashlib.md5(payload).hexdigest()
    for _ in range(2):                                      # a second call replaces the file the same way
        osig.download_checked("h/input.txt", target, md5)
        assert target.read_bytes() == payload and os.listdir(target.parent) == ["input.txt"]
    assert [b for _, b in renames] == [target] * 2 and renames[0] != renames[1]
    assert all(re.fullmatch(r"\.input\.txt\.[0-9a-f]{32}\.part", source) for source, _ in renames)
    for url, md5, message in (("h/drop", md5, "not connected"), ("h/input.txt", "0" * 32, "corrupt")):
        with pytest.raises(osig.DataError, match=message):
            osig.download_checked(url, tmp_path / "fail" / "input.txt", md5)
        assert os.listdir(tmp_path / "fail") == []

# ------------------------------------------------------------ Appendix C. Scoring the claims

def test_sign_episode_and_growth_helpers_against_explicit_definitions():
    rng, lr, T = np.random.default_rng(0), 0.1, 200
    (plus, minus, lam), values = rng.uniform(0.5, 1.5, (3, T)) + [[0], [0], [1]], rng.normal(size=T)
    mask, first = osig.oscillation_episode(plus, minus, lam, 2.3, 0.3), np.argmax(lam >= 2.3)
    gap = np.abs(plus - minus) >= 0.15 * (plus + minus)                 # |L+ − L−| >= 0.3 · their mean
    assert first > 0 and mask.any() and np.array_equal(mask, gap & (np.arange(T) >= first))
    flips = values[1:] * values[:-1] < 0
    assert osig.period_two_fraction(values) == pytest.approx(np.mean(flips[1:] & flips[:-1]))
    assert osig.period_two_fraction([2, 1, 0, -1, -2]) == 0          # a drift through an exact 0 flips once
    assert osig.consecutive_sign_changes(values, mask) == pytest.approx(np.mean(flips[mask[1:] & mask[:-1]]))
    lam, episode = 25 + 3 * np.sin(np.arange(60)), (np.arange(60) >= 10) & (np.arange(60) < 40)
    for rate in (1.0, 1.3):                    # outside the episode w moves at random: that must not count
        factors = np.where(episode, rate * (1 - lr * lam), rng.uniform(-3, 3, 60))
        weight = np.cumprod(np.r_[1, factors[:-1]])
        assert osig.flip_growth(weight, lam, lr, episode) == pytest.approx(rate)
    even = np.array([0.0, 0.1, 0.3, 0.45, 0.6, 0.5, 1.0, 0.9])         # half of the final 0.9 first at 3
    assert osig.half_learned_step(even) == 3 and osig.half_learned_step(-even) == 8
    assert osig.late_fall([1, 2, 4, 3, 3, 3, 3, 3, 3, 2]) == pytest.approx(1 - 2 / 4)  # last 10%: 2; peak 4

def test_null_test_is_calibrated_where_the_null_holds_and_finds_a_planted_shift():
    rng, results = np.random.default_rng(0), []
    for _ in range(1000):                                       # the selections share a common shift
        null = (shared := rng.normal(size=(12, 1))) + rng.normal(size=(12, 100))
        results.append(osig.null_test(shared[:, 0] + rng.normal(size=12), null))
    z, p = np.array(results).T
    assert 0.02 <= np.mean(p < 0.05) <= 0.09 and abs(np.mean(z)) < 0.15 and 0.85 < np.std(z) < 1.15
    (z, p), (z_up, p_up) = (osig.null_test(shared[:, 0] - 1.5, null, side) for side in ("less", "greater"))
    assert z > 3 and p == 1 / 101 and z_up == -z and p_up == 1
    assert osig.null_test([3], [[1, 2, 3, 4]])[1] == 3 / 5 and np.isnan(osig.null_test([np.nan], null[:1])[1])

def test_gram_statistics_and_selection_test_against_explicit_vectors_and_a_planted_direction():
    rng = np.random.default_rng(0)
    v, first, second = rng.normal(size=(10, 4)), rng.integers(0, 10, (5, 3)), rng.integers(0, 10, (5, 2))
    a, b, gram = v[first].sum(1), v[second].sum(1), v @ v.T                  # 5 draws of 3 and of 2 vectors
    assert np.allclose(osig.gram_mean(gram, first, second), (a * b).sum(1) / 6)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.allclose(osig.gram_cosine(gram, first, second), cosine)
    for planted in (3.0, 0.0):                   # both groups of outliers share a direction, or nothing
        features = rng.normal(size=(10, 40, 16)) + planted * (np.arange(40) < 8)[:, None] * np.eye(16)[0]
        change = np.sort(rng.uniform(0.1, 1, (10, 40)))[:, ::-1] * rng.choice([-1, 1], (10, 40))
        grams, keys = np.einsum("scd,sed->sce", features, features), rng.integers(0, 2, (10, 40))
        z, p = osig.selection_test(grams, change, keys, 8, draws=200)
        assert (z > 4 and p < 0.01) if planted else abs(z) < 2.5

def test_lookalike_test_and_pair_contrast_find_planted_antiphase_and_nothing_without_it(monkeypatch):
    rng, labels, wave = np.random.default_rng(2), np.arange(400) % 2, (-1.0) ** np.arange(160)[:, None]
    outliers, carriers, chosen = np.arange(8), np.arange(100, 108), np.tile(np.r_[:8, 200:208], (3, 1))
    change = np.tile(np.r_[1 - 2.0 * labels[outliers], np.full(8, 0.01)], (3, 1))     # class 0 up, 1 down
    for feature in (1, 0):
        unit, losses = rng.normal(size=(400, 12)), 1 + 0.1 * rng.normal(size=(160, 400))
        unit[np.r_[outliers, carriers], 0] += 6.0 * feature
        losses[:, carriers] += 0.1 * feature * wave * (1 - 2 * labels[carriers])
        unit /= np.linalg.norm(unit, axis=1)[:, None]
        z = osig.lookalike_test(losses, [10, 50, 90], chosen, change, labels, unit, 8, [1] * 3, draws=99)[0]
        assert z > 2 if feature else abs(z) < 2
    masks = [np.isin(np.arange(400), g) for g in (range(10), range(10, 25), range(100, 103), range(250, 400))]
    calls, antiphase = [], osig.antiphase
    monkeypatch.setattr(osig, "antiphase", lambda s, a, b: calls.append((a, b)) or antiphase(s, a, b))
    contrast = osig.pair_contrast(losses + 0.5 * wave * (masks[0] * 1.0 - masks[1]), *masks, draws=100)
    assert [(a.shape, b.shape) for a, b in calls] == [((100, 3), (100, 15))] * 2   # cut to the other's size
    assert contrast["pair"] < -0.9 and abs(contrast["control"]) < 0.6 and contrast["low"] > 0.3
    null = osig.pair_contrast(losses, masks[0], masks[1], np.isin(np.arange(400), range(100, 250)), masks[3])
    assert null["low"] < 0 < null["high"] and masks[0][calls[0][0]].all() and masks[3][calls[1][1]].all()

def test_spike_tail_alignment_probe_and_paste_statistics_against_explicit_computations():
    rng, loss = np.random.default_rng(0), np.exp(-np.arange(300) / 100)
    loss[[s + k for s in (40, 120, 180, 250) for k in range(3)]] += 0.2         # 1 before step 100, 3 after
    assert osig.spike_rate(loss, 100) == pytest.approx(3 / 200 * 100) and np.isnan(osig.spike_rate(loss, 290))
    losses = 1 + 0.01 * rng.normal(size=(30, 500))
    losses[[6, 13, 21], :5] += 5.0                       # 1% of the examples make the rises at 5, 12, 20
    change = np.abs(np.diff(losses, axis=0))
    share = np.sort(change, axis=1)[:, -5:].sum(1) / change.sum(1)
    assert osig.tail_share(losses, 2, 25, 3) == pytest.approx(np.median(share[[5, 12, 20]]))
    assert osig.tail_share(losses, 13, 25, 1) == pytest.approx(share[20])
    u = rng.random((4, 15))
    assert np.allclose(osig.excess_alignment(u, 3, 10), np.median(u[:, :3], 1) - np.median(u[:, 10:], 1))
    out, losses = rng.normal(0, 0.1, (40, 3, 10)) * [[1], [1], [3]], rng.random((40, 200))
    labels, sky = np.arange(200) % 10, rng.random(200) < 0.3
    pick = np.isin(labels, (0, 2))                                   # classes 0 and 2: sky minus no sky
    difference = losses[:, sky & pick].mean(1) - losses[:, ~sky & pick].mean(1)
    out[:, 0, 0] += 3 * difference                               # probe 0 follows the sky feature
    step = np.diff(out[:, :, [0, 2]].mean(-1), axis=0)
    swing = np.abs(step).mean(0)
    assert osig.probe_swing(out, (0, 2)) == pytest.approx(swing[0] / swing[1:].max())
    track = [abs(np.corrcoef(step[:, k], np.diff(difference))[0, 1]) for k in (0, 1)]
    shift = rng.normal(0, 0.01, (120, 3))
    shift[60:, 0] += 0.5 * (-1.0) ** np.arange(60)
    ratio = np.abs(np.diff(shift, axis=0))[60:110].mean(0) / np.abs(np.diff(shift, axis=0))[:40].mean(0)
    assert osig.paste_swing(shift, 60) == pytest.approx(np.log(ratio[0] / ratio[1])) and track[0] > 0.5
    assert np.isnan(osig.paste_swing(shift, 80)) and ratio[0] > 20 * ratio[1]

def test_intervention_endpoints_feature_shares_and_early_layers_against_known_answers():
    per_example = np.tile(np.exp(-np.arange(60) / 30.0)[:, None], (1, 4)).astype(np.float32)
    per_example[30:, 0] += 0.1 * (-1.0) ** np.arange(30)              # the pair swings by 0.2 per step
    measured, pair = [{"step": s, "eigenvalues": [1 + s / 10]} for s in range(0, 60, 5)], np.eye(4)[:2] > 0
    result = osig.intervention_endpoints(dict(per_example_loss=per_example, measured=measured), 1, pair)
    assert (result["crossing"], result["approach"], result["curve"][5]) == pytest.approx((10, 4, 1.5))
    assert result["antiphase"] == pytest.approx((0.1 + 0.2 * 29) / 49, 1e-5) and np.isnan(result["curve"][1])
    rng = np.random.default_rng(3)
    x, y = (torch.from_numpy(rng.integers(0, 4, (50, 6))) for _ in range(2))
    names, features = osig.token_features(x, y, "abcd")
    inside, main = x.reshape(-1).numpy() == 1, y.reshape(-1).numpy() == 2   # 'c' after 'b' moves most
    index = np.stack([rng.choice(np.flatnonzero(inside & main), 8), rng.choice(np.flatnonzero(inside), 8)])
    change, mass = rng.uniform(0.5, 1, (2, 8)) * [[1], [0.2]] * rng.choice([-1, 1], (2, 8)), np.zeros(300)
    np.add.at(mass, index.ravel(), np.abs(change.ravel()))     # (repeats within and across selections)
    share, base = osig.feature_shares(features, index, change)
    assert np.allclose(share, features @ mass / mass.sum()) and np.allclose(base, features.mean(1))
    ratio = share / base
    assert osig.top_feature(features, index, change) == (np.argmax(ratio), pytest.approx(max(ratio)))
    assert names[np.argmax(ratio)] in ("target 'c'", "after 'b'")
    assert osig.early_layer_ratio(np.array([1.0, 2, 5, 3, 4, 1, 2])) == 5 / 4      # the first ceil(7/3)

def test_t_quantile_interval_and_detectable_effect_against_tabulated_quantiles_and_simulation():
    for q, dof, value in ((0.975, 1, 12.706), (0.975, 4, 2.776), (0.975, 19, 2.093), (0.8, 19, 0.861),
                          (0.025, 4, -2.776)):
        assert osig.t_quantile(q, dof) == pytest.approx(value, abs=2e-3)
    values, rng = np.r_[np.random.default_rng(0).normal(size=5), np.nan], np.random.default_rng(1)
    mean, half = np.nanmean(values), 2.776 * np.nanstd(values, ddof=1) / math.sqrt(5)   # nan dropped
    assert osig.t_interval(values) == pytest.approx((mean, mean - half, mean + half), abs=1e-3 * half)
    d = osig.detectable_effect(2.0, 20)
    values = rng.normal(d, 2.0, (400, 20))                  # paired differences at that effect
    half = 2.093 * values.std(1, ddof=1) / math.sqrt(20)
    assert d == pytest.approx((2.093 + 0.861) * 2 / 20 ** 0.5, 1e-3) and np.isnan(osig.t_interval([2])[2])
    assert abs(np.mean((values.mean(1) - half > 0) | (values.mean(1) + half < 0)) - 0.8) < 0.08

# ------------------------------------------------------------ run_all

def smoke(tmp_path, *only, extra=()):
    """run_all.main on the smoke profile into tmp_path/r for the named experiments; returns (exit code, out).
    """
    out = tmp_path / "r"
    argv = ["--profile", "smoke", "--out", str(out), *extra] + [a for name in only for a in ("--only", name)]
    return run_all.main(argv), out

def verdicts(name, cfg, out, args_out=None):
    """The judged verdicts of an experiment's saved records, by claim text."""
    args = run_all.parse_args(["--profile", "smoke", "--out", str(args_out or out)])
    result = run_all.experiment(name, cfg, args, compute=False, draw=False)
    return {v["claim"]: v for v in result["verdicts"]}

def sizes():
    """Lines of the three files, and of osig's story (its header through section 7)."""
    lines = {name: (HERE / name).read_text(encoding="utf-8").split("\n")
             for name in ("osig.py", "run_all.py", "test_osig.py")}
    story = inspect.getsource(osig).split("# " + "-" * 60 + " Appendix A")[0].count("\n")
    return lines, story

def test_every_line_fits_and_osig_and_the_tests_keep_their_budgets():
    lines, story = sizes()
    assert all(len(line) <= 110 for text in lines.values() for line in text), "a line over 110 columns"
    assert story <= 1100 and len(lines["osig.py"]) <= 1600 and len(lines["test_osig.py"]) <= 1500

@pytest.mark.xfail(strict=True, reason="run_all.py is over its 800-line budget: issue 22's closing note")
def test_run_all_keeps_its_budget():
    assert len(sizes()[0]["run_all.py"]) <= 800

def test_claims_are_rows_of_at_most_two_lines_with_a_labelled_source():
    tree = ast.parse((HERE / "run_all.py").read_text(encoding="utf-8"))
    rows = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                and getattr(node.targets[0], "id", "") == "CLAIMS")
    assert all(row.end_lineno - row.lineno <= 1 for row in rows.elts)
    assert all(row.source.split()[0].strip(";,") in ("paper", "recalled", "ours", "calibration")
               for row in run_all.CLAIMS)
    assert all(row.source in ("setting", "derivation", "diagnostic") for row in run_all.CHECKS)
    assert {row.claim for row in run_all.CLAIMS}.isdisjoint(row.claim for row in run_all.CHECKS)

def test_judge_tallies_claims_against_targets_seeds_and_surrogates(monkeypatch):
    rows = [run_all.Claim("gd", "value above one", lambda r: r["v"], ">= 1", "ours"),
            run_all.Claim("gd", "needs a setting", lambda r: r["v"], ">= 1", "ours",
                          requires=lambda r: r["ok"]),
            run_all.Claim("gd", "a z and a p", lambda r: (r["v"], 0.01), ">= 1", "ours")]
    monkeypatch.setattr(run_all, "CLAIMS", rows)
    monkeypatch.setattr(run_all, "CHECKS", [run_all.Claim("gd", "a check", lambda r: r["v"], "<= 9",
                                                          "setting")])
    cfg, quiet = run_all.GDConfig(data="planted", model="mlp"), lambda *a: None

    def judged(values, surrogates=(), ok=True):
        found = run_all.judge(cfg, [{"v": v, "ok": ok} for v in values], [{"v": v} for v in surrogates],
                              quiet)
        return {v["claim"]: v for v in found}

    assert judged([2, 3])["value above one"]["status"] == "met" and not judged([2, 3])["a check"]["counted"]
    half = judged([2, 0.5])["value above one"]
    assert half["seeds"] == "1/2" and not half["met"]
    assert judged([2, np.nan])["value above one"]["status"] == "not measurable"
    assert judged([2, 3], [0.1, 2.5, 0.2])["value above one"]["status"] == "surrogate passes too"
    assert judged([2, 3], [0.1, 0.5, 0.2])["value above one"]["status"] == "met"
    assert judged([2, 3], [np.nan])["value above one"]["status"] == "surrogate not measurable"
    assert judged([2, 3], ok=False)["needs a setting"]["status"] == "setting check failed"
    assert judged([2, 3])["a z and a p"]["p"] == [0.01, 0.01]
    monkeypatch.setattr(run_all, "CLAIMS", [run_all.Claim("gd", "a typo", lambda r: r["vv"], ">= 1", "ours")])
    with pytest.raises(KeyError):                       # a bug raises; only a nan reads "not measurable"
        run_all.judge(cfg, [{"v": 1}], [], quiet)

def test_smoke_run_writes_records_report_and_figures_and_reuses_them(tmp_path, capsys):
    code, out = smoke(tmp_path, "linear", "planted_dose")
    assert code == 0 and (out / "linear" / "seed0.npz").exists() and (out / "linear" / "linear.png").exists()
    report = (out / "report.md").read_text()
    assert "## linear" in report and "derivation" in report and "not run" in report    # the others: not run
    capsys.readouterr()
    assert smoke(tmp_path, "linear")[0] == 0 and "===" not in capsys.readouterr().out     # reused
    cfg = run_all.PROFILES["smoke"]["cifar_ce"]
    key = run_all.record_key(cfg, "cpu")
    assert run_all.record_key(dataclasses.replace(cfg, lr=0.3), "cpu") != key
    original = run_all.GREEN                            # a module constant the runs read is part of the key
    try:
        run_all.GREEN = (1, 2, 3)
        assert run_all.record_key(cfg, "cpu") != key
    finally:
        run_all.GREEN = original

def test_the_key_ignores_comments_and_docstrings_and_no_git_still_gives_a_report(tmp_path, monkeypatch):
    cfg, original = run_all.PROFILES["smoke"]["linear"], inspect.getsource
    key = run_all.record_key(cfg, "cpu")

    def key_with(change):
        monkeypatch.setattr(inspect, "getsource", lambda f: change(original(f)) if f is run_all.run_linear
                            else original(f))
        return run_all.record_key(cfg, "cpu")

    assert key_with(lambda s: s.replace('"""The two-layer', '# a comment\n    """A revised two-layer')) == key
    assert key_with(lambda s: s.replace("cfg.large_steps)", "cfg.large_steps + 0)")) != key
    monkeypatch.undo()
    monkeypatch.setenv("PATH", "")                      # a slim image without git
    run_all.write_report(tmp_path, {}, "smoke", "cpu")
    assert "commit `unknown`" in (tmp_path / "report.md").read_text()

@pytest.mark.parametrize("damage", ["missing", "shape", "dtype", "bytes"])
def test_a_record_that_breaks_its_declaration_is_recomputed_with_one_warning(tmp_path, capsys, damage):
    code, out = smoke(tmp_path, "planted_dose")
    path = out / "planted_dose" / "seed0.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.pop("lr") if damage == "missing" else None
    arrays["steps"] = arrays["steps"][:-1] if damage == "shape" else arrays["steps"]
    arrays["sharpness"] = arrays["sharpness"] > 1 if damage == "dtype" else arrays["sharpness"]
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 damaged") if damage == "bytes" else np.savez_compressed(f, **arrays)
    capsys.readouterr()
    assert smoke(tmp_path, "planted_dose")[0] == 0
    printed = capsys.readouterr().out
    assert printed.count("warning:") == 1 and "=== planted_dose, seed 0" in printed

def test_divergence_keeps_the_record_padded_with_nan_and_the_claims_read_nan(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(run_all.PROFILES["smoke"], "linear", run_all.LinearConfig(
        large_steps=300, small_steps=50, large_lr=1.0))
    code, out = smoke(tmp_path, "linear")
    assert code == 0 and "training diverged at step" in (out / "report.md").read_text()
    cfg = run_all.PROFILES["smoke"]["linear"]
    record = run_all.saved(out / "linear" / "seed0.npz", run_all.record_key(cfg, "cpu"), cfg)[0]
    assert len(record["large"]["loss"]) == 300 and np.isnan(record["large"]["loss"][-1])
    capsys.readouterr()
    assert smoke(tmp_path, "linear")[0] == 0 and "===" not in capsys.readouterr().out     # kept, not redone

def test_faults_end_cleanly_and_name_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OSIG_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(osig, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    out = tmp_path / "with space"                       # hints quote --out
    argv = ["--profile", "smoke", "--data", "cifar10", "--out", str(out), "--only", "cifar_mse"]
    assert run_all.main(argv) == 2
    report = (out / "report.md").read_text()
    assert "skipped" in report and "OSIG_DATA" in report and f"--out '{out}'" in report
    monkeypatch.setitem(run_all.RUNS, "linear", lambda cfg, seed, device, log: 1 / 0)
    (out / ".lock").symlink_to(tmp_path / "target")     # no lock file: a symlink there is left alone
    (tmp_path / "target").write_text("keep")
    (out / "linear").mkdir()
    (out / "linear" / "result.json").write_text("{damaged")          # never read back
    assert run_all.main(["--profile", "smoke", "--out", str(out), "--only", "linear", "--only",
                         "planted_dose"]) == 1
    report = (out / "report.md").read_text()
    assert "ZeroDivisionError" in report and "| planted_dose | done |" in report and "&gt;" not in report
    assert (tmp_path / "target").read_text() == "keep"
    for argv, message in ((["--only", "bogus"], "unknown experiment"), (["--seed", "-1"], "seeds must be in"),
                          (["--device", "meta"], "cannot run"),
                          (["--out", str(tmp_path / "target")], "writable")):
        with pytest.raises(SystemExit):
            run_all.main(["--profile", "smoke", "--out", str(tmp_path / "never")] + argv)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()            # nothing written before the arguments are checked
    strange = os.fsdecode(bytes(tmp_path) + b"/r\xff")  # a folder whose name is not UTF-8
    assert run_all.main(["--profile", "smoke", "--out", strange, "--only", "planted_dose"]) == 0
    assert (Path(strange) / "report.md").exists()

def test_claims_need_no_write_access_and_follow_seed_and_data(tmp_path, capsys):
    code, out = smoke(tmp_path, "planted_dose", extra=("--seed", "3"))
    out.chmod(0o555)
    try:
        assert run_all.main(["--profile", "smoke", "--out", str(out), "--seed", "3", "--claims"]) == 0
    finally:
        out.chmod(0o755)
    table = capsys.readouterr().out
    assert "| the strongest, most frequent plant drives" in table and "planted_dose 1 ✓" in table

def test_sigterm_and_two_runs_into_one_folder(tmp_path):
    command = [sys.executable, str(HERE / "run_all.py"), "--profile", "smoke", "--out", str(tmp_path / "r")]
    slow = subprocess.Popen(command + ["--only", "toy"], stderr=subprocess.PIPE, text=True, cwd=HERE)
    time.sleep(6)
    slow.send_signal(signal.SIGTERM)
    assert slow.wait(60) == 143 and "resume with: python run_all.py" in slow.stderr.read()
    twins = [subprocess.Popen(command + ["--only", "linear"], stdout=subprocess.DEVNULL, cwd=HERE)
             for _ in range(2)]
    assert [p.wait(120) for p in twins] == [0, 0] and (tmp_path / "r" / "linear" / "seed0.npz").exists()
    assert not list((tmp_path / "r").rglob("*.tmp"))

def test_run_all_imports_without_posix_only_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.delitem(sys.modules, "run_all")
    importlib.import_module("run_all")

SELECTION = ("anti-phase:", "gradients:", "coherence:")

def planted_verdicts(strength, n):
    """The GD claims' verdicts on planted images (a border on a `strength` blend, none at 0) against their
    Gaussian surrogate, at smoke scale and a step size at which both reach 2/lr."""
    original = osig.make_planted_images
    cfg = run_all.GDConfig(data="planted", n=n, width=64, lr=0.3, steps=200, eig_every=10, top=10,
                           components=50, eos_by=200)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(osig, "make_planted_images", lambda **k: original(**dict(k, planted_strength=strength)))
        real, surrogate = ([run_all.nested(run_all.flat(run_all.run_gd(cfg, 0, "cpu", lambda *a: None, s)))]
                           for s in (False, True))
    assert np.isfinite([real[0]["eos"]["crossing"], surrogate[0]["eos"]["crossing"]]).all()
    verdicts = run_all.judge(cfg, real, surrogate, lambda *a: None)
    return {v["claim"].split()[0]: v for v in verdicts if v["counted"]}

def test_selection_claims_fail_without_a_shared_feature_and_coherence_finds_a_planted_one():
    """Issue: a claim counts only if a world without the phenomenon fails it. Unplanted images (class
    templates and noise, nothing shared across classes) fail every selection claim; an active planted pair
    passes input coherence against its own surrogate (the look-alike and gradient statistics do not find it at
    this scale)."""
    unplanted = planted_verdicts(0.0, 400)
    assert all(unplanted[name]["met"] is False for name in SELECTION), [unplanted[n] for n in SELECTION]
    planted = planted_verdicts(1.0, 800)
    assert planted["coherence:"]["met"], planted["coherence:"]

def test_the_swap_control_matches_the_swap_on_sharpness_and_input_moment():
    """Issue: the background swap's manipulation check, at smoke scale on real images (their skies and no-sky
    backgrounds): the swap removes every sky and the control moves as many masks onto non-sky images."""
    cfg = run_all.PROFILES["smoke"]["interventions"]
    try:
        images, labels, _ = run_all.load_images("cifar10", cfg.n, 1, download=False)
    except osig.DataError as error:
        pytest.skip(f"needs CIFAR-10: python ../shared/data/make_cifar10.py \"$OSIG_DATA\" ({error})")
    x, mean, std = osig.normalize(images)
    sky, no_sky = (a.numpy() for a in osig.sky_groups(images))
    swap, control, target, matched = run_all.swap_arms(cfg, images, labels.numpy(), sky, no_sky, mean, std, 1)
    assert max(abs(a / b - 1) for a, b in zip(matched, target)) <= cfg.tolerance
    assert not osig.sky_groups(swap)[0][torch.as_tensor(sky)].any()         # no sky left on the sky images
    moved = (control != images).any(-1).flatten(1).any(1).numpy()
    assert moved.sum() == sky.sum() and not (moved & sky).any()

@pytest.mark.parametrize("profile", ["gpu"])
def test_the_gpu_profile_passes_its_preflight_on_the_cpu_and_a_dead_init_fails_it(profile, monkeypatch):
    try:                        # real data only: on planted images a healthy VGG-11 fails the preflight too
        osig.load_cifar10(download=False), osig.load_tiny_shakespeare(download=False)
    except osig.DataError as error:
        pytest.skip("needs the data: python ../shared/data/make_cifar10.py \"$OSIG_DATA\" and "
                    f"../shared/data/tinyshakespeare/input.txt in $OSIG_DATA/tinyshakespeare/ ({error})")
    configs = run_all.PROFILES[profile]
    assert all(passed for name in ("cifar_ce", "text_gd") for passed, _ in run_all.preflight(
        name, configs[name], "cpu", log=lambda *a: None))
    monkeypatch.setattr(osig, "small_output_init", lambda model, *args, **kwargs: model)   # torch's default
    failed = run_all.preflight("cifar_mse", dataclasses.replace(configs["cifar_mse"], width=16), "cpu",
                               log=lambda *a: None)
    assert not failed[0][0] and "FAILS" in failed[0][1]

def test_readme_claims_table_is_the_claims_table_and_its_example_runs(capsys):
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    header = "| claim | target | source | measured (met: ✓) |\n|---|---|---|---|\n"
    table = readme.split(header)[1].split("\n\n")[0]
    assert [line.rsplit(" | ", 1)[0] + " |" for line in table.splitlines()] == [
        f"| {run_all.text(row.claim)} | {row.target} | {row.source} |" for row in run_all.CLAIMS]
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", readme, re.S).group(1), namespace)
    model, x, y = small_problem()
    found = namespace["track"](model, x, y, 0.1)
    assert "sharpness" in capsys.readouterr().out and len(found["candidates"]) == 4 * 5

# ------------------------------------------------------------ benchmark (opt-in: OSIG_BENCH=1)

def power_iteration(matvec, dim, iters=1000, seed=0):
    """The baseline `osig.lanczos` is measured against: v <- A v / |A v|, converging at |λ_2 / λ_1| per
    product."""
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    for _ in range(iters):
        v = matvec(v / v.norm())
    return v

@pytest.mark.skipif(not os.environ.get("OSIG_BENCH"),
                    reason="the speed table: OSIG_BENCH=1 python -m pytest -k bench -s")
def test_bench_prints_the_speed_table():
    """Times, not assertions about them: a Hessian-vector product against a gradient (fresh and reused graph),
    the products Lanczos and power iteration need for 1e-4 on the top eigenvalue, per-example gradients by
    vmap against a loop, on 500 CIFAR-10 images (planted ones without them); medians of 3 after a warm-up."""
    try:
        images, labels = osig.load_cifar10(train=True, download=False)
    except osig.DataError:
        images, labels, _ = osig.make_planted_images(n=500)
    x, y, rows = osig.normalize(images[:500])[0], labels[:500], []

    def timed(fn):
        fn()
        return float(np.median([(lambda t: (fn(), time.perf_counter() - t)[1])(time.perf_counter())
                                for _ in range(3)]))

    for name, model in (("MLP 3072-200-200-10", osig.MLP()), ("SmallCNN (32-64 ch)", osig.SmallCNN())):
        params = list(model.parameters())
        dim, v = sum(p.numel() for p in params), torch.randn(sum(p.numel() for p in params))
        gradient = timed(lambda: torch.autograd.grad(osig.mse_loss(model(x), y).mean(), params))
        operator = osig.hessian_operator(model, osig.mse_loss, x, y)
        rows += [(name, "one HVP / one gradient, fresh graph (hvp)", timed(
            lambda: osig.hvp(model, osig.mse_loss, x, y, v)) / gradient),
                 (name, "one HVP / one gradient, reused graph (top_eigenvalues)",
                  timed(lambda: operator(v)) / gradient)]
        reference = float(osig.lanczos(operator, dim, iters=300, tol=1e-8, dtype=torch.float32)[0][0])
        for method in ("lanczos", "power iteration"):
            inputs, outputs = [], []

            def recording(u):                   # stops the solver once its estimate is within 1e-4
                inputs.append(u.double() / u.double().norm())
                outputs.append(operator(inputs[-1].float()).double())
                estimate = (np.linalg.eigvalsh((torch.stack(inputs) @ torch.stack(outputs).T).numpy())[-1]
                            if method == "lanczos" else float(inputs[-1] @ outputs[-1]))
                if abs(estimate - reference) <= 1e-4 * abs(reference):
                    raise StopIteration
                return outputs[-1].float()

            with pytest.raises(StopIteration):
                osig.lanczos(recording, dim, iters=500, tol=0.0, dtype=torch.float32) if method == "lanczos" \
                    else power_iteration(recording, dim, iters=500)
            rows.append((name, f"products to 1e-4 on the top eigenvalue ({reference:.3f}): {method}",
                         len(inputs)))
        loop = timed(lambda: torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            osig.mse_loss(model(x[i:i + 1]), y[i:i + 1]).sum(), params)]) for i in range(256)]))
        rows.append((name, "per-example gradients of 256 examples: loop time / vmap time",
                     loop / timed(lambda: osig.per_example_grads(model, osig.mse_loss, x[:256], y[:256]))))
    print(f"\nbenchmark: {torch.get_num_threads()} threads, torch {torch.__version__}\n\n" + "\n".join(
        ["| model | measurement | value |", "|---|---|---|"]
        + [f"| {m} | {w} | {v:.3g} |" for m, w, v in rows]))
