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
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
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


def criterion(name, value, target, met, log=print):
    """One measured criterion: printed at once, stored for the report."""
    value = float(value)
    log(f"  criterion | {name}: {value:.4g} (target {target}) -> {'met' if met else 'NOT met'}")
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


# ----------------------------------------------------------------------------- experiments

LOSSES = {"mse": osig.mse_loss, "ce": osig.cross_entropy_loss}
AIRPLANE, BIRD, SHIP = 0, 2, 8


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


def products_to_accuracy(matvec, dim, method, reference, accuracy=1e-4, budget=300, device="cpu", dtype=torch.float32):
    """Matrix-vector products `method` needs before its top-eigenvalue estimate is within
    `accuracy` (relative) of `reference`. Records every product once and replays the estimates:
    Lanczos's estimate after m products is the top eigenvalue of Qₘᵀ A Qₘ (its basis is
    orthonormal), power iteration's is the Rayleigh quotient vₘ·A vₘ."""
    inputs, outputs = [], []

    def recording(v):
        w = matvec(v)
        inputs.append(v.double())
        outputs.append(w.double())
        return w

    if method == "lanczos":
        osig.lanczos(recording, dim, k=1, iters=budget, tol=0.0, dtype=dtype, device=device)
        Q, W = torch.stack(inputs), torch.stack(outputs)
        projected = (Q @ W.T).cpu().numpy()
        projected = (projected + projected.T) / 2
        estimates = [np.linalg.eigvalsh(projected[:m, :m])[-1] for m in range(1, len(inputs) + 1)]
    else:
        osig.power_iteration(recording, dim, iters=budget, tol=0.0, dtype=dtype, device=device)
        estimates = [float(v @ w) for v, w in zip(inputs, outputs)]
    for m, estimate in enumerate(estimates, start=1):
        if abs(estimate - reference) <= accuracy * abs(reference):
            return m
    return None


def run_bench(out, device, log=print):
    """Speed table: HVP vs gradient cost, Lanczos vs power iteration, vmap vs loop per-example grads."""
    try:
        images, labels = osig.load_cifar10(train=True)
        index = osig.seeded_subset(len(images), 1000)
        images, labels, data = images[index], labels[index], "CIFAR-10"
    except (FileNotFoundError, ValueError):
        images, labels, _ = osig.make_planted_images(n=1000)
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

        reference = float(osig.lanczos(matvec, dim, k=1, iters=300, tol=1e-9, seed=1, dtype=torch.float32,
                                       device=device)[0][0])
        m_lanczos = products_to_accuracy(matvec, dim, "lanczos", reference, device=device)
        m_power = products_to_accuracy(matvec, dim, "power", reference, budget=1000, device=device)
        ratio = (m_power or 1000) / (m_lanczos or 300)
        rows.append((name, f"HVPs to 1e-4 relative accuracy on the top eigenvalue ({reference:.3f}): Lanczos",
                     str(m_lanczos), "<= 30", m_lanczos is not None and m_lanczos <= 30))
        rows.append((name, "same, power iteration (and its ratio to Lanczos)",
                     f"{m_power if m_power else '>1000'} ({ratio:.1f}x)", ">= 3x Lanczos", ratio >= 3))
        batch_x, batch_y = x[:256], y[:256]

        def vmapped():
            osig.per_example_grads(model, osig.mse_loss, batch_x, batch_y, chunk=256)

        def looped():
            for i in range(len(batch_x)):
                torch.autograd.grad(osig.mse_loss(model(batch_x[i:i + 1]), batch_y[i:i + 1]).sum(), params)

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
        lines += [f"![{figure}]({name}/{figure})" for figure in record["figures"]]
        lines += ["", "| criterion | measured | target | met |", "|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['value']:.4g} | {c['target']} | {'yes' if c['met'] else '**no**'} |"
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
    return [
        ("cifar_mse", "Issue 3 phenomena, MSE: edge of stability, heavy-tailed loss changes, opposing groups, "
                      "the sky feature and its probe.", mse, run_opposing, data == "cifar10"),
        ("cifar_ce", "Issue 3 phenomena, cross-entropy: the gradient pairing of the opposing groups.",
         ce, run_opposing, data == "cifar10"),
    ]


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
        config = dataclasses.asdict(cfg)
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
