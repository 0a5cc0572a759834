"""
run_all.py: reproduce every phenomenon of osig end to end; write figures, per-seed records and a report.

    python run_all.py                            # every experiment: the GPU profile with CUDA, else the CPU one
    python run_all.py --only linear              # one experiment (repeatable); the report keeps the others
    python run_all.py --profile gpu --preflight  # 100 steps of every GPU setting, on any device

Sections: configs and profiles; runs, one `run_<kind>(cfg, seed, device, log)` per kind that returns a record (a
flat dict of arrays, saved as soon as its seed finishes); the claims, one row each, judged by `judge`; figures;
report and command line. run_all.py says what to run and what the paper claims; osig.py says how to measure.
"""

import argparse
import dataclasses
import fcntl
import html
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import osig

# ----------------------------------------------------------------------------- configs and profiles


@dataclass
class LinearConfig:
    """Two-layer linear model bᵀAx on data with a rare opposing feature: gradient descent at a large lr (enters the
    edge of stability), a small lr (sharpens and stays) and a control α at the genuine features' scale."""
    n_pairs: int = 200              # signal-bearing examples, each with s = +1 and s = −1: p = 2 n_pairs / N = 1/3
    n_plain: int = 800              # examples without the opposing feature
    alpha: float = 7.0              # opposing feature size: p α² = 16.3 against genuine second moments <= 1
    control_alpha: float = 1.0      # the control: at the scale of the largest genuine feature
    scales: tuple = (1.0, 0.7, 0.5, 0.35, 0.25)   # genuine features' standard deviations
    offset: float = 0.5             # target offset on |x_o|, shared by both groups
    width: int = 10                 # hidden width
    init_scale: float = 0.01        # std of the initial weights
    large_lr: float = 0.08          # 2/lr = 25 < p α² |β| = 36.5: enters the edge of stability
    large_steps: int = 1000
    small_lr: float = 0.02          # 1/lr = 50 > 36.5: the opposing weight never flips
    small_steps: int = 4000
    seeds: tuple = (0,)


@dataclass
class ToyConfig:
    """A one-hidden-layer ReLU network on the same data (target offset on |x_0|), gradient descent at one lr, and
    the same run with a small control α; "ce" classifies the target's sign with two-class cross-entropy."""
    loss: str = "mse"               # mse | ce
    n_pairs: int = 100              # p = 2 n_pairs / N = 1/3
    n_plain: int = 400
    alpha: float = 8.0
    control_alpha: float = 1.0
    scales: tuple = (1.0, 0.7, 0.5, 0.35, 0.25)
    offset: float = 0.2             # the |x_0| part of the target, learnable only non-linearly
    width: int = 16
    weight_scale: float = 0.05      # first-layer init scale
    output_scale: float = 0.1       # output-layer init scale
    hidden_bias: float = 0.7        # above weight_scale·α·max|U|: every unit starts active on both signs of x_0
    lr: float = 0.05
    steps: int = 3000
    seeds: tuple = (0,)


@dataclass
class GDConfig:
    """Full-batch gradient descent on a fixed training set, with the sharpness and the outliers of the step
    measured every eig_every steps: the edge of stability, heavy tails, opposing groups against selection-matched
    nulls, the features they share (the sky for images, characters for text) and where the sharp direction lives."""
    data: str = "cifar10"           # cifar10 | planted (synthetic, offline) | shakespeare
    n: int = 2000                   # images, or sequences of `context` characters
    model: str = "mlp"              # mlp | cnn | vgg11 | resnet18 | vit | gpt
    width: int = 200                # hidden width, channels or transformer dimension
    depth: int = 2
    heads: int = 4                  # transformers
    activation: str = "relu"        # the MLP's
    context: int = 64               # text: characters per sequence
    loss: str = "mse"               # mse | ce
    lr: float = 0.04
    steps: int = 1500
    eig_every: int = 20             # steps between sharpness measurements
    eig_k: int = 8                  # top eigenvalues (MSE puts several at 2/lr together)
    top: int = 30                   # outliers per selection
    draws: int = 50                 # selection-matched null draws per selection
    chunk: int = 0                  # examples per forward pass (0: all at once)
    eos_by: int = 800               # setting check: the crossing of 2/lr by this step
    seeds: tuple = (0,)


@dataclass
class DoseConfig:
    """Full-batch gradient descent on planted images over a grid of planted strength and fraction: where a planted
    opposing signal drives progressive sharpening and the edge of stability, and where it does not."""
    strengths: tuple = (0.0, 0.25, 0.5, 1.0)      # 0: nothing planted
    fractions: tuple = (0.05, 0.1, 0.25)          # of the two planted classes' images
    n: int = 400
    class_signal: float = 5.0
    width: int = 64
    lr: float = 0.15
    steps: int = 200
    eig_every: int = 10
    window: int = 60                # sharpening rate over steps 0..window, the same for every cell
    seeds: tuple = (0, 1, 2)


@dataclass
class InterventionsConfig:
    """Causal tests on CIFAR-10, paired by seed (same subset and initialization): recolour the sky of every sky
    image or, as the control, the top quarter of as many random images; paste a sky or a grey top on non-sky
    airplanes, birds and ships; remove the top movers after the crossing or matched examples; and the sky
    pasted on test images at every step around the crossing."""
    n: int = 500
    width: int = 200
    lr: float = 0.06                # calibration (helper, seeds 0-4): sharpness 0.51-0.63 x 2/lr at step 0, crossing
    steps: int = 220                # at steps 80-120
    eig_every: int = 25             # coarse sharpness grid ...
    fine_every: int = 5             # ... and the fine one near 2/lr (from 0.9 x 2/lr to 25 steps past it)
    window: int = 50                # steps after the crossing whose summed |loss change| ranks the movers
    fractions: tuple = (0.01, 0.02, 0.05)         # removed fractions (the dose)
    n_probe: int = 200              # non-airplane test images pasted with each top
    seeds: tuple = (0, 1, 2, 3, 4)


@dataclass
class OptimizersConfig:
    """SGD with momentum, Adam and split-update SGD, each at its best step size of a grid with the same budget
    (per seed); the opposing groups' oscillation against loss-matched controls, each optimizer's (preconditioned)
    sharpness against its threshold, and where the top Hessian eigenvector lives."""
    data: str = "shakespeare"       # shakespeare (GPT) | cifar10 | planted (MLP)
    n: int = 128                    # training sequences or images
    n_test: int = 64
    context: int = 64
    model: str = "gpt"
    width: int = 64
    depth: int = 2
    heads: int = 4
    activation: str = "relu"
    loss: str = "ce"
    steps: int = 500
    batch_size: int = 16
    momentum: float = 0.9           # SGD and split's SGD part; β1 of Adam and of split's normalized part
    beta2: float = 0.999
    sgd_lrs: tuple = (0.1, 0.3, 1.0)
    adam_lrs: tuple = (3e-3, 1e-2, 3e-2)
    split_lrs: tuple = (0.1, 0.3, 1.0)            # split's SGD part; its normalized part uses Adam's best lr
    split_quantile: float = 0.1
    record_every: int = 5           # per-example losses every this many steps (odd: period 2 still alternates)
    eig_every: int = 100
    eig_examples: int = 32
    top: int = 40
    window: int = 20                # record intervals measured after each selection
    seeds: tuple = (0, 1, 2)


IMAGES = GDConfig(seeds=(0, 1, 2))
PROFILES = {
    "cpu": {   # a laptop CPU, real CIFAR-10 and tiny Shakespeare: about an hour on 2 cores
        "linear": LinearConfig(), "toy": ToyConfig(),
        "toy_ce": ToyConfig(loss="ce", offset=0.75, hidden_bias=0.3, lr=0.2),
        "cifar_mse": IMAGES,
        "cifar_ce": dataclasses.replace(IMAGES, activation="tanh", loss="ce", lr=0.05, steps=700, eig_k=1, eos_by=500),
        "cnn_mse": GDConfig(n=500, model="cnn", width=16, lr=0.1, steps=1000, eig_every=40, eig_k=1, eos_by=800,
                            seeds=(0,)),
        "text_gd": GDConfig(data="shakespeare", n=128, model="gpt", width=64, loss="ce", lr=0.15, steps=750,
                            eig_every=25, eig_k=1, top=60, eos_by=500, seeds=(0, 1, 2)),
        "text_optimizers": OptimizersConfig(), "planted_dose": DoseConfig(), "interventions": InterventionsConfig(),
    },
}
PROFILES["smoke"] = {   # seconds, synthetic images and a few thousand characters: the tests
    "linear": LinearConfig(large_steps=400, small_steps=1000), "toy": ToyConfig(steps=600),
    "toy_ce": ToyConfig(loss="ce", offset=0.75, hidden_bias=0.3, lr=0.2, steps=600),
    "cifar_mse": GDConfig(data="planted", n=400, width=64, lr=0.15, steps=150, eig_every=10, eig_k=4, top=10,
                          eos_by=150),
    "cifar_ce": GDConfig(data="planted", n=400, width=64, activation="tanh", loss="ce", lr=0.2, steps=150,
                         eig_every=10, eig_k=1, top=10, eos_by=150),
    "text_gd": GDConfig(data="shakespeare", n=24, model="gpt", width=32, depth=1, heads=2, context=32, loss="ce",
                        lr=0.5, steps=150, eig_every=10, eig_k=1, top=20, eos_by=150),
    "optimizers": OptimizersConfig(data="planted", n=400, n_test=200, model="mlp", width=32, depth=1, steps=90,
                                   batch_size=32, sgd_lrs=(0.01, 0.03), adam_lrs=(3e-4, 1e-3), split_lrs=(0.01, 0.03),
                                   record_every=3, eig_every=30, eig_examples=200, top=10, window=8, seeds=(0, 1)),
    "planted_dose": DoseConfig(strengths=(0.0, 1.0), fractions=(0.25,), steps=120, seeds=(0,)),
    "interventions": InterventionsConfig(n=200, steps=100, eig_every=10, window=30, fractions=(0.05,), n_probe=50,
                                         seeds=(0, 1)),
}
PROFILES["gpu"] = dict({k: v for k, v in PROFILES["cpu"].items() if k != "cnn_mse"}, **{   # one H200, under 10
    # minutes: only what differs from the CPU profile (VGG-11 and ResNet-18 are its conv nets)
    "cifar_mse": GDConfig(model="vgg11", width=64, lr=0.05, steps=1000, eig_every=25, eig_k=4, eos_by=600),
    "resnet18": GDConfig(model="resnet18", width=32, lr=0.05, steps=1000, eig_every=25, eig_k=4, eos_by=600),
    "cifar_ce": GDConfig(model="vit", width=128, depth=4, loss="ce", lr=0.05, steps=800, eig_every=25, eig_k=1,
                         eos_by=400),
    "text_gd": GDConfig(data="shakespeare", n=256, model="gpt", width=128, depth=4, context=128, loss="ce", lr=0.08,
                        steps=1200, eig_every=30, eig_k=1, top=120, eos_by=900),
    "text_optimizers": OptimizersConfig(n=512, n_test=128, width=128, depth=4, context=128, steps=1000,
                                        batch_size=32, adam_lrs=(1e-3, 3e-3, 1e-2), eig_examples=64, top=80),
})
LOSSES = {"mse": osig.mse_loss, "ce": osig.cross_entropy_loss}
AIRPLANE, BIRD, SHIP = 0, 2, 8
GREY, GREEN = (128, 128, 128), (70, 140, 60)      # control colours (RGB)

# ----------------------------------------------------------------------------- runs: each returns one record


def load_images(data, n, seed, download=True):
    """uint8 images [n, 32, 32, 3], labels [n] and planted group ids [n] (zeros for CIFAR-10) of one seed."""
    if data == "planted":
        return osig.make_planted_images(n=n, planted_classes=(AIRPLANE, BIRD), seed=seed)
    images, labels = osig.load_cifar10(train=True, download=download)
    index = osig.seeded_subset(len(images), n, seed=seed)
    return images[index], labels[index], torch.zeros(n, dtype=torch.int64)


def build_model(cfg, in_shape, seed, classes=10):
    """The network a config names, seeded; no batch norm, so that per-example gradients are defined."""
    torch.manual_seed(seed)
    return {"mlp": lambda: osig.MLP(int(np.prod(in_shape)), cfg.width, cfg.depth, classes, cfg.activation),
            "cnn": lambda: osig.SmallCNN(in_shape[0], cfg.width, classes),
            "vgg11": lambda: osig.VGG11(classes, cfg.width),
            "resnet18": lambda: osig.ResNet18(classes, cfg.width, batch_norm=False),
            "vit": lambda: osig.ViT(classes, in_shape[-1], dim=cfg.width, depth=cfg.depth, heads=cfg.heads),
            "gpt": lambda: osig.GPT(classes, cfg.context, cfg.width, cfg.depth, cfg.heads)}[cfg.model]()


def run_linear(cfg, seed, device, log):
    """The two-layer linear model at a large lr, a small lr and a control α (float64, on the CPU)."""
    record = {}
    for run, alpha, lr, steps in (("large", cfg.alpha, cfg.large_lr, cfg.large_steps),
                                  ("small", cfg.alpha, cfg.small_lr, cfg.small_steps),
                                  ("control", cfg.control_alpha, cfg.large_lr, cfg.large_steps)):
        x, y, sign = osig.make_opposing_signal_data(cfg.n_pairs, cfg.n_plain, alpha, cfg.scales, offset=cfg.offset,
                                                    seed=seed)
        model = osig.TwoLayerLinear(x.shape[1], cfg.width, cfg.init_scale, seed=seed)
        sharpness = osig.sharpness_measure(osig.regression_loss, x, y, every=1)
        history = osig.train(model, x, y, osig.regression_loss, torch.optim.SGD(model.parameters(), lr=lr), steps,
                             measure=lambda step, model, optimizer: dict(sharpness(step, model, optimizer),
                                                                         **osig.linear_state(model, x, y, sign)),
                             seed=seed, log=None)
        record.update({f"{run}_{key}": osig.measured(history, key)[1] for key in history["measured"][0]
                       if key not in ("step", "layer_shares")}, **{f"{run}_loss": history["loss"], f"{run}_lr": lr})
        record[f"{run}_sharpness"] = record.pop(f"{run}_eigenvalues")[:, 0]
        record[f"{run}_episode"] = osig.oscillation_episode(record[f"{run}_loss_plus"], record[f"{run}_loss_minus"],
                                                            record[f"{run}_sharpness"], 2 / lr)
        record[f"{run}_crossing"] = int(np.argmax(record[f"{run}_sharpness"] >= 2 / lr))
        # |β|: the norm of the best linear fit, all of it genuine (the |x_o| offset is orthogonal to every input)
        record[f"{run}_theory"] = float((x[:, 0] ** 2).mean()) * float(torch.linalg.lstsq(x, y[:, None]).solution.norm())
        log(f"  {run}: alpha {alpha}, lr {lr}: max sharpness {record[f'{run}_sharpness'].max():.2f}, 2/lr {2 / lr:.1f}")
    return record


def run_toy(cfg, seed, device, log):
    """The toy ReLU network with the outlier feature and with a small control α (float64, on the CPU)."""
    record = {}
    for run, alpha in (("toy", cfg.alpha), ("control", cfg.control_alpha)):
        x, y, sign = osig.make_opposing_signal_data(cfg.n_pairs, cfg.n_plain, alpha, cfg.scales, offset=cfg.offset,
                                                    seed=seed)
        loss_fn, outputs = (osig.regression_loss, 1) if cfg.loss == "mse" else (osig.cross_entropy_loss, 2)
        y = y if cfg.loss == "mse" else (y > 0).long()
        model = osig.make_toy_network(x.shape[1], cfg.width, cfg.weight_scale, cfg.output_scale, cfg.hidden_bias,
                                      seed, num_outputs=outputs)
        probes, grid = osig.opposing_probes(alpha, x.shape[1])
        sharpness = osig.sharpness_measure(loss_fn, x, y, every=1)
        history = osig.train(model, x, y, loss_fn, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.steps,
                             measure=lambda step, model, optimizer: dict(sharpness(step, model, optimizer),
                                                                         **osig.toy_state(model, loss_fn, x, y, sign,
                                                                                          probes)),
                             seed=seed, log=None)
        state = {key: osig.measured(history, key)[1] for key in history["measured"][0] if key != "step"}
        odd, even = osig.odd_even_parts(state["probe_output"], grid.numpy(), alpha)
        record.update({f"{run}_{key}": value for key, value in dict(
            state, sharpness=state.pop("eigenvalues")[:, 0], loss=history["loss"], odd=odd, even=even,
            grid=grid.numpy(), alpha=alpha).items() if key != "layer_shares"})
        log(f"  {run}: alpha {alpha}: max sharpness {record[f'{run}_sharpness'].max():.2f}, 2/lr {2 / cfg.lr:.1f}")
    above = record["toy_sharpness"] >= 2 / cfg.lr
    return dict(record, crossing=int(np.argmax(above)) if above.any() else len(above), half_learned=osig.half_learned_step(
        record["toy_even"]), episode=osig.oscillation_episode(record["toy_loss_plus"], record["toy_loss_minus"],
                                                              record["toy_sharpness"], 2 / cfg.lr))


def gd_data(cfg, seed, download=True):
    """x, y and what the record keeps about the examples: for images their labels, sky groups, planted ids, the
    images themselves and the probes (sky colour, grey, green, and the orthogonal control); for text the
    characters' names and features (`osig.token_features`)."""
    if cfg.data == "shakespeare":
        tokens, vocabulary = osig.encode_characters(osig.load_tiny_shakespeare(download=download))
        x, y = osig.text_sequences(tokens, cfg.n, cfg.context, seed=seed)
        names, masks = osig.token_features(x, y, vocabulary)
        return x, y, dict(feature_names=np.array(names), features=masks, targets=y.reshape(-1).numpy(),
                          vocabulary=np.str_(vocabulary)), None
    images, labels, planted = load_images(cfg.data, cfg.n, seed, download)
    x, mean, std = osig.normalize(images)
    sky, no_sky = osig.sky_groups(images)
    sky_rgb = images[sky][:, :8].reshape(-1, 3).float().mean(0) if sky.any() else torch.tensor([80.0, 150, 255])
    probes = torch.cat([osig.uniform_probe(rgb, mean, std) for rgb in (sky_rgb, GREY, GREEN)])
    probes = torch.cat([probes, osig.orthogonal_probe(probes[:1])])
    return x, labels, dict(labels=labels.numpy(), sky=sky.numpy(), no_sky=no_sky.numpy(), planted=planted.numpy(),
                           images=images.numpy()), probes


def run_gd(cfg, seed, device, log):
    """Full-batch gradient descent on images or text; the outliers of the step measured every cfg.eig_every steps
    and, on images, four uniform probes at every step."""
    x, y, record, probes = gd_data(cfg, seed)
    model, loss_fn = build_model(cfg, x.shape[1:], seed, 65 if cfg.model == "gpt" else 10).to(device), LOSSES[cfg.loss]
    xd, yd, probes = x.to(device), y.to(device), None if probes is None else probes.to(device)
    log(f"  seed {seed}: {x.shape[0]} rows, {y.numel()} examples, {sum(p.numel() for p in model.parameters())} "
        f"parameters" + (f", {record['sky'].sum()} sky and {record['no_sky'].sum()} clearly no-sky images" if
                         probes is not None else ""))
    sharpness = osig.sharpness_measure(loss_fn, xd, yd, cfg.eig_every, cfg.eig_k, cfg.chunk or None, lr=cfg.lr,
                                       top=cfg.top, draws=cfg.draws)

    def measure(step, model, optimizer):
        record = sharpness(step, model, optimizer) or {}
        if probes is not None:
            with torch.no_grad():
                record["probe_output"] = model(probes).cpu().numpy()
        return record or None

    history = osig.train(model, xd, yd, loss_fn, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.steps,
                         chunk=cfg.chunk or None, measure=measure, seed=seed, log=log)
    record.update(loss=history["loss"], per_example_loss=history["per_example_loss"],
                  diverged=np.str_(history["diverged"] or ""), eig_step=osig.measured(history, "eigenvalues")[0])
    for key in history["measured"][0]:
        if key != "step":
            record[key] = osig.measured(history, key)[1]
    record["parameter_shares"] = np.bincount(osig.parameter_layers(model)[1]) / sum(p.numel() for p in model.parameters())
    for key in ("index", "null_index"):
        record[key] = record[key].astype(np.int64)
    record["up"] = record["up"].astype(bool)
    eos = osig.edge_of_stability(record["eig_step"], record["eigenvalues"][:, 0], 2 / cfg.lr)
    crossing, steps = eos["crossing"], record["eig_step"]
    record.update(eos, after=len(history["loss"]) if math.isnan(crossing) else int(math.ceil(crossing)),
                  post=(steps >= crossing) & (steps + 12 < len(history["loss"])), pre=(steps >= crossing / 2) & (steps < crossing))
    statistics = osig.pair_statistics(record["per_example_loss"], steps, record["index"], record["up"],
                                      record["null_index"], features=x if probes is not None else None)
    for name, (observed, null) in statistics.items():
        record.update({name: observed, f"{name}_null": null})
    return record


def run_dose(cfg, seed, device, log):
    """Every cell of the planted strength x fraction grid: the sharpness and its crossing of 2/lr."""
    record = {"sharpness": [], "crossing": []}
    for strength in cfg.strengths:
        for fraction in cfg.fractions:
            images, labels, _ = osig.make_planted_images(n=cfg.n, planted_fraction=fraction, seed=seed,
                                                         planted_strength=strength, class_signal=cfg.class_signal)
            x, y = osig.normalize(images)[0].to(device), labels.to(device)
            torch.manual_seed(seed)
            model = osig.MLP(x[0].numel(), cfg.width, 2, 10).to(device)
            history = osig.train(model, x, y, osig.mse_loss, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.steps,
                                 measure=osig.sharpness_measure(osig.mse_loss, x, y, cfg.eig_every, iters=40), log=None)
            steps, sharpness = osig.measured(history, "eigenvalues")
            record["sharpness"].append(sharpness[:, 0])
            record["crossing"].append(osig.edge_of_stability(steps, sharpness[:, 0], 2 / cfg.lr)["crossing"])
            log(f"  strength {strength:g}, fraction {fraction:g}: crossing {record['crossing'][-1]:.0f}")
    shape = (len(cfg.strengths), len(cfg.fractions))
    return dict(steps=steps, sharpness=np.reshape(record["sharpness"], shape + (-1,)),
                crossing=np.reshape(record["crossing"], shape), lr=cfg.lr, window=cfg.window)


def intervention_run(cfg, x, y, keep, seed, device, pastes=None):
    """Gradient descent from the seed's initialization on the kept examples: the sharpness every cfg.eig_every
    steps and every cfg.fine_every steps from 0.9 x 2/lr to 25 steps past the crossing; given pastes (name ->
    normalized images), the mean p(airplane) on each at every step; given keep=None, the parameters at every
    coarse measurement too. Returns the history."""
    xk, yk = x[keep].to(device), torch.as_tensor(y)[keep].to(device)
    threshold, near = 2 / cfg.lr, {"value": 0.0, "crossed": math.inf}
    torch.manual_seed(seed)
    model = osig.MLP(x[0].numel(), cfg.width, 2, 10).to(device)
    sharpness = osig.sharpness_measure(osig.mse_loss, xk, yk, every=1, iters=20, tol=1e-2)

    def measure(step, model, optimizer):
        record = {}
        if pastes is not None:
            with torch.no_grad():
                record["airplane"] = np.array([torch.softmax(model(p.to(device)), -1)[:, AIRPLANE].mean().item()
                                               for p in pastes.values()])
        fine = near["value"] >= 0.9 * threshold and step <= near["crossed"] + 25
        if step % (cfg.fine_every if fine else cfg.eig_every) == 0:
            record.update(sharpness(step, model, optimizer))
            near["value"] = record["eigenvalues"][0]
            near["crossed"] = min(near["crossed"], step if near["value"] >= threshold else math.inf)
            if pastes is not None and step % cfg.eig_every == 0:
                record["parameters"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
        return record

    return osig.train(model, xk, yk, osig.mse_loss, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.steps,
                      measure=measure, seed=seed, log=None)


def run_interventions(cfg, seed, device, log):
    """All the paired variants of one seed (InterventionsConfig), each summarized by `osig.intervention_endpoints`."""
    images, labels, _ = load_images("cifar10", cfg.n, seed)
    (x, mean, std), (sky, no_sky), labels = osig.normalize(images), osig.sky_groups(images), labels.numpy()
    sky_rgb = images[sky][:, :8].reshape(-1, 3).float().mean(0).tolist() if sky.any() else [80.0, 150.0, 255.0]
    test_images, test_labels = osig.load_cifar10(train=False)
    others = test_images[test_labels != AIRPLANE][:cfg.n_probe]
    pastes = {name: osig.normalize(osig.paste_top(others, rgb), mean, std)[0] for name, rgb in
              (("original", None), ("sky", sky_rgb), ("grey", GREY), ("green", GREEN))}
    pastes["orthogonal"] = pastes["original"].clone()
    pastes["orthogonal"][:, :, :8] = osig.orthogonal_probe(osig.uniform_probe(sky_rgb, mean, std))[:, :, :8]
    pair, everyone, rng = osig.sky_pair(labels, sky.numpy(), no_sky.numpy())[:2], np.ones(cfg.n, bool), np.random.default_rng(seed)
    base = intervention_run(cfg, x, labels, everyone, seed, device, pastes)
    record = {"as is": osig.intervention_endpoints(base, cfg.lr, pair, cfg.window)}
    after = min(record["as is"]["after"], cfg.steps - cfg.window - 1)
    score = np.abs(np.diff(base["per_example_loss"][after:after + cfg.window + 1], axis=0)).sum(0)
    model = osig.MLP(x[0].numel(), cfg.width, 2, 10)         # the run's parameters at the crossing, for the matching
    torch.nn.utils.vector_to_parameters(torch.as_tensor(osig.measured(base, "parameters")[1][after // cfg.eig_every],
                                                         dtype=torch.float32), model.parameters())
    state = np.stack([base["per_example_loss"][after], osig.per_example_grads(model, osig.mse_loss, x, torch.as_tensor(
        labels)).norm(dim=1).numpy()], axis=1)                 # matched on loss and gradient norm, within classes
    no_sky_pair = [np.flatnonzero(no_sky.numpy() & group) for group in osig.sky_pair(labels, everyone, everyone)[:2]]
    plant = np.concatenate([group[:min(map(len, no_sky_pair))] for group in no_sky_pair])
    control_tops = torch.zeros(images.shape[:3], dtype=torch.bool)
    control_tops[rng.choice(cfg.n, int(sky.sum()), replace=False), :8] = True
    variants = {"recolour sky": (osig.recolour(images, osig.sky_pixels(images) & sky[:, None, None]), everyone),
                "recolour control": (osig.recolour(images, control_tops), everyone),
                "paste sky": ((osig.paste_top(images, sky_rgb, members=plant), None), everyone),
                "paste grey": ((osig.paste_top(images, GREY, members=plant), None), everyone)}
    for fraction in cfg.fractions:
        top = np.argsort(-score)[:round(fraction * cfg.n)]
        variants[f"remove top {fraction:.0%}"] = (None, ~np.isin(np.arange(cfg.n), top))
        variants[f"remove matched {fraction:.0%}"] = (None, ~np.isin(np.arange(cfg.n), osig.matched_examples(state, top, labels)))
    variants["remove random 5%"] = (None, ~np.isin(np.arange(cfg.n), rng.choice(cfg.n, round(0.05 * cfg.n), replace=False)))
    for name, (changed, keep) in variants.items():
        xv = x if changed is None else osig.normalize(changed[0], mean, std)[0]
        record[name] = osig.intervention_endpoints(intervention_run(cfg, xv, labels, keep, seed, device), cfg.lr,
                                                   tuple(g[keep] for g in pair), cfg.window)
        record[name]["changed"] = np.median(changed[1][changed[1] > 0]) if changed and changed[1] is not None else np.nan
        log(f"  seed {seed} | {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in record[name].items() if np.ndim(v) == 0))
    airplane = osig.measured(base, "airplane")[1]
    return dict(variants=np.array(list(record)), shift=airplane[:, 1:] - airplane[:, :1], pastes=np.array(list(pastes)[1:]),
                curves=np.stack([record[v]["curve"] for v in record]), steps=cfg.steps, **{key: np.array(
                    [record[v].get(key, np.nan) for v in record]) for key in ("crossing", "rate", "antiphase", "spikes",
                                                                              "final", "changed")})


def run_optimizers(cfg, seed, device, log):
    """Every optimizer at every step size of its grid, measured; the best of each (lowest final training loss)
    summarized by `osig.optimizer_summary`."""
    if cfg.data == "shakespeare":
        tokens, _ = osig.encode_characters(osig.load_tiny_shakespeare())
        split = int(0.9 * len(tokens))
        (x, y), (x_test, y_test) = (osig.text_sequences(tokens[:split], cfg.n, cfg.context, seed=0),
                                    osig.text_sequences(tokens[split:], cfg.n_test, cfg.context, seed=1))
    else:
        images, labels, _ = load_images(cfg.data, cfg.n + cfg.n_test, 0)
        x, x_test = osig.normalize(images[:cfg.n])[0], osig.normalize(images[cfg.n:], *osig.normalize(images[:cfg.n])[1:])[0]
        y, y_test = labels[:cfg.n], labels[cfg.n:]
    x, y, x_test, y_test, loss_fn = x.to(device), y.to(device), x_test.to(device), y_test.to(device), LOSSES[cfg.loss]
    record, best = {}, {}
    for name, lrs in (("sgd", cfg.sgd_lrs), ("adam", cfg.adam_lrs), ("split", cfg.split_lrs)):
        runs = []
        for lr in lrs:
            model = build_model(cfg, x.shape[1:], seed, 65 if cfg.model == "gpt" else 10).to(device)
            optimizer = {"sgd": lambda: torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum),
                         "adam": lambda: torch.optim.Adam(model.parameters(), lr=lr, betas=(cfg.momentum, cfg.beta2)),
                         "split": lambda: osig.SplitSGD(model.parameters(), lr=lr, normalized_lr=best["adam"],
                                                        quantile=cfg.split_quantile, momentum=cfg.momentum,
                                                        betas=(cfg.momentum, cfg.beta2))}[name]()
            sharpness = osig.sharpness_measure(loss_fn, x[:cfg.eig_examples], y[:cfg.eig_examples], cfg.eig_every,
                                               preconditioner=None if name == "sgd" else osig.adaptive_preconditioner)
            history = osig.train(model, x, y, loss_fn, optimizer, cfg.steps, batch_size=cfg.batch_size, seed=seed,
                                 log=None, measure=lambda step, model, optimizer: dict(
                                     sharpness(step, model, optimizer) or {}, **({"losses": osig.per_example_losses(
                                         model, loss_fn, x, y).cpu().numpy()} if step % cfg.record_every == 0 else {})))
            runs.append(osig.optimizer_summary(model, loss_fn, history, optimizer, x, y, x_test, y_test, cfg.top,
                                               cfg.window))
            log(f"  seed {seed} | {name} lr {lr:g}: train loss {runs[-1]['train_loss']:.4f}, test accuracy "
                f"{runs[-1]['test_accuracy']:.3f}")
        chosen = int(np.nanargmin([run["train_loss"] for run in runs]))
        best[name] = lrs[chosen]
        record.update({f"{name}_{key}": value for key, value in runs[chosen].items()},
                      **{f"{name}_grid": np.array([run["train_loss"] for run in runs]), f"{name}_lr": best[name],
                         f"{name}_grid_edge": chosen in (0, len(lrs) - 1)})
    return record

# ----------------------------------------------------------------------------- the claims, one row each


@dataclass(frozen=True)
class Claim:
    kind: str                       # experiments it applies to: linear, toy, gd (images and text), images, text, ...
    claim: str                      # the claim in words
    measure: object                 # record -> value; pooled: the list of a run's records (one per seed) -> value
    target: str                     # "<= 0.05"; "" for a diagnostic
    source: str                     # paper | recalled | ours | calibration (run) | setting check | diagnostic
    pooled: bool = False


def median_of(values, mask=None):
    """The median of the finite values (selected by mask), nan when none: statistics of possibly empty groups."""
    values = np.asarray(values, dtype=np.float64)
    values = values[mask] if mask is not None else values
    return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else math.nan


def delay(records, variant, control):
    """Per seed: the relative delay of the crossing, (variant − control) / control (a run that never crosses
    counts at its last step)."""
    crossing = [dict(zip(r["variants"], np.nan_to_num(r["crossing"], nan=r["steps"]))) for r in records]
    return [(c[variant] - c[control]) / c[control] for c in crossing]


TAIL_NOTE = "paper (a few examples carry the loss change); size: ours"
CLAIMS = [
    Claim("linear", "large lr: the sharpness reaches 2/lr", lambda r: r["large_sharpness"].max() * r["large_lr"] / 2,
          ">= 1", "setting check"),
    Claim("linear", "control α: the sharpness stays below 2/lr",
          lambda r: r["control_sharpness"].max() * r["large_lr"] / 2, "< 1", "setting check"),
    Claim("linear", "small lr: balanced growth, | |b|² / |w_genuine| − 1 | at the end",
          lambda r: abs(r["small_b_norm_sq"][-1] / r["small_genuine_norm"][-1] - 1), "<= 0.05", "setting check"),
    Claim("linear", "control α: period-2 fraction of the opposing weight",
          lambda r: osig.period_two_fraction(r["control_opposing_weight"]), "== 0", "setting check"),
    Claim("linear", "sharpness = p·α²(|Ae_o|² + |b|²) within 5%, where the formula exceeds the residual term |∇_w L| "
          "(fraction of those steps of the two α = 7 runs)", lambda r: np.mean(np.concatenate([np.abs(
              r[f"{k}_prediction"] / r[f"{k}_sharpness"] - 1)[r[f"{k}_prediction"] >= r[f"{k}_residual_term_norm"]]
              for k in ("large", "small")]) <= 0.05), ">= 0.99", "ours"),
    Claim("linear", "large lr: the opposing direction's full Rayleigh quotient is the sharpness in the oscillation "
          "episodes (max relative error)", lambda r: np.nanmax(np.append(np.abs(
              r["large_rayleigh_quotient"] / r["large_sharpness"] - 1)[r["large_episode"]], np.nan)), "<= 0.05", "ours"),
    Claim("linear", "small lr: the sharpness ends at p·α²·|β| (relative error)",
          lambda r: abs(r["small_sharpness"][-1] / r["small_theory"] - 1), "<= 0.05", "ours"),
    Claim("linear", "small lr: the opposing weight never flips (period-2 fraction)",
          lambda r: osig.period_two_fraction(r["small_opposing_weight"]), "== 0", "ours"),
    Claim("linear", "large lr: the two groups' loss difference changes sign on consecutive steps of the episodes",
          lambda r: osig.consecutive_sign_changes(r["large_loss_plus"] - r["large_loss_minus"], r["large_episode"])[0],
          ">= 0.8", "paper (the groups' losses alternate); 0.8: ours"),
    Claim("linear", "large lr: the opposing weight grows at the predicted |1 − lr·λ| per step (|median ratio − 1|)",
          lambda r: abs(osig.flip_growth(r["large_opposing_weight"], r["large_sharpness"], r["large_lr"],
                                         r["large_episode"]) - 1), "<= 0.05", "ours"),
    Claim("linear", "large lr: peak loss in the episodes / loss at the crossing",
          lambda r: np.nanmax(np.append(r["large_loss"][r["large_episode"]], np.nan)) / r["large_loss"][r["large_crossing"]],
          ">= 2", "paper (the loss spikes); 2: ours"),
    Claim("linear", "large lr: the sharpness then hovers at 2/lr (median |λ / (2/lr) − 1| after the crossing)",
          lambda r: median_of(np.abs(r["large_sharpness"][r["large_crossing"]:] * r["large_lr"] / 2 - 1)), "<= 0.05",
          "paper (edge of stability); 5%: ours"),
    Claim("toy", "before 2/lr: median cosine of the two groups' gradients on the x_0 weights",
          lambda r: median_of(r["toy_column_cosine"][1:r["crossing"]]), "<= -0.9", "setting check"),
    Claim("toy", "before 2/lr: median |L(x_0 > 0) − L(x_0 < 0)| / their mean", lambda r: median_of(np.abs(
        r["toy_loss_plus"] - r["toy_loss_minus"])[1:r["crossing"]] * 2 / (r["toy_loss_plus"] + r["toy_loss_minus"])[
        1:r["crossing"]]), "<= 0.1", "setting check"),
    Claim("toy", "the sharpness reaches 2/lr", lambda r: r["toy_sharpness"].max() * r["lr"] / 2, ">= 1", "setting check"),
    Claim("toy", "after 2/lr the sharpness is the x_0-column curvature (median |ratio − 1|)",
          lambda r: median_of(np.abs(r["toy_opposing_curvature"] / r["toy_sharpness"] - 1)[r["crossing"]:]), "<= 0.05",
          "ours"),
    Claim("toy", "at the edge, before |x_0| is learned, the groups' loss difference changes sign on consecutive steps",
          lambda r: osig.consecutive_sign_changes(r["toy_loss_plus"] - r["toy_loss_minus"], r["episode"] & (
              np.arange(len(r["episode"])) < r["half_learned"]))[0], ">= 0.8", "paper (the groups alternate); 0.8: ours"),
    Claim("toy", "at the edge the pure-x_0 probe's odd part flips sign on consecutive steps",
          lambda r: osig.consecutive_sign_changes(r["toy_odd"], r["episode"])[0], ">= 0.8",
          "paper (the network's use of the feature flips); 0.8: ours"),
    Claim("toy", "sharpening (max − initial sharpness) with the outlier feature / with the control α",
          lambda r: (r["toy_sharpness"].max() - r["toy_sharpness"][0]) / (r["control_sharpness"].max()
                                                                          - r["control_sharpness"][0]), ">= 3",
          "paper (the outliers drive sharpening); 3: ours"),
    Claim("toy", "the fall: mean sharpness over the last 10% of steps / (2/lr)",
          lambda r: r["toy_sharpness"][int(0.9 * len(r["toy_sharpness"])):].mean() * r["lr"] / 2, "<= 0.9", "recalled"),
    Claim("toy", "the fall comes after |x_0| is learned: last 10% / mean between the crossing and the half-learned step",
          lambda r: r["toy_sharpness"][int(0.9 * len(r["toy_sharpness"])):].mean() / np.mean(
              r["toy_sharpness"][r["crossing"]:max(r["crossing"], r["half_learned"])]), "<= 0.9", "ours"),
    Claim("toy", "the x_0-column curvature falls with it (same ratio)",
          lambda r: r["toy_opposing_curvature"][int(0.9 * len(r["toy_sharpness"])):].mean() / np.mean(
              r["toy_opposing_curvature"][r["crossing"]:max(r["crossing"], r["half_learned"])]), "<= 0.9", "ours"),
    Claim("toy", "the fall is the outliers' doing: fall from the peak (1 − last 10% / max), toy − control α",
          lambda r: osig.late_fall(r["toy_sharpness"]) - osig.late_fall(r["control_sharpness"]), ">= 0.2", "ours"),
    Claim("gd", "the crossing of 2/lr (interpolated) / the step it is expected by", lambda r: r["crossing"] / r["eos_by"],
          "<= 1", "setting check"),
    Claim("gd", "sharpness at step 0 / (2/lr)", lambda r: r["start_ratio"], "<= 0.7", "setting check"),
    Claim("gd", "hover at the iterate: median |sharpness / (2/lr) − 1| from the crossing on", lambda r: r["hover"],
          "<= 0.15", "setting check"),
    Claim("gd", "sharpness at the midpoint of the step / (2/lr), median after the crossing",
          lambda r: median_of(r["midpoint"] * r["lr"] / 2, r["post"]), "", "diagnostic"),
    Claim("gd", "linearization check: balanced accuracy of the predicted up/down split (post-EoS)",
          lambda r: median_of(r["linearization"], r["post"]), "", "diagnostic"),
    Claim("gd", "post-EoS selections with both an up and a down side", lambda r: np.mean(
        r["up"][r["post"]].any(1) & ~r["up"][r["post"]].all(1)) if r["post"].any() else np.nan, "", "diagnostic"),
    Claim("gd", "false-positive rate of the anti-phase test where the null holds by construction (nominal 0.05)",
          lambda r: osig.null_false_positive_rate(r["antiphase_null"][r["post"]], "less"), "", "diagnostic"),
    Claim("gd", "loss spike events per 100 steps after the crossing", lambda r: 100 * np.sum(
        osig.loss_spikes(r["loss"])[:, 0] >= r["after"]) / (len(r["loss"]) - r["after"]) if r["after"] < len(r["loss"])
        else np.nan, ">= 1.5", "paper (the loss spikes at the edge); 1.5: ours"),
    Claim("gd", "heavy tail: the top 1%'s share of |loss change| at the 10 largest loss rises after the crossing / at "
          "pre-EoS steps", lambda r: osig.spike_tail_ratio(r["per_example_loss"], r["crossing"]), ">= 1.5", TAIL_NOTE),
    Claim("gd", "the outliers align with the top eigenvector: median |cos(g_i, v_1)| after the crossing / before, "
          "same selection rule", lambda r: median_of(r["cos_top"][r["post"]]) / median_of(r["cos_top"][r["pre"]]),
          ">= 1.5", "paper (their gradients carry the sharp direction); 1.5: ours"),
    Claim("gd", "a few examples own the sharp direction: the top 1%'s share of vᵀHv after the crossing / before",
          lambda r: median_of(r["top1_share"], r["post"]) / median_of(r["top1_share"], r["pre"]), ">= 1.25",
          "recalled (direction); 1.25: ours"),
    Claim("gd", "the up and down groups move in anti-phase more than selection-matched groups (combined p, one-sided)",
          lambda r: osig.combined_p(r["antiphase"][r["post"]], r["antiphase_null"][r["post"]], "less")[0], "< 0.05",
          "paper (the opposing groups' losses move in opposition); 0.05: ours"),
    Claim("gd", "their first-layer gradients are more aligned, or more opposed, than selection-matched groups' (a "
          "shared input feature shows in the layer that reads it; combined p, two-sided)", lambda r: osig.combined_p(
              r["grad_cosine"][r["post"]], r["grad_cosine_null"][r["post"]], "two-sided")[0], "< 0.05",
          "paper (the groups share a feature); 0.05: ours"),
    Claim("images", "precision: post-EoS outliers that carry the planted feature (planted images)",
          lambda r: np.mean(r["planted"][r["index"][r["post"]]] > 0) if r["planted"].any() else np.nan, "", "diagnostic"),
    Claim("images", "the up and down groups' images are more alike, or more opposite, than selection-matched groups' "
          "(combined p, two-sided)", lambda r: osig.combined_p(r["coherence"][r["post"]], r["coherence_null"][r["post"]],
                                                               "two-sided")[0], "< 0.05",
          "paper (the groups share a feature); 0.05: ours"),
    Claim("images", "sky airplanes vs sky birds/ships move in anti-phase more than size-matched no-sky pairs (contrast "
          "of loss-change correlations after the crossing)", lambda r: osig.pair_contrast(
              r["per_example_loss"][r["after"]:], *osig.sky_pair(r["labels"], r["sky"], r["no_sky"]))["contrast"],
          ">= 0.3", "paper (sky: airplanes against birds and ships); 0.3: ours"),
    Claim("images", "the sky probe's bird/ship output swings more after the crossing than the grey and orthogonal "
          "probes' (ratio to the larger)", lambda r: osig.probe_swing(r["probe_output"][r["after"]:], (BIRD, SHIP)),
          ">= 2", "paper (the network's use of the colour flips); 2: ours"),
    Claim("images", "the sky probe tracks the sky-minus-no-sky bird/ship loss better than the orthogonal probe "
          "(|corr of changes| difference)", lambda r: osig.probe_tracking(
              r["probe_output"][r["after"]:], r["per_example_loss"][r["after"]:], r["labels"], r["sky"], r["no_sky"],
              (BIRD, SHIP)), ">= 0.2", "ours"),
    Claim("text", "the outliers' most over-represented common feature (base rate >= 1%): share of their |loss change| "
          "/ base rate", lambda r: osig.top_feature(r["features"], r["index"][r["post"]], r["loss_change"][r["post"]])[1],
          ">= 3", "ours"),
    Claim("text", "feature pair (the top target against the others, in the top context) moves in anti-phase more "
          "than the same targets in other contexts (contrast)", lambda r: osig.pair_contrast(
              r["per_example_loss"][r["after"]:], *osig.feature_pair(r["features"], r["feature_names"], r["index"][
                  r["post"]], r["loss_change"][r["post"]])[:4])["contrast"], ">= 0.3", "ours"),
    Claim("gd", "the top eigenvector's share in the first third of the layers / their parameter share (post-EoS)",
          lambda r: osig.early_layer_ratio(r["layer_shares"][r["post"]].mean(0), r["parameter_shares"]), ">= 2",
          "recalled (early layers); 2: ours"),
    Claim("dose", "sharpening over steps 0..window: strongest, most frequent planted feature / nothing planted",
          lambda r: osig.sharpening_rate(r["steps"], r["sharpness"][-1, -1], r["window"]) / osig.sharpening_rate(
              r["steps"], r["sharpness"][0, -1], r["window"]), ">= 2", "ours"),
    Claim("dose", "the strongest, most frequent planted feature drives the sharpness to 2/lr within the run",
          lambda r: float(np.isfinite(r["crossing"][-1, -1])), "== 1", "paper (opposing signals drive the edge)"),
    Claim("interventions", "recolouring every sky background delays the crossing against recolouring as many random "
          "images' tops (paired relative delay: 95% t-interval's lower end)",
          lambda rs: osig.t_interval(delay(rs, "recolour sky", "recolour control"))[1], "> 0", "ours", pooled=True),
    Claim("interventions", "pasting a sky on non-sky airplanes, birds and ships advances the crossing against a grey "
          "paste on the same images (paired relative delay: upper end)",
          lambda rs: osig.t_interval(delay(rs, "paste sky", "paste grey"))[2], "< 0", "ours", pooled=True),
    Claim("interventions", "removing the top 5% movers delays the crossing more than a matched removal (lower end)",
          lambda rs: osig.t_interval(delay(rs, "remove top 5%", "remove matched 5%"))[1], "> 0", "ours", pooled=True),
    Claim("interventions", "the delay against matched removal grows with the fraction removed (slope per percentage "
          "point over seeds: lower end)", lambda rs: osig.t_interval([np.polyfit(
              [1, 2, 5], [delay([r], f"remove top {f}%", f"remove matched {f}%")[0] for f in (1, 2, 5)], 1)[0]
              for r in rs])[1], "> 0", "ours", pooled=True),
    Claim("interventions", "the sky paste's step-to-step swing grows more across the crossing than the grey, green and "
          "orthogonal pastes' (log ratio: lower end)", lambda rs: osig.t_interval([osig.paste_swing(
              r["shift"], r["crossing"][0]) for r in rs])[1], "> 0", "ours", pooled=True),
    Claim("interventions", "pixels changed per recoloured sky image (median)", lambda r: r["changed"][1], "",
          "diagnostic"),
    Claim("interventions", "pixels changed per recoloured control image (median)", lambda r: r["changed"][2], "",
          "diagnostic"),
    Claim("optimizers", "the best step sizes lie inside their grids (optimizers at an edge)",
          lambda r: sum(bool(r[f"{o}_grid_edge"]) for o in ("sgd", "adam", "split")), "== 0", "setting check"),
    Claim("optimizers", "opposing-group oscillation over its loss-matched control: SGD / Adam",
          lambda r: r["sgd_relative"] / r["adam_relative"], ">= 3", "recalled (Adam damps it); 3: ours"),
    Claim("optimizers", "split-update SGD closes the SGD-to-Adam final-loss gap (fraction closed)",
          lambda r: (r["sgd_train_loss"] - r["split_train_loss"]) / (r["sgd_train_loss"] - r["adam_train_loss"]),
          ">= 0.5", "recalled ('most of the gap'); 0.5: ours"),
    Claim("optimizers", "SGD: the top eigenvector's share in the first third of the layers / their parameter share",
          lambda r: r["sgd_early"], ">= 2", "recalled (early layers); 2: ours"),
    Claim("optimizers", "Adam: the same share", lambda r: r["adam_early"], ">= 2", "recalled (early layers); 2: ours"),
]

KINDS = {"LinearConfig": ("linear",), "ToyConfig": ("toy",), "DoseConfig": ("dose",),
         "InterventionsConfig": ("interventions",), "OptimizersConfig": ("optimizers",)}


def kinds_of(cfg):
    name = type(cfg).__name__
    return KINDS.get(name) or ("gd", "text" if cfg.data == "shakespeare" else "images")


def judge(cfg, records, log=print):
    """Apply every claim row of the experiment's kinds: to each seed's record (the value is the median over seeds)
    or, pooled, to all of them. A value that cannot be measured (say, the run never crossed 2/lr) is nan and not
    met. Returns one verdict per row: claim, target, source, value, per_seed, met (None for a diagnostic)."""
    verdicts = []
    for row in (row for row in CLAIMS if row.kind in kinds_of(cfg)):
        def value(arg):
            try:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    return float(row.measure(arg))
            except (ValueError, IndexError, ZeroDivisionError, FloatingPointError, KeyError) as error:
                log(f"  cannot measure '{row.claim[:60]}': {type(error).__name__}: {error}")
                return math.nan
        per_seed = [] if row.pooled else [value(r) for r in records]
        combined = value(records) if row.pooled else (float(np.median(per_seed)) if np.all(np.isfinite(per_seed))
                                                        else math.nan)
        met = None
        if row.target:
            operator, bound = row.target.split()[:2]
            met = bool(math.isfinite(combined) and {"<=": combined <= float(bound), ">=": combined >= float(bound),
                                                    "<": combined < float(bound), ">": combined > float(bound),
                                                    "==": combined == float(bound)}[operator])
        verdicts.append(dict(claim=row.claim, target=row.target, source=row.source, value=combined,
                             per_seed=per_seed, met=met))
        log(f"  {'claim' if counted(verdicts[-1]) else row.source:>13} | {row.claim[:90]}: {combined:.4g}"
            + (f" (target {row.target}) -> {'met' if met else 'NOT met'}" if row.target else ""))
    return verdicts


def counted(verdict):
    return verdict["met"] is not None and verdict["source"] not in ("setting check", "diagnostic")

# ----------------------------------------------------------------------------- figures


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def panels(path, title, rows):
    """One figure of stacked line panels sharing the step axis. rows: (ylabel, [(x, y, label), ...], options), with
    options "threshold" (a dashed line: 2/lr) and "log" (a log y axis)."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.1 * len(rows) + 0.5), sharex=True, squeeze=False)
    for ax, (ylabel, lines, options) in zip(axes[:, 0], rows):
        for x, y, label in lines:
            ax.plot(x, y, lw=0.9, label=label)
        if "threshold" in options:
            ax.axhline(options["threshold"], ls="--", color="k", lw=0.8, label=f"2/lr = {options['threshold']:.3g}")
        ax.set_yscale("log" if options.get("log") else "linear")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=6, loc="best")
    axes[0, 0].set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("step")
    save_figure(fig, path)
    return path.name


def figures(cfg, r, out):
    """The figures of one experiment, drawn from its first seed's record. Returns their file names."""
    kind, names = kinds_of(cfg)[-1], []
    t = np.arange(len(r.get("loss", r.get("large_loss", r.get("toy_loss", [])))))
    if kind == "linear":
        names.append(panels(out / "linear.png", "two-layer linear model", [
            ("loss (large lr)", [(t[::2], r["large_loss_plus"][::2], "group s = +1 (even steps)"),
                                 (t[::2], r["large_loss_minus"][::2], "group s = −1 (even steps)"),
                                 (t, r["large_loss"], "total")], {"log": True}),
            ("sharpness (large lr)", [(t, r["large_sharpness"], "Lanczos"), (t, r["large_prediction"],
                                      "p·α²(|Ae_o|²+|b|²)")], {"threshold": 2 / r["large_lr"]}),
            ("opposing weight", [(t, r["large_opposing_weight"], "(Ae_o)·b, large lr")], {}),
            ("sharpness", [(np.arange(len(r["small_sharpness"])), r["small_sharpness"], "small lr"),
                           (t, r["control_sharpness"], "control α, large lr")], {"threshold": 2 / r["large_lr"]})]))
    elif kind == "toy":
        names.append(panels(out / "toy.png", f"toy ReLU network ({cfg.loss})", [
            ("loss", [(t[::2], r["toy_loss_plus"][::2], "x_0 = +α (even steps)"),
                      (t[::2], r["toy_loss_minus"][::2], "x_0 = −α (even steps)"), (t, r["toy_loss"], "total")],
             {"log": True}),
            ("sharpness", [(t, r["toy_sharpness"], "Lanczos"), (t, r["toy_opposing_curvature"], "x_0-column curvature"),
                           (t, r["control_sharpness"], "control α")], {"threshold": 2 / r["lr"]}),
            ("use of x_0", [(t, r["toy_odd"], "odd part"), (t, r["toy_even"], "even part (|x_0|)")], {})]))
    elif kind in ("images", "text"):
        e = r["eig_step"]
        names.append(panels(out / "eos.png", f"{cfg.model}, {cfg.loss}, n = {cfg.n}, lr = {cfg.lr}", [
            ("train loss", [(t, r["loss"], "")], {"log": True}),
            ("sharpness", [(e, r["eigenvalues"][:, 0], "top eigenvalue"), (e, r["midpoint"], "at the step's midpoint")],
             {"threshold": 2 / cfg.lr}),
            ("share of vᵀHv", [(e, r["top1_share"], "top 1% of examples"), (e, r["outlier_share"], "the step's outliers")],
             {})]))
        if kind == "images" and r["post"].any():
            s = np.flatnonzero(r["post"])[0]
            fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
            for row, side in enumerate((True, False)):
                members = r["index"][s][r["up"][s] == side][:10]
                for j, ax in enumerate(axes[row]):
                    ax.axis("off")
                    if j < len(members):
                        ax.imshow(r["images"][members[j]])
                        ax.set_title(osig.CIFAR10_CLASSES[r["labels"][members[j]]], fontsize=6)
            fig.suptitle(f"the outliers of step {e[s]}: loss up (top row) and down", fontsize=8)
            save_figure(fig, out / "groups.png")
            names.append("groups.png")
    elif kind == "dose":
        fig, ax = plt.subplots(figsize=(5, 3.5))
        image = ax.imshow(r["crossing"], origin="lower", aspect="auto")
        ax.set(xticks=range(len(cfg.fractions)), xticklabels=cfg.fractions, yticks=range(len(cfg.strengths)),
               yticklabels=cfg.strengths, xlabel="planted fraction", ylabel="planted strength",
               title="first step at 2/lr (blank: never)")
        fig.colorbar(image, ax=ax)
        save_figure(fig, out / "phase_diagram.png")
        names.append("phase_diagram.png")
    elif kind == "interventions":
        names.append(panels(out / "interventions.png", "interventions, first seed", [
            ("sharpness", [(np.flatnonzero(np.isfinite(c)), c[np.isfinite(c)], v) for v, c in zip(r["variants"],
                                                                                              r["curves"])],
             {"threshold": 2 / cfg.lr}),
            ("p(airplane): pasted − original", [(np.arange(len(r["shift"])), r["shift"][:, j], p)
                                                for j, p in enumerate(r["pastes"])], {})]))
    else:
        names.append(panels(out / "optimizers.png", "the best run of each optimizer, first seed", [
            ("mean training loss at the records", [(np.arange(len(r[f"{o}_curve"])), r[f"{o}_curve"], o)
                                                   for o in ("sgd", "adam", "split")], {"log": True})]))
    return names

# ----------------------------------------------------------------------------- report and command line


def atomic_write(path, write):
    """write(temporary path), fsync, rename onto `path`: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def strict_json(obj):
    """JSON text with null for nan and infinity (strict JSON has neither)."""
    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, (float, np.floating)):
            return float(value) if math.isfinite(value) else None
        return value.item() if isinstance(value, np.generic) else value
    return json.dumps(clean(obj), indent=1, allow_nan=False)


def text(value):
    """Untrusted text for the markdown report: HTML-escaped, one line, no table pipes, no link schemes."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", " ").replace("javascript:", "javascript&#58;")


def write_report(out, results, profile, device):
    """report.md: the status of every experiment, then per experiment its figures, claims (value, per seed, target,
    source, met) and its setting checks and diagnostics, from the saved results."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    lines = ["# osig: measured reproduction report", "",
             f"Profile `{profile}` on `{device}`, torch {torch.__version__}; claims judged under commit `{commit}`, "
             f"{time.strftime('%Y-%m-%d %H:%M')}.", "", SOURCES, "", "| experiment | status | claims met | seconds |",
             "|---|---|---|---|"]
    for name, result in results.items():
        claims = [v for v in result.get("verdicts", []) if counted(v)]
        lines.append(f"| [{name}](#{name}) | {text(result['status'])} | {sum(v['met'] for v in claims)}/{len(claims)} "
                     f"| {result.get('seconds') or 0:.0f} |")
    for name, result in results.items():
        lines += ["", f"## {name}", "", text(result.get("title", "")), ""]
        if result["status"] != "done":
            lines += [f"**{text(result['status'])}**: {text(result.get('reason', ''))}", ""]
            continue
        lines += [f"![{f}]({name}/{f})" for f in result["figures"] if f.replace("_", "").replace(".", "").isalnum()]
        for title, rows in (("Claims", [v for v in result["verdicts"] if counted(v)]),
                            ("Setting checks and diagnostics (not counted)",
                             [v for v in result["verdicts"] if not counted(v)])):
            lines += ["", f"{title}:", "", "| claim | value | per seed | target | source | met |", "|---|---|---|---|---|---|"]
            lines += [f"| {text(v['claim'])} | {fmt(v['value'])} | {', '.join(fmt(x) for x in v['per_seed'])} | "
                      f"{text(v['target'])} | {text(v['source'])} | "
                      f"{'' if v['met'] is None else 'yes' if v['met'] else '**no**'} |" for v in rows]
        lines += [""] + [f"- {text(note)}" for note in result.get("notes", [])]
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def fmt(value):
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4g}"


SOURCES = ("Sources: **paper**, the paper's own claim; **recalled**, remembered from the paper, not confirmed; "
           "**ours**, our reconstruction's choice; **calibration**, read off the named run. Where a row says "
           "'paper (...); 0.8: ours', the direction is the paper's and the size ours. Every target was committed "
           "before the runs that judge it. Setting checks and diagnostics are printed, not counted. A value that "
           "cannot be measured (say, the run never reached 2/lr) is nan and not met.")


def record_key(cfg, device):
    """What a saved record must have been made with: this config, the measuring code (osig.py and the runs section
    of this file: editing a claim or a figure does not invalidate records), the torch version and the device."""
    runs = Path(__file__).read_text().split("# " + "-" * 77 + " runs")[-1].split("# " + "-" * 77 + " the claims")[0]
    config = json.dumps([type(cfg).__name__, dataclasses.asdict(cfg), torch.__version__, str(device)])
    return __import__("hashlib").sha256((Path(osig.__file__).read_text() + runs + config).encode()).hexdigest()[:16]


def load_record(path, key, config):
    """The record saved at `path` if it is readable and was made with `key` (code) and `config`, else None."""
    try:
        with np.load(path, allow_pickle=False) as data:
            record = {name: data[name] for name in data.files}
    except FileNotFoundError:
        return None
    except Exception as error:                 # a damaged archive can fail in many ways: recompute it
        print(f"  warning: {path} is unreadable ({type(error).__name__}); it will be recomputed")
        return None
    return record if str(record.pop("_key", "")) == key and str(record.pop("_config", "")) == config else None


def load_result(path, key):
    """The result.json at `path` if it was made with `key` and has the shape the report needs, else None."""
    try:
        result = json.loads(path.read_text())
        if isinstance(result, dict) and result.get("key") != key:
            return None                        # made with another config or code: not this experiment's result
        assert isinstance(result, dict) and result.get("status") in ("done", "skipped", "failed")
        assert all(isinstance(result.get(k, ""), str) for k in ("title", "reason", "status"))
        assert all(isinstance(f, str) for f in result.get("figures", [])) and isinstance(result.get("notes", []), list)
        for v in result.get("verdicts", []):
            assert all(isinstance(v[k], str) for k in ("claim", "target", "source"))
            assert all(x is None or isinstance(x, (int, float)) for x in [v["value"]] + list(v["per_seed"]))
            assert v["met"] in (True, False, None)
        return dict(result, verdicts=[dict(v, value=math.nan if v["value"] is None else v["value"], per_seed=[
            math.nan if x is None else x for x in v["per_seed"]]) for v in result.get("verdicts", [])])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AssertionError, KeyError, TypeError) as error:
        print(f"  warning: {path} is unreadable or damaged ({type(error).__name__}); it will be recomputed")
        return None


RUNS = {"LinearConfig": run_linear, "ToyConfig": run_toy, "GDConfig": run_gd, "DoseConfig": run_dose,
        "InterventionsConfig": run_interventions, "OptimizersConfig": run_optimizers}


def run_experiment(name, cfg, args, hint):
    """One experiment: each seed's record reused if saved with the same key, else computed and saved at once (an
    interrupted run loses at most one seed); then the claims and figures. Missing data skips it; any other error,
    including a folder it cannot write, fails it alone. Returns its result, also saved as result.json."""
    out, key, began = Path(args.out) / name, record_key(cfg, args.device), time.time()
    config = json.dumps(dataclasses.asdict(cfg))
    result = {"title": " ".join(type(cfg).__doc__.split()), "config": dataclasses.asdict(cfg), "key": key,
              "status": "done", "notes": []}
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / ".write-test", lambda tmp: Path(tmp).write_text(""))
        records = []
        for seed in cfg.seeds:
            path = out / f"seed{seed}.npz"
            if args.force or load_record(path, key, config) is None:
                print(f"\n=== {name}, seed {seed} ({len(records) + 1}/{len(cfg.seeds)})\n{cfg}")
                threads = torch.get_num_threads()      # tiny float64 problems: synchronizing threads costs more
                torch.set_num_threads(1 if isinstance(cfg, (LinearConfig, ToyConfig)) else threads)
                try:
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        record = RUNS[type(cfg).__name__](cfg, seed, args.device, print)
                finally:
                    torch.set_num_threads(threads)
                record.update(lr=getattr(cfg, "lr", math.nan), eos_by=getattr(cfg, "eos_by", math.nan))
                def save(tmp):
                    with open(tmp, "wb") as f:
                        np.savez_compressed(f, _key=np.str_(key), _config=np.str_(config), **record)
                atomic_write(path, save)
            else:
                print(f"reusing {name} seed {seed}: saved with the same config and code (--force recomputes it)")
            records.append(load_record(path, key, config))
        result["verdicts"] = judge(cfg, records)
        result["figures"] = figures(cfg, records[0], out)
        result["notes"] = [f"seed {s}: {r['diverged']}" for s, r in zip(cfg.seeds, records) if str(r.get("diverged", ""))]
    except osig.DataError as error:
        result.update(status="skipped", reason=f"{error} (then: {hint} --only {name})")
    except Exception as error:                 # one broken experiment must not lose the others
        traceback.print_exc()
        result.update(status="failed", reason=f"{type(error).__name__}: {error} (rerun: {hint} --only {name})")
    result["seconds"] = time.time() - began
    try:
        atomic_write(out / "result.json", lambda tmp: Path(tmp).write_text(strict_json(result)))
    except OSError as error:
        result.update(status="failed", reason=f"cannot write to {out} ({error.strerror}): make it writable, or pass "
                                              f"another --out")
    print(f"  {name}: {result['status']} in {result['seconds']:.0f} s" + (f": {result.get('reason')}" if
                                                                          result["status"] != "done" else ""))
    return result


def preflight(name, cfg, device, n=16, steps=100, log=print):
    """A dead configuration, caught in seconds on any device: 100 full-batch steps of the experiment's own model,
    loss and step size (optimizer studies: SGD and Adam at the middle of their grids) on n CIFAR-10 images (planted
    ones without them) or n/4 tiny Shakespeare sequences. It passes when the mean loss of the last 20 steps is at
    most 0.8 x the best constant prediction's and, for gradient descent, the sharpness measured every 25 steps
    reaches 1.5x its start (README: why). Returns a list of (passed, message)."""
    text = cfg.data == "shakespeare"
    try:
        x, y, _, _ = gd_data(dataclasses.replace(GDConfig(), data=cfg.data, n=max(1, n // 4) if text else n,
                                                 context=cfg.context), 0, download=False)
    except osig.DataError:
        if text:
            return []
        x, y, _, _ = gd_data(dataclasses.replace(GDConfig(), data="planted", n=n), 0)
    frequency = np.bincount(y.reshape(-1).numpy()) / y.numel()
    constant = 0.5 * (1 - (frequency ** 2).sum()) if cfg.loss == "mse" else -np.sum(frequency[frequency > 0] * np.log(
        frequency[frequency > 0]))
    results, loss_fn = [], LOSSES[cfg.loss]
    for optimizer_name, lr in ([("gd", cfg.lr)] if isinstance(cfg, GDConfig) else [
            ("sgd", cfg.sgd_lrs[len(cfg.sgd_lrs) // 2]), ("adam", cfg.adam_lrs[len(cfg.adam_lrs) // 2])]):
        model = build_model(cfg, x.shape[1:], 0, 65 if text else 10).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr) if optimizer_name == "adam" else torch.optim.SGD(
            model.parameters(), lr, momentum=0.0 if optimizer_name == "gd" else cfg.momentum)
        history = osig.train(model, x.to(device), y.to(device), loss_fn, optimizer, steps, log=None,
                             measure=osig.sharpness_measure(loss_fn, x.to(device), y.to(device), 25, iters=10, tol=1e-2))
        sharpness = osig.measured(history, "eigenvalues")[1][:, 0]
        final, rise = float(np.mean(history["loss"][-20:])), sharpness.max() / sharpness[0]
        learns, sharpens = final <= 0.8 * constant, rise >= 1.5 or optimizer_name != "gd"
        passed = history["diverged"] is None and learns and sharpens
        message = (f"{name} ({cfg.model}, {cfg.loss}, {optimizer_name} lr {lr:g}): loss {history['loss'][0]:.3f} -> "
                   f"{final:.3f} (constant predictor {constant:.3f}), sharpness x{rise:.2f}" + ("" if passed else
                   " -- FAILS: " + (history["diverged"] or ("the network does not learn at this init and lr" if not
                                                             learns else "no progressive sharpening at this init and lr"))))
        log(("  preflight ok   | " if passed else "  preflight FAIL | ") + message)
        results.append((passed, message))
    return results


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), help="gpu (full; default with CUDA), cpu (a laptop; "
                        "default otherwise), smoke (seconds, synthetic images: the tests)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this experiment (repeatable)")
    parser.add_argument("--out", default="results", help="results folder (default: results)")
    parser.add_argument("--seed", type=int, help="run every experiment on this one seed")
    parser.add_argument("--data", choices=["cifar10", "planted"], help="images of the image experiments")
    parser.add_argument("--force", action="store_true", help="recompute experiments whose records exist")
    parser.add_argument("--preflight", action="store_true", help="only check each gradient-descent and optimizer "
                        "setting: 100 steps on 16 images must lower the loss and raise the sharpness")
    parser.add_argument("--claims", action="store_true", help="print the claims table (markdown) and exit")
    args = parser.parse_args(argv)
    if args.seed is not None and not 0 <= args.seed < 2 ** 31:
        parser.error(f"--seed {args.seed}: seeds must be in 0..2^31 - 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        assert float(torch.ones(2, device=args.device).sum().cpu()) == 2.0
    except Exception as error:                 # an unknown, absent or computeless device ("meta")
        parser.error(f"--device {args.device} cannot run computations here ({str(error).splitlines()[0][:120]}); "
                     f"try --device cpu")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / ".write-test", lambda tmp: Path(tmp).write_text(""))
    except OSError as error:
        parser.error(f"--out {out} is not a writable folder ({error.strerror}): give a folder you can write to")
    args.profile = args.profile or ("gpu" if args.device.startswith("cuda") else "cpu")
    args.data = args.data or ("planted" if args.profile == "smoke" else "cifar10")
    unknown = sorted(set(args.only or []) - set(PROFILES[args.profile]))
    if unknown:
        parser.error(f"unknown experiment {', '.join(unknown)}: choose from {', '.join(PROFILES[args.profile])}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.claims:
        print("| experiments | claim | target | source |\n|---|---|---|---|\n" + "\n".join(
            f"| {c.kind} | {c.claim} | {c.target} | {c.source} |" for c in CLAIMS if c.target))
        return 0
    configs = {name: dataclasses.replace(cfg, **({"data": args.data} if getattr(cfg, "data", "") in ("cifar10", "planted")
                                                  else {}), **({"seeds": (args.seed,)} if args.seed is not None else {}))
               for name, cfg in PROFILES[args.profile].items()}
    chosen = {name: cfg for name, cfg in configs.items() if not args.only or name in args.only}
    if args.preflight:
        checks = [check for name, cfg in chosen.items() if isinstance(cfg, (GDConfig, OptimizersConfig))
                  for check in preflight(name, cfg, args.device)]
        failed = [message for passed, message in checks if not passed]
        print(f"\npreflight: {len(checks) - len(failed)}/{len(checks)} passed" + "".join(f"\n  {m}" for m in failed))
        return 1 if failed else 0
    out, hint = Path(args.out), f"python run_all.py --profile {args.profile} --out {args.out} --data {args.data}"
    lock = open(out / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        print(f"run_all.py: another run (pid {lock.read().strip() or '?'}) is writing to {out}: wait for it to "
              f"finish, or pass another --out", file=sys.stderr)
        return 2
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    for stale in out.rglob(".*.tmp"):          # left by a run that was killed; the lock says none is running now
        stale.unlink(missing_ok=True)
    results = {}
    try:
        for name, cfg in chosen.items():
            results[name] = run_experiment(name, cfg, args, hint)
            write_report(out, planned_results(out, configs, results, args.device, hint), args.profile, args.device)
    except KeyboardInterrupt:
        write_report(out, planned_results(out, configs, results, args.device, hint), args.profile, args.device)
        print(f"\ninterrupted: every finished seed is saved in {out}; resume with: {hint}"
              + "".join(f" --only {name}" for name in args.only or []), file=sys.stderr)
        return 130
    finally:
        lock.close()                           # releases the folder
    print(f"\nreport: {out / 'report.md'}")
    if results and all(r["status"] == "skipped" for r in results.values()):
        print("nothing ran: every requested experiment was skipped for missing data (reasons above); put the data "
              "where the messages say, or set OSIG_DATA, and rerun", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


def planned_results(out, configs, results, device, hint):
    """Every planned experiment's result: this run's, else a saved one made with the same config and code, else
    "not run" with the command that runs it."""
    return {name: results.get(name) or load_result(out / name / "result.json", record_key(cfg, device)) or {
        "status": "not run", "reason": f"no result for this config and code yet: {hint} --only {name}"}
        for name, cfg in configs.items()}


if __name__ == "__main__":
    sys.exit(main())
