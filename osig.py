"""
osig.py: a small, readable reproduction of
"Outliers with Opposing Signals Have an Outsized Effect on Neural Network Optimization"
(Rosenfeld & Risteski, ICLR 2024).

Read it top to bottom; every section only uses what came before it.

  1. Data            CIFAR-10 loader (official python layout), normalization, seeded subsets,
                     and a synthetic image set with a planted pair of opposing signals.
  2. Models          MLP, small CNN, VGG-11, CIFAR ResNet-18, small ViT; all twice differentiable.
  3. Losses          per-example MSE and cross-entropy.
  4. Curvature       Hessian-vector products, hand-written Lanczos and power iteration, sharpness.
  5. Per-example     per-example losses, gradients (vmap) and directional derivatives (jvp).
  6. Training        full-batch GD, minibatch SGD with momentum and Adam, recording every step.

Conventions. A "loss_fn" maps (outputs [B, C], labels [B]) to per-example losses [B]; the training
objective is their mean over the training set. Flat parameter vectors concatenate
`[p.reshape(-1) for p in model.parameters() if p.requires_grad]` in module order.

Every public function is self-contained: paste it into another project with the imports at the top
of this file and it works. Where a function builds on another public function it says so.
"""

import hashlib
import math
import os
import pickle
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- 1. Data

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


def load_cifar10(root=None, train=True, download=True):
    """Load CIFAR-10 from the official "python version" layout.

    Looks for `root/cifar-10-batches-py/` (root from the argument, else the OSIG_DATA environment
    variable, else ./data). If it is absent, uses `root/cifar-10-python.tar.gz`, downloading it from
    its home page when allowed, checks its md5 and extracts it atomically: the archive is unpacked
    into a temporary folder that is renamed into place only when complete. An extracted folder is
    checked by structure (files, keys, shapes, label range), not by md5, so re-encoded copies load.

    Returns images uint8 [N, 32, 32, 3] (HWC, as the raw data) and labels int64 [N];
    N = 50,000 for train, 10,000 for test. Raises FileNotFoundError (missing, cannot download) or
    ValueError (corrupted) with a one-line message that says how to fix it.
    """
    root = Path(root or os.environ.get("OSIG_DATA") or "data").expanduser()
    folder = root / "cifar-10-batches-py"
    archive = root / "cifar-10-python.tar.gz"
    where = (f"put cifar-10-python.tar.gz (from {CIFAR10_URL}) or its extracted cifar-10-batches-py/ "
             f"folder in {root}, or set OSIG_DATA to the folder that holds it")
    if not folder.is_dir():
        if not archive.exists():
            if not download:
                raise FileNotFoundError(f"CIFAR-10 not found in {root}: {where}")
            root.mkdir(parents=True, exist_ok=True)
            partial = archive.with_name(archive.name + ".part")
            try:
                with urllib.request.urlopen(CIFAR10_URL, timeout=30) as response, open(partial, "wb") as f:
                    while block := response.read(1 << 20):
                        f.write(block)
                os.replace(partial, archive)
            except OSError as error:
                partial.unlink(missing_ok=True)
                raise FileNotFoundError(f"CIFAR-10 not found in {root} and the download failed "
                                        f"({error}): {where}") from None
        md5 = hashlib.md5()
        with open(archive, "rb") as f:
            while block := f.read(1 << 20):
                md5.update(block)
        if md5.hexdigest() != CIFAR10_MD5:
            raise ValueError(f"{archive} is corrupted (md5 {md5.hexdigest()}, expected {CIFAR10_MD5}): "
                             f"delete it and download it again from {CIFAR10_URL}")
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".cifar10-extract-"))
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(staging, filter="data")
            if not (staging / "cifar-10-batches-py").is_dir():
                raise ValueError(f"{archive} does not contain cifar-10-batches-py/: "
                                 f"delete it and download it again from {CIFAR10_URL}")
            os.replace(staging / "cifar-10-batches-py", folder)
        finally:
            for path in sorted(staging.rglob("*"), reverse=True):
                path.unlink() if path.is_file() else path.rmdir()
            staging.rmdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"])
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except (OSError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as error:
            raise ValueError(f"{path} is missing or unreadable ({type(error).__name__}: {error}): "
                             f"delete {folder} and {where}") from None
        if (data.dtype != np.uint8 or data.shape != (10000, 3072) or batch_labels.shape != (10000,)
                or batch_labels.min() < 0 or batch_labels.max() > 9):
            raise ValueError(f"{path} is not a CIFAR-10 batch (data {data.dtype} {data.shape}, "
                             f"{batch_labels.shape[0]} labels): delete {folder} and {where}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def normalize(images, mean=None, std=None):
    """Per-channel standardization: uint8 [N, H, W, C] -> float32 [N, C, H, W].

    x = (images / 255 - mean[c]) / std[c], with mean and std ([C], in units of images / 255)
    computed over all pixels of these images unless given. Pass the training set's mean and std
    to normalize test or probe images exactly like the training data. Returns (x, mean, std).
    """
    x = images.permute(0, 3, 1, 2).float() / 255
    if mean is None:
        mean = x.mean(dim=(0, 2, 3))
    if std is None:
        std = x.std(dim=(0, 2, 3))
    mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), mean, std


def seeded_subset(n_total, n, seed=0):
    """Indices of a seeded subset: the first n entries of a fixed random permutation of n_total.

    Subsets of one seed are nested (the first 1,000 are inside the first 2,000), so a small run
    and a large run see the same leading examples. Returns int64 [n].
    """
    if not 0 < n <= n_total:
        raise ValueError(f"subset size {n} must be between 1 and {n_total}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[:n]


def make_planted_images(n=1000, num_classes=10, image_size=32, planted_classes=(0, 2),
                        planted_fraction=0.25, signal=5.0, noise=60.0, seed=0):
    """Synthetic images with a planted pair of opposing signals.

    Each class c has a fixed random smooth pattern T_c (the genuine, class-specific signal); an
    image of class c is  128 + signal·T_c + noise·z  per pixel and channel (z i.i.d. Gaussian,
    clipped to uint8); a weaker signal makes the classes harder to fit, as in real images. The opposing signal: a fraction `planted_fraction` of the images of each
    of the two `planted_classes` get a large uniform sky-blue background (RGB 80, 150, 255) outside
    a centred square of half the image size. The background carries no label information by
    itself (it appears equally on both classes), is large in pixel norm and is rare: exactly the
    structure the paper says produces opposing signals.

    Returns images uint8 [n, H, W, 3], labels int64 [n] (balanced, shuffled) and planted int64 [n]
    (0: no background; 1: background on planted_classes[0]; 2: on planted_classes[1]).
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=generator)
    templates = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=generator)]
    z = torch.randn(n, 3, image_size, image_size, generator=generator)
    images = 128 + signal * templates[labels] + noise * z
    planted = torch.zeros(n, dtype=torch.int64)
    for group, cls in enumerate(planted_classes, start=1):
        members = torch.nonzero(labels == cls).flatten()
        planted[members[: max(1, round(planted_fraction * len(members)))]] = group
    border = torch.ones(image_size, image_size, dtype=torch.bool)
    quarter = image_size // 4
    border[quarter:image_size - quarter, quarter:image_size - quarter] = False
    sky = torch.tensor([80.0, 150.0, 255.0]).view(3, 1, 1)
    sky_images = torch.where(border, sky + 10 * z[planted > 0], images[planted > 0])
    images[planted > 0] = sky_images
    images = images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return images, labels.to(torch.int64), planted


# ----------------------------------------------------------------------------- 2. Models

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


class VGG11(nn.Module):
    """VGG-11 for 32x32 inputs (8 conv layers, 5 max-pools, one linear head); no BN by default."""

    def __init__(self, num_classes=10, width=64, batch_norm=False):
        super().__init__()
        plan = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
        layers, channels = [], 3
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(channels, item * width, 3, padding=1),
                       nn.BatchNorm2d(item * width) if batch_norm else nn.Identity(), nn.ReLU()]
            channels = item * width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

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
    """CIFAR ResNet-18: 3x3 stem, four stages of two basic blocks, global average pool, linear."""

    def __init__(self, num_classes=10, width=64, batch_norm=True):
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

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class LayerNorm(nn.Module):
    """LayerNorm written out: (x - mean) / sqrt(var + eps) * weight + bias over the last dim."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class Attention(nn.Module):
    """Multi-head self-attention written out (fused attention kernels have no double backward)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                                  # x: [B, T, D]
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D // self.heads), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, T, D))


class ViT(nn.Module):
    """Small vision transformer: patch embedding + learned positions, pre-LN blocks, mean-pooled head."""

    def __init__(self, num_classes=10, image_size=32, patch=4, dim=128, depth=4, heads=4, mlp_ratio=2):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(3 * patch * patch, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict(dict(
                norm1=LayerNorm(dim), attention=Attention(dim, heads), norm2=LayerNorm(dim),
                mlp=nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)))))
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):                                                  # x: [B, 3, H, W]
        p = self.patch
        patches = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        h = self.embed(patches) + self.position
        for block in self.blocks:
            h = h + block["attention"](block["norm1"](h))
            h = h + block["mlp"](block["norm2"](h))
        return self.head(self.norm(h).mean(dim=1))


# ----------------------------------------------------------------------------- 3. Losses

def mse_loss(outputs, labels):
    """Per-example squared error to one-hot targets: 0.5 * sum_c (outputs[i, c] - 1[c = labels[i]])^2.

    outputs [B, C], labels int64 [B] -> [B]. Summed (not averaged) over classes, as in Cohen et al.
    """
    # a comparison rather than F.one_hot, which checks label values and so cannot run under vmap
    one_hot = (labels.unsqueeze(-1) == torch.arange(outputs.shape[-1], device=outputs.device)).to(outputs.dtype)
    return 0.5 * (outputs - one_hot).pow(2).sum(-1)


def cross_entropy_loss(outputs, labels):
    """Per-example cross-entropy: -log softmax(outputs[i])[labels[i]]. [B, C], [B] -> [B]."""
    return F.cross_entropy(outputs, labels, reduction="none")


# ----------------------------------------------------------------------------- 4. Curvature

def hvp(model, loss_fn, x, y, v, chunk=None):
    """Hessian-vector product H v of the mean loss L = (1/N) sum_i loss_fn(model(x), y)[i].

    v: flat vector [P] over the trainable parameters (module order). Computed chunk by chunk: each
    chunk contributes d/dθ <∇θ (sum of its losses / N), v>, so the sum over chunks is exactly H v
    whatever the chunk size (up to float rounding), for any model whose per-example losses do not
    depend on other examples.

    Batch norm: the product is taken of the function the model computes in its current mode. In
    eval mode BN uses running statistics and the result does not depend on `chunk`. In train mode
    BN normalizes by each chunk's own batch statistics, the same function a training step with the
    same chunk size optimizes ("ghost batch norm"); chunk then becomes part of the objective's
    definition. Either way running statistics and other buffers are saved and restored, and the
    train/eval mode is left as it was: the call has no side effects on the model.

    Returns H v, shape [P], dtype and device of the parameters.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    directions = [d.view_as(p) for d, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    n, chunk = len(x), chunk or len(x)
    saved_buffers, was_training = [b.detach().clone() for b in model.buffers()], model.training
    result = [torch.zeros_like(p) for p in params]
    try:
        for start in range(0, n, chunk):
            loss = loss_fn(model(x[start:start + chunk]), y[start:start + chunk]).sum() / n
            grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=directions, materialize_grads=True)
            for total, part in zip(result, hv):
                total += part
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), saved_buffers):
                buffer.copy_(saved)
        model.train(was_training)
    return torch.cat([r.reshape(-1) for r in result])


def lanczos(matvec, dim, k=1, iters=100, tol=1e-6, seed=0, v0=None, dtype=torch.float64, device="cpu"):
    """The k largest (algebraic) eigenpairs of a symmetric linear operator, by Lanczos.

    matvec: function [dim] -> [dim] computing A v for a symmetric A. Builds an orthonormal Krylov
    basis q_1..q_m of span{v0, A v0, A^2 v0, ...} with the three-term recurrence
        w = A q_j - alpha_j q_j - beta_{j-1} q_{j-1},   alpha_j = q_j·A q_j,   beta_j = |w|,
    re-orthogonalized against all previous q (twice, "twice is enough") so rounding never brings
    back converged directions. The eigenvalues theta of the tridiagonal T_m = Q^T A Q (Ritz
    values) approximate A's extreme eigenvalues; the Ritz residual |A y - theta y| of the Ritz
    vector y = Q s equals beta_m |s_m| and costs nothing. Stops when the k largest Ritz values all
    have residual <= tol * max|theta| (or after `iters` products, or when the Krylov space fills
    R^dim). If the recurrence breaks down (beta ~ 0: an invariant subspace was found) it restarts
    from a random vector orthogonal to the basis, so a warm start that is an exact eigenvector
    still finds the rest.

    v0: start vector [dim] (e.g. the last call's top eigenvector, during training this cuts the
    products per call) or [dim, m] (their columns are normalized and summed). Random if None.
    Returns eigenvalues float64 [k] (descending), eigenvectors [dim, k] (unit columns) and Ritz
    residuals float64 [k]. Needs only torch and numpy.
    """
    iters = min(iters, dim)
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
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, S = np.linalg.eigh(T)
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
            betas.append(0.0)
            basis[j + 1] = w / w.norm()
            continue
        betas.append(beta)
        basis[j + 1] = w / beta
    m = len(alphas)
    eigenvectors = basis[:m].T @ torch.as_tensor(S[:, top].copy(), dtype=dtype, device=device)
    return (torch.as_tensor(theta[top].copy()), eigenvectors, torch.as_tensor(residuals.copy()))


def power_iteration(matvec, dim, iters=1000, tol=1e-6, seed=0, v0=None, dtype=torch.float64, device="cpu"):
    """Top eigenvalue by power iteration, the teaching baseline for `lanczos`.

    v <- A v / |A v|. Converges to the eigenvalue of largest magnitude (which for a Hessian at a
    minimum is the top one) at the rate |lambda_2 / lambda_1| per product, so slowly when the top
    two are close. Each iteration reports the Rayleigh quotient lambda = v·A v and stops when the
    residual |A v - lambda v| <= tol * |lambda|.

    Returns (eigenvalue float, eigenvector [dim], converged bool, products used int).
    """
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype) if v0 is None \
        else v0.reshape(-1).to(device=device, dtype=dtype).clone()
    v = v / v.norm()
    eigenvalue = 0.0
    for step in range(1, iters + 1):
        w = matvec(v).to(dtype)
        eigenvalue = float(v @ w)
        if float((w - eigenvalue * v).norm()) <= tol * abs(eigenvalue):
            return eigenvalue, v, True, step
        v = w / w.norm()
    return eigenvalue, v, False, iters


def top_eigenvalues(model, loss_fn, x, y, k=1, chunk=None, iters=100, tol=1e-3, seed=0, v0=None):
    """Sharpness: the k largest eigenvalues of the Hessian of the mean loss over (x, y).

    Runs `lanczos` on Hessian-vector products. When the examples fit in one chunk (chunk None or
    >= len(x)) the gradient graph g = ∇L is built once and every product is one backward pass of
    <g, v> through it (instead of forward + backward + double backward each time); otherwise each
    product is `hvp` chunk by chunk. BN is treated as in `hvp`; buffers and mode are restored.

    Returns eigenvalues float64 [k] (descending), eigenvectors [P, k] and Ritz residuals [k].
    Needs `hvp` and `lanczos`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    saved_buffers, was_training = [b.detach().clone() for b in model.buffers()], model.training
    try:
        if chunk is None or chunk >= len(x):
            loss = loss_fn(model(x), y).mean()
            grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)

            def matvec(v):
                directions = [d.view_as(p) for d, p in zip(torch.split(v, sizes), params)]
                hv = torch.autograd.grad(grads, params, grad_outputs=directions, retain_graph=True,
                                         materialize_grads=True)
                return torch.cat([h.reshape(-1) for h in hv])
        else:
            def matvec(v):
                return hvp(model, loss_fn, x, y, v, chunk)
        return lanczos(matvec, sum(sizes), k=k, iters=iters, tol=tol, seed=seed, v0=v0,
                       dtype=params[0].dtype, device=params[0].device)
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), saved_buffers):
                buffer.copy_(saved)
        model.train(was_training)


# ----------------------------------------------------------------------------- 5. Per-example statistics

def per_example_losses(model, loss_fn, x, y, chunk=1024):
    """loss_fn(model(x), y) for every example, without gradients: [N].

    During training the step's own forward pass already gives these (see `train`); this is for
    evaluation at other times. Buffers (BN running statistics) and mode are left unchanged.
    """
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    with torch.no_grad():
        losses = torch.cat([loss_fn(model(x[s:s + chunk]), y[s:s + chunk]) for s in range(0, len(x), chunk)])
        for buffer, saved in zip(model.buffers(), saved_buffers):
            buffer.copy_(saved)
    return losses


def per_example_grads(model, loss_fn, x, y, chunk=256):
    """Gradient of each example's own loss: G[i] = ∇θ loss_fn(model(x[i:i+1]), y[i:i+1]), [N, P].

    torch.func: vmap over examples of grad of a functional_call, `chunk` examples at a time (the
    memory is chunk x P floats). Per-example gradients are undefined under batch statistics, so a
    model with batch norm must be in eval mode. Columns follow the flat parameter order.
    """
    from torch.func import functional_call, grad, vmap
    if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("per-example gradients need batch norm in eval mode: call model.eval() first")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def example_loss(params, xi, yi):
        return loss_fn(functional_call(model, (params, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()

    grad_per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    rows = []
    for start in range(0, len(x), chunk):
        grads = grad_per_example(params, x[start:start + chunk], y[start:start + chunk])
        rows.append(torch.cat([g.reshape(len(g), -1) for g in grads.values()], dim=1))
    return torch.cat(rows)


def per_example_directional_derivatives(model, loss_fn, x, y, directions, chunk=1024):
    """<∇θ loss_i, u_j> for every example i and direction u_j, by forward-mode AD: [N, k].

    directions: [P, k] flat parameter vectors (e.g. top Hessian eigenvectors). One jvp per
    direction gives the derivative of all N losses at once, far cheaper than forming per-example
    gradients when only their components along a few directions are needed. Buffers are read,
    never updated; BN in train mode uses each chunk's statistics (see `hvp`).
    """
    from torch.func import functional_call, jvp
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    sizes = [p.numel() for p in params.values()]
    columns = []
    for u in directions.T:
        tangent = {name: d.view_as(params[name]) for name, d in zip(names, torch.split(u, sizes))}
        parts = []
        for start in range(0, len(x), chunk):
            xc, yc = x[start:start + chunk], y[start:start + chunk]
            _, derivative = jvp(lambda p: loss_fn(functional_call(model, (p, buffers), (xc,)), yc),
                                (params,), (tangent,))
            parts.append(derivative)
        columns.append(torch.cat(parts))
    return torch.stack(columns, dim=1)


# ----------------------------------------------------------------------------- 6. Training

def train(model, x, y, loss_fn, optimizer="gd", lr=0.01, steps=1000, batch_size=128, momentum=0.9,
          betas=(0.9, 0.999), chunk=None, eig_every=20, eig_k=1, eig_examples=None, eig_iters=100,
          record_every=1, probes=None, callback=None, log_every=100, seed=0, log=print):
    """Train `model` on (x, y) and record the quantities the paper looks at.

    optimizer: "gd"   full-batch gradient descent θ <- θ - lr ∇L(θ), L the mean loss over all N
                      examples; the gradient is accumulated over chunks of `chunk` examples, each
                      contributing ∇(sum of its losses)/N, which equals the one-batch gradient.
               "sgd"  minibatch SGD with heavy-ball momentum (torch.optim.SGD), `batch_size`
                      examples per step drawn by a seeded reshuffle each epoch.
               "adam" Adam (torch.optim.Adam) on the same minibatches.
    Every step records, at the parameters θ_t before the update: the loss and accuracy (full
    training set for gd, the minibatch for sgd/adam) and the outputs on `probes` [P, ...] if given.
    Every `record_every` steps (default: every step) it records the per-example losses of all N
    training examples: for gd from the step's own forward pass (no extra pass), for sgd/adam by
    an extra forward pass over the whole set. Every `eig_every` steps: the top `eig_k` Hessian
    eigenvalues of the mean loss over the first `eig_examples` examples (`top_eigenvalues`,
    warm-started from the previous eigenvectors), then `callback(step, model, eigenvalues,
    eigenvectors)` if given, whose return value is kept in history["callback"].

    A non-finite loss stops the run with a message (history["diverged"]); everything recorded up to
    then is returned. Seeded: two runs with the same seed and model init give identical records on
    CPU. Returns a dict of numpy arrays: step, loss, accuracy, per_example_loss [T, N] (float32),
    probe_output [T, P, C], eig_step, eigenvalues [E, k], record_step, and "diverged" (None or str).
    Needs `top_eigenvalues` (and through it `hvp`, `lanczos`).
    """
    if optimizer not in ("gd", "sgd", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}: use 'gd', 'sgd' or 'adam'")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, betas=betas)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.0 if optimizer == "gd" else momentum)
    n, chunk = len(x), chunk or len(x)
    eig_x, eig_y = x[:eig_examples or n], y[:eig_examples or n]
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n, generator=generator), 0
    record = {key: [] for key in ("step", "loss", "accuracy", "per_example_loss", "probe_output",
                                  "record_step", "eig_step", "eigenvalues", "callback")}
    record["diverged"], eigenvectors, start_time = None, None, time.time()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        if optimizer == "gd":
            losses, correct = [], 0
            for start in range(0, n, chunk):
                outputs = model(x[start:start + chunk])
                example_losses = loss_fn(outputs, y[start:start + chunk])
                (example_losses.sum() / n).backward()
                losses.append(example_losses.detach())
                correct += int((outputs.argmax(-1) == y[start:start + chunk]).sum())
            losses = torch.cat(losses)
            loss, accuracy = float(losses.mean()), correct / n
            if step % record_every == 0:
                record["record_step"].append(step)
                record["per_example_loss"].append(losses.float().cpu())
        else:
            if step % record_every == 0:
                record["record_step"].append(step)
                record["per_example_loss"].append(per_example_losses(model, loss_fn, x, y).float().cpu())
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            batch = order[cursor:cursor + batch_size].to(x.device)
            cursor += batch_size
            outputs = model(x[batch])
            batch_loss = loss_fn(outputs, y[batch]).mean()
            batch_loss.backward()
            loss, accuracy = float(batch_loss), float((outputs.argmax(-1) == y[batch]).float().mean())
        record["step"].append(step)
        record["loss"].append(loss)
        record["accuracy"].append(accuracy)
        if probes is not None:
            with torch.no_grad():
                record["probe_output"].append(model(probes).float().cpu())
        if not math.isfinite(loss):
            sharpness = record["eigenvalues"][-1][0] if record["eigenvalues"] else float("nan")
            record["diverged"] = (f"training diverged at step {step} (loss {loss}): lr={lr} is too large "
                                  f"(last sharpness {sharpness:.1f}, 2/lr = {2 / lr:.1f}); lower lr. "
                                  f"Steps 0..{step - 1} are kept.")
            log(record["diverged"])
            break
        if eig_every and step % eig_every == 0:
            eigenvalues, eigenvectors, _ = top_eigenvalues(
                model, loss_fn, eig_x, eig_y, k=eig_k, chunk=chunk, iters=eig_iters, seed=seed, v0=eigenvectors)
            record["eig_step"].append(step)
            record["eigenvalues"].append(eigenvalues.tolist())
            if callback is not None:
                record["callback"].append(callback(step, model, eigenvalues, eigenvectors))
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            elapsed = time.time() - start_time
            sharpness = record["eigenvalues"][-1][0] if record["eigenvalues"] else float("nan")
            log(f"step {step:5d} | loss {loss:.4f} | acc {accuracy:.3f} | sharpness {sharpness:8.2f} | "
                f"2/lr {2 / lr:7.2f} | {elapsed:6.1f}s elapsed, {elapsed / (step + 1) * (steps - step - 1):6.1f}s left")
    history = {key: np.asarray(record[key]) for key in ("step", "loss", "accuracy", "record_step", "eig_step")}
    history["eigenvalues"] = np.asarray(record["eigenvalues"], dtype=np.float64).reshape(-1, eig_k)
    history["per_example_loss"] = (torch.stack(record["per_example_loss"]).numpy() if record["per_example_loss"]
                                   else np.zeros((0, n), np.float32))
    if probes is not None:
        history["probe_output"] = (torch.stack(record["probe_output"]).numpy() if record["probe_output"]
                                   else np.zeros((0, len(probes), 0), np.float32))
    history["callback"], history["diverged"] = record["callback"], record["diverged"]
    return history


# ----------------------------------------------------------------------------- 7. Outliers and opposing groups

def loss_spikes(loss, window=20, factor=1.1):
    """Steps t where the loss exceeds `factor` times its minimum over the previous `window` steps.

    loss: [T]. A spike is counted at every step of it above the threshold. Returns int64 steps.
    """
    loss = np.asarray(loss, dtype=np.float64)
    return np.array([t for t in range(window, len(loss)) if loss[t] > factor * loss[t - window:t].min()],
                    dtype=np.int64)


def edge_of_stability(eig_step, sharpness, lr):
    """Progressive sharpening to 2/lr: first step with sharpness >= 2/lr, and how closely it hovers there.

    eig_step [E], sharpness [E] (top Hessian eigenvalue at those steps). Returns (first crossing
    step or None, median over measurements from the crossing on of |sharpness - 2/lr| / (2/lr)).
    """
    threshold = 2.0 / lr
    eig_step, sharpness = np.asarray(eig_step), np.asarray(sharpness, dtype=np.float64)
    above = np.nonzero(sharpness >= threshold)[0]
    if len(above) == 0:
        return None, float("nan")
    return int(eig_step[above[0]]), float(np.median(np.abs(sharpness[above[0]:] - threshold) / threshold))


def top_fraction_share(loss_change, fraction=0.01):
    """Share of the total |loss change| carried by the top `fraction` of examples.

    loss_change: [..., N] per-example changes ℓ_i(t+1) - ℓ_i(t). Returns [...] values of
    sum of the largest ceil(fraction·N) |Δℓ_i| / sum_i |Δℓ_i|. For i.i.d. Gaussian changes and
    fraction 0.01 it is about 0.036 (E|z| over the top 1% tail / E|z|); heavy tails give more.
    """
    magnitude = np.abs(np.asarray(loss_change, dtype=np.float64))
    top = max(1, int(math.ceil(fraction * magnitude.shape[-1])))
    largest = -np.sort(-magnitude, axis=-1)[..., :top]
    return largest.sum(-1) / np.maximum(magnitude.sum(-1), 1e-300)


def sky_mask(images, rows=0.25, fraction=0.7):
    """Which images have a sky background: a simple, documented pixel rule.

    images: uint8 [N, H, W, 3]. A pixel is "sky" when it is blue-dominant and not dark:
    B > R + 10, B >= G and B > 80 (0..255 units). An image has a sky background when at least
    `fraction` of the pixels in its top `rows` fraction of rows are sky. Returns bool [N].
    (Overcast grey skies are missed and blue water at the top counts; the rule is deliberately
    crude so that the groups are defined by a visible feature, not by the network.)
    """
    top = images[:, : max(1, int(round(rows * images.shape[1])))].to(torch.int32)
    red, green, blue = top[..., 0], top[..., 1], top[..., 2]
    sky = (blue > red + 10) & (blue >= green) & (blue > 80)
    return sky.flatten(1).float().mean(1) >= fraction


def sky_probe(images, mask, mean, std):
    """A uniform image of the average sky colour, normalized exactly like the training data.

    images uint8 [N, H, W, 3], mask bool [N] (e.g. `sky_mask`), mean/std from `normalize`.
    The colour is the mean RGB of the top-quarter pixels of the masked images. Returns
    (probe float32 [1, 3, H, W], rgb [3] in 0..255).
    """
    top = images[mask][:, : max(1, images.shape[1] // 4)].reshape(-1, 3).float()
    rgb = top.mean(0)
    probe = rgb.view(1, 1, 1, 3).expand(1, images.shape[1], images.shape[2], 3).round().to(torch.uint8)
    x = probe.permute(0, 3, 1, 2).float() / 255
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), rgb


def change_correlation(a, b):
    """Pearson correlation of the step-to-step changes of two series: corr(diff(a), diff(b))."""
    da, db = np.diff(np.asarray(a, dtype=np.float64)), np.diff(np.asarray(b, dtype=np.float64))
    if da.std() == 0 or db.std() == 0:
        return float("nan")
    return float(np.corrcoef(da, db)[0, 1])


def opposing_groups(model, loss_fn, x, y, lr, eigenvectors, top=30, seed=0):
    """Find the examples that move most in one GD step and split them into the two opposing groups.

    At parameters θ (the model as given), with the gradient g = ∇L(θ) of the mean loss, the GD step
    θ' = θ - lr·g is taken on trial (the parameters are restored exactly afterwards) and
    Δℓ_i = ℓ_i(θ') - ℓ_i(θ) measured for every example. The `top` examples by |Δℓ_i| are the
    outliers of this step; `top` random others are a control.

    Split rule (our reconstruction): V = eigenvectors [P, k] span the sharp subspace (k = 1 is the
    top eigenvector; with MSE several eigenvalues sit at 2/lr together, so pass 5-10). The step's
    oscillating direction there is u = V Vᵀg / |Vᵀg|. Each outlier's per-example gradient g_i is
    projected on it: s_i = <g_i, u>. To first order the sharp part of the step changes ℓ_i by
    -lr·|Vᵀg|·s_i, so the group s_i > 0 is predicted to go down and s_i < 0 to go up: the two
    groups pull the parameters in opposite directions along the sharp subspace.

    Returns a dict of numpy values: index [top] (by decreasing |Δℓ|), loss_change [top],
    projection s [top], predicted_up bool [top], cos_subspace [top] = |Vᵀg_i| / |g_i| and
    cos_subspace_random [top] for the control examples, agreement (fraction of outliers whose
    actual sign of Δℓ matches the prediction), n_up / n_down (actual), group_mean_cosine (cosine of
    the mean gradients of the predicted-up and predicted-down groups; nan if one is empty), and
    loss_change_all [N]. Needs `per_example_grads`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(x)
    with torch.no_grad():
        before = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss_fn(model(x), y).mean(), params)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
        after = loss_fn(model(x), y)
        for p, s in zip(params, saved):
            p.copy_(s)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    change = (after - before).double()
    order = torch.argsort(change.abs(), descending=True)
    outliers = order[:top]
    generator = torch.Generator().manual_seed(seed)
    rest = order[top:][torch.randperm(n - top, generator=generator)[:top].to(order.device)]
    V = eigenvectors.to(flat_grad.dtype)
    coefficients = V.T @ flat_grad
    u = V @ (coefficients / coefficients.norm().clamp_min(1e-30))
    g_out = per_example_grads(model, loss_fn, x[outliers], y[outliers])
    g_rand = per_example_grads(model, loss_fn, x[rest], y[rest])
    projection = g_out @ u
    predicted_up = projection < 0
    actual_up = change[outliers] > 0
    up_mean, down_mean = g_out[predicted_up].mean(0), g_out[~predicted_up].mean(0)
    group_cos = (float(F.cosine_similarity(up_mean, down_mean, dim=0))
                 if predicted_up.any() and (~predicted_up).any() else float("nan"))

    def subspace_cosine(g):
        return ((g @ V).norm(dim=1) / g.norm(dim=1).clamp_min(1e-30)).cpu().numpy()

    return {"index": outliers.cpu().numpy(), "loss_change": change[outliers].cpu().numpy(),
            "projection": projection.double().cpu().numpy(), "predicted_up": predicted_up.cpu().numpy(),
            "cos_subspace": subspace_cosine(g_out), "cos_subspace_random": subspace_cosine(g_rand),
            "agreement": float((predicted_up == actual_up).float().mean()),
            "n_up": int(actual_up.sum()), "n_down": int((~actual_up).sum()),
            "group_mean_cosine": group_cos, "loss_change_all": change.float().cpu().numpy()}


# ----------------------------------------------------------------------------- 8. Plotting helpers

def plot_loss_and_sharpness(history, lr, title="", spikes=None):
    """Figure with the training loss (top, log scale) and the top Hessian eigenvalues (bottom)
    against a dashed 2/lr line; `spikes` (steps) are marked on the loss. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(history["step"], history["loss"], lw=0.8, color="k")
    if spikes is not None and len(spikes):
        top.plot(spikes, np.asarray(history["loss"])[spikes], "r.", ms=3, label=f"{len(spikes)} spike steps")
        top.legend(loc="upper right")
    top.set_yscale("log")
    top.set_ylabel("train loss")
    top.set_title(title)
    eigenvalues = np.asarray(history["eigenvalues"])
    for j in range(eigenvalues.shape[1]):
        bottom.plot(history["eig_step"], eigenvalues[:, j], lw=1.2 if j == 0 else 0.5,
                    color="C0" if j == 0 else "C7", label="top eigenvalue" if j == 0 else None)
    bottom.axhline(2 / lr, ls="--", color="C3", label=f"2/lr = {2 / lr:.0f}")
    bottom.set_ylabel("sharpness")
    bottom.set_xlabel("step")
    bottom.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_image_grid(axes, images, titles):
    """Show uint8 [n, H, W, 3] images on a flat list of axes with small titles; spare axes are blanked."""
    for j, ax in enumerate(axes):
        ax.axis("off")
        if j < len(images):
            ax.imshow(np.asarray(images[j]))
            ax.set_title(titles[j], fontsize=6, pad=2)
