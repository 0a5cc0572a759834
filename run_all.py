"""
run_all.py: reproduce every phenomenon of osig end to end and write results/.

    python run_all.py                    # all experiments; GPU profile when CUDA is available, else CPU
    python run_all.py --only linear      # one experiment (repeat --only for several)
    python run_all.py --bench            # speed benchmark table (results/bench.md)

Each experiment writes its figures, raw numbers (.npz/.json) and measured criteria into
results/<name>/; report.md embeds them all with each criterion's value, target and verdict.
Finished experiments are reused on a rerun (--force recomputes them); files are written
atomically, so an interrupted run loses only the experiment it was in.

Sections: utilities, configs, experiments, benchmark, report, main.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import osig

# ----------------------------------------------------------------------------- utilities


def atomic_write(path, write):
    """Call write(temporary_path), then rename it onto path: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, default=float)))


def save_npz(path, **arrays):
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


@contextlib.contextmanager
def single_thread():
    """Run tiny float64 problems on one thread: with several, synchronization costs more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def criterion(name, value, target, met=None, log=print, where=""):
    """One measured criterion, printed at once and stored for the report.

    target: text such as "<= 0.15"; when `met` is not given it is decided from it (a leading <=, >=,
    <, > or == and a number). `where` is printed after the verdict (context for the reader)."""
    value = float(value)
    if met is None:
        op, bound = target.split()[:2]
        bound = float(bound)
        met = math.isfinite(value) and {"<=": value <= bound, ">=": value >= bound, "<": value < bound,
                                        ">": value > bound, "==": value == bound}[op]
    log(f"  criterion | {name}: {value:.4g} (target {target}) -> {'met' if met else 'NOT met'}"
        + (f"  [{where}]" if where else ""))
    return {"name": name, "value": value, "target": target, "met": bool(met)}


# ----------------------------------------------------------------------------- configs

@dataclass
class OpposingConfig:
    """Full-batch GD on a fixed training subset, recording what issue 3's five phenomena need."""
    name: str = "cifar_mse"
    data: str = "cifar10"           # "cifar10" or "planted" (synthetic, offline)
    n_train: int = 2000
    model: str = "mlp"              # mlp | cnn | vgg11 | resnet18 | vit
    width: int = 200
    depth: int = 2
    activation: str = "relu"
    loss: str = "mse"               # mse | ce
    lr: float = 0.04
    steps: int = 1500
    eig_every: int = 20
    eig_k: int = 8                  # MSE puts several eigenvalues at 2/lr: use their subspace
    top: int = 30                   # outliers per step
    chunk: int = 0                  # examples per forward pass (0: all at once)
    seed: int = 0
    eos_by: int = 800               # criterion: first crossing of 2/lr by this step


@dataclass
class LinearConfig:
    """Two-layer linear model bᵀA x on make_opposing_signal_data; GD runs at a large lr, a small lr, and a control α."""
    n_pairs: int = 200              # signal-bearing x_g, each with s = +1 and s = −1: p = 2 n_pairs / N = 1/3
    n_plain: int = 800
    alpha: float = 7.0              # p α² = 16.3 against genuine second moments <= 1
    control_alpha: float = 1.0      # at the scale of the largest genuine feature
    scales: tuple = (1.0, 0.7, 0.5, 0.35, 0.25)
    offset: float = 0.5             # target offset on |x_o| shared by both groups
    width: int = 10
    init_scale: float = 0.01
    large_lr: float = 0.08          # 2/lr = 25 < p α² |β| = 36.5: must enter the edge of stability
    large_steps: int = 1000
    small_lr: float = 0.02          # 1/lr = 50 > 36.5: the opposing weight never flips
    small_steps: int = 4000
    seed: int = 0


@dataclass
class ToyConfig:
    """One-hidden-layer ReLU MLP on osig.make_opposing_signal_data (target offset on |x_0|); GD at one lr, plus a control α.

    loss "mse" regresses the target; "ce" classifies its sign (class 1 iff βᵀx_g + offset·|s| > 0) with
    two-class cross-entropy, whose curvature p(1 - p) vanishes on examples fit with a large margin."""
    name: str = "toy"
    loss: str = "mse"
    n_pairs: int = 100              # p = 2 n_pairs / N = 1/3
    n_plain: int = 400
    alpha: float = 8.0
    control_alpha: float = 1.0
    scales: tuple = (1.0, 0.7, 0.5, 0.35, 0.25)
    offset: float = 0.2             # the |x_0| part of the target, learnable only non-linearly
    width: int = 16
    weight_scale: float = 0.05
    output_scale: float = 0.1
    hidden_bias: float = 0.7        # above weight_scale·α·max|U|: every unit starts active on both signs of x_0
    lr: float = 0.05
    steps: int = 3000
    seed: int = 0


@dataclass
class OptimizersConfig:
    """Issue 5: SGD with momentum, Adam, clipped SGD and split-update SGD, each at its best step size from a
    grid of the same size and the same step budget; then opposing-group oscillations, (preconditioned)
    sharpness against each optimizer's threshold, and where the top Hessian eigenvector lives. The CPU defaults
    (MLP, 5,000 CIFAR-10 images, 4 x 4 runs of 1,500 steps + 4 measured reruns) take about 8 minutes."""
    name: str = "optimizers"
    data: str = "cifar10"           # "cifar10" or "planted" (synthetic, offline)
    n_train: int = 5000
    n_test: int = 10000             # test images for the final accuracy (CIFAR-10 test set; planted: held out)
    model: str = "mlp"              # mlp | cnn | vgg11 | resnet18 | vit
    width: int = 200
    depth: int = 2
    activation: str = "relu"
    loss: str = "ce"
    steps: int = 1500
    batch_size: int = 128
    momentum: float = 0.9           # SGD, clip and split's SGD part; β1 of Adam and split's normalized part
    beta2: float = 0.999
    # step-size grids, lists so that the config survives run_all's JSON round trip unchanged
    sgd_lrs: list = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1])
    adam_lrs: list = field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3])
    clip_lrs: list = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1])
    clip_norm: float = 1.0          # about half the median minibatch gradient norm of SGD on the MLP
    split_lrs: list = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1])  # SGD part; normalized part: Adam's best lr
    split_quantile: float = 0.1
    curve_every: int = 50           # grid runs: full-set loss every this many steps
    grid_eig_every: int = 500       # grid runs: (preconditioned) sharpness every this many steps
    record_every: int = 3           # best runs: per-example losses every this many steps (odd: a period-2 oscillation still alternates)
    eig_every: int = 50
    eig_examples: int = 1000
    eig_iters: int = 100
    top: int = 40                   # examples per selection of opposing groups
    window: int = 30                # record intervals measured after each selection
    chunk: int = 0                  # examples per forward pass in Hessian products (0: all at once)
    seed: int = 0


# GPU profile: the small ViT (where the paper finds Adam's advantage largest) and ResNet-18 without BN
OPTIMIZERS_GPU_VIT = OptimizersConfig(
    name="optimizers", model="vit", width=128, depth=4, n_train=10000, steps=4000, sgd_lrs=[0.01, 0.03, 0.1, 0.3],
    adam_lrs=[1e-4, 3e-4, 1e-3, 3e-3], clip_lrs=[0.01, 0.03, 0.1, 0.3], split_lrs=[0.01, 0.03, 0.1, 0.3],
    grid_eig_every=1000, record_every=5, eig_every=100, eig_examples=2000, chunk=0, top=80)
OPTIMIZERS_GPU_RESNET18 = OptimizersConfig(
    name="optimizers_resnet18", model="resnet18", width=64, n_train=10000, steps=3000, sgd_lrs=[0.003, 0.01, 0.03, 0.1],
    adam_lrs=[3e-5, 1e-4, 3e-4, 1e-3], clip_lrs=[0.003, 0.01, 0.03, 0.1], split_lrs=[0.003, 0.01, 0.03, 0.1],
    grid_eig_every=1000, record_every=5, eig_every=100, eig_examples=2000, chunk=500, top=80)
# smoke profile: seconds, planted images
OPTIMIZERS_SMOKE = OptimizersConfig(
    data="planted", n_train=400, n_test=200, width=32, depth=1, steps=90, batch_size=32, sgd_lrs=[0.01, 0.03],
    adam_lrs=[3e-4, 1e-3], clip_lrs=[0.01, 0.03], split_lrs=[0.01, 0.03], curve_every=10, grid_eig_every=45,
    record_every=3, eig_every=30, eig_examples=200, eig_iters=30, top=10, window=8)


# ----------------------------------------------------------------------------- experiments

LOSSES = {"mse": osig.mse_loss, "ce": osig.cross_entropy_loss}
AIRPLANE, BIRD, SHIP = 0, 2, 8
OPTIMIZER_NAMES = ("sgd", "adam", "clip", "split")
COLORS = {"sgd": "C0", "adam": "C3", "clip": "C2", "split": "C1"}


def build_model(cfg, in_shape, num_classes=10):
    """The network a config names, seeded; BN is off so that per-example gradients are defined."""
    torch.manual_seed(cfg.seed)
    if cfg.model == "mlp":
        return osig.MLP(int(np.prod(in_shape)), cfg.width, cfg.depth, num_classes, cfg.activation)
    if cfg.model == "cnn":
        return osig.SmallCNN(in_shape[0], cfg.width, num_classes)
    if cfg.model == "vgg11":
        return osig.VGG11(num_classes, cfg.width)
    if cfg.model == "resnet18":
        return osig.ResNet18(num_classes, cfg.width, batch_norm=False)
    if cfg.model == "vit":
        return osig.ViT(num_classes, image_size=in_shape[-1], dim=cfg.width, depth=cfg.depth)
    raise ValueError(f"unknown model {cfg.model!r}: use mlp, cnn, vgg11, resnet18 or vit")


def load_training_images(data, n, seed):
    """uint8 images [n, 32, 32, 3], labels [n] and planted group ids [n] (None for CIFAR-10)."""
    if data == "planted":
        return osig.make_planted_images(n=n, planted_classes=(AIRPLANE, BIRD), seed=seed)
    images, labels = osig.load_cifar10(train=True)
    index = osig.seeded_subset(len(images), n, seed=seed)
    return images[index], labels[index], None


def run_opposing(cfg, out, device, log=print):
    """Issue 3: EoS, heavy-tailed loss changes, opposing groups, the sky feature and its probe."""
    images, labels, planted = load_training_images(cfg.data, cfg.n_train, cfg.seed)
    x, mean, std = osig.normalize(images)
    x, y = x.to(device), labels.to(device)
    sky = osig.sky_mask(images).numpy()
    probe, sky_rgb = osig.sky_probe(images, torch.from_numpy(sky), mean, std)
    model = build_model(cfg, x.shape[1:]).to(device)
    loss_fn, threshold = LOSSES[cfg.loss], 2 / cfg.lr
    log(f"  {len(x)} images, {int(sky.sum())} with a sky background (sky colour RGB {sky_rgb.round().tolist()}), "
        f"{sum(p.numel() for p in model.parameters())} parameters")

    crossed = []

    def find_groups(step, model, eigenvalues, eigenvectors):
        # only after the edge of stability is reached: before it no direction oscillates
        if not crossed and eigenvalues[0] < threshold:
            return None
        crossed.append(step)
        found = osig.opposing_groups(model, loss_fn, x, y, cfg.lr, eigenvectors, top=cfg.top, seed=step)
        found.pop("loss_change_all")
        return dict(found, step=step)

    history = osig.train(model, x, y, loss_fn, "gd", lr=cfg.lr, steps=cfg.steps, chunk=cfg.chunk or None,
                         eig_every=cfg.eig_every, eig_k=cfg.eig_k, probes=probe.to(device),
                         callback=find_groups, log_every=100, seed=cfg.seed, log=log)
    groups = [g for g in history["callback"] if g is not None]
    loss, losses = history["loss"], history["per_example_loss"].astype(np.float64)
    T, labels_np = len(loss), labels.numpy()
    criteria, notes = [], []
    if history["diverged"]:
        notes.append(history["diverged"])

    # 1. progressive sharpening and the edge of stability
    first, hover = osig.edge_of_stability(history["eig_step"], history["eigenvalues"][:, 0], cfg.lr)
    spikes = osig.loss_spikes(loss)
    criteria.append(criterion("first step with sharpness >= 2/lr", first if first is not None else np.nan,
                              f"<= {cfg.eos_by}", first is not None and first <= cfg.eos_by, log))
    criteria.append(criterion("median |sharpness - 2/lr| / (2/lr) after it", hover, "<= 0.15", hover <= 0.15, log))
    criteria.append(criterion("loss spike steps (loss > 1.1 x min of previous 20)", len(spikes), ">= 15",
                              len(spikes) >= 15, log))
    fig = osig.plot_loss_and_sharpness(history, cfg.lr, f"{cfg.name}: {cfg.model} ({cfg.activation}), "
                                       f"{cfg.loss}, n={cfg.n_train}, lr={cfg.lr}", spikes)
    save_figure(fig, out / "eos.png")
    figures = ["eos.png"]
    if first is None or len(groups) < 2:
        notes.append("the run never reached the edge of stability: phenomena 2-5 need it; raise lr or steps")
        return finish_opposing(out, cfg, history, criteria, figures, notes, {})

    # 2. heavy-tailed loss changes
    delta = np.diff(losses, axis=0)                                   # [T-1, N]: step t -> t+1
    shares = osig.top_fraction_share(delta[first:])
    criteria.append(criterion("median share of sum|dloss| carried by the top 1% (post-EoS)",
                              np.median(shares), ">= 0.06 (Gaussian: 0.036)", np.median(shares) >= 0.06, log))
    spike_steps = [t for t in range(first, T - 1) if loss[t + 1] > 1.1 * loss[max(0, t - 19):t + 1].min()]
    up_fraction = float(np.mean([(delta[t] > 0).mean() for t in spike_steps])) if spike_steps else float("nan")
    if spike_steps:
        notes.append(f"At the {len(spike_steps)} post-EoS steps where the loss rises into a spike, a fraction "
                     f"{up_fraction:.2f} of all examples go up (the rest go down).")
        log(f"  {notes[-1]}")
    biggest = first + int(np.argmax(loss[first + 1:] - loss[first:-1]))
    calm = max(1, first // 2)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, t, color, what in ((axes[0], calm, "C7", "pre-EoS"), (axes[1], biggest, "C3", "largest spike")):
        ax.hist(delta[t], bins=60, color=color)
        ax.set_yscale("log")
        ax.set_title(f"{what}, step {t}: top-1% share {osig.top_fraction_share(delta[t]):.3f}, "
                     f"{100 * (delta[t] > 0).mean():.0f}% go up", fontsize=8)
        ax.set_xlabel("per-example loss change in one step")
    axes[0].set_ylabel("examples")
    fig.suptitle(f"median top-1% share over post-EoS steps {np.median(shares):.3f} (Gaussian 0.036)", fontsize=9)
    save_figure(fig, out / "loss_changes.png")
    figures.append("loss_changes.png")

    # 3. opposing groups found automatically
    both = np.mean([g["n_up"] >= 5 and g["n_down"] >= 5 for g in groups])
    cos_top = np.median(np.concatenate([g["cos_subspace"] for g in groups]))
    cos_random = np.median(np.concatenate([g["cos_subspace_random"] for g in groups]))
    agreement = np.median([g["agreement"] for g in groups])
    group_cos = np.nanmedian([g["group_mean_cosine"] for g in groups])
    criteria.append(criterion(f"fraction of post-EoS steps whose top-{cfg.top} hold >= 5 up and >= 5 down",
                              both, ">= 0.8", both >= 0.8, log))
    criteria.append(criterion(f"median cos(g_i, top-{cfg.eig_k} eigenspace): top-{cfg.top} / random",
                              cos_top / cos_random, ">= 1.5", cos_top / cos_random >= 1.5, log))
    if cfg.loss == "ce":  # the gradient-pairing criteria are stated for cross-entropy
        criteria.append(criterion("median agreement of the gradient split with the actual up/down split",
                                  agreement, ">= 0.8 (chance 0.5)", agreement >= 0.8, log))
        criteria.append(criterion("median cosine of the two groups' mean gradients", group_cos,
                                  "in [-0.8, -0.2] (expect about -0.5)", -0.8 <= group_cos <= -0.2, log))
    else:
        notes.append(f"Gradient pairing under MSE (criteria are stated for cross-entropy): split agreement "
                     f"{agreement:.2f}, cosine of the two groups' mean gradients {group_cos:.2f}.")
        log(f"  {notes[-1]}")
    pairs = {}
    for g in groups:
        up = labels_np[g["index"][g["loss_change"] > 0]]
        down = labels_np[g["index"][g["loss_change"] <= 0]]
        if len(up) and len(down):
            pair = tuple(sorted((osig.CIFAR10_CLASSES[np.bincount(up).argmax()],
                                 osig.CIFAR10_CLASSES[np.bincount(down).argmax()])))
            pairs[pair] = pairs.get(pair, 0) + 1
    ranked = sorted(pairs.items(), key=lambda item: -item[1])[:6]
    class_counts = np.bincount(np.concatenate([labels_np[g["index"]] for g in groups]), minlength=10)
    log("  dominant class pairs (majority class of the up group vs the down group): " +
        ", ".join(f"{a}/{b} x{c}" for (a, b), c in ranked))
    notes.append("Dominant class pairs (majority class of the group going up vs the group going down, "
                 "counted over post-EoS steps): " + ", ".join(f"{a} vs {b} ({c})" for (a, b), c in ranked) +
                 ". Outliers by class: " + ", ".join(f"{osig.CIFAR10_CLASSES[c]} {class_counts[c]}"
                                                    for c in np.argsort(-class_counts)[:5]) + ".")
    if planted is not None:
        precision = np.mean(np.concatenate([planted.numpy()[g["index"]] > 0 for g in groups]))
        criteria.append(criterion("precision: detected outliers that are planted", precision, ">= 0.9",
                                  precision >= 0.9, log))
    shown = [groups[i] for i in np.linspace(0, len(groups) - 1, min(3, len(groups))).astype(int)]
    fig, axes = plt.subplots(2 * len(shown), 10, figsize=(10, 2.3 * len(shown)))
    for row, g in enumerate(shown):
        for side, up in enumerate((True, False)):
            members = g["index"][g["predicted_up"] == up][:10]
            ax_row = axes[2 * row + side]
            osig.plot_image_grid(ax_row, images[members].numpy(),
                                 [osig.CIFAR10_CLASSES[labels_np[i]] for i in members])
            ax_row[0].text(-40, 16, f"step {g['step']}\npredicted {'up' if up else 'down'}", fontsize=6,
                           ha="right", va="center")
    fig.suptitle("outliers of one GD step, split by the sign of their gradient along the sharp direction", fontsize=8)
    save_figure(fig, out / "groups.png")
    figures.append("groups.png")

    # 4. the opposing signal is a feature: sky vs no-sky groups
    window = slice(first, T)
    planes, others = labels_np == AIRPLANE, np.isin(labels_np, (BIRD, SHIP))
    series = {"sky airplane": sky & planes, "sky bird/ship": sky & others,
              "no-sky airplane": ~sky & planes, "no-sky bird/ship": ~sky & others}
    mean_loss = {name: losses[:, mask].mean(1) for name, mask in series.items() if mask.any()}
    corr_sky = osig.change_correlation(mean_loss["sky airplane"][window], mean_loss["sky bird/ship"][window])
    corr_nosky = osig.change_correlation(mean_loss["no-sky airplane"][window], mean_loss["no-sky bird/ship"][window])
    criteria.append(criterion("corr of loss changes: sky airplane vs sky bird/ship (post-EoS)", corr_sky, "<= -0.6",
                              corr_sky <= -0.6, log))
    criteria.append(criterion("same for the no-sky pair, minus the sky pair", corr_nosky - corr_sky, ">= 0.3",
                              corr_nosky - corr_sky >= 0.3, log))
    rng = np.random.default_rng(cfg.seed)
    selected, control = [], []
    for g in groups:
        start, stop = g["step"] + 2, min(T, g["step"] + 42)
        up, down = g["index"][g["loss_change"] > 0], g["index"][g["loss_change"] <= 0]
        if stop - start < 10 or not len(up) or not len(down):
            continue
        selected.append(osig.change_correlation(losses[start:stop, up].mean(1), losses[start:stop, down].mean(1)))
        shuffled = rng.permutation(losses.shape[1])
        control.append(osig.change_correlation(losses[start:stop, shuffled[:len(up)]].mean(1),
                                               losses[start:stop, shuffled[len(up):len(up) + len(down)]].mean(1)))
    corr_selected, corr_control = float(np.nanmedian(selected)), float(np.nanmedian(control))
    criteria.append(criterion("loss-change groups, corr over the 40 steps after selection (median)", corr_selected,
                              "<= -0.6", corr_selected <= -0.6, log))
    criteria.append(criterion("random control groups, same correlation (median)", corr_control,
                              "about 0 (|.| <= 0.3)", abs(corr_control) <= 0.3, log))
    zoom = slice(first, min(T, first + 200))
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    steps = history["step"][zoom]
    for name, values in mean_loss.items():
        ax = axes[0] if name.startswith("sky") else axes[1]
        ax.plot(steps, values[zoom], lw=0.9, label=f"{name} ({int(series[name].sum())})")
    axes[0].set_title(f"sky groups: corr of loss changes {corr_sky:.2f}", fontsize=9)
    axes[1].set_title(f"no-sky groups: corr of loss changes {corr_nosky:.2f}", fontsize=9)
    for ax in axes:
        ax.set_ylabel("mean loss")
        ax.legend(fontsize=7)
    axes[1].set_xlabel("step (edge of stability)")
    save_figure(fig, out / "sky_groups.png")
    figures.append("sky_groups.png")

    # 5. the sky probe
    outputs = history["probe_output"][:, 0, :].astype(np.float64)
    preference = outputs[:, AIRPLANE] - outputs[:, [BIRD, SHIP]].mean(1)
    corr_planes = osig.change_correlation(preference[window], mean_loss["sky airplane"][window])
    corr_others = osig.change_correlation(preference[window], mean_loss["sky bird/ship"][window])
    criteria.append(criterion("corr(probe airplane - bird/ship change, sky airplane loss change)", corr_planes,
                              "<= -0.8", corr_planes <= -0.8, log))
    criteria.append(criterion("corr(probe change, sky bird/ship loss change)", corr_others, ">= 0.7",
                              corr_others >= 0.7, log))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(steps, preference[zoom], color="k", lw=0.9, label="probe: out[airplane] - mean(out[bird], out[ship])")
    twin = ax.twinx()
    twin.plot(steps, mean_loss["sky airplane"][zoom], color="C0", lw=0.7, label="sky airplane loss")
    twin.plot(steps, mean_loss["sky bird/ship"][zoom], color="C1", lw=0.7, label="sky bird/ship loss")
    ax.set_xlabel("step (edge of stability)")
    ax.set_ylabel("probe preference")
    twin.set_ylabel("group mean loss")
    ax.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    ax.set_title(f"uniform sky image RGB {sky_rgb.round().int().tolist()}: corr {corr_planes:.2f} / {corr_others:.2f}",
                 fontsize=9)
    save_figure(fig, out / "sky_probe.png")
    figures.append("sky_probe.png")
    extra = {"shares": shares, "up_fraction_at_spikes": up_fraction, "sky": sky, "preference": preference,
             "group_steps": np.array([g["step"] for g in groups]),
             "group_index": np.stack([g["index"] for g in groups]),
             "group_loss_change": np.stack([g["loss_change"] for g in groups])}
    return finish_opposing(out, cfg, history, criteria, figures, notes, extra)


def finish_opposing(out, cfg, history, criteria, figures, notes, extra):
    """Save the run's raw numbers (per-example losses as float16) and return its result record."""
    arrays = {k: history[k] for k in ("step", "loss", "accuracy", "eig_step", "eigenvalues", "probe_output")}
    save_npz(out / "history.npz", per_example_loss=history["per_example_loss"].astype(np.float16),
             **arrays, **{k: np.asarray(v) for k, v in extra.items()})
    return {"criteria": criteria, "figures": figures, "notes": notes}


def linear_run(cfg, alpha, lr, steps, log):
    """Full-batch GD on the two-layer linear model; every step records the Lanczos sharpness and the theory's quantities."""
    x, y, sign = osig.make_opposing_signal_data(cfg.n_pairs, cfg.n_plain, alpha, cfg.scales, offset=cfg.offset, seed=cfg.seed)
    model = osig.TwoLayerLinear(x.shape[1], cfg.width, cfg.init_scale, seed=cfg.seed)
    signal_moment = float((x[:, 0] ** 2).mean())
    plus, minus = sign > 0, sign < 0

    def record(step, model, eigenvalues, eigenvectors):
        with torch.no_grad():
            residual = model(x)[:, 0] - y
            losses = 0.5 * residual ** 2
            return {"opposing_weight": osig.opposing_weight(model), "prediction": osig.predicted_sharpness(model, signal_moment),
                    "rayleigh_quotient": osig.opposing_rayleigh_quotient(model, x, y),
                    "loss_plus": float(losses[plus].mean()), "loss_minus": float(losses[minus].mean()),
                    "b_norm_sq": float(model.b @ model.b), "a_norm_sq": float(model.A[:, 0] @ model.A[:, 0]),
                    "genuine_norm": float((model.A[:, 1:].T @ model.b).norm()),
                    "residual_term_norm": float((residual @ x / len(x)).norm())}

    history = osig.train(model, x, y, osig.regression_loss, optimizer="gd", lr=lr, steps=steps, eig_every=1,
                         callback=record, log_every=steps // 4, seed=cfg.seed, log=log)
    run = {key: np.array([entry[key] for entry in history["callback"]]) for key in history["callback"][0]}
    # |β|: the norm of the best linear fit, all of it genuine (the |x_o| offset is orthogonal to every input)
    target_norm = float(torch.linalg.lstsq(x, y[:, None]).solution.norm())
    run.update(loss=history["loss"], sharpness=history["eigenvalues"][:, 0], lr=lr, alpha=alpha,
               signal_moment=signal_moment, genuine_target_norm=target_norm)
    return run


def run_linear(cfg, out, log=print):
    """Experiment `linear`: sharpness formula, progressive sharpening, edge of stability and its control."""
    with single_thread():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        runs = {}
        for name, alpha, lr, steps in (("large_lr", cfg.alpha, cfg.large_lr, cfg.large_steps),
                                       ("small_lr", cfg.alpha, cfg.small_lr, cfg.small_steps),
                                       ("control", cfg.control_alpha, cfg.large_lr, cfg.large_steps)):
            log(f"linear/{name}: alpha={alpha}, lr={lr} (2/lr = {2 / lr:.1f}), {steps} steps")
            runs[name] = linear_run(cfg, alpha, lr, steps, log)
        large, small, control = runs["large_lr"], runs["small_lr"], runs["control"]
        edge = 2 / cfg.large_lr
        figure = out / "linear.png"
        plot_linear(runs, figure, out / "linear_zoom.png")
        log(f"linear: figures {figure}, {out / 'linear_zoom.png'}")
        criteria = []

        # the formula, wherever its premise holds: opposing curvature above the residual term's norm |∇_w L|
        within, worst, worst_at, valid_steps, total = 0, 0.0, "", 0, 0
        for name in ("large_lr", "small_lr"):
            run = runs[name]
            valid = run["prediction"] >= run["residual_term_norm"]
            error = np.abs(run["prediction"] / run["sharpness"] - 1)
            within, valid_steps, total = within + (error[valid] <= 0.05).sum(), valid_steps + valid.sum(), total + len(valid)
            if error[valid].max() > worst:
                worst, worst_at = float(error[valid].max()), f"{name} step {int(np.nonzero(valid)[0][np.argmax(error[valid])])}"
        formula_fraction = within / valid_steps
        criteria.append(criterion("formula p·α²·(|Ae_o|²+|b|²) within 5% of the Lanczos sharpness: fraction of steps",
                                  formula_fraction, ">= 0.99", log=log, where=
                                  f"{valid_steps}/{total} steps of the two α={cfg.alpha:g} runs where it exceeds |∇_w L|; "
                                  f"max error {worst:.3f} at {worst_at}"))
        episode = osig.oscillation_episode(large["loss_plus"], large["loss_minus"], large["sharpness"], 2 / cfg.large_lr)
        quotient_error = float(np.abs(large["rayleigh_quotient"] / large["sharpness"] - 1)[episode].max()) \
            if episode.any() else float("nan")
        criteria.append(criterion("full Rayleigh quotient of the opposing direction vs Lanczos, max rel. error in the "
                                  "large-lr oscillation episodes", quotient_error, "<= 0.05", log=log, where=
                                  f"{episode.sum()} steps (leading term alone: "
                                  f"{np.abs(large['prediction'] / large['sharpness'] - 1)[episode].max():.3f})"))

        # small lr: rises to p α² |β| and stays, no oscillation
        theory_final = small["signal_moment"] * small["genuine_target_norm"]
        criteria.append(criterion("small lr: final sharpness / (p·α²·|β|) - 1", small["sharpness"][-1] / theory_final - 1,
                                  "<= 0.05", log=log, where=
                                  f"sharpness {small['sharpness'][-1]:.2f}, p·α²·|β| = {theory_final:.2f}"))
        balance = small["b_norm_sq"][-1] / small["genuine_norm"][-1]
        criteria.append(criterion("small lr: | |b|² / |w_genuine| - 1 | at the end (balanced growth)", abs(balance - 1),
                                  "<= 0.05", log=log, where=f"ratio {balance:.4f}"))
        criteria.append(criterion("small lr: period-2 fraction of the opposing weight",
                                  osig.period_two_fraction(small["opposing_weight"]), "== 0", log=log))

        # large lr: crossing, period-2 growth at the predicted rate, alternating groups, spike, self-stabilization
        crossing = int(np.argmax(large["sharpness"] > edge))
        crossed = bool(large["sharpness"].max() > edge)
        criteria.append(criterion("large lr: max sharpness / (2/lr)", large["sharpness"].max() / edge, "> 1", log=log))
        alternation, pairs = osig.consecutive_sign_changes(large["loss_plus"] - large["loss_minus"], episode)
        criteria.append(criterion("large lr: fraction of consecutive steps where L(s=+1) - L(s=-1) changes sign, in episode",
                                  alternation, ">= 0.8", log=log, where=f"{pairs} step pairs"))
        growth_ratio = float("nan")
        if episode.any():
            # the first contiguous stretch of the episode, up to the largest swing of the opposing weight
            first = int(np.argmax(episode))
            last = first + int(np.argmin(episode[first:])) if not episode[first:].all() else len(episode)
            w, lam = large["opposing_weight"], large["sharpness"]
            peak = first + int(np.argmax(np.abs(w[first:last])))
            steps = np.arange(first, peak)
            growth_ratio = float(np.median(np.abs(w[steps + 1] / w[steps]) / np.abs(1 - cfg.large_lr * lam[steps])))
        criteria.append(criterion("large lr: growing oscillation, |median of |w_o(t+1)/w_o(t)| / |1 - lr·sharpness_t|  -  1|",
                                  abs(growth_ratio - 1), "<= 0.05", log=log, where=f"median ratio {growth_ratio:.4f}"))
        spike = float(large["loss"][episode].max() / large["loss"][crossing]) if episode.any() else float("nan")
        criteria.append(criterion("large lr: peak loss in the episode / loss at the first crossing of 2/lr", spike,
                                  ">= 2", log=log))
        hover = float(np.median(np.abs(large["sharpness"][crossing:] / edge - 1))) if crossed else float("nan")
        criteria.append(criterion("large lr: median |sharpness/(2/lr) - 1| after the first crossing", hover, "<= 0.05", log=log))

        # control: α at the genuine features' scale
        criteria.append(criterion("control alpha: max sharpness / (2/lr)", control["sharpness"].max() / edge, "< 1", log=log))
        criteria.append(criterion("control alpha: period-2 fraction of the opposing weight",
                                  osig.period_two_fraction(control["opposing_weight"]), "== 0", log=log))

        save_npz(out / "linear.npz", **{f"{name}_{key}": value for name, run in runs.items()
                                                   for key, value in run.items()})
        elapsed = time.time() - start
        log(f"linear: done in {elapsed:.0f}s")
        summary = (f"Two-layer linear net bᵀAx with an opposing feature x_o = ±{cfg.alpha} on p = 1/3 of the examples. "
                   f"Its Lanczos sharpness is within 5% of p·α²·(|Ae_o|²+|b|²) on {formula_fraction:.1%} of steps "
                   f"(max {worst:.0%} at {worst_at}; in the oscillation episodes the full Rayleigh quotient stays within "
                   f"{quotient_error:.1%}) and grows "
                   f"with the learned signal to p·α²·|β| = {theory_final:.1f} at lr {cfg.small_lr}; at lr {cfg.large_lr} "
                   f"it crosses 2/lr = {edge:.0f} (max {large['sharpness'].max():.1f}), the opposing weight flips every step, "
                   f"growing at the predicted rate |1-lr·λ| (ratio {growth_ratio:.3f}), the two groups' losses alternate on "
                   f"{alternation:.0%} of steps (here L+ - L- = -2·α·offset·w_o exactly), the loss spikes {spike:.1f}x "
                   f"and the sharpness then stays within a median "
                   f"{hover:.1%} of 2/lr. With α = {cfg.control_alpha} the sharpness peaks at "
                   f"{control['sharpness'].max():.1f} and nothing oscillates.")
        return {"criteria": criteria, "figures": [figure.name, "linear_zoom.png"], "summary": summary}


def plot_linear(runs, path, zoom_path):
    """linear.png: per run (columns) loss and group losses, sharpness vs prediction vs 2/lr, opposing weight."""
    titles = {"large_lr": "large lr", "small_lr": "small lr", "control": "control: small α"}
    fig, axes = plt.subplots(3, 3, figsize=(15, 10), sharex="col")
    for column, (name, run) in enumerate(runs.items()):
        steps = np.arange(len(run["loss"]))
        ax = axes[0, column]
        # even steps only: during a period-2 oscillation the groups swap on odd steps, so this separates them
        ax.semilogy(steps[::2], run["loss_plus"][::2], color="tab:red", lw=0.8, label="group s=+1 (even steps)")
        ax.semilogy(steps[::2], run["loss_minus"][::2], color="tab:blue", lw=0.8, label="group s=−1 (even steps)")
        ax.semilogy(steps, run["loss"], color="k", lw=1.2, label="total loss")
        ax.set_title(f"{titles[name]}: α = {run['alpha']:g}, lr = {run['lr']:g}")
        ax.legend(fontsize=8)
        ax = axes[1, column]
        ax.plot(steps, run["sharpness"], color="k", lw=1.2, label="sharpness (Lanczos)")
        ax.plot(steps, run["prediction"], color="tab:orange", lw=1, ls="--", label="p·α²·(|Ae_o|²+|b|²)")
        ax.plot(steps, run["rayleigh_quotient"], color="tab:cyan", lw=0.8, ls=":", label="full Rayleigh quotient")
        ax.axhline(2 / run["lr"], color="tab:green", ls=":", label="2/lr")
        ax.axhline(run["signal_moment"] * run["genuine_target_norm"], color="tab:purple", lw=0.8, ls="-.",
                   label="p·α²·|β|")
        ax.set_ylim(0, 1.15 * max(run["sharpness"].max(), 2 / run["lr"] if name != "small_lr" else 0,
                                  run["signal_moment"] * run["genuine_target_norm"]))
        ax.legend(fontsize=8)
        ax = axes[2, column]
        ax.plot(steps, run["opposing_weight"], color="tab:brown", lw=0.5)
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_ylabel("opposing weight (Ae_o)·b")
        ax.set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, path)

    run = runs["large_lr"]
    edge = 2 / run["lr"]
    episode = osig.oscillation_episode(run["loss_plus"], run["loss_minus"], run["sharpness"], edge)
    first = int(np.argmax(episode)) if episode.any() else int(np.argmax(run["sharpness"]))
    window = np.arange(max(first - 20, 0), min(first + 40, len(run["loss"])))
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(window, run["loss_plus"][window], "o-", color="tab:red", ms=3, lw=0.8, label="group s=+1")
    axes[0].plot(window, run["loss_minus"][window], "o-", color="tab:blue", ms=3, lw=0.8, label="group s=−1")
    axes[0].plot(window, run["loss"][window], color="k", lw=1.2, label="total")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"large lr, first oscillation episode (lr = {run['lr']:g})")
    axes[1].plot(window, run["opposing_weight"][window], "o-", color="tab:brown", ms=3, lw=0.8)
    axes[1].axhline(0, color="gray", lw=0.5)
    axes[1].set_ylabel("opposing weight (Ae_o)·b")
    axes[2].plot(window, run["sharpness"][window], "o-", color="k", ms=3, lw=0.8, label="sharpness")
    axes[2].plot(window, run["prediction"][window], "--", color="tab:orange", label="p·α²·(|Ae_o|²+|b|²)")
    axes[2].plot(window, run["rayleigh_quotient"][window], ":", color="tab:cyan", label="full Rayleigh quotient")
    axes[2].axhline(edge, color="tab:green", ls=":", label="2/lr")
    axes[2].legend(fontsize=8)
    axes[2].set_xlabel("step")
    fig.tight_layout()
    save_figure(fig, zoom_path)


def toy_run(cfg, alpha, log):
    """Full-batch GD on the toy network; every step records sharpness, x_0 curvature, group statistics and probes."""
    x, y, sign = osig.make_opposing_signal_data(cfg.n_pairs, cfg.n_plain, alpha, cfg.scales, offset=cfg.offset, seed=cfg.seed)
    loss_fn, outputs = osig.regression_loss, 1
    if cfg.loss == "ce":
        y, loss_fn, outputs = (y > 0).long(), osig.cross_entropy_loss, 2
    model = osig.make_toy_network(x.shape[1], cfg.width, cfg.weight_scale, cfg.output_scale, cfg.hidden_bias, cfg.seed,
                                  num_outputs=outputs)
    probes, grid = osig.opposing_probes(alpha, x.shape[1])
    plus, minus = sign > 0, sign < 0
    hidden = model.net[1]

    def record(step, model, eigenvalues, eigenvectors):
        grad_plus, grad_minus = osig.group_gradients(model, loss_fn, x, y, [plus, minus])
        # the first-layer column that reads x_0: its entries sit at positions j·d of the flat weight
        column = slice(0, cfg.width * x.shape[1], x.shape[1])
        g_plus, g_minus = grad_plus[column], grad_minus[column]
        with torch.no_grad():
            losses = loss_fn(model(x), y)
            active = hidden(x) > 0
            return {"loss_plus": float(losses[plus].mean()), "loss_minus": float(losses[minus].mean()),
                    "opposing_curvature": osig.opposing_curvature(model, x),
                    "column_cosine": float(g_plus @ g_minus / (g_plus.norm() * g_minus.norm() + 1e-300)),
                    "column_cancellation": float((g_plus + g_minus).norm() / (g_plus.norm() + g_minus.norm() + 1e-300)),
                    "active_both": float((active[plus] & active[minus]).float().mean())}

    history = osig.train(model, x, y, loss_fn, optimizer="gd", lr=cfg.lr, steps=cfg.steps, eig_every=1,
                         callback=record, probes=probes, log_every=cfg.steps // 4, seed=cfg.seed, log=log)
    run = {key: np.array([entry[key] for entry in history["callback"]]) for key in history["callback"][0]}
    # the network's use of x_0: its output, or for two classes the logit difference f_1 - f_0
    probe_output = history["probe_output"][:, :, -1] - (history["probe_output"][:, :, 0] if outputs == 2 else 0)
    odd, even = osig.odd_even_parts(probe_output, grid.numpy(), alpha)
    run.update(loss=history["loss"], sharpness=history["eigenvalues"][:, 0], probe_output=probe_output,
               grid=grid.numpy(), odd=odd, even=even, alpha=alpha, lr=cfg.lr, offset=cfg.offset, loss_name=cfg.loss)
    return run


def half_learned_step(even):
    """First step at which the network's |x_0| (even) response reaches half its final value.

    For the squared-error toy the final value is the target offset; for the cross-entropy toy it is
    the margin the network ends with. Returns len(even) if it never does."""
    learned = np.asarray(even) >= even[-1] / 2 if even[-1] > 0 else np.zeros(len(even), dtype=bool)
    return int(np.argmax(learned)) if learned.any() else len(even)


def run_toy(cfg, out, log=print):
    """Experiment `toy`: a small ReLU network sharpens on a rare opposing input, oscillates at 2/lr, and its control."""
    with single_thread():
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        start = time.time()
        log(f"toy: alpha={cfg.alpha}, lr={cfg.lr} (2/lr = {2 / cfg.lr:.1f}), {cfg.steps} steps")
        toy = toy_run(cfg, cfg.alpha, log)
        log(f"toy/control: alpha={cfg.control_alpha}")
        control = toy_run(cfg, cfg.control_alpha, log)
        edge = 2 / cfg.lr
        figure = out / "toy.png"
        plot_toy(toy, control, figure)
        log(f"toy: figure {figure}")
        criteria = []
        crossed = bool((toy["sharpness"] > edge).any())
        crossing = int(np.argmax(toy["sharpness"] > edge)) if crossed else len(toy["loss"])
        half_learned = half_learned_step(toy["even"])
        early = slice(1, crossing)
        cosine = float(np.median(toy["column_cosine"][early]))
        criteria.append(criterion("before 2/lr: median cosine between the two groups' gradients on the x_0 weights",
                                  cosine, "<= -0.9", log=log, where=f"steps 1..{crossing - 1}"))
        balance = float(np.median(np.abs(toy["loss_plus"] - toy["loss_minus"])[early]
                                  / ((toy["loss_plus"] + toy["loss_minus"])[early] / 2)))
        criteria.append(criterion("before 2/lr: median |L(x_0>0) - L(x_0<0)| / their mean", balance, "<= 0.1", log=log))
        criteria.append(criterion("max sharpness / (2/lr)", toy["sharpness"].max() / edge, "> 1", log=log, where=
                                  f"from {toy['sharpness'][0]:.2f} at init to {toy['sharpness'].max():.2f}, "
                                  f"crossing at step {crossing}"))
        curvature_error = float(np.median(np.abs(toy["opposing_curvature"] / toy["sharpness"] - 1)[crossing:]))
        criteria.append(criterion("after 2/lr: median |x_0-column curvature λmax(M) / sharpness - 1|", curvature_error,
                                  "<= 0.05", log=log))
        episode = osig.oscillation_episode(toy["loss_plus"], toy["loss_minus"], toy["sharpness"], edge)
        difference = toy["loss_plus"] - toy["loss_minus"]
        before = episode & (np.arange(len(episode)) < half_learned)
        after = episode & (np.arange(len(episode)) >= half_learned)
        alternation, pairs = osig.consecutive_sign_changes(difference, before)
        alternation_after, pairs_after = osig.consecutive_sign_changes(difference, after)
        criteria.append(criterion("EoS, |x_0| part not yet learned: fraction of consecutive steps where L(x_0>0) - L(x_0<0) "
                                  "changes sign", alternation, ">= 0.8", log=log, where=
                                  f"{pairs} step pairs (steps {crossing}..{half_learned}); after |x_0| is learned: "
                                  f"{alternation_after:.2f} over {pairs_after} pairs"))
        flips, flip_pairs = osig.consecutive_sign_changes(toy["odd"], episode)
        criteria.append(criterion("EoS: fraction of consecutive steps where the pure-x_0 probe's odd part flips sign", flips,
                                  ">= 0.8", log=log, where=f"{flip_pairs} step pairs"))
        late = toy["sharpness"][int(0.9 * len(toy["sharpness"])):].mean() / edge
        criteria.append(criterion("after |x_0| is learned: mean sharpness over the last 10% of steps / (2/lr) (a fall)", late,
                                  "<= 0.9", log=log, where=f"|x_0| part half learned at step {half_learned}; fraction of (unit, pair) "
                                  f"active on both signs at the end {toy['active_both'][-1]:.2f}"))
        rise, control_rise = toy["sharpness"].max() - toy["sharpness"][0], control["sharpness"].max() - control["sharpness"][0]
        criteria.append(criterion("sharpening (max - initial sharpness): outliers / control α", rise / control_rise,
                                  ">= 3", log=log, where=f"{rise:.2f} vs {control_rise:.2f}"))
        save_npz(out / "toy.npz", **{f"{name}_{key}": value for name, run in (("toy", toy), ("control", control))
                                                for key, value in run.items()})
        elapsed = time.time() - start
        log(f"toy: done in {elapsed:.0f}s")
        summary = (f"ReLU MLP (width {cfg.width}, {'squared error' if cfg.loss == 'mse' else 'two-class cross-entropy'}) "
                   f"with x_0 = ±{cfg.alpha:g} on 1/3 of the examples and a target offset {cfg.offset:g} on |x_0|. Before the edge the two groups' gradients on the x_0 weights cancel (median "
                   f"cosine {cosine:.3f}) and their losses stay balanced; the sharpness rises {rise / control_rise:.0f}x more "
                   f"than with α = {cfg.control_alpha:g}, tracks the x_0-column curvature (median error {curvature_error:.1%} "
                   f"after the edge) and crosses 2/lr = {edge:g} at step {crossing}; the probe's odd part then flips on "
                   f"{flips:.0%} of steps and the groups' loss difference changes sign on {alternation:.0%} of steps until "
                   f"|x_0| is learned (step {half_learned}), after which the groups move in phase ({alternation_after:.0%}). "
                   f"The sharpness does not fall afterwards: it stays at {late:.2f}x 2/lr.")
        return {"criteria": criteria, "figures": [figure.name], "summary": summary}


def plot_toy(toy, control, path):
    """toy.png: the full run (losses, sharpness, odd/even use of x_0), a zoom on the anti-phase oscillation, f(x_0 e_0)."""
    edge = 2 / toy["lr"]
    steps = np.arange(len(toy["loss"]))
    crossing = int(np.argmax(toy["sharpness"] > edge)) if (toy["sharpness"] > edge).any() else len(steps) - 1
    half_learned = min(half_learned_step(toy["even"]), len(steps) - 1)
    episode = osig.oscillation_episode(toy["loss_plus"], toy["loss_minus"], toy["sharpness"], edge) & (steps < half_learned)
    gap = np.where(episode, np.abs(toy["loss_plus"] - toy["loss_minus"]), -1)
    center = int(np.argmax(gap)) if episode.any() else crossing
    window = np.arange(max(center - 20, 0), min(center + 20, len(steps)))

    fig, axes = plt.subplots(3, 2, figsize=(16, 12))

    def mark(ax):
        ax.axvline(crossing, color="tab:green", ls=":", lw=1)
        ax.axvline(half_learned, color="tab:purple", ls=":", lw=1)

    ax = axes[0, 0]
    # even steps only: in the anti-phase oscillation the groups swap on odd steps, so this separates them
    ax.semilogy(steps[::2], toy["loss_minus"][::2], color="tab:blue", lw=0.6, label="group x_0 = −α (even steps)")
    ax.semilogy(steps[::2], toy["loss_plus"][::2], color="tab:red", lw=0.6, label="group x_0 = +α (even steps)")
    ax.semilogy(steps, toy["loss"], color="k", lw=1.2, label="total loss")
    mark(ax)
    ax.set_title(f"toy ReLU network, α = {toy['alpha']:g}, lr = {toy['lr']:g} "
                 f"(green: sharpness crosses 2/lr; purple: |x_0| part half learned)", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(steps, toy["sharpness"], color="k", lw=1, label="sharpness (Lanczos)")
    ax.plot(steps, toy["opposing_curvature"], color="tab:orange", lw=0.8, ls="--", label="x_0-column curvature λmax(M)")
    ax.plot(steps, control["sharpness"], color="gray", lw=1, label=f"control α = {control['alpha']:g}: sharpness")
    ax.axhline(edge, color="tab:green", ls=":", label="2/lr")
    mark(ax)
    ax.set_ylim(0, 1.2 * max(toy["sharpness"].max(), edge))
    ax.legend(fontsize=8)
    ax = axes[2, 0]
    ax.plot(steps, toy["odd"], color="tab:brown", lw=0.3, label="odd part (f(αe_0) − f(−αe_0))/2: linear use of x_0")
    ax.plot(steps, toy["even"], color="tab:purple", lw=1.2,
            label="even part (f(αe_0) + f(−αe_0))/2 − f(0): |x_0| use")
    if toy["loss_name"] == "mse":
        ax.axhline(toy["offset"], color="tab:purple", ls=":", lw=0.8, label="|x_0| target offset")
    mark(ax)
    ax.set_xlabel("step")
    ax.legend(fontsize=8, loc="upper right")
    twin = ax.twinx()
    twin.plot(steps, toy["active_both"], color="gray", lw=0.5)
    twin.set_ylabel("fraction of units active on both signs (gray)", fontsize=8)

    ax = axes[0, 1]
    ax.plot(window, toy["loss_plus"][window], "o-", color="tab:red", ms=3, lw=0.8, label="group x_0 = +α")
    ax.plot(window, toy["loss_minus"][window], "o-", color="tab:blue", ms=3, lw=0.8, label="group x_0 = −α")
    ax.plot(window, toy["loss"][window], color="k", lw=1, label="total")
    ax.set_yscale("log")
    ax.set_title("zoom: edge of stability before |x_0| is learned", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    plus, minus = (int(np.argmin(np.abs(toy["grid"] - value))) for value in (toy["alpha"], -toy["alpha"]))
    ax.plot(window, toy["probe_output"][window, plus], "o-", color="tab:red", ms=3, lw=0.8, label="f(+α e_0)")
    ax.plot(window, toy["probe_output"][window, minus], "o-", color="tab:blue", ms=3, lw=0.8, label="f(−α e_0)")
    ax.plot(window, toy["odd"][window], "o-", color="tab:brown", ms=3, lw=0.8, label="odd part")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax = axes[2, 1]
    moments = [0, crossing // 2, crossing, center, center + 1, half_learned, len(steps) - 1]
    styles = ["-", "-", "-", "-", "--", "-", "-"]
    for t, style in zip(moments, styles):
        t = min(t, len(steps) - 1)
        ax.plot(toy["grid"], toy["probe_output"][t], style, lw=1.2, label=f"step {t}")
    for value in (toy["alpha"], -toy["alpha"]):
        ax.axvline(value, color="gray", lw=0.5, ls=":")
    ax.set_xlabel("x_0 (probe input, all other inputs 0)")
    ax.set_ylabel("network output (two classes: f_1 - f_0)")
    ax.set_title("f(x_0 e_0) at a few moments (dashed: the step after the previous one)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def evaluate(model, loss_fn, x, y, chunk=1000):
    """Mean loss and accuracy of the model on (x, y), without gradients."""
    with torch.no_grad():
        outputs = torch.cat([model(x[s:s + chunk]) for s in range(0, len(x), chunk)])
    return float(loss_fn(outputs, y).mean()), float((outputs.argmax(-1) == y).float().mean())


def early_layers(names):
    """The first third (rounded up) of the layer groups in module order: the first Linear of the MLP; the
    positions, patch embedding and first block of a depth-4 ViT; stem and first blocks of a ResNet."""
    return np.arange(len(names)) < int(np.ceil(len(names) / 3))


def run_optimizers(cfg, out, device, log=print):
    """Issue 5: Adam versus SGD (with clipping and split-update SGD) under opposing signals."""
    start_time = time.time()
    loss_fn = LOSSES[cfg.loss]
    if cfg.data == "planted":
        images, labels, _ = load_training_images("planted", cfg.n_train + cfg.n_test, cfg.seed)
        test_images, test_labels = images[cfg.n_train:], labels[cfg.n_train:]
        images, labels = images[:cfg.n_train], labels[:cfg.n_train]
    else:
        images, labels, _ = load_training_images(cfg.data, cfg.n_train, cfg.seed)
        test_images, test_labels = osig.load_cifar10(train=False)
        test_images, test_labels = test_images[:cfg.n_test], test_labels[:cfg.n_test]
    x, mean, std = osig.normalize(images)
    x_test, _, _ = osig.normalize(test_images, mean, std)
    x, y, x_test, y_test = x.to(device), labels.to(device), x_test.to(device), test_labels.to(device)
    betas = (cfg.momentum, cfg.beta2)
    grids = {"sgd": cfg.sgd_lrs, "adam": cfg.adam_lrs, "clip": cfg.clip_lrs, "split": cfg.split_lrs}
    log(f"  {len(x)} training and {len(x_test)} test images, {cfg.model}, {cfg.steps} steps of batch "
        f"{cfg.batch_size}; step-size grids: " + "; ".join(f"{k} {list(v)}" for k, v in grids.items()) +
        f" (split: normalized part at Adam's best lr, q = {cfg.split_quantile}; clip at |g| <= {cfg.clip_norm})")

    def run(name, lr, measured, split_lr=None):
        """One seeded run; `measured` adds dense per-example losses, frequent sharpness, eigenvectors, sign flips."""
        model = build_model(cfg, x.shape[1:]).to(device)
        history = osig.train(
            model, x, y, loss_fn, name, lr=lr, steps=cfg.steps, batch_size=cfg.batch_size, momentum=cfg.momentum,
            betas=betas, chunk=cfg.chunk or None, eig_every=cfg.eig_every if measured else cfg.grid_eig_every,
            eig_examples=cfg.eig_examples, eig_iters=cfg.eig_iters,
            record_every=cfg.record_every if measured else cfg.curve_every,
            callback=(lambda step, m, values, vectors: osig.layer_shares(vectors[:, 0], m)) if measured else None,
            log_every=cfg.steps // 5 if measured else 0, seed=cfg.seed, log=log, clip_norm=cfg.clip_norm,
            split_quantile=cfg.split_quantile, split_lr=split_lr or 1e-3,
            preconditioned=name in ("adam", "split"), record_sign_flips=measured)
        if history["diverged"]:
            return model, history, float("inf"), float("nan"), float("nan")
        train_loss, _ = evaluate(model, loss_fn, x, y)
        test_loss, test_accuracy = evaluate(model, loss_fn, x_test, y_test)
        return model, history, train_loss if np.isfinite(train_loss) else float("inf"), test_loss, test_accuracy

    def sharpness_ratio(name, history):
        """Per measurement: (preconditioned, for adam and split) sharpness / the optimizer's threshold."""
        values = history["preconditioned_eigenvalues" if name in ("adam", "split") else "eigenvalues"]
        return values[:, 0] / history["threshold"]

    # 1. step-size grids, all with the same budget; the best step size has the lowest final training loss
    grid_results, best = {}, {}
    for name in OPTIMIZER_NAMES:
        split_lr = best["adam"]["lr"] if name == "split" else None
        rows = []
        for lr in grids[name]:
            t0 = time.time()
            _, history, train_loss, test_loss, test_accuracy = run(name, lr, False, split_lr)
            ratio = sharpness_ratio(name, history)[history["eig_step"] > 0]
            rows.append(dict(lr=lr, train_loss=train_loss, test_loss=test_loss, test_accuracy=test_accuracy,
                             curve_step=history["record_step"], curve=history["per_example_loss"].mean(1),
                             ratio=float(np.nanmax(ratio)) if np.isfinite(ratio).any() else float("nan")))
            log(f"  grid | {name:5s} lr {lr:<8g} final train loss {train_loss:.4f} test acc {test_accuracy:.3f} "
                f"max sharpness / threshold {rows[-1]['ratio']:.3f} ({time.time() - t0:.0f}s)")
        grid_results[name] = rows
        choice = min(rows, key=lambda row: row["train_loss"])
        best[name] = dict(choice, split_lr=split_lr)
        if choice["lr"] in (grids[name][0], grids[name][-1]):
            log(f"  note: {name}'s best lr {choice['lr']} is at the edge of its grid")

    # 2. the best run of each optimizer again, measured (same seed: the same trajectory)
    measured, notes = {}, []
    for name in OPTIMIZER_NAMES:
        lr = best[name]["lr"]
        log(f"  measured run | {name} lr {lr}")
        model, history, train_loss, _, _ = run(name, lr, True, best[name]["split_lr"])
        if not np.isclose(train_loss, best[name]["train_loss"], rtol=1e-4):
            notes.append(f"{name}: the measured rerun ended at train loss {train_loss:.5f}, the grid run at "
                         f"{best[name]['train_loss']:.5f} (not bit-identical on this device)")
        measured[name] = dict(history=history, model=model)
    layer_names, layer_index, sizes = osig.parameter_layers(measured["sgd"]["model"])
    parameter_share = np.bincount(layer_index, weights=sizes, minlength=len(layer_names)) / sizes.sum()
    early = early_layers(layer_names)

    # 3. analysis of each measured run
    summary = {}
    for name in OPTIMIZER_NAMES:
        history = measured[name]["history"]
        losses = history["per_example_loss"]
        start = len(losses) // 5          # after the first fifth of training, when the fast initial drop is over
        oscillation = osig.opposing_group_oscillation(losses, top=cfg.top, window=cfg.window, start=start,
                                                       seed=cfg.seed)
        threshold = history["threshold"]
        ratio = sharpness_ratio(name, history)
        later = history["eig_step"] >= cfg.steps // 2
        shares = np.asarray([s for step, s in zip(history["eig_step"], history["callback"]) if step > 0])
        mean_shares = shares.mean(0) if len(shares) else np.full(len(layer_names), np.nan)
        flips = osig.layer_sign_flip_rates(history["sign_flip"], measured[name]["model"])
        summary[name] = dict(
            lr=best[name]["lr"], train_loss=best[name]["train_loss"], test_accuracy=best[name]["test_accuracy"],
            relative_amplitude=oscillation["median_relative"], amplitude=oscillation["median_amplitude"],
            relative_matched=oscillation["median_relative_matched"],
            group_correlation=oscillation["median_correlation"], oscillation=oscillation,
            sharpness_ratio=float(np.nanmedian(ratio[later])) if later.any() else float("nan"),
            sharpness_ratio_max=float(np.nanmax(ratio)) if np.isfinite(ratio).any() else float("nan"),
            plain_sharpness=float(np.median(history["eigenvalues"][later, 0])) if later.any() else float("nan"),
            threshold=threshold, layer_shares=mean_shares, early_share=float(mean_shares[early].sum()),
            sign_flips=flips, ratio=ratio)
        log(f"  {name:5s} | lr {summary[name]['lr']:<7g} | train loss {summary[name]['train_loss']:.4f} | test acc "
            f"{summary[name]['test_accuracy']:.3f} | group oscillation {summary[name]['relative_amplitude']:.2f}x "
            f"random, {summary[name]['relative_matched']:.2f}x loss-matched ({summary[name]['amplitude']:.4f} per "
            f"{cfg.record_every} steps, corr up/down "
            f"{summary[name]['group_correlation']:.2f}) | {'preconditioned ' if name in ('adam', 'split') else ''}"
            f"sharpness / threshold {summary[name]['sharpness_ratio']:.3f} (max {summary[name]['sharpness_ratio_max']:.3f})"
            f" | early-layer eigenvector share {summary[name]['early_share']:.3f}")

    # 4. criteria
    criteria = []
    sgd, adam = summary["sgd"], summary["adam"]
    amplitude_ratio = sgd["relative_amplitude"] / adam["relative_amplitude"]
    criteria.append(criterion("opposing-group oscillation (x control), SGD / Adam at their best lr", amplitude_ratio,
                              ">= 3", amplitude_ratio >= 3, log))
    for name in ("sgd", "adam"):
        criteria.append(criterion(f"{name}: share of the top Hessian eigenvector's squared norm in the early layers "
                                  f"({', '.join(np.asarray(layer_names)[early])}; their parameter share "
                                  f"{parameter_share[early].sum():.2f})", summary[name]["early_share"], ">= 0.5",
                                  summary[name]["early_share"] >= 0.5, log))
    gap = sgd["train_loss"] - adam["train_loss"]
    closed = {name: (sgd["train_loss"] - summary[name]["train_loss"]) / gap if gap > 0 else float("nan")
              for name in ("clip", "split")}
    criteria.append(criterion("fraction of the SGD -> Adam final train-loss gap closed by split-update SGD",
                              closed["split"], ">= 0.5 (our reading of 'closes most of it')",
                              closed["split"] >= 0.5, log))
    if gap <= 0:
        notes.append(f"Adam did not reach a lower final train loss than SGD (gap {gap:.4g}): the fraction of the "
                     f"gap closed is undefined (nan).")

    # 5. table and notes
    header = ("| optimizer | best lr | final train loss | test acc | group oscillation / random control | "
              "/ loss-matched control | group amplitude (loss per record) | corr(up, down) | "
              "sharpness / threshold (median, 2nd half) | early-layer share (parameter share) |")
    table = [header, "|" + "---|" * 10]
    for name in OPTIMIZER_NAMES:
        s = summary[name]
        kind = "P^-1 H vs 38/lr" if name == "adam" else ("P^-1 H vs 3.8/lr" if name == "split" else "H vs 3.8/lr")
        table.append(f"| {name} | {s['lr']:g} | {s['train_loss']:.4f} | {s['test_accuracy']:.3f} | "
                     f"{s['relative_amplitude']:.2f} | {s['relative_matched']:.2f} | {s['amplitude']:.4f} | "
                     f"{s['group_correlation']:.2f} | {s['sharpness_ratio']:.3f} ({kind}) | {s['early_share']:.3f} "
                     f"({parameter_share[early].sum():.2f}) |")
    table += ["", "Step-size grids (same budget for each): lr -> final train loss, test acc, max sharpness / threshold",
              "", "| optimizer | grid |", "|---|---|"]
    for name in OPTIMIZER_NAMES:
        table.append(f"| {name} | " + "; ".join(f"{row['lr']:g} -> {row['train_loss']:.3g}, {row['test_accuracy']:.3f}, "
                                             f"{row['ratio']:.2f}" for row in grid_results[name]) + " |")
    table_text = "\n".join(table)
    atomic_write(out / "table.md", lambda tmp: Path(tmp).write_text(table_text + "\n"))
    log("\n" + table_text)
    notes.append("Measured table (also in table.md): " + " ".join(
        f"{n}: lr {summary[n]['lr']:g}, train loss {summary[n]['train_loss']:.4f}, test acc "
        f"{summary[n]['test_accuracy']:.3f}, group oscillation {summary[n]['relative_amplitude']:.2f}x control, "
        f"sharpness/threshold {summary[n]['sharpness_ratio']:.3f}, early-layer share {summary[n]['early_share']:.3f};"
        for n in OPTIMIZER_NAMES))
    notes.append(f"Gap SGD -> Adam in final train loss: {gap:.4g}; clipping closes {closed['clip']:.2f} of it, "
                 f"split-update SGD {closed['split']:.2f}.")
    notes.append(f"Other normalizations of the oscillation, SGD / Adam: in loss units {sgd['amplitude']:.4f} / "
                 f"{adam['amplitude']:.4f} per {cfg.record_every} steps (ratio {sgd['amplitude'] / adam['amplitude']:.2f}); "
                 f"against loss-matched control groups {sgd['relative_matched']:.2f} / {adam['relative_matched']:.2f} "
                 f"(ratio {sgd['relative_matched'] / adam['relative_matched']:.2f}). The windows are at the same steps, "
                 f"not at the same training loss.")
    notes.append("Max (preconditioned) sharpness / threshold over each grid run: " + "; ".join(
        f"{n}: " + ", ".join(f"lr {row['lr']:g} -> {row['ratio']:.2f}" for row in grid_results[n])
        for n in OPTIMIZER_NAMES) + ".")
    notes.append("Per-layer sign-flip rate of the minibatch gradient (fraction of coordinates per step): " + "; ".join(
        f"{n}: " + ", ".join(f"{layer} {rate:.2f}" for layer, rate in zip(layer_names, summary[n]["sign_flips"]))
        for n in ("sgd", "adam")) + ".")
    notes.append("Rules (OUR RECONSTRUCTION): opposing groups are the top-|change| examples between two consecutive "
                 f"records (every {cfg.record_every} steps, odd so a period-2 oscillation still alternates), split "
                 "by sign; their amplitude is the mean |change| of each group's mean loss over the next "
                 f"{cfg.window} intervals, divided by that of random groups of the same sizes (median over "
                 "selections; also against loss-matched groups, since high-loss examples move more anyway). Thresholds: (2 + 2 momentum)/lr for SGD and clip (heavy-ball; 2/lr is the "
                 "momentum-free case), (2 + 2 beta1)/((1 - beta1) lr) for Adam on P^-1/2 H P^-1/2, "
                 "P = sqrt(v_hat) + eps; split on its own P (SplitSGD.preconditioner). Sharpness is of the mean "
                 f"loss over the first {cfg.eig_examples} training examples. Early layers: the first third of the "
                 "layer groups; a random direction would put their parameter share there.")

    # 6. figures
    figures = []
    fig, (ax_loss, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4))
    for name in OPTIMIZER_NAMES:
        for row in grid_results[name]:
            if row["lr"] != summary[name]["lr"] and len(row["curve"]):
                ax_loss.plot(row["curve_step"], row["curve"], color=COLORS[name], lw=0.5, alpha=0.35)
        history = measured[name]["history"]
        ax_loss.plot(history["record_step"], history["per_example_loss"].mean(1), color=COLORS[name], lw=1.2,
                     label=f"{name} lr={summary[name]['lr']:g}: {summary[name]['train_loss']:.3g}, "
                           f"test acc {summary[name]['test_accuracy']:.3f}")
        ax_ratio.plot(history["eig_step"], summary[name]["ratio"], "o-", ms=2.5, color=COLORS[name], lw=1,
                      label=f"{name}: {'preconditioned ' if name in ('adam', 'split') else ''}sharpness / "
                            f"{summary[name]['threshold']:.4g}")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel(f"training loss (all {len(x)} examples)")
    ax_loss.set_title("best step size of each grid (thin: the other grid points)", fontsize=9)
    ax_loss.legend(fontsize=7)
    ax_ratio.axhline(1.0, ls="--", color="k", lw=0.8)
    ax_ratio.set_xlabel("step")
    ax_ratio.set_ylabel("sharpness / stability threshold")
    ax_ratio.set_yscale("log")
    ax_ratio.set_title("full-batch sharpness against each optimizer's threshold", fontsize=9)
    ax_ratio.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "training_curves.png")
    figures.append("training_curves.png")

    fig, axes = plt.subplots(1, len(OPTIMIZER_NAMES), figsize=(14, 3.4), sharey=False)
    for ax, name in zip(axes, OPTIMIZER_NAMES):
        history, oscillation = measured[name]["history"], summary[name]["oscillation"]
        losses = history["per_example_loss"].astype(np.float64)
        if len(oscillation["record"]):
            r = int(oscillation["record"][len(oscillation["record"]) // 2])
            change = losses[r + 1] - losses[r]
            chosen = np.argsort(-np.abs(change))[:cfg.top]
            rest = np.setdiff1d(np.arange(losses.shape[1]), chosen)
            control = np.random.default_rng(cfg.seed).choice(rest, size=cfg.top, replace=False)
            span = slice(r, min(len(losses), r + 3 + cfg.window))
            steps = history["record_step"][span]
            for members, label, color in ((chosen[change[chosen] > 0], "went up", "C3"),
                                          (chosen[change[chosen] <= 0], "went down", "C0"), (control, "random", "C7")):
                ax.plot(steps, losses[span][:, members].mean(1), color=color, lw=1, label=f"{label} ({len(members)})")
            ax.axvspan(history["record_step"][r], history["record_step"][r + 1], color="y", alpha=0.3)
        ax.set_title(f"{name} lr={summary[name]['lr']:g}: {summary[name]['relative_amplitude']:.2f}x random, "
                     f"{summary[name]['relative_matched']:.2f}x loss-matched\n"
                     f"corr(up, down) {summary[name]['group_correlation']:.2f}", fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("group mean loss")
    fig.suptitle("opposing groups selected at the shaded interval (mid-training), then followed", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "group_oscillations.png")
    figures.append("group_oscillations.png")

    fig, (ax_share, ax_flip) = plt.subplots(1, 2, figsize=(12, 3.8))
    positions, width = np.arange(len(layer_names)), 0.8 / len(OPTIMIZER_NAMES)
    for j, name in enumerate(OPTIMIZER_NAMES):
        ax_share.bar(positions + (j - 1.5) * width, summary[name]["layer_shares"], width, color=COLORS[name],
                     label=name)
        ax_flip.bar(positions + (j - 1.5) * width, summary[name]["sign_flips"], width, color=COLORS[name], label=name)
    ax_share.plot(positions, parameter_share, "k_", ms=18, mew=2, label="parameter share (random direction)")
    for ax, label in ((ax_share, "share of top eigenvector's |v|²"), (ax_flip, "gradient sign flips per step")):
        ax.set_xticks(positions)
        ax.set_xticklabels(layer_names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    ax_share.set_title("top Hessian eigenvector by layer (mean over measurements)", fontsize=9)
    ax_flip.set_title("fraction of gradient coordinates flipping sign between steps", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "layer_shares.png")
    figures.append("layer_shares.png")

    # 7. raw numbers
    arrays = {"layer_names": np.asarray(layer_names), "parameter_share": parameter_share}
    for name in OPTIMIZER_NAMES:
        arrays[f"{name}_grid_lr"] = np.asarray([row["lr"] for row in grid_results[name]])
        arrays[f"{name}_grid_train_loss"] = np.asarray([row["train_loss"] for row in grid_results[name]])
        arrays[f"{name}_grid_test_accuracy"] = np.asarray([row["test_accuracy"] for row in grid_results[name]])
        arrays[f"{name}_grid_max_sharpness_ratio"] = np.asarray([row["ratio"] for row in grid_results[name]])
        history = measured[name]["history"]
        for key in ("step", "loss", "grad_norm", "record_step", "eig_step", "eigenvalues", "sign_flip"):
            arrays[f"{name}_{key}"] = history[key]
        if "preconditioned_eigenvalues" in history:
            arrays[f"{name}_preconditioned_eigenvalues"] = history["preconditioned_eigenvalues"]
        arrays[f"{name}_per_example_loss"] = history["per_example_loss"].astype(np.float16)
        arrays[f"{name}_layer_shares"] = np.asarray([s for s in history["callback"]])
        arrays[f"{name}_sign_flip_rate"] = summary[name]["sign_flips"]
        for key, value in summary[name]["oscillation"].items():
            arrays[f"{name}_oscillation_{key}"] = np.asarray(value)
    save_npz(out / "optimizers.npz", **arrays)
    notes.append(f"Run time {time.time() - start_time:.0f} s on {device} with {torch.get_num_threads()} thread(s).")
    log(f"  {notes[-1]}")
    return {"criteria": criteria, "figures": figures, "notes": notes}


# ----------------------------------------------------------------------------- benchmark

def median_time(fn, repeats=5):
    """Median wall time of fn() over `repeats` calls, after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class _Reached(Exception):
    """Raised inside a matvec to stop an eigensolver once the benchmark's accuracy is reached."""


def products_to_accuracy(matvec, dim, method, reference, accuracy=1e-4, budget=300, device="cpu", dtype=torch.float32):
    """Matrix-vector products `method` needs before its top-eigenvalue estimate is within
    `accuracy` (relative) of `reference`, or None within `budget`. The estimate after m products
    is, for Lanczos, the top eigenvalue of Qₘᵀ A Qₘ (its basis is orthonormal, so this is its
    Ritz value) and, for power iteration, the Rayleigh quotient vₘ·A vₘ."""
    inputs, outputs = [], []

    def recording(v):
        w = matvec(v)
        inputs.append(v.double())
        outputs.append(w.double())
        if method == "lanczos":
            Q, W = torch.stack(inputs), torch.stack(outputs)
            projected = (Q @ W.T).cpu().numpy()
            estimate = np.linalg.eigvalsh((projected + projected.T) / 2)[-1]
        else:
            estimate = float(inputs[-1] @ outputs[-1])
        if abs(estimate - reference) <= accuracy * abs(reference):
            raise _Reached
        return w

    try:
        if method == "lanczos":
            osig.lanczos(recording, dim, k=1, iters=budget, tol=0.0, dtype=dtype, device=device)
        else:
            osig.power_iteration(recording, dim, iters=budget, tol=0.0, dtype=dtype, device=device)
    except _Reached:
        return len(inputs)
    return None


def run_bench(out, device, log=print):
    """Speed table: HVP vs gradient cost, Lanczos vs power iteration, vmap vs loop per-example grads."""
    try:
        images, labels = osig.load_cifar10(train=True)
        index = osig.seeded_subset(len(images), 500)
        images, labels, data = images[index], labels[index], "CIFAR-10"
    except (FileNotFoundError, ValueError):
        images, labels, _ = osig.make_planted_images(n=500)
        data = "planted synthetic images (CIFAR-10 not found)"
    x, _, _ = osig.normalize(images)
    x, y = x.to(device), labels.to(device)
    torch.manual_seed(0)
    models = {"MLP 3072-200-200-10": osig.MLP().to(device), "SmallCNN (32-64 ch)": osig.SmallCNN().to(device)}
    rows = []
    log(f"benchmark on {device}, {torch.get_num_threads()} threads, n = {len(x)} {data}")
    for name, model in models.items():
        params = [p for p in model.parameters()]
        dim = sum(p.numel() for p in params)
        v = torch.randn(dim, device=device)

        def gradient():
            torch.autograd.grad(osig.mse_loss(model(x), y).mean(), params)

        def fresh_hvp():
            osig.hvp(model, osig.mse_loss, x, y, v)

        grads = torch.autograd.grad(osig.mse_loss(model(x), y).mean(), params, create_graph=True)
        directions = [d.view_as(p) for d, p in zip(torch.split(v, [p.numel() for p in params]), params)]

        def reused_hvp():
            torch.autograd.grad(grads, params, grad_outputs=directions, retain_graph=True)

        t_grad, t_fresh, t_reused = median_time(gradient), median_time(fresh_hvp), median_time(reused_hvp)
        rows.append((name, "one HVP / one gradient (hvp: forward + backward + double backward)",
                     f"{t_fresh / t_grad:.2f}x", "<= 3x", t_fresh / t_grad <= 3))
        rows.append((name, "one HVP / one gradient (top_eigenvalues: graph built once, reused)",
                     f"{t_reused / t_grad:.2f}x", "<= 3x", t_reused / t_grad <= 3))

        def matvec(u):
            return torch.cat([h.reshape(-1) for h in torch.autograd.grad(
                grads, params, grad_outputs=[d.view_as(p) for d, p in zip(torch.split(u, [p.numel() for p in params]),
                                                                           params)], retain_graph=True)])

        reference = float(osig.lanczos(matvec, dim, k=1, iters=300, tol=1e-6, seed=1, dtype=torch.float32,
                                       device=device)[0][0])
        m_lanczos = products_to_accuracy(matvec, dim, "lanczos", reference, device=device)
        m_power = products_to_accuracy(matvec, dim, "power", reference, budget=500, device=device)
        ratio = (m_power or 500) / (m_lanczos or 300)
        rows.append((name, f"HVPs to 1e-4 relative accuracy on the top eigenvalue ({reference:.3f}): Lanczos",
                     str(m_lanczos), "<= 30", m_lanczos is not None and m_lanczos <= 30))
        rows.append((name, "same, power iteration (and its ratio to Lanczos)",
                     f"{m_power if m_power else '>500'} ({ratio:.1f}x)", ">= 3x Lanczos", ratio >= 3))
        batch_x, batch_y = x[:256], y[:256]

        def vmapped():
            osig.per_example_grads(model, osig.mse_loss, batch_x, batch_y, chunk=256)

        def looped():  # the same [256, P] matrix, one example at a time
            rows = []
            for i in range(len(batch_x)):
                grads_i = torch.autograd.grad(osig.mse_loss(model(batch_x[i:i + 1]), batch_y[i:i + 1]).sum(), params)
                rows.append(torch.cat([g.reshape(-1) for g in grads_i]))
            return torch.stack(rows)

        t_vmap, t_loop = median_time(vmapped, 3), median_time(looped, 3)
        rows.append((name, "per-example gradients, batch 256: loop time / vmap time",
                     f"{t_loop / t_vmap:.1f}x ({1e3 * t_vmap:.0f} ms vs {1e3 * t_loop:.0f} ms)", ">= 10x",
                     t_loop / t_vmap >= 10))
        log(f"  {name}: gradient {1e3 * t_grad:.1f} ms, HVP {1e3 * t_fresh:.1f} ms fresh / {1e3 * t_reused:.1f} ms "
            f"reused, Lanczos {m_lanczos} vs power {m_power} products, per-example grads vmap "
            f"{1e3 * t_vmap:.0f} ms vs loop {1e3 * t_loop:.0f} ms")
    table = ["| model | measurement | value | target | met |", "|---|---|---|---|---|"]
    table += [f"| {m} | {what} | {value} | {target} | {'yes' if met else 'no'} |" for m, what, value, target, met in rows]
    text = (f"Benchmark on {device} ({torch.get_num_threads()} threads, torch {torch.__version__}), "
            f"n = {len(x)} {data}, MSE loss.\n\n" + "\n".join(table) + "\n")
    atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(text))
    save_json(out / "bench.json", [dict(zip(("model", "measurement", "value", "target", "met"), r)) for r in rows])
    log("\n" + text)
    return rows


# ----------------------------------------------------------------------------- report

def write_report(out, records, profile, device):
    """results/report.md: a summary table, then per experiment its figures, criteria and notes."""
    def escape(text):  # a | inside a table cell would end the cell
        return text.replace("|", "\\|")

    lines = ["# osig: measured reproduction report", "",
             f"Profile `{profile}` on `{device}`, torch {torch.__version__}, written "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Each criterion is a statistic over the run, measured "
             "by run_all.py; targets come from the issues, not from these runs.", "",
             "| experiment | status | criteria met | time |", "|---|---|---|---|"]
    for name, record in records.items():
        met = [c["met"] for c in record.get("criteria", [])]
        lines.append(f"| [{name}](#{name}) | {record['status']} | {sum(met)}/{len(met)} | "
                     f"{record.get('seconds', 0):.0f} s |")
    for name, record in records.items():
        lines += ["", f"## {name}", "", record.get("title", ""), ""]
        if record["status"] != "done":
            lines += [f"**{record['status']}**: {record.get('reason', '')}", ""]
            continue
        lines += ["<details><summary>config</summary>", "", "```", json.dumps(record["config"], indent=1), "```",
                  "", "</details>", ""]
        if record.get("summary"):
            lines += [record["summary"], ""]
        lines += [f"![{figure}]({name}/{figure})" for figure in record["figures"]]
        lines += ["", "| criterion | measured | target | met |", "|---|---|---|---|"]
        lines += [f"| {escape(c['name'])} | {c['value']:.4g} | {escape(c['target'])} | {'yes' if c['met'] else '**no**'} |"
                  for c in record["criteria"]]
        lines += [""] + [f"- {note}" for note in record.get("notes", [])]
    atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


# ----------------------------------------------------------------------------- main

def experiment_plan(profile, data):
    """(name, title, config, run function, needs CIFAR-10) for every experiment of a profile."""
    if profile == "smoke":
        # seconds-long runs that sit at the edge of stability throughout (later the planted
        # groups are fit and their oscillation dies out)
        mse = OpposingConfig(name="cifar_mse", data=data, n_train=400, width=64, lr=0.15, steps=150,
                             eig_every=10, eig_k=4, top=10, eos_by=150)
        ce = OpposingConfig(name="cifar_ce", data=data, n_train=400, width=64, activation="tanh", loss="ce",
                            lr=0.3, steps=150, eig_every=10, eig_k=1, top=10, eos_by=150)
    elif profile == "gpu":
        mse = OpposingConfig(name="cifar_mse", data=data, n_train=5000, model="vgg11", width=64, lr=0.05,
                             steps=3000, eig_every=25, eig_k=8, chunk=1250, eos_by=2000)
        ce = OpposingConfig(name="cifar_ce", data=data, n_train=5000, model="vit", width=128, depth=4, loss="ce",
                            lr=0.05, steps=2000, eig_every=25, eig_k=1, chunk=1250, eos_by=1500)
    else:
        mse = OpposingConfig(name="cifar_mse", data=data)
        ce = OpposingConfig(name="cifar_ce", data=data, activation="tanh", loss="ce", lr=0.05, steps=700,
                            eig_k=1, eos_by=500)
    linear, toy, optimizers = LinearConfig(), ToyConfig(), [OptimizersConfig()]
    # the cross-entropy toy: the outliers' curvature p(1 - p) can vanish once |x_0| is used
    toy_ce = ToyConfig(name="toy_ce", loss="ce", offset=0.75, hidden_bias=0.3, lr=0.2)
    if profile == "smoke":
        linear, toy = LinearConfig(large_steps=400, small_steps=1000), ToyConfig(steps=600)
        toy_ce = dataclasses.replace(toy_ce, steps=600)
        optimizers = [OPTIMIZERS_SMOKE]
    elif profile == "gpu":
        optimizers = [OPTIMIZERS_GPU_VIT, OPTIMIZERS_GPU_RESNET18]
    optimizers = [dataclasses.replace(cfg, data=data) for cfg in optimizers]
    return [
        ("linear", "The mechanism in a two-layer linear network: sharpness in closed form, edge of stability, "
                   "self-stabilization, and a control.", linear, lambda cfg, out, device: run_linear(cfg, out), False),
        ("toy", "The mechanism in a small ReLU network on a rare, large input: sharpening, anti-phase group losses, "
                "a flipping probe, and a control.", toy, lambda cfg, out, device: run_toy(cfg, out), False),
        ("toy_ce", "The same toy classified with cross-entropy: the outliers' curvature vanishes once the network "
                   "uses |x_0|, so the sharpness falls.", toy_ce, lambda cfg, out, device: run_toy(cfg, out), False),
        ("cifar_mse", "Issue 3 phenomena, MSE: edge of stability, heavy-tailed loss changes, opposing groups, "
                      "the sky feature and its probe.", mse, run_opposing, data == "cifar10"),
        ("cifar_ce", "Issue 3 phenomena, cross-entropy: the gradient pairing of the opposing groups.",
         ce, run_opposing, data == "cifar10"),
    ] + [(cfg.name, f"Adam versus SGD ({cfg.model}): SGD with momentum, Adam, clipped SGD and split-update SGD at "
                    "their best step sizes; opposing-group oscillations, (preconditioned) sharpness against each "
                    "threshold, and where the top Hessian eigenvector lives.", cfg, run_optimizers, data == "cifar10")
         for cfg in optimizers]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["cpu", "gpu", "smoke"],
                        help="scale: gpu (full), cpu (laptop, default without CUDA), smoke (seconds, for tests)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this experiment (repeatable)")
    parser.add_argument("--out", default="results", help="results folder (default: results)")
    parser.add_argument("--seed", type=int, help="override every experiment's seed")
    parser.add_argument("--data", choices=["cifar10", "planted"],
                        help="images for the cifar experiments (default: cifar10; planted for the smoke profile)")
    parser.add_argument("--force", action="store_true", help="recompute experiments whose results exist")
    parser.add_argument("--bench", action="store_true", help="run the speed benchmark instead")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        parser.error(f"--device {device} is not usable here ({str(error).splitlines()[0]}); try --device cpu")
    profile = args.profile or ("gpu" if device.startswith("cuda") else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.bench:
        run_bench(out, device)
        return 0
    plan = experiment_plan(profile, args.data or ("planted" if profile == "smoke" else "cifar10"))
    names = [name for name, *_ in plan]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown experiment {', '.join(unknown)}: choose from {', '.join(names)}")
    records, failures = {}, 0
    for name, title, cfg, run, needs_cifar in plan:
        if args.only and name not in args.only:
            continue
        if args.seed is not None:
            cfg = dataclasses.replace(cfg, seed=args.seed)
        config = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as it reads back from result.json
        print(f"\n=== {name}: {title}\n{cfg}")
        saved = out / name / "result.json"
        if saved.exists() and not args.force:
            record = json.loads(saved.read_text())
            if record.get("config") == config and record.get("status") == "done":
                print(f"  reusing {saved} (finished earlier; --force recomputes)")
                records[name] = record
                continue
        start = time.time()
        try:
            result = run(cfg, out / name, device)
            record = dict(result, status="done", title=title, config=config, seconds=time.time() - start)
            save_json(saved, record)
        except (FileNotFoundError, ValueError) as error:
            if not needs_cifar:
                raise
            reason = f"{error} (then rerun: python run_all.py --only {name})"
            print(f"  skipped {name}: {reason}")
            record = {"status": "skipped", "title": title, "reason": reason}
        except Exception as error:  # one broken experiment must not lose the others
            failures += 1
            print(f"  FAILED {name}: {type(error).__name__}: {error}")
            record = {"status": "failed", "title": title, "reason": f"{type(error).__name__}: {error}"}
        records[name] = record
        write_report(out, records, profile, device)
    write_report(out, records, profile, device)
    print(f"\nreport: {out / 'report.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
