"""
run_all.py: reproduce every phenomenon of osig end to end; write per-seed records, figures and results/report.md.

    python run_all.py                            # every experiment: the GPU profile with CUDA, else the CPU one
    python run_all.py --only linear              # one experiment (repeatable); the report keeps the others
    python run_all.py --profile gpu --preflight  # 100 steps of every GPU setting, on any device
    python run_all.py --claims                   # the claims table (README's "What it measures")

Sections: configs and profiles; runs, one `run_<kind>(cfg, seed, device, log)` per kind returning a record (a flat
dict of arrays, saved as soon as its seed finishes); the claims, one row each, judged by `judge`; figures; report and
command line. This file says what to run and what the paper claims; osig.py says how to measure.
"""

import argparse, ast, dataclasses, fcntl, functools, hashlib, html, json, math, os, subprocess, sys, tempfile, time
import traceback, warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import osig

# ----------------------------------------------------------------------------- configs and profiles

@dataclass(frozen=True)
class LinearConfig:
    """Two-layer linear model bᵀAx on data with a rare opposing feature: gradient descent at a large lr (enters the
    edge of stability), a small lr (sharpens and stays) and a control α at the genuine features' scale."""
    n_pairs: int = 200              # examples carrying the feature, each with s = +1 and −1: p = 2 n_pairs / N = 1/3
    n_plain: int = 800              # examples without it
    alpha: float = 7.0              # its size: p α² = 16.3 against genuine second moments <= 1
    control_alpha: float = 1.0      # the control: at the scale of the largest genuine feature
    scales: tuple = (1.0, 0.7, 0.5, 0.35, 0.25)   # genuine features' standard deviations
    offset: float = 0.5             # target offset on |x_o|, shared by both groups
    width: int = 10
    init_scale: float = 0.01
    large_lr: float = 0.08          # 2/lr = 25 < p α² |β| = 36.5: enters the edge of stability
    large_steps: int = 1000
    small_lr: float = 0.02          # 1/lr = 50 > 36.5: the opposing weight never flips
    small_steps: int = 4000
    seeds: tuple = (0,)

@dataclass(frozen=True)
class ToyConfig:
    """A one-hidden-layer ReLU network on the same data (target offset on |x_0|) at one lr, with the same run at a
    small control α; "ce" classifies the target's sign with two-class cross-entropy."""
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

@dataclass(frozen=True)
class GDConfig:
    """Full-batch gradient descent on a fixed training set, the sharpness and the step's outliers measured every
    eig_every steps: the edge of stability, heavy tails, opposing groups against selection-matched nulls, the features
    they share (the sky for images, characters for text) and where the sharp direction lives."""
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
    steps: int = 1200
    eig_every: int = 25             # steps between measurements
    eig_k: int = 4                  # top eigenvalues (MSE puts several at 2/lr together)
    top: int = 30                   # outliers per selection
    draws: int = 50                 # selection-matched null draws per selection (>= 40: two-sided p can be < 0.05)
    chunk: int = 0                  # examples per forward pass (0: all at once)
    eos_by: int = 800               # setting check: the crossing of 2/lr by this step
    seeds: tuple = (0,)

@dataclass(frozen=True)
class DoseConfig:
    """Full-batch GD on planted images over a grid of planted strength and fraction: where a planted opposing signal
    drives progressive sharpening and the edge of stability."""
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

@dataclass(frozen=True)
class InterventionsConfig:
    """Causal tests on CIFAR-10, paired by seed (same subset and initialization): recolour the sky of every sky image
    or, as the control, the top quarter of as many random images; paste a sky or a grey top on non-sky airplanes,
    birds and ships; remove the top movers after the crossing or matched examples; paste the sky on test images."""
    n: int = 500
    width: int = 200
    lr: float = 0.06                # calibration (helper run, seeds 0-4): start at 0.51-0.63 x 2/lr, cross at 80-120
    steps: int = 220
    eig_every: int = 25             # coarse sharpness grid, and ...
    fine_every: int = 5             # ... the fine one from 0.9 x 2/lr to 25 steps past the crossing
    window: int = 50                # steps after the crossing whose summed |loss change| ranks the movers
    fractions: tuple = (0.01, 0.02, 0.05)         # removed fractions (the dose)
    n_probe: int = 200              # non-airplane test images pasted with each top
    seeds: tuple = (0, 1, 2, 3, 4)

@dataclass(frozen=True)
class OptimizersConfig:
    """SGD with momentum, Adam and split-update SGD, each at its best step size of a grid with the same budget (per
    seed): the opposing groups' oscillation against loss-matched controls, and where the top eigenvector lives."""
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
    lrs: tuple = ((0.1, 0.3, 1.0), (3e-3, 1e-2, 3e-2), (0.1, 0.3, 1.0))   # SGD, Adam, split's SGD part (its
    split_quantile: float = 0.1                                          # normalized part: Adam's best lr)
    record_every: int = 5           # per-example losses every this many steps (odd: period 2 still alternates)
    eig_every: int = 100
    eig_examples: int = 32
    top: int = 40
    window: int = 20                # record intervals measured after each selection
    seeds: tuple = (0, 1, 2)

GD_IMAGES = GDConfig(seeds=(0, 1, 2))
PROFILES = {"cpu": {   # a laptop CPU, real CIFAR-10 and tiny Shakespeare: 72 min on 2 idle cores (sized for 60)
    "linear": LinearConfig(), "toy": ToyConfig(), "toy_ce": ToyConfig(loss="ce", offset=0.75, hidden_bias=0.3, lr=0.2),
    "cifar_mse": GD_IMAGES,
    "cifar_ce": dataclasses.replace(GD_IMAGES, activation="tanh", loss="ce", lr=0.05, steps=700, eig_k=1, eos_by=500),
    "cnn_mse": GDConfig(n=500, model="cnn", width=16, lr=0.1, steps=900, eig_every=50, eig_k=1, eos_by=800),
    "text_gd": GDConfig(data="shakespeare", n=128, model="gpt", width=64, loss="ce", lr=0.15, steps=750, eig_every=25,
                        eig_k=1, top=60, eos_by=500, seeds=(0, 1, 2)),
    "text_optimizers": OptimizersConfig(), "planted_dose": DoseConfig(), "interventions": InterventionsConfig()}}
PROFILES["smoke"] = {   # seconds, synthetic images and a few thousand characters: the tests
    "linear": LinearConfig(large_steps=400, small_steps=1000), "toy": ToyConfig(steps=600),
    "toy_ce": ToyConfig(loss="ce", offset=0.75, hidden_bias=0.3, lr=0.2, steps=600),
    "cifar_mse": GDConfig(data="planted", n=400, width=64, lr=0.15, steps=150, eig_every=10, eig_k=4, top=10, eos_by=150),
    "cifar_ce": GDConfig(data="planted", n=400, width=64, activation="tanh", loss="ce", lr=0.2, steps=150, eig_every=10,
                         eig_k=1, top=10, eos_by=150),
    "text_gd": GDConfig(data="shakespeare", n=24, model="gpt", width=32, depth=1, heads=2, context=32, loss="ce", lr=0.5,
                        steps=150, eig_every=10, eig_k=1, top=20, eos_by=150),
    "optimizers": OptimizersConfig(data="planted", n=400, n_test=200, model="mlp", width=32, depth=1, steps=90,
                                   batch_size=32, lrs=((0.01, 0.03), (3e-4, 1e-3), (0.01, 0.03)), record_every=3,
                                   eig_every=30, eig_examples=200, top=10, window=8, seeds=(0, 1)),
    "planted_dose": DoseConfig(strengths=(0.0, 1.0), fractions=(0.25,), steps=120, seeds=(0,)),
    "interventions": InterventionsConfig(n=200, steps=100, eig_every=10, window=30, fractions=(0.05,), n_probe=50,
                                         seeds=(0, 1))}
PROFILES["gpu"] = dict({k: v for k, v in PROFILES["cpu"].items() if k != "cnn_mse"}, **{   # one H200, under 10
    # minutes: what differs from the CPU profile; VGG-11 and ResNet-18 are its conv nets (README: calibration)
    "cifar_mse": GDConfig(model="vgg11", width=64, lr=0.05, steps=1000, eig_every=25, eig_k=4, eos_by=600),
    "resnet18": GDConfig(model="resnet18", width=32, lr=0.05, steps=1000, eig_every=25, eig_k=4, eos_by=600),
    "cifar_ce": GDConfig(model="vit", width=128, depth=4, loss="ce", lr=0.05, steps=800, eig_every=25, eig_k=1,
                         eos_by=400),
    "text_gd": GDConfig(data="shakespeare", n=256, model="gpt", width=128, depth=4, context=128, loss="ce", lr=0.08,
                        steps=1200, eig_every=30, eig_k=1, top=120, eos_by=900),
    "text_optimizers": OptimizersConfig(n=512, n_test=128, width=128, depth=4, context=128, steps=1000, batch_size=32,
                                        lrs=((0.1, 0.3, 1.0), (1e-3, 3e-3, 1e-2), (0.1, 0.3, 1.0)), eig_examples=64,
                                        top=80)})
LOSSES, AIRPLANE, BIRD, SHIP = {"mse": osig.mse_loss, "ce": osig.cross_entropy_loss}, 0, 2, 8
GREY, GREEN = (128, 128, 128), (70, 140, 60)      # control colours (RGB)

# ----------------------------------------------------------------------------- runs

def load_images(data, n, seed, download=True):
    """uint8 images [n, 32, 32, 3], labels [n] and planted ids [n] (zeros for CIFAR-10) of one seed's subset."""
    if data == "planted":
        return osig.make_planted_images(n=n, planted_classes=(AIRPLANE, BIRD), seed=seed)
    images, labels = osig.load_cifar10(train=True, download=download)
    index = osig.seeded_subset(len(images), n, seed=seed)
    return images[index], labels[index], torch.zeros(n, dtype=torch.int64)

def build_model(cfg, in_shape, seed, classes=10):
    """The network a config names, seeded; no batch norm, so that per-example gradients are defined."""
    torch.manual_seed(seed)
    return {"mlp": lambda: osig.MLP(int(np.prod(in_shape)), cfg.width, cfg.depth, classes, cfg.activation),
            "cnn": lambda: osig.SmallCNN(in_shape[0], cfg.width, classes), "vgg11": lambda: osig.VGG11(classes, cfg.width),
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
                             measure=lambda step, model, opt: dict(sharpness(step, model, opt),
                                                                   **osig.linear_state(model, x, y, sign)), log=None)
        state = {key: osig.measured(history, key)[1] for key in history["measured"][0] if key != "step"}
        state.update(sharpness=state.pop("eigenvalues")[:, 0], loss=history["loss"], lr=lr, theory=float(
            (x[:, 0] ** 2).mean()) * float(torch.linalg.lstsq(x, y[:, None]).solution.norm()))  # p α² |β|
        state.update(episode=osig.oscillation_episode(state["loss_plus"], state["loss_minus"], state["sharpness"], 2 / lr),
                     crossing=int(np.argmax(state["sharpness"] >= 2 / lr)))
        record.update({f"{run}_{key}": value for key, value in state.items()})
        log(f"  {run}: alpha {alpha}, lr {lr}: max sharpness {state['sharpness'].max():.2f}, 2/lr {2 / lr:.1f}")
    return record

def run_toy(cfg, seed, device, log):
    """The toy ReLU network with the outlier feature and with a small control α (float64, on the CPU)."""
    record = {}
    for run, alpha in (("toy", cfg.alpha), ("control", cfg.control_alpha)):
        x, y, sign = osig.make_opposing_signal_data(cfg.n_pairs, cfg.n_plain, alpha, cfg.scales, offset=cfg.offset,
                                                    seed=seed)
        loss_fn, y = (osig.regression_loss, y) if cfg.loss == "mse" else (osig.cross_entropy_loss, (y > 0).long())
        model = osig.make_toy_network(x.shape[1], cfg.width, cfg.weight_scale, cfg.output_scale, cfg.hidden_bias, seed,
                                      num_outputs=1 if cfg.loss == "mse" else 2)
        probes, grid = osig.opposing_probes(alpha, x.shape[1])
        sharpness = osig.sharpness_measure(loss_fn, x, y, every=1)
        history = osig.train(model, x, y, loss_fn, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.steps, log=None,
                             measure=lambda step, model, opt: dict(sharpness(step, model, opt), **osig.toy_state(
                                 model, loss_fn, x, y, sign, probes)))
        state = {key: osig.measured(history, key)[1] for key in history["measured"][0] if key != "step"}
        state.update(zip(("odd", "even"), osig.odd_even_parts(state["probe_output"], grid.numpy(), alpha)),
                     sharpness=state.pop("eigenvalues")[:, 0], loss=history["loss"], grid=grid.numpy())
        record.update({f"{run}_{key}": value for key, value in state.items()})
        log(f"  {run}: alpha {alpha}: max sharpness {state['sharpness'].max():.2f}, 2/lr {2 / cfg.lr:.1f}")
    above = record["toy_sharpness"] >= 2 / cfg.lr
    return dict(record, crossing=int(np.argmax(above)) if above.any() else len(above), half_learned=osig.half_learned_step(
        record["toy_even"]), episode=osig.oscillation_episode(record["toy_loss_plus"], record["toy_loss_minus"],
                                                              record["toy_sharpness"], 2 / cfg.lr))

def gd_data(cfg, seed, download=True):
    """x, y, what the record keeps about the examples, and the probes: for images their labels, sky groups, planted
    ids and pixels, and four uniform probes (the sky's mean colour, grey, green, `osig.orthogonal_probe`); for text the
    characters' features (`osig.token_features`)."""
    if cfg.data == "shakespeare":
        tokens, vocabulary = osig.encode_characters(osig.load_tiny_shakespeare(download=download))
        x, y = osig.text_sequences(tokens, cfg.n, cfg.context, seed=seed)
        names, masks = osig.token_features(x, y, vocabulary)
        return x, y, dict(feature_names=np.array(names), features=masks), None
    images, labels, planted = load_images(cfg.data, cfg.n, seed, download)
    (x, mean, std), (sky, no_sky) = osig.normalize(images), osig.sky_groups(images)
    sky_rgb = images[sky][:, :8].reshape(-1, 3).float().mean(0) if sky.any() else torch.tensor([80.0, 150, 255])
    probes = torch.cat([osig.uniform_probe(rgb, mean, std) for rgb in (sky_rgb, GREY, GREEN)])
    return x, labels, dict(labels=labels.numpy(), sky=sky.numpy(), no_sky=no_sky.numpy(), planted=planted.numpy(),
                           images=images.numpy()), torch.cat([probes, osig.orthogonal_probe(probes[:1])])

def run_gd(cfg, seed, device, log):
    """Full-batch GD on images or text: the step's outliers every cfg.eig_every steps, the probes at every step."""
    x, y, record, probes = gd_data(cfg, seed)
    model, loss_fn = build_model(cfg, x.shape[1:], seed, 65 if cfg.model == "gpt" else 10).to(device), LOSSES[cfg.loss]
    xd, yd, probes = x.to(device), y.to(device), None if probes is None else probes.to(device)
    log(f"  seed {seed}: {y.numel()} examples, {sum(p.numel() for p in model.parameters())} parameters")
    sharpness = osig.sharpness_measure(loss_fn, xd, yd, cfg.eig_every, cfg.eig_k, cfg.chunk or None, lr=cfg.lr,
                                       top=cfg.top, draws=cfg.draws)

    def measure(step, model, optimizer):
        with torch.no_grad():
            record = {} if probes is None else {"probe_output": model(probes).cpu().numpy()}
        return dict(record, **(sharpness(step, model, optimizer) or {})) or None

    history = osig.train(model, xd, yd, loss_fn, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.steps,
                         chunk=cfg.chunk or None, measure=measure, seed=seed, log=log)
    steps, T = osig.measured(history, "eigenvalues")[0], len(history["loss"])
    record.update({key: osig.measured(history, key)[1] for key in history["measured"][0] if key != "step"},
                  loss=history["loss"], per_example_loss=history["per_example_loss"], eig_step=steps,
                  diverged=np.str_(history["diverged"] or ""), parameter_shares=np.bincount(
                      osig.parameter_layers(model)[1]) / sum(p.numel() for p in model.parameters()))
    record.update(index=record["index"].astype(int), null_index=record["null_index"].astype(int),
                  up=record["up"].astype(bool), **osig.edge_of_stability(steps, record["eigenvalues"][:, 0], 2 / cfg.lr))
    crossing = record["crossing"]
    record.update(after=T if math.isnan(crossing) else math.ceil(crossing), post=(steps >= crossing) & (steps + 12 < T),
                  pre=(steps >= crossing / 2) & (steps < crossing))
    for name, (observed, null) in osig.pair_statistics(record["per_example_loss"], steps, record["index"], record["up"],
                                                       record["null_index"], x if probes is not None else None).items():
        record.update({name: observed, f"{name}_null": null})
    return record

def run_dose(cfg, seed, device, log):
    """Every cell of the planted strength x fraction grid: the sharpness and its crossing of 2/lr."""
    curves = []
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
            curves.append(sharpness[:, 0])
            log(f"  strength {strength:g}, fraction {fraction:g}: sharpness {sharpness[0, 0]:.1f} -> {sharpness.max():.1f}")
    curves = np.reshape(curves, (len(cfg.strengths), len(cfg.fractions), -1))
    return dict(steps=steps, sharpness=curves, window=cfg.window, crossing=np.apply_along_axis(
        lambda s: osig.edge_of_stability(steps, s, 2 / cfg.lr)["crossing"], -1, curves))

def intervention_run(cfg, x, y, keep, seed, device, pastes=None):
    """GD from the seed's initialization on the kept examples, the sharpness every cfg.eig_every steps and every
    cfg.fine_every from 0.9 x 2/lr to 25 steps past the crossing; given pastes (name -> normalized images), also the
    mean p(airplane) on each at every step and the parameters at every coarse measurement."""
    xk, yk, near = x[keep].to(device), torch.as_tensor(y)[keep].to(device), {"value": 0.0, "crossed": math.inf}
    torch.manual_seed(seed)
    model = osig.MLP(x[0].numel(), cfg.width, 2, 10).to(device)
    sharpness = osig.sharpness_measure(osig.mse_loss, xk, yk, every=1, iters=20, tol=1e-2)

    def measure(step, model, optimizer):
        record = {} if pastes is None else {"airplane": np.array([torch.softmax(model(p.to(device)), -1)[:, AIRPLANE]
                                                                  .mean().item() for p in pastes.values()])}
        fine = near["value"] >= 0.9 * 2 / cfg.lr and step <= near["crossed"] + 25
        if step % (cfg.fine_every if fine else cfg.eig_every) == 0:
            record.update(sharpness(step, model, optimizer))
            near["value"] = record["eigenvalues"][0]
            near["crossed"] = min(near["crossed"], step if near["value"] >= 2 / cfg.lr else math.inf)
            if pastes is not None and step % cfg.eig_every == 0:
                record["parameters"] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
        return record

    return osig.train(model, xk, yk, osig.mse_loss, torch.optim.SGD(model.parameters(), lr=cfg.lr), cfg.steps,
                      measure=measure, seed=seed, log=None)

def run_interventions(cfg, seed, device, log):
    """Every paired variant of one seed (InterventionsConfig), each summarized by `osig.intervention_endpoints`."""
    images, labels, _ = load_images("cifar10", cfg.n, seed)
    (x, mean, std), (sky, no_sky), labels = osig.normalize(images), osig.sky_groups(images), labels.numpy()
    sky_rgb = images[sky][:, :8].reshape(-1, 3).float().mean(0).tolist() if sky.any() else [80.0, 150.0, 255.0]
    test_images, test_labels = osig.load_cifar10(train=False)
    others = test_images[test_labels != AIRPLANE][:cfg.n_probe]
    pastes = {name: osig.normalize(osig.paste_top(others, rgb), mean, std)[0]
              for name, rgb in (("original", None), ("sky", sky_rgb), ("grey", GREY), ("green", GREEN))}
    pastes["orthogonal"] = pastes["original"].clone()
    pastes["orthogonal"][:, :, :8] = osig.orthogonal_probe(osig.uniform_probe(sky_rgb, mean, std))[:, :, :8]
    pair, everyone, rng = osig.sky_pair(labels, sky.numpy(), no_sky.numpy())[:2], np.ones(cfg.n, bool), np.random.default_rng(seed)
    base = intervention_run(cfg, x, labels, everyone, seed, device, pastes)
    record = {"as is": osig.intervention_endpoints(base, cfg.lr, pair, cfg.window)}
    after = min(record["as is"]["after"], cfg.steps - cfg.window - 1)
    score = np.abs(np.diff(base["per_example_loss"][after:after + cfg.window + 1], axis=0)).sum(0)
    model = osig.MLP(x[0].numel(), cfg.width, 2, 10)         # the run at the crossing: match on loss and gradient norm
    torch.nn.utils.vector_to_parameters(torch.as_tensor(osig.measured(base, "parameters")[1][after // cfg.eig_every],
                                                         dtype=torch.float32), model.parameters())
    state = np.stack([base["per_example_loss"][after], osig.per_example_grads(model, osig.mse_loss, x, torch.as_tensor(
        labels)).norm(dim=1).numpy()], axis=1)
    no_sky_pair = [np.flatnonzero(no_sky.numpy() & group) for group in osig.sky_pair(labels, everyone, everyone)[:2]]
    plant = np.concatenate([group[:min(map(len, no_sky_pair))] for group in no_sky_pair])
    control_tops = torch.zeros(images.shape[:3], dtype=torch.bool)
    control_tops[rng.choice(cfg.n, int(sky.sum()), replace=False), :8] = True
    variants = {"recolour sky": osig.recolour(images, osig.sky_pixels(images) & sky[:, None, None]),
                "recolour control": osig.recolour(images, control_tops),
                "paste sky": (osig.paste_top(images, sky_rgb, members=plant), None),
                "paste grey": (osig.paste_top(images, GREY, members=plant), None)}
    for fraction in cfg.fractions:
        top = np.argsort(-score)[:round(fraction * cfg.n)]
        variants[f"remove top {fraction:.0%}"] = top
        variants[f"remove matched {fraction:.0%}"] = osig.matched_examples(state, top, labels)
    variants["remove random 5%"] = rng.choice(cfg.n, round(0.05 * cfg.n), replace=False)
    for name, change in variants.items():
        keep = ~np.isin(np.arange(cfg.n), change) if name.startswith("remove") else everyone
        xv = osig.normalize(change[0], mean, std)[0] if not name.startswith("remove") else x
        record[name] = osig.intervention_endpoints(intervention_run(cfg, xv, labels, keep, seed, device), cfg.lr,
                                                   tuple(g[keep] for g in pair), cfg.window)
        record[name]["changed"] = np.median(change[1][change[1] > 0]) if name.startswith("recolour") else np.nan
        log(f"  seed {seed} | {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in record[name].items() if np.ndim(v) == 0))
    airplane = osig.measured(base, "airplane")[1]                  # p(airplane): pasted − original, at every step
    return dict(variants=np.array(list(record)), shift=airplane[:, 1:] - airplane[:, :1], steps=cfg.steps,
                curves=np.stack([record[v]["curve"] for v in record]), **{key: np.array([record[v].get(key, np.nan) for
                v in record]) for key in ("crossing", "rate", "antiphase", "spikes", "final", "changed")})

def run_optimizers(cfg, seed, device, log):
    """Every optimizer at every step size of its grid, measured; the best of each (the lowest final training loss)
    summarized by `osig.optimizer_summary`."""
    if cfg.data == "shakespeare":
        tokens = osig.encode_characters(osig.load_tiny_shakespeare())[0]
        (x, y), (x_test, y_test) = (osig.text_sequences(tokens[:int(0.9 * len(tokens))], cfg.n, cfg.context, seed=0),
                                    osig.text_sequences(tokens[int(0.9 * len(tokens)):], cfg.n_test, cfg.context, 1))
    else:
        images, labels, _ = load_images(cfg.data, cfg.n + cfg.n_test, 0)
        x, mean, std = osig.normalize(images[:cfg.n])
        x_test, y, y_test = osig.normalize(images[cfg.n:], mean, std)[0], labels[:cfg.n], labels[cfg.n:]
    x, y, x_test, y_test, loss_fn = x.to(device), y.to(device), x_test.to(device), y_test.to(device), LOSSES[cfg.loss]
    record, best = {}, {}
    for name, lrs in zip(("sgd", "adam", "split"), cfg.lrs):
        runs = []
        for lr in lrs:
            model = build_model(cfg, x.shape[1:], seed, 65 if cfg.model == "gpt" else 10).to(device)
            optimizer = {"sgd": lambda: torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum),
                         "adam": lambda: torch.optim.Adam(model.parameters(), lr=lr, betas=(cfg.momentum, 0.999)),
                         "split": lambda: osig.SplitSGD(model.parameters(), lr=lr, normalized_lr=best["adam"],
                                                        quantile=cfg.split_quantile, momentum=cfg.momentum)}[name]()
            sharpness = osig.sharpness_measure(loss_fn, x[:cfg.eig_examples], y[:cfg.eig_examples], cfg.eig_every,
                                               preconditioner=osig.adaptive_preconditioner)
            history = osig.train(model, x, y, loss_fn, optimizer, cfg.steps, batch_size=cfg.batch_size, seed=seed,
                                 log=None, measure=lambda step, model, opt: dict(sharpness(step, model, opt) or {}, **(
                                     {"losses": osig.per_example_losses(model, loss_fn, x, y).cpu().numpy()}
                                     if step % cfg.record_every == 0 else {})))
            runs.append(osig.optimizer_summary(model, loss_fn, history, optimizer, x, y, x_test, y_test, cfg.top,
                                               cfg.window))
            log(f"  seed {seed} | {name} lr {lr:g}: train loss {runs[-1]['train_loss']:.4f}, test accuracy "
                f"{runs[-1]['test_accuracy']:.3f}")
        chosen = int(np.nanargmin([run["train_loss"] for run in runs]))
        best[name] = lrs[chosen]
        record.update({f"{name}_{key}": value for key, value in runs[chosen].items()}, **{f"{name}_lr": best[name],
                      f"{name}_grid": [run["train_loss"] for run in runs], f"{name}_edge": chosen in (0, len(lrs) - 1)})
    return record

# ----------------------------------------------------------------------------- the claims, one row each

@dataclass(frozen=True)
class Claim:
    kind: str           # the experiments it applies to: linear, toy, gd (images and text), images, text, dose, ...
    claim: str          # the claim in words
    measure: object     # record -> value; pooled: the list of an experiment's records (one per seed) -> value
    target: str         # "<= 0.05"; "" for a diagnostic (printed, never judged)
    source: str         # paper | recalled | ours | calibration (run) | setting check | diagnostic
    pooled: bool = False

def delay(records, variant, control):
    """Per seed, the relative delay of the crossing, (variant − control) / control; never counts as the last step."""
    crossing = [dict(zip(r["variants"], np.nan_to_num(r["crossing"], nan=r["steps"]))) for r in records]
    return [(c[variant] - c[control]) / c[control] for c in crossing]

M, P, L = np.nanmedian, "paper", "large"                            # post: selections after the crossing; pre: before
ALTERNATE, SETTING, DIAGNOSTIC = "paper (the groups' losses alternate); 0.8: ours", "setting check", "diagnostic"
CLAIMS = [
    Claim("linear", "large lr: the sharpness reaches 2/lr", lambda r: r["large_sharpness"].max() * r["large_lr"] / 2,
          ">= 1", SETTING),
    Claim("linear", "control α: it stays below 2/lr", lambda r: r["control_sharpness"].max() * r["large_lr"] / 2, "< 1",
          SETTING),
    Claim("linear", "small lr: balanced growth, | |b|² / |w_genuine| − 1 | at the end",
          lambda r: abs(r["small_b_norm_sq"][-1] / r["small_genuine_norm"][-1] - 1), "<= 0.05", SETTING),
    Claim("linear", "control α: period-2 fraction of the opposing weight",
          lambda r: osig.period_two_fraction(r["control_opposing_weight"]), "== 0", SETTING),
    Claim("linear", "sharpness = p·α²(|Ae_o|² + |b|²) within 5%, where it exceeds the residual term |∇_w L| (fraction "
          "of those steps, α = 7)", lambda r: np.mean(np.concatenate([np.abs(r[f"{k}_prediction"] / r[f"{k}_sharpness"]
          - 1)[r[f"{k}_prediction"] >= r[f"{k}_residual_term_norm"]] for k in (L, "small")]) <= 0.05), ">= 0.99", "ours"),
    Claim("linear", "large lr: the opposing direction's Rayleigh quotient is the sharpness in the episodes (max "
          "relative error)", lambda r: np.nanmax(np.append(np.abs(r["large_rayleigh_quotient"] / r["large_sharpness"]
                                                                  - 1)[r["large_episode"]], np.nan)), "<= 0.05", "ours"),
    Claim("linear", "small lr: the sharpness ends at p·α²·|β| (relative error)",
          lambda r: abs(r["small_sharpness"][-1] / r["small_theory"] - 1), "<= 0.05", "ours"),
    Claim("linear", "small lr: the opposing weight never flips (period-2 fraction)",
          lambda r: osig.period_two_fraction(r["small_opposing_weight"]), "== 0", "ours"),
    Claim("linear", "large lr: the groups' loss difference changes sign on consecutive steps of the episodes",
          lambda r: osig.consecutive_sign_changes(r["large_loss_plus"] - r["large_loss_minus"], r["large_episode"])[0],
          ">= 0.8", ALTERNATE),
    Claim("linear", "large lr: the opposing weight grows at the predicted |1 − lr·λ| per step (|median ratio − 1|)",
          lambda r: abs(osig.flip_growth(r["large_opposing_weight"], r["large_sharpness"], r["large_lr"],
                                         r["large_episode"]) - 1), "<= 0.05", "ours"),
    Claim("linear", "large lr: peak loss in the episodes / loss at the crossing", lambda r: np.nanmax(np.append(
        r["large_loss"][r["large_episode"]], np.nan)) / r["large_loss"][r["large_crossing"]], ">= 2",
          "paper (the loss spikes); 2: ours"),
    Claim("linear", "large lr: the sharpness then hovers at 2/lr (median |λ / (2/lr) − 1| after the crossing)",
          lambda r: M(np.abs(r["large_sharpness"][r["large_crossing"]:] * r["large_lr"] / 2 - 1)), "<= 0.05",
          "paper (edge of stability); 5%: ours"),
    Claim("toy", "before 2/lr: median cosine of the groups' gradients on the x_0 weights",
          lambda r: M(r["toy_column_cosine"][1:r["crossing"]]), "<= -0.9", SETTING),
    Claim("toy", "before 2/lr: median |L(x_0 > 0) − L(x_0 < 0)| / their mean", lambda r: M((2 * np.abs(r["toy_loss_plus"]
          - r["toy_loss_minus"]) / (r["toy_loss_plus"] + r["toy_loss_minus"]))[1:r["crossing"]]), "<= 0.1", SETTING),
    Claim("toy", "the sharpness reaches 2/lr", lambda r: r["toy_sharpness"].max() * r["lr"] / 2, ">= 1", SETTING),
    Claim("toy", "after 2/lr the sharpness is the x_0-column curvature (median |ratio − 1|)",
          lambda r: M(np.abs(r["toy_opposing_curvature"] / r["toy_sharpness"] - 1)[r["crossing"]:]), "<= 0.05", "ours"),
    Claim("toy", "at the edge, before |x_0| is learned, the groups' loss difference changes sign on consecutive steps",
          lambda r: osig.consecutive_sign_changes(r["toy_loss_plus"] - r["toy_loss_minus"], r["episode"] & (
              np.arange(len(r["episode"])) < r["half_learned"]))[0], ">= 0.8", ALTERNATE),
    Claim("toy", "at the edge the pure-x_0 probe's odd part flips sign on consecutive steps",
          lambda r: osig.consecutive_sign_changes(r["toy_odd"], r["episode"])[0], ">= 0.8",
          "paper (the network's use of the feature flips); 0.8: ours"),
    Claim("toy", "sharpening (max − initial sharpness) with the outlier feature / with the control α",
          lambda r: np.ptp(r["toy_sharpness"][[0, r["toy_sharpness"].argmax()]]) / np.ptp(r["control_sharpness"][
              [0, r["control_sharpness"].argmax()]]), ">= 3", "paper (the outliers drive sharpening); 3: ours"),
    Claim("toy", "the fall: mean sharpness over the last 10% of steps / (2/lr)",
          lambda r: r["toy_sharpness"][int(0.9 * len(r["toy_sharpness"])):].mean() * r["lr"] / 2, "<= 0.9", "recalled"),
    Claim("toy", "the fall comes after |x_0| is learned: last 10% / mean between the crossing and the half-learned step",
          lambda r: r["toy_sharpness"][int(0.9 * len(r["toy_sharpness"])):].mean() / np.mean(
              r["toy_sharpness"][r["crossing"]:max(r["crossing"], r["half_learned"])]), "<= 0.9", "ours"),
    Claim("toy", "the x_0-column curvature falls with it (the same ratio)",
          lambda r: r["toy_opposing_curvature"][int(0.9 * len(r["toy_sharpness"])):].mean() / np.mean(
              r["toy_opposing_curvature"][r["crossing"]:max(r["crossing"], r["half_learned"])]), "<= 0.9", "ours"),
    Claim("toy", "the fall is the outliers' doing: fall from the peak (1 − last 10% / max), toy − control α",
          lambda r: osig.late_fall(r["toy_sharpness"]) - osig.late_fall(r["control_sharpness"]), ">= 0.2", "ours"),
    Claim("gd", "the crossing of 2/lr (interpolated) / the step it is expected by", lambda r: r["crossing"] / r["eos_by"],
          "<= 1", SETTING),
    Claim("gd", "sharpness at step 0 / (2/lr)", lambda r: r["start_ratio"], "<= 0.7", SETTING),
    Claim("gd", "hover at the iterate: median |sharpness / (2/lr) − 1| from the crossing on", lambda r: r["hover"],
          "<= 0.15", SETTING),
    Claim("gd", "sharpness at the midpoint of the step / (2/lr) after the crossing (median)",
          lambda r: M(r["midpoint"][r["post"]]) * r["lr"] / 2, "", DIAGNOSTIC),
    Claim("gd", "linearization check: balanced accuracy of the predicted up/down split after the crossing",
          lambda r: M(r["linearization"][r["post"]]), "", DIAGNOSTIC),
    Claim("gd", "selections after the crossing with both an up and a down side", lambda r: np.mean(
        r["up"][r["post"]].any(1) & ~r["up"][r["post"]].all(1)), "", DIAGNOSTIC),
    Claim("gd", "false-positive rate of the anti-phase test where the null holds by construction (nominal 0.05)",
          lambda r: osig.null_false_positive_rate(r["antiphase_null"][r["post"]]), "", DIAGNOSTIC),
    Claim("gd", "loss spike events per 100 steps after the crossing", lambda r: 100 * np.sum(osig.loss_spikes(r["loss"])[
        :, 0] >= r["after"]) / (len(r["loss"]) - r["after"]), ">= 1.5", "paper (the loss spikes); 1.5: ours"),
    Claim("gd", "heavy tail: the top 1%'s share of |loss change| at the 10 largest loss rises after the crossing / at "
          "pre-EoS steps", lambda r: osig.spike_tail_ratio(r["per_example_loss"], r["crossing"]), ">= 1.5",
          "paper (a few examples carry the loss change); 1.5: ours"),
    Claim("gd", "the outliers align with the top eigenvector: median |cos(g_i, v_1)| after the crossing / before",
          lambda r: M(r["cos_top"][r["post"]]) / M(r["cos_top"][r["pre"]]), ">= 1.5",
          "paper (their gradients carry the sharp direction); 1.5: ours"),
    Claim("gd", "a few examples own the sharp direction: the top 1%'s share of vᵀHv after the crossing / before",
          lambda r: M(r["top1_share"][r["post"]]) / M(r["top1_share"][r["pre"]]), ">= 1.25",
          "recalled (direction); 1.25: ours"),
    Claim("gd", "the up and down groups move in anti-phase more than selection-matched groups (combined p, one-sided)",
          lambda r: osig.combined_p(r["antiphase"][r["post"]], r["antiphase_null"][r["post"]], "less")[0], "< 0.05",
          "paper (the groups' losses move in opposition); 0.05: ours"),
    Claim("gd", "their first-layer gradients are more aligned, or more opposed, than selection-matched groups' (a shared "
          "input feature; combined p, two-sided)", lambda r: osig.combined_p(r["grad_cosine"][r["post"]], r[
              "grad_cosine_null"][r["post"]], "two-sided")[0], "< 0.05", "paper (the groups share a feature); 0.05: ours"),
    Claim("gd", "the top eigenvector's share in the first third of the layers / their parameter share, after the "
          "crossing", lambda r: osig.early_layer_ratio(r["layer_shares"][r["post"]].mean(0), r["parameter_shares"]),
          ">= 2", "recalled (early layers); 2: ours"),
    Claim("images", "precision: outliers after the crossing that carry the planted feature (planted images)",
          lambda r: np.mean(r["planted"][r["index"][r["post"]]] > 0) if r["planted"].any() else np.nan, "", DIAGNOSTIC),
    Claim("images", "the up and down groups' images are more alike, or more opposite, than selection-matched groups' "
          "(combined p, two-sided)", lambda r: osig.combined_p(r["coherence"][r["post"]], r["coherence_null"][r["post"]],
                                                               "two-sided")[0], "< 0.05", "paper (the groups share a feature); 0.05: ours"),
    Claim("images", "sky airplanes and sky birds/ships move in anti-phase more than size-matched no-sky pairs after the "
          "crossing (contrast)", lambda r: osig.pair_contrast(r["per_example_loss"][r["after"]:], *osig.sky_pair(
              r["labels"], r["sky"], r["no_sky"]))["contrast"], ">= 0.3", "paper (sky: airplanes vs birds, ships); 0.3: ours"),
    Claim("images", "the sky probe's bird/ship output swings more after the crossing than the grey and orthogonal probes'",
          lambda r: osig.probe_swing(r["probe_output"][r["after"]:], (BIRD, SHIP)), ">= 2",
          "paper (the network's use of the colour flips); 2: ours"),
    Claim("images", "the sky probe tracks the sky-minus-no-sky bird/ship loss better than the orthogonal probe (|corr| "
          "difference)", lambda r: osig.probe_tracking(r["probe_output"][r["after"]:], r["per_example_loss"][r["after"]:],
                                                       r["labels"], r["sky"], r["no_sky"], (BIRD, SHIP)), ">= 0.2", "ours"),
    Claim("text", "the outliers' most over-represented common feature: share of their |loss change| / base rate",
          lambda r: osig.top_feature(r["features"], r["index"][r["post"]], r["loss_change"][r["post"]])[1], ">= 3", "ours"),
    Claim("text", "feature pair (the top target against the others, in the top context) moves in anti-phase more than "
          "the same targets in other contexts", lambda r: osig.pair_contrast(r["per_example_loss"][r["after"]:], *osig.
          feature_pair(r["features"], r["feature_names"], r["index"][r["post"]], r["loss_change"][r["post"]])[:4])[
              "contrast"], ">= 0.3", "ours"),
    Claim("dose", "sharpening over steps 0..window: strongest, most frequent planted feature / nothing planted",
          lambda r: osig.sharpening_rate(r["steps"], r["sharpness"][-1, -1], r["window"]) / osig.sharpening_rate(
              r["steps"], r["sharpness"][0, -1], r["window"]), ">= 2", "ours"),
    Claim("dose", "the strongest, most frequent planted feature drives the sharpness to 2/lr within the run",
          lambda r: float(np.isfinite(r["crossing"][-1, -1])), "== 1", "paper (opposing signals drive the edge)"),
    Claim("interventions", "recolouring every sky background delays the crossing against recolouring as many random "
          "tops (paired relative delay: 95% t-interval's lower end)", lambda rs: osig.t_interval(delay(
              rs, "recolour sky", "recolour control"))[1], "> 0", "ours", pooled=True),
    Claim("interventions", "pasting a sky on non-sky airplanes, birds and ships advances the crossing against a grey "
          "paste (paired relative delay: upper end)", lambda rs: osig.t_interval(delay(rs, "paste sky", "paste grey"))[2],
          "< 0", "ours", pooled=True),
    Claim("interventions", "removing the top 5% movers delays the crossing more than a matched removal (lower end)",
          lambda rs: osig.t_interval(delay(rs, "remove top 5%", "remove matched 5%"))[1], "> 0", "ours", pooled=True),
    Claim("interventions", "the delay against matched removal grows with the fraction removed (slope per percentage "
          "point: lower end)", lambda rs: osig.t_interval([np.polyfit([1, 2, 5], [delay([r], f"remove top {f}%", f"remove"
          f" matched {f}%")[0] for f in (1, 2, 5)], 1)[0] for r in rs])[1], "> 0", "ours", pooled=True),
    Claim("interventions", "the sky paste's step-to-step swing grows more across the crossing than the grey, green and "
          "orthogonal pastes' (log ratio: lower end)", lambda rs: osig.t_interval([osig.paste_swing(
              r["shift"], r["crossing"][0]) for r in rs])[1], "> 0", "ours", pooled=True),
    Claim("interventions", "pixels changed per recoloured sky image (median)", lambda r: r["changed"][1], "", DIAGNOSTIC),
    Claim("interventions", "pixels changed per recoloured control image", lambda r: r["changed"][2], "", DIAGNOSTIC),
    Claim("optimizers", "optimizers whose best step size is at the edge of its grid",
          lambda r: sum(bool(r[f"{o}_edge"]) for o in ("sgd", "adam", "split")), "== 0", SETTING),
    Claim("optimizers", "opposing-group oscillation over its loss-matched control: SGD / Adam",
          lambda r: r["sgd_relative"] / r["adam_relative"], ">= 3", "recalled (Adam damps it); 3: ours"),
    Claim("optimizers", "split-update SGD closes the SGD-to-Adam final-loss gap (fraction closed)", lambda r: (
        r["sgd_train_loss"] - r["split_train_loss"]) / (r["sgd_train_loss"] - r["adam_train_loss"]), ">= 0.5",
          "recalled ('most of the gap'); 0.5: ours"),
    Claim("optimizers", "SGD: the top eigenvector's share in the first third of the layers / their parameter share",
          lambda r: r["sgd_early"], ">= 2", "recalled (early layers); 2: ours"),
    Claim("optimizers", "Adam: the same share", lambda r: r["adam_early"], ">= 2", "recalled (early layers); 2: ours")]
KINDS = {"LinearConfig": ("linear",), "ToyConfig": ("toy",), "DoseConfig": ("dose",),
         "InterventionsConfig": ("interventions",), "OptimizersConfig": ("optimizers",)}

def judge(cfg, records, log=print):
    """Every claim row of the experiment's kinds, applied to each seed's record (the value: the median over seeds) or,
    pooled, to all of them. A value that cannot be measured (the run never crossed 2/lr, say) is nan and not met."""
    verdicts = []
    for row in (row for row in CLAIMS if row.kind in (KINDS.get(type(cfg).__name__) or (
            "gd", "text" if cfg.data == "shakespeare" else "images"))):
        def value(arg):
            try:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    return float(row.measure(arg))
            except (ValueError, IndexError, ZeroDivisionError, KeyError) as error:
                log(f"  cannot measure '{row.claim[:60]}': {type(error).__name__}: {error}")
                return math.nan
        per_seed = [] if row.pooled else [value(r) for r in records]
        combined = value(records) if row.pooled else float(np.median(per_seed)) if np.isfinite(per_seed).all() else math.nan
        operator, bound = (row.target or "? 0").split()[:2]
        met = None if not row.target else bool(math.isfinite(combined) and {
            "<=": combined <= float(bound), ">=": combined >= float(bound), "<": combined < float(bound),
            ">": combined > float(bound), "==": combined == float(bound)}[operator])
        verdicts.append(dict(claim=row.claim, target=row.target, source=row.source, value=combined, per_seed=per_seed,
                             met=met, counted=met is not None and row.source not in (SETTING, DIAGNOSTIC)))
        log(f"  {'claim' if verdicts[-1]['counted'] else row.source:>13} | {row.claim[:90]}: {combined:.4g}"
            + (f" (target {row.target}) -> {'met' if met else 'NOT met'}" if row.target else ""))
    return verdicts

# ----------------------------------------------------------------------------- figures, report, command line

def figures(cfg, r, out):
    """The experiment's figure, from its first seed's record: stacked line panels on one step axis, each row (ylabel,
    [(x, y, label)], threshold (dashed: 2/lr) or None, log scale); returns its file name in a list."""
    kind, edge = (KINDS.get(type(cfg).__name__) or ("images",))[0], 2 / getattr(cfg, "lr", getattr(cfg, "large_lr", 1))
    if kind in ("linear", "toy"):
        run = "large" if kind == "linear" else "toy"
        t = np.arange(len(r[f"{run}_loss"]))
        name, title, rows = f"{kind}.png", f"{kind} (α = {getattr(cfg, 'alpha')}, lr = {2 / edge:g})", [
            ("loss", [(t[::2], r[f"{run}_loss_plus"][::2], "group +α (even steps)"), (t[::2], r[f"{run}_loss_minus"][
                ::2], "group −α (even steps)"), (t, r[f"{run}_loss"], "total")], None, True),
            ("sharpness", [(t, r[f"{run}_sharpness"], "Lanczos"), (t, r.get("large_prediction", r.get(
                "toy_opposing_curvature")), "the theory's curvature"), (np.arange(len(r["control_sharpness"])), r[
                    "control_sharpness"], "control α")], edge, False),
            ("use of the feature", [(t, r.get("large_opposing_weight", r.get("toy_odd")), "odd part / opposing weight")],
             None, False)]
    elif kind == "dose":
        name, title, rows = "dose.png", "planted dose: sharpness per cell (strength, fraction)", [
            ("sharpness", [(r["steps"], r["sharpness"][i, j], f"({s:g}, {f:g})") for i, s in enumerate(cfg.strengths)
                           for j, f in enumerate(cfg.fractions)], edge, False)]
    elif kind == "interventions":
        name, title, rows = "interventions.png", "interventions, first seed", [
            ("sharpness", [(np.flatnonzero(np.isfinite(c)), c[np.isfinite(c)], v) for v, c in zip(r["variants"], r[
                "curves"])], edge, False),
            ("p(airplane): pasted − original", [(np.arange(len(r["shift"])), r["shift"][:, j], p) for j, p in
                                                 enumerate(("sky", "grey", "green", "orthogonal"))], None, False)]
    elif kind == "optimizers":
        name, title, rows = "optimizers.png", "the best run of each optimizer, first seed", [
            ("mean training loss", [(np.arange(len(r[f"{o}_curve"])), r[f"{o}_curve"], o) for o in ("sgd", "adam",
                                                                                                  "split")], None, True)]
    else:
        e = r["eig_step"]
        name, title, rows = "eos.png", f"{cfg.model}, {cfg.loss}, n = {cfg.n}, lr = {cfg.lr}", [
            ("train loss", [(np.arange(len(r["loss"])), r["loss"], "")], None, True),
            ("sharpness", [(e, r["eigenvalues"][:, 0], "top eigenvalue"), (e, r["midpoint"], "at the step's midpoint")],
             edge, False),
            ("share of vᵀHv", [(e, r["top1_share"], "top 1% of examples"), (e, r["outlier_share"], "the outliers")],
             None, False)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.1 * len(rows) + 0.5), sharex=True, squeeze=False)
    for ax, (ylabel, lines, threshold, log) in zip(axes[:, 0], rows):
        for x, y, label in lines:
            ax.plot(x, y, lw=0.9, label=label)
        if threshold:
            ax.axhline(threshold, ls="--", color="k", lw=0.8, label=f"2/lr = {threshold:.3g}")
        ax.set(ylabel=ylabel, yscale="log" if log else "linear")
        if any(label for _, _, label in lines) or threshold:
            ax.legend(fontsize=6)
    axes[0, 0].set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("step")
    atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return [name]

def atomic_write(path, write):
    """write(temporary path), fsync, rename onto `path` (mode 0644): readers never see a partial file."""
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

def text(value):
    """A report cell: a number to 4 significant digits (None: nan); text HTML-escaped, on one line, without table pipes
    or link schemes (titles, notes and reasons may come from a damaged file)."""
    if value is None or isinstance(value, (float, int)):
        return "nan" if value is None or not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ").replace("javascript:",
                                                                                              "javascript&#58;")

def write_report(out, results, profile, device):
    """report.md: every experiment's status and claims met, then its figures, claims (value, per seed, target, source,
    met) and its setting checks and diagnostics, from the saved results."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    lines = ["# osig: measured reproduction report", "", f"Profile `{profile}` on `{device}`, torch {torch.__version__}; "
             f"claims judged under commit `{commit}`, {time.strftime('%Y-%m-%d %H:%M')}.", "", SOURCES, "",
             "| experiment | status | claims met | seconds to compute |", "|---|---|---|---|"]
    for name, result in results.items():
        claims = [v for v in result.get("verdicts", []) if v["counted"]]
        lines.append(f"| [{name}](#{name}) | {text(result['status'])} | {sum(v['met'] for v in claims)}/{len(claims)} | "
                     f"{text(result.get('seconds')).replace('nan', 'not recorded')} |")
    for name, result in results.items():
        lines += ["", f"## {name}", "", text(result.get("title", "")), ""]
        if result["status"] != "done":
            lines += [f"**{text(result['status'])}**: {text(result.get('reason', ''))}"]
            continue
        lines += [f"![{f}]({name}/{f})" for f in result["figures"] if f.replace("_", "").replace(".", "").isalnum()]
        for title, rows in (("Claims", [v for v in result["verdicts"] if v["counted"]]), (
                "Setting checks and diagnostics (not counted)", [v for v in result["verdicts"] if not v["counted"]])):
            lines += ["", f"{title}:", "", "| claim | value | per seed | target | source | met |", "|---|---|---|---|---|---|"]
            lines += [f"| {text(v['claim'])} | {text(v['value'])} | {', '.join(map(text, v['per_seed']))} | {text(v['target'])} "
                      f"| {text(v['source'])} | {'' if v['met'] is None else 'yes' if v['met'] else '**no**'} |" for v in rows]
        for title, header, rows in result.get("tables", []):
            lines += ["", f"{text(title)}:", "", "| " + " | ".join(map(text, header)) + " |", "|---" * len(header) + "|"]
            lines += ["| " + " | ".join(text(c) for c in row) + " |" for row in rows]
        lines += [""] + [f"- {text(note)}" for note in result.get("notes", [])]
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))

SOURCES = ("Sources: **paper**, the paper's own claim; **recalled**, remembered from the paper, not confirmed; **ours**, "
           "our reconstruction's choice; **calibration**, read off the named run; 'paper (...); 0.8: ours' takes the "
           "direction from the paper and the size from us. Targets were committed before the runs that judge them. "
           "Setting checks and diagnostics are printed, not counted; a value that cannot be measured is nan, not met.")

@functools.lru_cache(maxsize=None)
def record_key(cfg, device):
    """What a saved record must have been made with: this config, the measuring code (osig.py and the runs section of
    this file, without docstrings, comments or layout: editing those, a claim or a figure keeps the records), the
    torch version and the device."""
    def code(source):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node, clean=False):
                node.body = node.body[1:]
        return ast.dump(tree)
    runs = Path(__file__).read_text().split("# " + "-" * 77 + " runs")[-1].split("# " + "-" * 77 + " the claims")[0]
    return hashlib.sha256((code(Path(osig.__file__).read_text()) + code(runs) + json.dumps([type(cfg).__name__,
        dataclasses.asdict(cfg), torch.__version__, str(device)])).encode()).hexdigest()[:16]

def load_saved(path, key, config=None):
    """The record (.npz) or result (.json) saved at `path` if it is readable, has the shape the report needs and was
    made with `key` (and `config`), else None, with a warning when the file exists but is damaged."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                saved = {name: data[name] for name in data.files}
            return saved if str(saved.pop("_key", "")) == key and str(saved.pop("_config", "")) == config else None
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            return None
        assert saved["status"] in ("done", "skipped", "failed") and all(isinstance(saved.get(k, ""), str) for k in (
            "title", "reason")) and all(isinstance(f, str) for f in saved.get("figures", [])) and all(
            isinstance(v[k], str) for v in saved.get("verdicts", []) for k in ("claim", "target", "source")) and all(
            isinstance(v["counted"], bool) for v in saved.get("verdicts", [])) and all(
            x is None or isinstance(x, (int, float)) for v in saved.get("verdicts", []) for x in [v["value"]] + v["per_seed"])
        return dict(saved, verdicts=[dict(v, value=math.nan if v["value"] is None else v["value"], per_seed=[
            math.nan if x is None else x for x in v["per_seed"]]) for v in saved.get("verdicts", [])])
    except FileNotFoundError:
        return None
    except Exception as error:                 # a damaged file can fail in many ways: recompute it
        print(f"  warning: {path} is unreadable or damaged ({type(error).__name__}); it will be recomputed")
        return None

def intervention_tables(records):
    """Per endpoint, a table of every variant against its control: per-seed values, the paired differences and their
    95% t-interval (`osig.t_interval`); the crossing's relative delay is the primary endpoint."""
    pairs = [(v, c) for v, c in (("recolour sky", "recolour control"), ("paste sky", "paste grey"), ("remove random 5%",
             "as is")) if v in records[0]["variants"]] + [(v, v.replace("top", "matched")) for v in records[0][
             "variants"] if v.startswith("remove top")]
    tables = []
    for endpoint in ("crossing", "rate", "antiphase", "spikes"):
        rows = []
        for variant, control in pairs:
            values = [dict(zip(r["variants"], np.nan_to_num(r[endpoint], nan=r["steps"]) if endpoint == "crossing" else
                                r[endpoint])) for r in records]
            difference = [(v[variant] - v[control]) / (v[control] if endpoint == "crossing" else 1) for v in values]
            mean, low, high = osig.t_interval(difference)
            rows.append([f"{variant} vs {control}", ", ".join(text(v[variant]) for v in values),
                         ", ".join(text(d) for d in difference), f"{text(mean)} ({text(low)}..{text(high)})"])
        tables.append((f"{endpoint}" + (" (relative delay; never crossing counts as the last step)" if endpoint ==
                       "crossing" else ""), ["variant vs control", "per seed", "paired difference", "mean (95% t)"], rows))
    return tables

RUNS = {"LinearConfig": run_linear, "ToyConfig": run_toy, "GDConfig": run_gd, "DoseConfig": run_dose,
        "InterventionsConfig": run_interventions, "OptimizersConfig": run_optimizers}

def run_experiment(name, cfg, args, hint):
    """One experiment: each seed's record reused when saved with the same key, else computed and saved at once (an
    interruption loses at most one seed); then its claims and figures. Missing data skips it; any other error,
    a folder it cannot write included, fails it alone. Returns its result, also saved as result.json."""
    out, key, config = Path(args.out) / name, record_key(cfg, args.device), json.dumps(dataclasses.asdict(cfg))
    result, records = {"title": " ".join(type(cfg).__doc__.split()), "key": key, "status": "done", "notes": []}, []
    try:
        atomic_write(out / ".write-test", lambda tmp: None)
        for seed in cfg.seeds:
            path, threads = out / f"seed{seed}.npz", torch.get_num_threads()
            if args.force or load_saved(path, key, config) is None:
                print(f"\n=== {name}, seed {seed} ({len(records) + 1}/{len(cfg.seeds)})\n{cfg}")
                torch.set_num_threads(1 if isinstance(cfg, (LinearConfig, ToyConfig)) else threads)  # tiny float64 runs
                began = time.time()
                try:
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        record = dict(RUNS[type(cfg).__name__](cfg, seed, args.device, print), lr=getattr(cfg, "lr", 0),
                                      eos_by=getattr(cfg, "eos_by", 0), _key=np.str_(key), _config=np.str_(config))
                finally:
                    torch.set_num_threads(threads)
                record["_seconds"] = time.time() - began
                left = len(cfg.seeds) - len(records) - 1             # an ETA from this experiment's own seeds
                print(f"  {name}, seed {seed}: {record['_seconds']:.0f} s" + (
                    f"; about {left * record['_seconds']:.0f} s more for its other seeds" if left else ""))

                def save(tmp):
                    with open(tmp, "wb") as f:
                        np.savez_compressed(f, **record)
                atomic_write(path, save)
            else:
                print(f"reusing {name} seed {seed}: saved with the same config and code (--force recomputes it)")
            records.append(load_saved(path, key, config))
        result.update(verdicts=judge(cfg, records), figures=figures(cfg, records[0], out), notes=[
            f"seed {s}: {r['diverged']}" for s, r in zip(cfg.seeds, records) if str(r.get("diverged", ""))],
                      tables=intervention_tables(records) if isinstance(cfg, InterventionsConfig) else [])
    except osig.DataError as error:
        result.update(status="skipped", reason=f"{error} (then: {hint} --only {name})")
    except Exception as error:                 # one broken experiment must not lose the others
        traceback.print_exc()
        result.update(status="failed", reason=f"{type(error).__name__}: {error} (rerun: {hint} --only {name})")
    result["seconds"] = sum(float(r.get("_seconds", math.nan)) for r in records)      # computing, not reusing
    try:
        atomic_write(out / "result.json", lambda tmp: Path(tmp).write_text(json.dumps(json.loads(
            json.dumps(result, default=float), parse_constant=lambda nan: None), indent=1, allow_nan=False)))  # strict
    except OSError as error:
        result.update(status="failed", reason=f"cannot write to {out} ({error.strerror}): make it writable or pass --out")
    print(f"  {name}: {result['status']}, {result['seconds']:.0f} s of computing {result.get('reason', '')}")
    return result

def preflight(name, cfg, device, n=16, steps=100, log=print):
    """A dead setting caught in seconds on any device: `steps` full-batch steps of the experiment's model, loss and
    lr (optimizer studies: SGD and Adam at the middle of their grids) on n CIFAR-10 images (planted ones without the
    data) or n/4 text sequences. It passes when the last 20 steps' mean loss is at most 0.8 x the best constant
    prediction's and, for gradient descent, the sharpness (every 25 steps) reaches 1.5x its start (README: why)."""
    text_data = cfg.data == "shakespeare"
    try:
        x, y, _, _ = gd_data(GDConfig(data=cfg.data, n=n // 4 if text_data else n, context=cfg.context), 0, False)
    except osig.DataError:
        if text_data:
            return []
        x, y, _, _ = gd_data(GDConfig(data="planted", n=n), 0)
    p = np.bincount(y.reshape(-1).numpy()) / y.numel()
    constant = 0.5 * (1 - (p ** 2).sum()) if cfg.loss == "mse" else -np.sum(p[p > 0] * np.log(p[p > 0]))
    results = []
    for kind, lr in [("gd", cfg.lr)] if isinstance(cfg, GDConfig) else [("sgd", cfg.lrs[0][1]), ("adam", cfg.lrs[1][1])]:
        model = build_model(cfg, x.shape[1:], 0, 65 if text_data else 10).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr) if kind == "adam" else torch.optim.SGD(
            model.parameters(), lr, momentum=0.0 if kind == "gd" else cfg.momentum)
        history = osig.train(model, x.to(device), y.to(device), LOSSES[cfg.loss], optimizer, steps, log=None, measure=
                             osig.sharpness_measure(LOSSES[cfg.loss], x.to(device), y.to(device), 25, iters=10, tol=1e-2))
        sharpness, final = osig.measured(history, "eigenvalues")[1][:, 0], float(np.mean(history["loss"][-20:]))
        learns, sharpens = final <= 0.8 * constant, sharpness.max() / sharpness[0] >= 1.5 or kind != "gd"
        problem = history["diverged"] or ("" if learns else "the network does not learn at this init and lr") or (
            "" if sharpens else "no progressive sharpening at this init and lr")
        results.append((not problem, f"{name} ({cfg.model}, {cfg.loss}, {kind} lr {lr:g}): loss {history['loss'][0]:.3f}"
                        f" -> {final:.3f} (constant {constant:.3f}), sharpness x{sharpness.max() / sharpness[0]:.2f}"
                        + (f" -- FAILS: {problem}" if problem else "")))
        log(("  preflight ok   | " if not problem else "  preflight FAIL | ") + results[-1][1])
    return results

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), help="gpu (default with CUDA), cpu, smoke (the tests)")
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
    except Exception as error:                 # an unknown, absent or computeless ("meta") device
        parser.error(f"--device {args.device} cannot run computations here ({str(error).splitlines()[0][:120]}); "
                     f"try --device cpu")
    try:
        atomic_write(Path(args.out) / ".write-test", lambda tmp: None)
    except OSError as error:
        parser.error(f"--out {args.out} is not a writable folder ({error.strerror}): give a folder you can write to")
    args.profile = args.profile or ("gpu" if args.device.startswith("cuda") else "cpu")
    args.data = args.data or ("planted" if args.profile == "smoke" else "cifar10")
    if set(args.only or []) - set(PROFILES[args.profile]):
        parser.error(f"unknown experiment {', '.join(sorted(set(args.only) - set(PROFILES[args.profile])))}: choose "
                     f"from {', '.join(PROFILES[args.profile])}")
    return args

def main(argv=None):
    args = parse_args(argv)
    if args.claims:                           # with the values judged in --out, where there are any
        judged = {name: load_saved(Path(args.out) / name / "result.json", record_key(cfg, args.device)) or {}
                  for name, cfg in PROFILES[args.profile].items()}
        print("| claim | target | source | measured (met: ✓) |\n|---|---|---|---|\n" + "\n".join(
            f"| {text(c.claim)} | {c.target} | {c.source} | " + ", ".join(
                f"{name} {text(v['value'])}{' ✓' if v['met'] else ''}" for name, result in judged.items()
                for v in result.get("verdicts", []) if v["claim"] == c.claim) + " |" for c in CLAIMS if c.target and c.source != SETTING))
        return 0
    configs = {name: dataclasses.replace(cfg, **({"data": args.data} if getattr(cfg, "data", "") in ("cifar10", "planted")
                                                  else {}), **({"seeds": (args.seed,)} if args.seed is not None else {}))
               for name, cfg in PROFILES[args.profile].items()}
    chosen = [name for name in configs if not args.only or name in args.only]
    if args.preflight:
        checks = [check for name in chosen if isinstance(configs[name], (GDConfig, OptimizersConfig))
                  for check in preflight(name, configs[name], args.device)]
        failed = [message for passed, message in checks if not passed]
        print(f"\npreflight: {len(checks) - len(failed)}/{len(checks)} passed" + "".join(f"\n  {m}" for m in failed))
        return 1 if failed else 0
    out, hint = Path(args.out), f"python run_all.py --profile {args.profile} --out {args.out} --data {args.data}"
    with open(out / ".lock", "a+") as lock:
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
        for stale in out.rglob(".*.tmp"):      # left by a killed run; the lock says none is running now
            stale.unlink(missing_ok=True)
        results = {}
        try:
            for name in chosen:
                results[name] = run_experiment(name, configs[name], args, hint)
                write_report(out, {n: results.get(n) or load_saved(out / n / "result.json", record_key(c, args.device))
                                   or {"status": "not run", "reason": f"no result for this config and code yet: {hint} "
                                       f"--only {n}"} for n, c in configs.items()}, args.profile, args.device)
        except KeyboardInterrupt:
            print(f"\ninterrupted: every finished seed is saved in {out}; resume with: {hint}"
                  + "".join(f" --only {name}" for name in args.only or []), file=sys.stderr)
            return 130
    print(f"\nreport: {out / 'report.md'}")
    if results and all(r["status"] == "skipped" for r in results.values()):
        print("nothing ran: every requested experiment was skipped for missing data (reasons above); put the data where "
              "the messages say, or set OSIG_DATA, and rerun", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0

if __name__ == "__main__":
    sys.exit(main())
