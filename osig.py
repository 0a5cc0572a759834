"""
osig.py: a small, readable reproduction of
"Outliers with Opposing Signals Have an Outsized Effect on Neural Network Optimization"
(Rosenfeld & Risteski, ICLR 2024).

Read it top to bottom: each section uses only what came before it, in the paper's order.

  1. Data            CIFAR-10, normalization, seeded subsets; synthetic images with a planted opposing pair;
                     tiny Shakespeare as characters.
  2. Models          MLP, small CNN, VGG-11, ResNet-18, ViT, a character GPT; all twice differentiable.
  3. Losses          per-example MSE and cross-entropy.
  4. Curvature       Hessian-vector products, hand-written Lanczos and power iteration, sharpness, the
                     curvature one step away.
  5. Per-example     per-example losses, gradients (vmap) and curvatures along a direction (jvp), evaluation.
  6. Training        one loop for full-batch GD and minibatch optimizers, with a measurement hook.
  7. Outliers        edge of stability, loss spikes, heavy tails, opposing groups and their controls,
                     the sky feature and its probes.
  8. Linear model    a two-layer linear network with an opposing feature: sharpness in closed form.
  9. Toy network     a small ReLU network on a rare, large input: the mechanism end to end.
 10. Optimizers      Adam's preconditioner, split-update SGD, stability thresholds, where the sharp
                     direction lives, group oscillations under minibatch noise.
 11. Plotting        small matplotlib helpers.
  Appendix           downloading, checking and reading the data files.

Conventions. A `loss_fn` maps (outputs [B, C], labels [B]) to per-example losses [B]; the training
objective is their mean over the training set. For a language model outputs are [B, T, C] and labels
[B, T]: each (sequence, position) pair is one example, and per-example arrays are flat over B·T
(example i·T + t is position t of sequence i). Flat parameter vectors concatenate
`[p.reshape(-1) for p in model.parameters() if p.requires_grad]` in module order.

Paste promise: every public function works when pasted into another project together with the
imports at the top of this file and the helpers its docstring names ("Needs ...").
"""

import codecs
import hashlib
import math
import os
import pickle
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

# ----------------------------------------------------------------------------- 1. Data

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class DataError(Exception):
    """A data set is missing, cannot be downloaded, or is corrupted. The message says how to fix it."""


def load_cifar10(root=None, train=True, download=True):
    """CIFAR-10 in the official "python version" layout: images uint8 [N, 32, 32, 3] (HWC), labels int64 [N].

    N = 50,000 (train) or 10,000 (test). Reads root/cifar-10-batches-py/ (root: the argument, else
    $OSIG_DATA, else ./data); when that folder is absent it is made from cifar-10-python.tar.gz,
    downloaded if allowed, md5-checked and extracted atomically (`cifar10_folder`, in the appendix).
    The batch files are Python pickles. They are read by `read_cifar_batch`, whose unpickler accepts
    only the numpy array reconstruction a CIFAR batch needs, so a tampered file cannot run code.
    An extracted folder is checked by structure (keys, dtypes, shapes, label range), not by md5,
    so that re-encoded copies load. Raises DataError with one line that says how to fix the problem.
    Needs `DataError`, `cifar10_folder`, `read_cifar_batch` (appendix).
    """
    root = Path(root or os.environ.get("OSIG_DATA") or "data").expanduser()
    folder = cifar10_folder(root, download)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    batches = [read_cifar_batch(folder / name) for name in names]
    images = np.concatenate([data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for data, _ in batches])
    return torch.from_numpy(images), torch.from_numpy(np.concatenate([labels for _, labels in batches]))


def normalize(images, mean=None, std=None):
    """Per-channel standardization: uint8 [N, H, W, C] -> float32 [N, C, H, W].

    x = (images / 255 - mean[c]) / std[c], with mean and std ([C], in units of images / 255)
    computed over all pixels of these images unless given. Pass the training set's mean and std
    to normalize test or probe images exactly like the training data. Returns (x, mean, std).
    """
    x = images.permute(0, 3, 1, 2).float() / 255
    mean = x.mean(dim=(0, 2, 3)) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
    std = x.std(dim=(0, 2, 3)) if std is None else torch.as_tensor(std, dtype=torch.float32)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), mean, std


def seeded_subset(n_total, n, seed=0):
    """Indices of a seeded subset: the first n entries of a fixed random permutation of n_total.

    Subsets of one seed are nested (the first 1,000 are inside the first 2,000), so a small run
    and a large run see the same leading examples. Returns int64 [n].
    """
    if not 0 < n <= n_total:
        raise ValueError(f"subset size n={n} must be between 1 and {n_total}")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def make_planted_images(n=1000, num_classes=10, image_size=32, planted_classes=(0, 2), planted_fraction=0.25,
                        planted_strength=1.0, class_signal=5.0, noise=60.0, seed=0):
    """Synthetic images with a planted pair of opposing signals.

    Each class c has a fixed random smooth pattern T_c (unit pixel std): an image of class c is
    128 + class_signal·T_c + noise·z per pixel and channel (z i.i.d. Gaussian, clipped to uint8).
    class_signal sets how strongly the genuine, class-specific evidence competes with the planted
    feature (5 against noise 60: weak and slow to fit; 30: easy).
    The opposing signal: a fraction `planted_fraction` of the images of each of the two
    `planted_classes` get a sky-blue background (RGB 80, 150, 255 plus noise of std 10) outside a
    centred square of half the image size, blended in with weight planted_strength (1: replaced, 0:
    nothing planted). The background appears equally on both classes, so by itself it carries no
    label information; it is large in pixel norm and rare: the structure the paper says produces
    opposing signals. planted_fraction 0 gives unplanted data (a null for the detectors).

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
    images = 128 + class_signal * templates[labels] + noise * z
    planted = torch.zeros(n, dtype=torch.int64)
    for group, cls in enumerate(planted_classes, start=1):
        members = torch.nonzero(labels == cls).flatten()
        count = round(planted_fraction * len(members))
        planted[members[:count]] = group
    border = torch.ones(image_size, image_size, dtype=torch.bool)
    quarter = image_size // 4
    border[quarter:image_size - quarter, quarter:image_size - quarter] = False
    sky = torch.tensor([80.0, 150.0, 255.0]).view(3, 1, 1) + 10 * z[planted > 0]
    blended = (1 - planted_strength) * images[planted > 0] + planted_strength * sky
    images[planted > 0] = torch.where(border, blended, images[planted > 0])
    images = images.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return images, labels.to(torch.int64), planted

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
SHAKESPEARE_BYTES = 1115394


def load_tiny_shakespeare(root=None, download=True):
    """The tiny Shakespeare corpus (Shakespeare's plays, 1,115,394 characters), as one str.

    Reads root/tinyshakespeare/input.txt (root: the argument, else $OSIG_DATA, else ./data). When it is
    missing it downloads the file that character-level tutorials use (karpathy/char-rnn), checks its md5
    and writes it atomically (`download_checked`, appendix). A file that is empty, truncated, not UTF-8
    text or not the expected file (md5) raises DataError with one line that says how to fix it.
    Needs `DataError`, `download_checked`.
    """
    root = Path(root or os.environ.get("OSIG_DATA") or "data").expanduser()
    path = root / "tinyshakespeare" / "input.txt"
    fix = f"delete it and put the file from {SHAKESPEARE_URL} there (or set OSIG_DATA to a folder holding " \
          f"tinyshakespeare/input.txt)"
    if not path.exists():
        if not download:
            raise DataError(f"tiny Shakespeare not found at {path}: put the file from {SHAKESPEARE_URL} "
                            f"there, or set OSIG_DATA to a folder holding tinyshakespeare/input.txt")
        download_checked(SHAKESPEARE_URL, path, SHAKESPEARE_MD5)
    data = path.read_bytes()
    if len(data) != SHAKESPEARE_BYTES:
        what = ("empty" if not data
                else f"{len(data):,} bytes, not {SHAKESPEARE_BYTES:,} (truncated or a different file)")
        raise DataError(f"{path} is {what}: {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not text ({error}): {fix}") from None
    if hashlib.md5(data).hexdigest() != SHAKESPEARE_MD5:
        raise DataError(f"{path} is corrupted (md5 {hashlib.md5(data).hexdigest()}, "
                        f"expected {SHAKESPEARE_MD5}): {fix}")
    return text


def encode_characters(text):
    """Character-level tokens: the sorted distinct characters of `text` are the vocabulary (65 for tiny
    Shakespeare), each character its index. Returns tokens int64 [len(text)] and the vocabulary (a str)."""
    vocabulary = "".join(sorted(set(text)))
    index = {character: i for i, character in enumerate(vocabulary)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64), vocabulary


def text_sequences(tokens, n, context, seed=0):
    """A fixed training set of n windows of the token stream at seeded random starts: inputs x [n, context]
    and targets y [n, context] = the next token of each position (x shifted by one). Each (sequence, position)
    pair is one example: y[i, t] is predicted from x[i, :t + 1]. Needs only torch."""
    if not 0 < n or len(tokens) <= context + 1:
        raise ValueError(f"need n >= 1 sequences and more than context + 1 = {context + 1} tokens")
    starts = torch.randint(0, len(tokens) - context - 1, (n,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([tokens[s:s + context + 1] for s in starts.tolist()])
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


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


def small_output_init(model, body_gain, zero_last_conv_of_blocks=False):
    """Initialize a ReLU conv net without batch norm so that its output starts at zero but its features carry
    signal: Kaiming-normal convs (fan_in, ReLU gain) times body_gain with zero biases, a zero linear head and,
    for a ResNet, a zero last conv in every residual branch (each block starts as its shortcut).

    Why: with PyTorch's default init the signal shrinks through the layers (VGG-11's outputs start near 0.02
    and GD stalls at the constant predictor); with plain Kaiming the outputs start large (MSE about 20) and GD
    at a usual step size diverges. With a zero head, the MSE sharpness at init is about the squared norm of
    the mean penultimate feature, which body_gain sets. Returns the model. Needs only torch.
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
    """VGG-11 for 32x32 inputs (8 conv layers, 5 max-pools, one linear head); no BN by default.

    Without BN it starts from `small_output_init`. body_gain (default 0.8·(16/width)^(1/16)) keeps the mean
    penultimate feature's norm about 2.5 on CIFAR-10 whatever the width (its square grows as width·gain^16),
    so that the MSE sharpness starts near 10 (measured: 10.5 at width 16, 10.2 at width 64). With BN,
    PyTorch's default init. Needs `small_output_init`.
    """

    def __init__(self, num_classes=10, width=64, batch_norm=False, body_gain=None):
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
    """CIFAR ResNet-18: 3x3 stem, four stages of two basic blocks, global average pool, linear.

    Without BN it starts from `small_output_init` with zero residual branches: body_gain 0.69 puts the mean
    penultimate feature's norm near 3 on CIFAR-10 at widths 32 and 64 (measured 2.9 and 3.1; width 16 needs
    0.84), so that the MSE sharpness starts near 13. With BN, PyTorch's default init.
    Needs `small_output_init`, `BasicBlock`.
    """

    def __init__(self, num_classes=10, width=64, batch_norm=True, body_gain=0.69):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=not batch_norm),
                                  nn.BatchNorm2d(width) if batch_norm else nn.Identity(), nn.ReLU())
        blocks, channels = [], width
        for stage, stride in enumerate([1, 2, 2, 2]):
            for block in range(2):
                blocks.append(BasicBlock(channels, width * 2 ** stage, stride if block == 0 else 1,
                                         batch_norm))
                channels = width * 2 ** stage
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)
        if not batch_norm:
            small_output_init(self, body_gain, zero_last_conv_of_blocks=True)

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
    """Multi-head self-attention written out (fused attention kernels have no double backward); with
    causal=True position t attends to positions <= t only, as a language model must."""

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
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return self.proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, D))


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
                mlp=nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                  nn.Linear(mlp_ratio * dim, dim)))))
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


class GPT(nn.Module):
    """A small character-level GPT: token and learned position embeddings, pre-LN blocks of causal attention
    and a GELU MLP (written out, so everything has a double backward), a final LayerNorm and a linear head.

    forward: tokens int64 [B, T] -> logits [B, T, vocab_size]; the logits at position t predict token t + 1,
    so each (sequence, position) pair is one example of the losses below.
    """

    def __init__(self, vocab_size=65, context=64, dim=64, depth=2, heads=4, mlp_ratio=4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(0.02 * torch.randn(1, context, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=LayerNorm(dim), attention=Attention(dim, heads, causal=True), norm2=LayerNorm(dim),
            mlp=nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))))
            for _ in range(depth))
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens):                                             # tokens: [B, T]
        h = self.embed(tokens) + self.position[:, :tokens.shape[1]]
        for block in self.blocks:
            h = h + block["attention"](block["norm1"](h))
            h = h + block["mlp"](block["norm2"](h))
        return self.head(self.norm(h))


# ----------------------------------------------------------------------------- 3. Losses

def mse_loss(outputs, labels):
    """Per-example squared error to one-hot targets: 0.5 * sum_c (outputs[i, c] - 1[c = labels[i]])^2.

    outputs [B, C], labels int64 [B] -> [B]. Summed (not averaged) over classes, as in Cohen et al.
    """
    if outputs.shape[:-1] != labels.shape:
        raise ValueError(f"mse_loss: outputs {tuple(outputs.shape)} and labels {tuple(labels.shape)} "
                         f"must describe the same examples (labels [B] for outputs [B, C])")
    # a comparison rather than F.one_hot, which checks label values and so cannot run under vmap
    one_hot = (labels.unsqueeze(-1)
               == torch.arange(outputs.shape[-1], device=outputs.device)).to(outputs.dtype)
    return 0.5 * (outputs - one_hot).pow(2).sum(-1)


def cross_entropy_loss(outputs, labels):
    """Per-example cross-entropy: -log softmax(outputs[i])[labels[i]]. [B, C], [B] -> [B]; [B, T, C], [B, T]
    -> [B, T] for a language model."""
    if outputs.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy_loss: outputs {tuple(outputs.shape)} "
                         f"and labels {tuple(labels.shape)} must describe the same examples "
                         f"(labels [B] for outputs [B, C])")
    flat = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), labels.reshape(-1), reduction="none")
    return flat.view(labels.shape)


def check_examples(x, y, outputs=None):
    """Raise ValueError unless x [N, ...] and y [N] hold the same N >= 1 examples and, given the model's
    outputs [., C] with C > 1, every integer label is a class index in 0..C-1 (a wrong label would
    silently become an all-zero MSE target)."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples and y {len(y)}: pass one label per example (N >= 1)")
    if outputs is not None and outputs.shape[-1] > 1 and not torch.is_floating_point(y):
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= outputs.shape[-1]:
            raise ValueError(f"labels range over {low}..{high} but the model has {outputs.shape[-1]} "
                             f"outputs: labels must be class indices 0..{outputs.shape[-1] - 1}")

# ----------------------------------------------------------------------------- 4. Curvature

@contextmanager
def preserved(model):
    """Context manager: on exit, restore the model's buffers (e.g. BN running statistics) and its train/eval
    mode to what they were on entry, so that a measurement has no side effects on training."""
    saved, was_training = [b.detach().clone() for b in model.buffers()], model.training
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)
        model.train(was_training)


def unflatten(vector, params):
    """Split a flat vector [sum of sizes] into tensors shaped like `params` (views, module order)."""
    return [part.view_as(p) for part, p in zip(torch.split(vector, [p.numel() for p in params]), params)]


def hvp(model, loss_fn, x, y, v, chunk=None):
    """Hessian-vector product H v of the mean loss L = (1/N) Σ_i loss_fn(model(x), y)[i].

    v: flat vector [P] over the trainable parameters (module order). Computed chunk by chunk: each
    chunk contributes d/dθ <∇θ (sum of its losses / N), v> (N: all examples, B·T for a language model),
    so the sum over chunks is exactly H v
    whatever the chunk size (up to float rounding), for any model whose per-example losses do not
    depend on other examples. One product costs a forward, a backward and a double backward pass.

    Batch norm: the product is taken of the function the model computes in its current mode. In
    eval mode BN uses running statistics and the result does not depend on `chunk`. In train mode
    BN normalizes by each chunk's own batch statistics, the same function a training step with the
    same chunk size optimizes ("ghost batch norm"); chunk then becomes part of the objective's
    definition. Either way buffers and mode are restored (`preserved`): no side effects.

    Returns H v, shape [P], dtype and device of the parameters. Needs `preserved`, `unflatten`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    directions = unflatten(v, params)
    n, chunk = len(x), chunk or len(x)
    result = [torch.zeros_like(p) for p in params]
    with preserved(model):
        for start in range(0, n, chunk):
            losses = loss_fn(model(x[start:start + chunk]), y[start:start + chunk])
            loss = losses.sum() / (n * losses[0].numel())           # the mean over every example of every row
            grads = torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=directions, materialize_grads=True)
            for total, part in zip(result, hv):
                total += part
    return torch.cat([r.reshape(-1) for r in result])


def lanczos(matvec, dim, k=1, iters=100, tol=1e-6, seed=0, v0=None, dtype=torch.float64, device="cpu"):
    """The k largest (algebraic) eigenpairs of a symmetric linear operator, by Lanczos.

    matvec: function [dim] -> [dim] computing A v for a symmetric A. Builds an orthonormal Krylov
    basis q_1..q_m of span{v0, A v0, A² v0, ...} with the three-term recurrence
        w = A q_j - α_j q_j - β_{j-1} q_{j-1},   α_j = q_j·A q_j,   β_j = |w|,
    re-orthogonalized against all previous q (twice, "twice is enough") so rounding never brings
    back converged directions. The eigenvalues θ of the tridiagonal T_m = Qᵀ A Q (Ritz values)
    approximate A's extreme eigenvalues; the Ritz residual |A y - θ y| of the Ritz vector y = Q s
    equals β_m |s_m| and costs nothing. Stops when the k largest Ritz values all have residual
    <= tol · max|θ| (or after `iters` products, or when the Krylov space fills R^dim). If the
    recurrence breaks down (β ≈ 0: an invariant subspace was found) it restarts from a random vector
    orthogonal to the basis, so a warm start that is an exact eigenvector still finds the rest.

    v0: start vector [dim] (e.g. the last call's top eigenvector: during training this cuts the
    products per call) or [dim, m] (its columns are normalized and summed). Random if None.
    Raises FloatingPointError when a product is not finite (the operator overflowed, as a diverging
    network's Hessian does). Returns eigenvalues float64 [k] (descending), eigenvectors [dim, k]
    (unit columns) and Ritz residuals float64 [k]. Needs only torch and numpy.
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
    eigenvectors = basis[:len(alphas)].T @ torch.as_tensor(S[:, top].copy(), dtype=dtype, device=device)
    return torch.as_tensor(theta[top].copy()), eigenvectors, torch.as_tensor(residuals.copy())


def power_iteration(matvec, dim, iters=1000, tol=1e-6, seed=0, v0=None, dtype=torch.float64, device="cpu"):
    """Top eigenvalue by power iteration, the teaching baseline for `lanczos`.

    v <- A v / |A v|. Converges to the eigenvalue of largest magnitude (which for a Hessian at a
    minimum is the top one) at the rate |λ_2 / λ_1| per product, so slowly when the top two are close.
    Each iteration computes the Rayleigh quotient λ = v·A v and stops when |A v - λ v| <= tol · |λ|.

    Returns (eigenvalue float, eigenvector [dim], converged bool, products used int).
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


def curvature_along(model, loss_fn, x, y, v, offsets, chunk=None):
    """Curvature of the mean loss along a direction, away from the current point:
    vᵀ H(θ + t v) v for t in offsets.

    v: a unit flat vector [P] (e.g. the top Hessian eigenvector); offsets: distances t in parameter units.
    At t = 0 this is the Rayleigh quotient; the loss is quadratic along v over a range of t when the
    values stay equal. Gradient descent that oscillates along v moves by about lr·|gᵀv| per step, so the
    curvature at that offset is what its stability actually depends on. The parameters are restored
    exactly. Returns float64 numpy [len(offsets)]. Needs `hvp`, `preserved`, `unflatten`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    values = []
    try:
        for t in offsets:
            with torch.no_grad():
                for p, start, step in zip(params, saved, unflatten(v, params)):
                    p.copy_(start + t * step)
            values.append(float(v @ hvp(model, loss_fn, x, y, v, chunk)))
    finally:
        with torch.no_grad():
            for p, start in zip(params, saved):
                p.copy_(start)
    return np.asarray(values)


def top_eigenvalues(model, loss_fn, x, y, k=1, chunk=None, iters=100, tol=1e-3, seed=0, v0=None,
                    preconditioner=None):
    """Sharpness: the k largest eigenvalues of the Hessian H of the mean loss over (x, y).

    Runs `lanczos` on Hessian-vector products. When the examples fit in one chunk (chunk None or
    >= len(x)) the gradient graph g = ∇L is built once and every product is one backward pass of
    <g, v> through it (instead of forward + backward + double backward each time); otherwise each
    product is `hvp` chunk by chunk. BN is treated as in `hvp`; buffers and mode are restored.

    preconditioner: a diagonal P [num params] > 0 (e.g. `adaptive_preconditioner`). Then the eigenvalues
    are those of P^-1/2 H P^-1/2, the sharpness an adaptive optimizer actually sees: `lanczos` runs on
    the symmetric u -> s ⊙ H (s ⊙ u), s = P^-1/2, whose eigenvalues are those of P^-1 H (similar
    matrices); its eigenvectors w are in whitened coordinates (s ⊙ w is a parameter direction).

    Returns eigenvalues float64 [k] (descending), eigenvectors [P, k] and Ritz residuals [k]; raises
    FloatingPointError when the Hessian products overflow. Needs `check_examples`, `preserved`,
    `unflatten`, `hvp`, `lanczos`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    check_examples(x, y)
    if not 1 <= k <= dim:
        raise ValueError(f"top_eigenvalues: k={k} but the model has {dim} parameters: need 1 <= k <= {dim}")
    with preserved(model):
        if chunk is None or chunk >= len(x):
            outputs = model(x)
            check_examples(x, y, outputs)
            grads = torch.autograd.grad(loss_fn(outputs, y).mean(), params, create_graph=True,
                                        materialize_grads=True)

            def hessian_times(v):
                hv = torch.autograd.grad(grads, params, grad_outputs=unflatten(v, params), retain_graph=True,
                                         materialize_grads=True)
                return torch.cat([h.reshape(-1) for h in hv])
        else:
            def hessian_times(v):
                return hvp(model, loss_fn, x, y, v, chunk)
        matvec = hessian_times
        if preconditioner is not None:
            scale = preconditioner.to(device=params[0].device, dtype=params[0].dtype).rsqrt()

            def matvec(u):
                return scale * hessian_times(scale * u)
        return lanczos(matvec, dim, k=k, iters=iters, tol=tol, seed=seed, v0=v0, dtype=params[0].dtype,
                       device=params[0].device)

# ----------------------------------------------------------------------------- 5. Per-example statistics

def per_example_losses(model, loss_fn, x, y, chunk=1024):
    """loss_fn(model(x), y) for every example, without gradients: [N] (flat over B·T for a language model).

    During full-batch training the step's own forward pass already gives these (see `train`); this
    is for other times. Buffers (BN running statistics) and mode are left unchanged.
    Needs `check_examples`, `preserved`.
    """
    check_examples(x, y)
    with preserved(model), torch.no_grad():
        return torch.cat([loss_fn(model(x[s:s + chunk]), y[s:s + chunk]).reshape(-1)
                          for s in range(0, len(x), chunk)])


def evaluate(model, loss_fn, x, y, chunk=1024):
    """Mean loss and accuracy (nan for a single output) of the model on (x, y), without gradients.
    Returns (loss float, accuracy float). Needs `check_examples`, `preserved`."""
    check_examples(x, y)
    with preserved(model), torch.no_grad():
        outputs = torch.cat([model(x[s:s + chunk]) for s in range(0, len(x), chunk)])
    accuracy = float((outputs.argmax(-1) == y).float().mean()) if outputs.shape[-1] > 1 else float("nan")
    return float(loss_fn(outputs, y).mean()), accuracy


def per_example_grads(model, loss_fn, x, y, chunk=256, positions=None):
    """Gradient of each example's own loss: G[i] = ∇θ loss_fn(model(x[i:i+1]), y[i:i+1]), [N, P].

    torch.func: vmap over examples of grad of a functional_call, `chunk` examples at a time (the
    memory is chunk x P floats), written straight into one [N, P] matrix (for wide layers the
    copies, not the arithmetic, dominate). For a language model (losses [B, T]) row i's example is
    its position positions[i] (int [N]); without positions, the gradient of the row's summed losses.
    Per-example gradients are undefined under batch statistics, so a model with batch norm must be
    in eval mode. Columns follow the flat parameter order. Needs only torch and numpy.
    """
    from torch.func import functional_call, grad, vmap
    if model.training and any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
                              for m in model.modules()):
        raise ValueError("per-example gradients need batch norm in eval mode: call model.eval() first")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples and y {len(y)}: pass one label per example")
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def example_loss(params, xi, yi, ti):
        losses = loss_fn(functional_call(model, (params, buffers), (xi.unsqueeze(0),)),
                         yi.unsqueeze(0)).reshape(-1)
        chosen = (torch.arange(len(losses), device=losses.device) == ti) | (ti < 0)  # ti = -1: all of the row
        return (losses * chosen).sum()

    grad_per_example = vmap(grad(example_loss), in_dims=(None, 0, 0, 0))
    positions = torch.full((len(x),), -1) if positions is None else torch.as_tensor(positions)
    positions = positions.to(x.device)
    sizes = [p.numel() for p in params.values()]
    first = next(iter(params.values()))
    result = torch.empty(len(x), sum(sizes), dtype=first.dtype, device=first.device)
    for start in range(0, len(x), chunk):
        grads = grad_per_example(params, x[start:start + chunk], y[start:start + chunk],
                                 positions[start:start + chunk])
        for column, g in zip(np.cumsum([0] + sizes[:-1]), grads.values()):
            result[start:start + len(g), column:column + g[0].numel()] = g.reshape(len(g), -1)
    return result

def per_example_curvature(model, loss_fn, x, y, v, chunk=1024):
    """Each example's curvature along a direction v, split into its Gauss-Newton and residual parts.

    With f_i(θ) the model's outputs on example i and ℓ_i = loss of f_i, the curvature of the mean loss
    along a unit v is vᵀHv = (1/N) Σ_i c_i with
        c_i  = d²/dt² ℓ_i(f_i(θ + t v)) at t = 0                         (total)
             = (J_i v)ᵀ ∇²_f ℓ_i (J_i v)   +   Σ_c ∂ℓ_i/∂f_c · vᵀ∇²f_{i,c} v,
    the Gauss-Newton term (for MSE |J_i v|², for cross-entropy (J_i v)ᵀ(diag p_i - p_i p_iᵀ)(J_i v))
    and the residual term. Forward-mode products compute all of them for every example at once:
    J v = d/dt f(θ + tv) is one jvp of the outputs; the total is a jvp of that jvp through the loss; the
    Gauss-Newton term is the second derivative of ℓ_i(f_i + s J_i v) in s (exact for any loss_fn). For a
    language model each (sequence, position) is one example. Buffers are read, never updated (BN: eval mode).
    Returns a dict of float64 numpy [N]: total, gauss_newton, residual (= total - gauss_newton).
    Needs `unflatten`.
    """
    from torch.func import functional_call, jvp
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    directions = {name: d for name, d in zip(names, unflatten(v.to(params[0].dtype), params))}
    base = dict(zip(names, params))
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    zero = torch.zeros((), dtype=params[0].dtype, device=params[0].device)
    one = torch.ones_like(zero)
    totals, gauss_newton = [], []
    for start in range(0, len(x), chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]

        def outputs_at(t):
            return functional_call(model, ({n: base[n] + t * directions[n] for n in names}, buffers), (xc,))

        def slope(t):
            return jvp(lambda s: loss_fn(outputs_at(s), yc), (t,), (one,))[1]

        outputs, jv = jvp(outputs_at, (zero,), (one,))
        totals.append(jvp(slope, (zero,), (one,))[1].detach().reshape(-1))
        outputs, jv = outputs.detach(), jv.detach()

        def output_slope(s):
            return jvp(lambda r: loss_fn(outputs + r * jv, yc), (s,), (one,))[1]

        gauss_newton.append(jvp(output_slope, (zero,), (one,))[1].detach().reshape(-1))
    total, gn = (torch.cat(parts).double().cpu().numpy() for parts in (totals, gauss_newton))
    return {"total": total, "gauss_newton": gn, "residual": total - gn}


# ----------------------------------------------------------------------------- 6. Training

def full_batch_gradient(model, loss_fn, x, y, chunk):
    """Put ∇L of the mean loss L = (1/N) Σ_i ℓ_i into p.grad, `chunk` rows at a time: each chunk adds
    ∇(Σ_chunk ℓ_i)/N, so the sum is the one-batch gradient (N counts every example, B·T for a language
    model). The same forward pass gives every example's loss. Returns (losses [N] detached, flat;
    accuracy, nan for a single output; the last chunk's outputs)."""
    losses, correct = [], []
    for start in range(0, len(x), chunk):
        outputs = model(x[start:start + chunk])
        chunk_losses = loss_fn(outputs, y[start:start + chunk])
        (chunk_losses.sum() / (len(x) * chunk_losses[0].numel())).backward()
        losses.append(chunk_losses.detach().reshape(-1))
        correct.append((outputs.detach().argmax(-1) == y[start:start + chunk]).reshape(-1))
    accuracy = float(torch.cat(correct).float().mean()) if outputs.shape[-1] > 1 else math.nan
    return torch.cat(losses), accuracy, outputs


def minibatches(n, batch_size, generator):
    """Endless minibatch indices: consecutive batch_size slices of a seeded random permutation of range(n),
    a new permutation each epoch (a last, partial slice is skipped)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def train(model, x, y, loss_fn, optimizer, steps, batch_size=None, chunk=None, measure=None, clip_norm=None,
          seed=0, log=print):
    """Train `model` on (x, y) with a constructed torch `optimizer`, recording every step.

    Full batch (batch_size None): the gradient of L(θ) = (1/N) Σ_i ℓ_i(θ) (`full_batch_gradient`);
        with torch.optim.SGD(lr) this is gradient descent θ ← θ − lr ∇L. Its forward pass gives every
        example's loss ℓ_i(θ_t), kept as per_example_loss [T, N] at no extra cost.
    Minibatch (batch_size B): each step the next B examples of a seeded reshuffle (`minibatches`); loss and
        accuracy are the minibatch's.
    clip_norm: rescale the gradient g to g · min(1, clip_norm / |g|) before the update.
    measure(step, model, optimizer): called at θ_t after the gradient is computed (p.grad holds it), before
        the update; what it returns (a dict, or None) is kept in history["measured"] with its step
        (`sharpness_measure` builds the usual one).
    Divergence: a non-finite loss, or a FloatingPointError from measure (an overflowing sharpness), stops
        the run with a message in history["diverged"]; all earlier steps are kept.

    Returns a dict: step, loss, accuracy (nan for one output), grad_norm (before clipping) [T] numpy;
    per_example_loss float32 [T, N] (full batch; [0, N] otherwise); measured (list of dicts); diverged (None
    or the message). Same seed and model init give identical records on the CPU.
    Needs `check_examples`, `full_batch_gradient`, `minibatches`.
    """
    check_examples(x, y)
    n, chunk = len(x), chunk or len(x)
    if steps < 0 or chunk < 1 or (batch_size is not None and not 1 <= batch_size <= n):
        raise ValueError(f"train: need steps >= 0 (got {steps}), chunk >= 1 (got {chunk}) and batch_size "
                         f"None (full batch) or in 1..{n} (got {batch_size})")
    params = [p for p in model.parameters() if p.requires_grad]
    batches = minibatches(n, batch_size or n, torch.Generator().manual_seed(seed))
    history = {key: [] for key in ("step", "loss", "accuracy", "grad_norm", "per_example_loss", "measured")}
    history["diverged"], start_time, lr = None, time.time(), optimizer.param_groups[0]["lr"]
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        if batch_size is None:                  # full batch: every example, in chunks
            losses, accuracy, outputs = full_batch_gradient(model, loss_fn, x, y, chunk)
            history["per_example_loss"].append(losses.float().cpu())
            loss = float(losses.mean())
        else:                                   # minibatch: the next batch_size of a seeded reshuffle
            batch = next(batches).to(x.device)
            outputs = model(x[batch])
            batch_loss = loss_fn(outputs, y[batch]).mean()
            batch_loss.backward()
            loss = float(batch_loss.detach())
            accuracy = (float((outputs.argmax(-1) == y[batch]).float().mean()) if outputs.shape[-1] > 1
                        else math.nan)
        if step == 0:
            check_examples(x, y, outputs)
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                                if p.grad is not None])))
        for key, value in (("step", step), ("loss", loss), ("accuracy", accuracy), ("grad_norm", grad_norm)):
            history[key].append(value)
        problem = None if math.isfinite(loss) else f"loss {loss}"
        try:
            record = measure(step, model, optimizer) if measure is not None and problem is None else None
            history["measured"] += [dict(record, step=step)] if record is not None else []
        except FloatingPointError as error:
            problem = str(error)
        sharpness = ([m["eigenvalues"][0] for m in history["measured"] if "eigenvalues" in m]
                     or [math.nan])[-1]
        if problem is not None:
            history["diverged"] = (
                f"training diverged at step {step} ({problem}); last sharpness {sharpness:.4g}, gradient "
                f"descent's threshold 2/lr = {2 / lr if lr > 0 else math.inf:.4g} at lr = {lr:.4g}: lower "
                f"the learning rate. Steps 0..{step} are kept in the history.")
            if log:
                log(history["diverged"])
            break
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        if log and (step % max(1, steps // 10) == 0 or step == steps - 1):
            elapsed = time.time() - start_time
            log(f"step {step:5d} | loss {loss:.4f} | acc {accuracy:.3f} | sharpness {sharpness:8.2f} | "
                f"{elapsed:6.1f}s, ETA {elapsed / (step + 1) * (steps - step - 1):6.1f}s")
    result = {key: np.asarray(history[key], dtype=np.float64) for key in ("loss", "accuracy", "grad_norm")}
    result["per_example_loss"] = (torch.stack(history["per_example_loss"]).numpy()
                                  if history["per_example_loss"] else np.zeros((0, n), np.float32))
    return dict(result, step=np.asarray(history["step"], dtype=np.int64), measured=history["measured"],
                diverged=history["diverged"])


def measured(history, key):
    """The steps [M] and values [M, ...] (numpy) of `key` in a train history's measure records that
    have it."""
    records = [m for m in history["measured"] if key in m]
    return (np.asarray([m["step"] for m in records], dtype=np.int64),
            np.asarray([np.asarray(m[key], dtype=np.float64) for m in records]))


def sharpness_measure(loss_fn, x, y, every=20, k=1, chunk=None, iters=100, tol=1e-3, preconditioner=None,
                      then=None):
    """A `measure` hook for `train`: the top-k Hessian eigenvalues of the mean loss every `every` steps.

    At steps 0, every, 2·every, ...: `top_eigenvalues` over (x, y) (a subset of the training set is
    cheaper), warm-started from the previous call's eigenvectors, recorded as "eigenvalues" [k].
    preconditioner: a function optimizer -> diagonal P [num params] (or None before the optimizer's
    first step), e.g. `adaptive_preconditioner`; then also "preconditioned_eigenvalues" [k] of
    P^-1/2 H P^-1/2 (nan before the first step), the sharpness an adaptive optimizer sees.
    then(step, model, eigenvalues, eigenvectors) -> dict adds its entries to the record.
    A non-finite sharpness raises FloatingPointError, which `train` treats as divergence.
    Returns measure(step, model, optimizer) -> dict or None. Needs `top_eigenvalues`, `check_examples`,
    `preserved`, `unflatten`, `hvp`, `lanczos`.
    """
    warm = {"plain": None, "preconditioned": None}

    def measure(step, model, optimizer):
        if step % every:
            return None
        values, vectors, _ = top_eigenvalues(model, loss_fn, x, y, k=k, chunk=chunk, iters=iters, tol=tol,
                                             v0=warm["plain"])
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"non-finite sharpness {values.tolist()}")
        warm["plain"], record = vectors, {"eigenvalues": values.numpy()}
        if preconditioner is not None:
            P = preconditioner(optimizer)
            record["preconditioned_eigenvalues"] = np.full(k, np.nan)
            if P is not None:
                preconditioned, warm["preconditioned"], _ = top_eigenvalues(
                    model, loss_fn, x, y, k=k, chunk=chunk, iters=iters, tol=tol, v0=warm["preconditioned"],
                    preconditioner=P)
                record["preconditioned_eigenvalues"] = preconditioned.numpy()
        if then is not None:
            record.update(then(step, model, values, vectors) or {})
        return record

    return measure

# ------------------------------------------------------------------- 7. Edge of stability and opposing groups

def edge_of_stability(eig_step, sharpness, lr):
    """Progressive sharpening up to 2/lr and the hover there, from sharpness measurements.

    eig_step [E], sharpness [E] (top Hessian eigenvalue λ at those steps); threshold 2/lr; "crossed"
    means λ >= 2/lr. Returns a dict:
      first          the first measured step with λ >= 2/lr (None if never);
      hover          median over measurements from that one on of |λ - 2/lr| / (2/lr) (nan if never);
      initial_ratio  λ at the first measurement / (2/lr): a run that starts at or above the threshold
                     has not sharpened progressively;
      rise           λ at the crossing (or the run's maximum, if it never crosses) divided by the
                     minimum of λ over the measurements before it: how much the sharpness grew.
    """
    threshold = 2.0 / lr
    eig_step, sharpness = np.asarray(eig_step), np.asarray(sharpness, dtype=np.float64)
    if len(sharpness) == 0:
        return {"first": None, "hover": math.nan, "initial_ratio": math.nan, "rise": math.nan}
    above = np.nonzero(sharpness >= threshold)[0]
    end = int(above[0]) if len(above) else int(np.argmax(sharpness))
    early_minimum = sharpness[:end + 1].min()
    rise = sharpness[end] / early_minimum if early_minimum > 0 else math.nan
    hover = float(np.median(np.abs(sharpness[end:] - threshold) / threshold)) if len(above) else math.nan
    return {"first": int(eig_step[end]) if len(above) else None, "hover": hover,
            "initial_ratio": float(sharpness[0] / threshold), "rise": float(rise)}


def loss_spikes(loss, window=20, factor=1.1):
    """Loss spike events: maximal runs of consecutive steps t with loss[t] > factor · min(loss[t-window:t]).

    loss: [T]. Counting events rather than steps keeps one long spike from counting many times.
    Returns int64 [number of events, 2]: the first and last step of each run.
    """
    loss = np.asarray(loss, dtype=np.float64)
    high = np.array([loss[t] > factor * loss[t - window:t].min() for t in range(window, len(loss))],
                    dtype=bool)
    edges = np.diff(np.concatenate([[0], high.astype(np.int8), [0]]))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0] - 1
    return np.stack([starts + window, ends + window], axis=1).astype(np.int64) if len(starts) else \
        np.zeros((0, 2), dtype=np.int64)


def top_fraction_share(loss_change, fraction=0.01):
    """Share of the total |loss change| carried by the top `fraction` of examples.

    loss_change: [..., N] per-example changes ℓ_i(t+1) - ℓ_i(t). Returns [...] values of
    Σ of the largest ceil(fraction·N) |Δℓ_i| / Σ_i |Δℓ_i|. For i.i.d. Gaussian changes and fraction
    0.01 it is about 0.036, for Laplace changes about 0.056; compare a run with its own earlier steps.
    """
    magnitude = np.abs(np.asarray(loss_change, dtype=np.float64))
    top = max(1, int(math.ceil(fraction * magnitude.shape[-1])))
    largest = -np.sort(-magnitude, axis=-1)[..., :top]
    return largest.sum(-1) / np.maximum(magnitude.sum(-1), 1e-300)


def change_correlation(a, b):
    """Pearson correlation of the step-to-step changes of two series: corr(diff(a), diff(b)) (nan if flat)."""
    da, db = np.diff(np.asarray(a, dtype=np.float64)), np.diff(np.asarray(b, dtype=np.float64))
    if len(da) < 2 or da.std() == 0 or db.std() == 0:
        return math.nan
    return float(np.corrcoef(da, db)[0, 1])


def opposing_groups(model, loss_fn, x, y, lr, eigenvectors, top=30, seed=0):
    """Find the examples that move most in one GD step and split them into two opposing groups.

    At parameters θ (the model as given), with the gradient g = ∇L(θ) of the mean loss, the GD step
    θ' = θ - lr·g is taken on trial (the parameters are restored exactly afterwards) and
    Δℓ_i = ℓ_i(θ') - ℓ_i(θ) measured for every example. The `top` examples by |Δℓ_i| are the
    outliers of this step.

    Split rule (our reconstruction): V = eigenvectors [P, k] span the sharp subspace (k = 1 is the
    top eigenvector; with MSE several eigenvalues sit at 2/lr together, so pass 5-10). The step's
    oscillating direction there is u = V Vᵀg / |Vᵀg|, and each outlier's per-example gradient g_i is
    projected on it: s_i = <g_i, u>. To first order the sharp part of the step changes ℓ_i by
    -lr·|Vᵀg|·s_i, so s_i < 0 is predicted to go up and s_i > 0 down. How often that prediction
    matches the actual sign of Δℓ_i is a check of the linearization (balanced accuracy), not evidence
    of opposing signals. Any sign split makes the two groups' mean gradients point apart, so the same
    rule is applied to `top` random non-outliers as the control of their cosine.

    For a language model the examples are (sequence, position) pairs and `index` is flat over them.
    Returns a dict of numpy values: index [top] (by decreasing |Δℓ|), loss_change [top], projection
    [top], predicted_up bool [top], cos_subspace [top] = |Vᵀg_i| / |g_i|, linearization_balanced_accuracy,
    n_up / n_down (actual), group_mean_cosine and group_mean_cosine_random (cosine of the two predicted
    groups' mean gradients, for the outliers and for the random examples; nan if a group is empty),
    random_index [top], and loss_change_all [N]. Needs `per_example_grads`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        before = loss_fn(model(x), y).reshape(-1)
    grads = torch.autograd.grad(loss_fn(model(x), y).mean(), params)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
        after = loss_fn(model(x), y).reshape(-1)
        for p, s in zip(params, saved):
            p.copy_(s)
    per_row = len(before) // len(x)                          # examples per input row: T for a language model
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    change = (after - before).double()
    order = torch.argsort(change.abs(), descending=True)
    outliers = order[:top]
    generator = torch.Generator().manual_seed(seed)
    random = order[top:][torch.randperm(len(before) - top, generator=generator)[:top].to(order.device)]
    V = eigenvectors.to(flat_grad.dtype)
    coefficients = V.T @ flat_grad
    u = V @ (coefficients / coefficients.norm().clamp_min(1e-30))

    def split(g):
        """Predicted-up mask and the cosine of the two predicted groups' mean gradients."""
        up = (g @ u) < 0
        if not up.any() or up.all():
            return up, math.nan
        return up, float(F.cosine_similarity(g[up].mean(0), g[~up].mean(0), dim=0))

    def grads_of(index):
        rows, positions = index // per_row, index % per_row
        return per_example_grads(model, loss_fn, x[rows], y[rows],
                                 positions=positions if per_row > 1 else None)

    g_out, g_random = grads_of(outliers), grads_of(random)
    predicted_up, group_cosine = split(g_out)
    _, random_cosine = split(g_random)
    actual_up = change[outliers] > 0
    recalls = [float((predicted_up[actual_up == side] == side).float().mean())
               for side in (True, False) if (actual_up == side).any()]
    return {"index": outliers.cpu().numpy(), "loss_change": change[outliers].cpu().numpy(),
            "projection": (g_out @ u).double().cpu().numpy(), "predicted_up": predicted_up.cpu().numpy(),
            "cos_subspace": ((g_out @ V).norm(dim=1) / g_out.norm(dim=1).clamp_min(1e-30)).cpu().numpy(),
            "linearization_balanced_accuracy": float(np.mean(recalls)),
            "n_up": int(actual_up.sum()), "n_down": int((~actual_up).sum()),
            "group_mean_cosine": group_cosine, "group_mean_cosine_random": random_cosine,
            "random_index": random.cpu().numpy(), "loss_change_all": change.float().cpu().numpy()}


def post_selection_correlation(per_example_loss, step, up, down, length=40, gap=2, seed=0):
    """Anti-phase of two groups after they were selected, against a random split of the same examples.

    per_example_loss [T, N]; the groups were selected from the change between steps `step` and
    step + 1, so the measurement starts `gap` steps later (leaving that change out) and runs for
    `length` steps: corr of the step-to-step changes of the up group's and the down group's mean
    loss (`change_correlation`). Control: the same examples, split at random into groups of the same
    sizes; it shares every property of the selection (loss level, common-mode oscillation) except
    the split itself. Returns (selected, control) floats; nan when fewer than 10 steps remain.
    Needs `change_correlation`.
    """
    losses = np.asarray(per_example_loss, dtype=np.float64)
    span = losses[step + gap:min(len(losses), step + gap + length)]
    if len(span) < 10 or len(up) == 0 or len(down) == 0:
        return math.nan, math.nan
    members = np.random.default_rng(seed).permutation(np.concatenate([up, down]))
    shuffled_up, shuffled_down = members[:len(up)], members[len(up):]
    return (change_correlation(span[:, up].mean(1), span[:, down].mean(1)),
            change_correlation(span[:, shuffled_up].mean(1), span[:, shuffled_down].mean(1)))


def pair_significance(features, labels, up, down, candidates, series=None, draws=200, seed=0):
    """Is an opposing pair more than its classes? Two statistics, each against a class-matched null.

    features [N, D]: each example's input, flattened (for images: the normalized pixels).
    up, down: indices of the two groups; candidates: bool [N], the examples the null may draw from
    (not outliers). Statistics:
      coherence   mean cosine similarity between an up member and a down member, of the features
                  centred on the mean over all N examples: a feature the two groups share beyond their
                  labels (a common background) makes it large; confusable classes alone do not.
      antiphase   (given series [S, N], e.g. per-example losses over a window after the selection) the
                  corr of the step-to-step changes of the two groups' mean series (`change_correlation`).
    Null: `draws` pairs of groups with the same class composition and sizes as (up, down), drawn
    without replacement from the candidates of each class. p-values (1 + #null at least as extreme)
    / (1 + draws): large coherence, negative antiphase. Returns a dict of floats: coherence,
    coherence_null (median), coherence_p, and with series antiphase, antiphase_null, antiphase_p.
    Needs `change_correlation`.
    """
    features = torch.as_tensor(features, dtype=torch.float64).flatten(1)
    centred = features - features.mean(0)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-30)
    labels, candidates = np.asarray(labels), np.asarray(candidates, dtype=bool)
    up, down = np.asarray(up), np.asarray(down)
    rng = np.random.default_rng(seed)

    def statistics(first, second):
        coherence = float((unit[first] @ unit[second].T).mean())
        if series is None:
            return coherence, math.nan
        values = np.asarray(series, dtype=np.float64)
        return coherence, change_correlation(values[:, first].mean(1), values[:, second].mean(1))

    def class_matched(group, taken):
        drawn = []
        for cls, count in zip(*np.unique(labels[group], return_counts=True)):
            pool = np.flatnonzero(candidates & (labels == cls) & ~taken)
            if len(pool) < count:
                return None
            choice = rng.choice(pool, size=count, replace=False)
            taken[choice] = True
            drawn.append(choice)
        return np.concatenate(drawn)

    if len(up) == 0 or len(down) == 0:
        return dict.fromkeys(("coherence", "coherence_null", "coherence_p") + (
            () if series is None else ("antiphase", "antiphase_null", "antiphase_p")), math.nan)
    observed = statistics(up, down)
    null = []
    for _ in range(draws):
        taken = np.zeros(len(labels), dtype=bool)
        first = class_matched(up, taken)
        second = class_matched(down, taken) if first is not None else None
        if second is not None:
            null.append(statistics(first, second))
    null = np.asarray(null, dtype=np.float64).reshape(-1, 2)
    result = {"coherence": observed[0],
              "coherence_null": float(np.median(null[:, 0])) if len(null) else math.nan,
              "coherence_p": float((1 + np.sum(null[:, 0] >= observed[0])) / (1 + len(null)))}
    if series is not None:
        finite = null[np.isfinite(null[:, 1]), 1]
        result.update(antiphase=observed[1],
                      antiphase_null=float(np.median(finite)) if len(finite) else math.nan,
                      antiphase_p=float((1 + np.sum(finite <= observed[1])) / (1 + len(finite))))
    return result


def group_pair_contrast(series, first, second, first_pool, second_pool, draws=200, seed=0):
    """How much more two groups move in anti-phase than size-matched control groups, with a bootstrap CI.

    series [T, N] (e.g. per-example losses over a window); first, second: bool [N] or index arrays of
    the pair (e.g. sky airplanes and sky birds/ships); first_pool, second_pool: where the control pair
    is drawn from (e.g. no-sky airplanes and no-sky birds/ships), each control group the size of its
    counterpart, `draws` times. pair = corr of changes of the two groups' mean series
    (`change_correlation`); control = median over draws of the same for the control pairs;
    contrast = control - pair (> 0: the pair is more opposed). The 95% interval resamples the pair's
    members with replacement and draws a fresh control pair each time. Returns a dict of floats:
    pair, control, contrast, low, high. Needs `change_correlation`.
    """
    values = np.asarray(series, dtype=np.float64)
    groups = [np.flatnonzero(g) if np.asarray(g).dtype == bool else np.asarray(g)
              for g in (first, second, first_pool, second_pool)]
    rng = np.random.default_rng(seed)

    def corr(a, b):
        return change_correlation(values[:, a].mean(1), values[:, b].mean(1))

    def control_pair():
        return corr(rng.choice(groups[2], min(len(groups[0]), len(groups[2])), replace=False),
                    rng.choice(groups[3], min(len(groups[1]), len(groups[3])), replace=False))

    if min(len(g) for g in groups) == 0:
        return {key: math.nan for key in ("pair", "control", "contrast", "low", "high")}
    pair, control = corr(groups[0], groups[1]), float(np.nanmedian([control_pair() for _ in range(draws)]))
    bootstrap = [control_pair() - corr(rng.choice(groups[0], len(groups[0])),
                                       rng.choice(groups[1], len(groups[1])))
                 for _ in range(draws)]
    low, high = np.nanpercentile(bootstrap, [2.5, 97.5])
    return {"pair": pair, "control": control, "contrast": control - pair,
            "low": float(low), "high": float(high)}


def class_pairs(labels, selections, class_names):
    """Which classes oppose each other: for each selection (up indices, down indices), the majority class
    of each group, as a sorted name pair. labels [N]. Returns [(pair, count)] by decreasing count."""
    labels, counts = np.asarray(labels), {}
    for up, down in selections:
        if len(up) and len(down):
            pair = tuple(sorted((class_names[np.bincount(labels[up]).argmax()],
                                 class_names[np.bincount(labels[down]).argmax()])))
            counts[pair] = counts.get(pair, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])


# The sky feature: a documented pixel rule defines the groups, so that they come from the images, not
# from the network. Probes are uniform images: how the network's output on a flat sky-coloured image
# moves tells how it uses the colour itself.

def sky_fraction(images, rows=0.25):
    """Fraction of "sky" pixels in each image's top `rows` of rows: blue-dominant and not dark,
    B > R + 10, B >= G and B > 80 (0..255). images uint8 [N, H, W, 3] -> float [N]."""
    top = images[:, : max(1, int(round(rows * images.shape[1])))].to(torch.int32)
    red, green, blue = top[..., 0], top[..., 1], top[..., 2]
    return ((blue > red + 10) & (blue >= green) & (blue > 80)).flatten(1).float().mean(1)


def sky_groups(images, sky_at=0.7, clear_below=0.1, flat_below=20.0, rows=0.25):
    """Images with a sky background, and images clearly without one; the ambiguous ones are in neither.

    sky:    at least `sky_at` of the top quarter's pixels are sky (`sky_fraction`).
    no sky: at most `clear_below` are, and the top quarter is not flat (the std of its luminance is at
            least `flat_below` grey levels): grey overcast skies and other uniform backgrounds, the
            kind of feature that could itself be an opposing signal, are excluded from the control.
    The rule is crude by design (blue water at the top counts as sky). Returns (sky, no_sky) bool [N].
    Needs `sky_fraction`.
    """
    fraction = sky_fraction(images, rows)
    top = images[:, : max(1, int(round(rows * images.shape[1])))].float()
    luminance_std = (top @ torch.tensor([0.299, 0.587, 0.114])).flatten(1).std(1)
    return fraction >= sky_at, (fraction <= clear_below) & (luminance_std >= flat_below)


def uniform_probe(rgb, mean, std, size=32):
    """A uniform image of colour `rgb` (0..255), normalized like the training data (mean/std from
    `normalize`): float32 [1, 3, size, size]."""
    colour = torch.as_tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).round() / 255
    return ((colour - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).expand(1, 3, size, size).contiguous()

# -------------------------------------------------------------- 8. Two-layer linear model of opposing signals
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
    can fit it by computing |x_o| (section 9).

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


# ----------------------------------------------------------------------------- 9. Toy network
#
# OUR RECONSTRUCTION of the paper's toy example. The data are those of section 8: a rare coordinate
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
    """A one-hidden-layer ReLU MLP (osig.MLP, depth 1) that starts linear in the opposing input.

    num_outputs: 1 for the squared-error toy, 2 for its two-class cross-entropy version. PyTorch's
    default init, then: first-layer weights times weight_scale, output weights times output_scale (a
    small init, so the network learns its features progressively), hidden biases set to hidden_bias
    > 0 and output biases 0. With weight_scale·α well below hidden_bias every unit is active on both
    signs of x_0 at init. Needs `MLP`.
    """
    torch.manual_seed(seed)
    model = MLP(in_features=in_features, width=width, depth=1, num_classes=num_outputs).to(dtype)
    hidden, output = model.net[1], model.net[3]
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

    For f(x) = Vᵀ relu(U x + c) + c_2 (osig.MLP with depth 1, e.g. make_toy_network) with one output
    v (squared error): M_jk = (1/N) Σ_i x_{i,f}² v_j v_k 1_j(x_i) 1_k(x_i), 1_j(x) = [unit j is active
    on x]. Its top eigenvalue is the curvature of the mean loss along the best direction of U[:, f];
    it equals p α² |v|² when every unit is active on every outlier (the linear model's prediction
    with b = v), and is smaller when units are gated off for one sign. With two outputs (two-class
    cross-entropy) the loss depends on the logit difference only, with curvature p_i(1 - p_i)
    (p_i = softmax probability): v becomes v_1 - v_0 and example i is weighted by p_i(1 - p_i), which
    goes to 0 as the example is fit with a large margin. OUR RECONSTRUCTION. Returns a float.
    """
    hidden, output = model.net[1], model.net[3]
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


def group_gradients(model, loss_fn, x, y, groups):
    """Each group's share of the full-batch gradient: g_k = ∇θ (Σ_{i in group k} loss_i) / N.

    groups: list of bool masks [N]; the g_k of disjoint groups covering the data sum to ∇θ L. Returns
    a list of flat gradient vectors [P] (parameters in module order), computed without touching .grad.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    losses = loss_fn(model(x), y)
    grads = []
    for mask in groups:
        parts = torch.autograd.grad(losses[mask].sum() / len(x), params, retain_graph=True,
                                    materialize_grads=True)
        grads.append(torch.cat([part.reshape(-1) for part in parts]))
    return grads




def half_learned_step(even):
    """First step at which the network's |x_0| (even) response reaches half its final value.

    even [T]: the even part from `odd_even_parts`. For the squared-error toy the final value is about
    the target offset; for the cross-entropy toy it is the margin the network ends with. Returns T
    (never) when the final value is not positive.
    """
    even = np.asarray(even, dtype=np.float64)
    learned = even >= even[-1] / 2 if even[-1] > 0 else np.zeros(len(even), dtype=bool)
    return int(np.argmax(learned)) if learned.any() else len(even)

# ---------------------------------------------------------------------------- 10. Optimizers: Adam versus SGD
#
# Adam divides each coordinate's step by the running RMS of its gradient; plain SGD does not. What an
# optimizer "sees" as sharpness is then the top eigenvalue of P^-1/2 H P^-1/2, P its diagonal
# preconditioner (`top_eigenvalues(..., preconditioner=P)`), to be compared with its own stability
# threshold. Opposing signals produce large, sign-flipping gradients in a few parameters; SplitSGD
# (OUR RECONSTRUCTION of the paper's proposal) gives Adam's step only to those coordinates. The last
# functions say in which layers the sharp direction and the sign flips live, and how strongly the
# groups of examples whose losses move most keep oscillating under minibatch noise.


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


def stability_threshold(optimizer):
    """The sharpness above which an optimizer's update is unstable on a quadratic (Cohen et al., 2021, 2022).

    On a quadratic with curvature λ along an eigenvector, for a constructed `optimizer` (first group):
      torch.optim.SGD, momentum μ   heavy ball b ← μ b + g, θ ← θ − lr b:
                                    unstable iff λ > (2 + 2μ)/lr; μ = 0 is gradient descent and its 2/lr.
                                    Clipping only shortens steps, so this is also clipped SGD's threshold
                                    while the gradient is not clipped.
      torch.optim.Adam, β1          on the preconditioned sharpness λ(P^-1/2 H P^-1/2):
                                    (2 + 2β1)/((1 − β1) lr), 38/lr for β1 = 0.9.
      SplitSGD                      on λ(P^-1/2 H P^-1/2) with its own preconditioner: (2 + 2μ)/lr.
    Returns a float. Needs `adam_denominator`, `top_quantile_mask`, `SplitSGD`.
    """
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.Adam):
        beta1 = group["betas"][0]
        return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * group["lr"])
    if isinstance(optimizer, (torch.optim.SGD, SplitSGD)):
        return (2.0 + 2.0 * group["momentum"]) / group["lr"]
    raise ValueError(f"no stability threshold known for {type(optimizer).__name__}: "
                     f"use SGD, Adam or SplitSGD")


def parameter_layers(model, within_blocks=False):
    """Group the trainable parameter tensors into layers, in module order.

    A tensor's layer is its name up to and including the first all-digit component ("net.1.weight"
    -> "net.1", "blocks.2.attention.qkv.weight" -> "blocks.2": a whole transformer or residual block;
    with within_blocks, one component more: "blocks.2.attention", "blocks.2.mlp"), else its name without
    the last component ("embed.weight" -> "embed", "position" -> "position").
    Returns (layer names [L] in order of first appearance, layer index of each tensor int64 [n_tensors],
    number of entries of each tensor int64 [n_tensors]).
    """
    names, index, sizes = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        digit = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        end = None if digit is None else min(digit + 1 + within_blocks, len(parts) - 1)
        layer = ".".join(parts[:end]) if digit is not None else (".".join(parts[:-1]) or name)
        if layer not in names:
            names.append(layer)
        index.append(names.index(layer))
        sizes.append(p.numel())
    return names, np.asarray(index, dtype=np.int64), np.asarray(sizes, dtype=np.int64)


def layer_shares(vector, model, within_blocks=False):
    """Share of a flat parameter vector's squared norm in each layer: |v_layer|² / |v|², [L], sums to 1.

    vector [P] in the flat parameter order (e.g. the top Hessian eigenvector). For comparison, a random
    isotropic vector puts the layer's parameter count / P there (`parameter_shares`): divide by it to
    see which layers hold more of the vector than their size. Needs `parameter_layers`.
    """
    names, index, sizes = parameter_layers(model, within_blocks)
    squared = [float(part.double().pow(2).sum()) for part in torch.split(vector.reshape(-1), sizes.tolist())]
    shares = np.bincount(index, weights=squared, minlength=len(names))
    return shares / max(shares.sum(), 1e-300)


def parameter_shares(model, within_blocks=False):
    """Each layer's share of the trainable parameters [L] (`parameter_layers`' grouping): what a random
    isotropic direction puts in each layer, the baseline for `layer_shares`. Needs `parameter_layers`."""
    names, index, sizes = parameter_layers(model, within_blocks)
    return np.bincount(index, weights=sizes, minlength=len(names)) / sizes.sum()


def sign_flip_measure():
    """A `measure` hook for `train` (or part of one): per parameter tensor, the number of gradient
    coordinates whose sign is opposite to the previous step's (nan at the first call), recorded as
    "sign_flips" [n_tensors] at every step. Returns measure(step, model, optimizer) -> dict."""
    previous = {}

    def measure(step, model, optimizer):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                 for p in model.parameters() if p.requires_grad]
        signs = [torch.sign(g).to(torch.int8) for g in grads]
        flips = [math.nan] * len(grads) if "signs" not in previous else \
            [float((s * s_old < 0).sum()) for s, s_old in zip(signs, previous["signs"])]
        previous["signs"] = signs
        return {"sign_flips": np.asarray(flips)}

    return measure


def layer_sign_flip_rates(sign_flips, model):
    """Per layer, the fraction of gradient coordinates whose sign flips from one step to the next.

    sign_flips [T, n_tensors]: per step and parameter tensor, the number of coordinates with
    sign(g_t) = -sign(g_{t-1}) (as recorded by `sign_flip_measure`; rows with nan are skipped).
    Returns [L] = sum over steps and the layer's tensors of flips / (steps · layer size).
    Needs `parameter_layers`.
    """
    names, index, sizes = parameter_layers(model)
    flips = np.asarray(sign_flips, dtype=np.float64)
    flips = flips[np.all(np.isfinite(flips), axis=1)]
    per_layer = np.bincount(index, weights=flips.sum(0), minlength=len(names))
    return per_layer / (np.bincount(index, weights=sizes, minlength=len(names)) * max(len(flips), 1))


def opposing_group_oscillation(per_example_loss, top=40, window=30, start=0, stride=None, seed=0):
    """How strongly the groups of examples whose losses move most keep oscillating, against control groups.

    OUR RECONSTRUCTION of a rule for stochastic runs, where no single step defines the groups.
    per_example_loss [R, N]: the loss of every training example at R record times (every k steps; take
    k odd, so that a period-2 oscillation still alternates between records).
    Selection at record r: Δ_i = ℓ_i(r+1) − ℓ_i(r); the `top` examples by |Δ_i| split by sign into the
    group that went up and the group that went down (the opposing pair of that interval). Two controls,
    each member drawn from outside the top without replacement: random examples, and loss-matched
    examples (for each member, the remaining example whose loss at record r+1 is nearest), since
    high-loss examples move more whatever the optimizer does.
    Measurement over the `window` intervals between records r+2 ... r+2+window (record r+1, where the
    selecting change ended, is left out: any noise in it would show up as a spurious reversal in the
    next interval): a group's amplitude is mean_t |ℓ̄(t+1) − ℓ̄(t)|, ℓ̄ the group's mean loss
    (loss units per record interval); a pair's amplitude is the mean of its two groups'. Selections at
    r = start, start + stride, ... (stride defaults to window: disjoint windows).

    Returns a dict of numpy arrays over selections: record [S], n_up [S], amplitude [S], amplitude_control
    [S] (random), amplitude_matched [S], relative = amplitude / amplitude_control [S], relative_matched =
    amplitude / amplitude_matched [S], correlation [S] = corr of the up and down groups' changes (opposing:
    < 0), correlation_control [S] (random pair); and floats median_relative, median_relative_matched,
    median_amplitude, median_correlation (nan when S = 0).
    """
    losses = np.asarray(per_example_loss, dtype=np.float64)
    R, N = losses.shape
    stride = stride or window
    rng = np.random.default_rng(seed)

    def amplitude(series):
        return float(np.abs(np.diff(series)).mean())

    def correlation(a, b):
        da, db = np.diff(a), np.diff(b)
        return float(np.corrcoef(da, db)[0, 1]) if da.std() > 0 and db.std() > 0 else float("nan")

    def pair_amplitude(span, first, second):
        return (amplitude(span[:, first].mean(1)) + amplitude(span[:, second].mean(1))) / 2

    rows = []
    for r in range(start, R - window - 2, stride):
        change = losses[r + 1] - losses[r]
        order = np.argsort(-np.abs(change))
        chosen, rest = order[:top], rng.permutation(order[top:])
        is_up = change[chosen] > 0
        if is_up.all() or not is_up.any():
            continue
        up, down = chosen[is_up], chosen[~is_up]
        control_up, control_down = rest[:len(up)], rest[len(up):len(up) + len(down)]
        available = np.ones(N, dtype=bool)
        available[chosen] = False
        matched = []
        for i in chosen:
            candidates = np.flatnonzero(available)
            j = candidates[np.argmin(np.abs(losses[r + 1, candidates] - losses[r + 1, i]))]
            matched.append(j)
            available[j] = False
        matched = np.asarray(matched)
        span = losses[r + 2:r + 3 + window]
        groups = pair_amplitude(span, up, down)
        control = pair_amplitude(span, control_up, control_down)
        loss_matched = pair_amplitude(span, matched[is_up], matched[~is_up])
        rows.append((r, len(up), groups, control, loss_matched, groups / max(control, 1e-300),
                     groups / max(loss_matched, 1e-300),
                     correlation(span[:, up].mean(1), span[:, down].mean(1)),
                     correlation(span[:, control_up].mean(1), span[:, control_down].mean(1))))
    keys = ("record", "n_up", "amplitude", "amplitude_control", "amplitude_matched", "relative",
            "relative_matched", "correlation", "correlation_control")
    result = {key: np.asarray([row[j] for row in rows], dtype=np.float64) for j, key in enumerate(keys)}
    for key in ("relative", "relative_matched", "amplitude", "correlation"):
        result[f"median_{key}"] = float(np.nanmedian(result[key])) if rows else float("nan")
    return result


# ----------------------------------------------------------------------------- 11. Plotting helpers

def plot_loss_and_sharpness(step, loss, eig_step, eigenvalues, lr, title="", spikes=None):
    """Figure: the training loss (top, log scale; spike events from `loss_spikes` [S, 2] marked) and the
    top Hessian eigenvalues [E, k] at eig_step [E] (bottom) against a dashed 2/lr line. Returns the figure."""
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    loss = np.asarray(loss)
    top.plot(step, loss, lw=0.8, color="k")
    if spikes is not None and len(spikes):
        top.plot(spikes[:, 0], loss[spikes[:, 0]], "r.", ms=4, label=f"{len(spikes)} spike events")
        top.legend(loc="upper right")
    top.set_yscale("log")
    top.set_ylabel("train loss")
    top.set_title(title, fontsize=9)
    eigenvalues = np.asarray(eigenvalues).reshape(len(eig_step), -1)
    for j in range(eigenvalues.shape[1]):
        bottom.plot(eig_step, eigenvalues[:, j], lw=1.2 if j == 0 else 0.5, color="C0" if j == 0 else "C7",
                    label="top eigenvalue" if j == 0 else None)
    bottom.axhline(2 / lr, ls="--", color="C3", label=f"2/lr = {2 / lr:.3g}")
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

# ----------------------------------------------------------------------------- Appendix: the data files

def cifar10_folder(root, download=True):
    """root/cifar-10-batches-py, made from root/cifar-10-python.tar.gz when absent.

    The archive is downloaded from CIFAR10_URL when missing and allowed (to a .part file renamed
    when complete), its md5 is checked against CIFAR10_MD5, and it is unpacked into a temporary
    folder that is renamed into place only when complete. Raises DataError naming the fix.
    Needs `DataError`.
    """
    folder, archive = root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz"
    where = (f"put cifar-10-python.tar.gz (from {CIFAR10_URL}) or its extracted cifar-10-batches-py/ "
             f"folder in {root}, or set OSIG_DATA to the folder that holds it")
    if folder.is_dir():
        return folder
    if not archive.exists():
        if not download:
            raise DataError(f"CIFAR-10 not found in {root}: {where}")
        partial = archive.with_name(archive.name + ".part")
        try:
            root.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(CIFAR10_URL, timeout=30) as response, open(partial, "wb") as f:
                while block := response.read(1 << 20):
                    f.write(block)
            os.replace(partial, archive)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise DataError(f"CIFAR-10 not found in {root} and the download failed ({error}): "
                            f"{where}") from None
    md5 = hashlib.md5()
    with open(archive, "rb") as f:
        while block := f.read(1 << 20):
            md5.update(block)
    if md5.hexdigest() != CIFAR10_MD5:
        raise DataError(f"{archive} is corrupted (md5 {md5.hexdigest()}, expected {CIFAR10_MD5}): "
                        f"delete it and download it again from {CIFAR10_URL}")
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".cifar10-extract-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(staging, filter="data")
        if not (staging / "cifar-10-batches-py").is_dir():
            raise DataError(f"{archive} does not contain cifar-10-batches-py/: "
                            f"delete it and download it again from {CIFAR10_URL}")
        os.replace(staging / "cifar-10-batches-py", folder)
    except (OSError, tarfile.TarError) as error:
        raise DataError(f"{archive} could not be extracted ({error}): "
                        f"delete it and download it again") from None
    finally:
        for path in sorted(staging.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        staging.rmdir()
    return folder


def download_checked(url, path, md5):
    """Download `url` to `path`: into path.part, md5-checked, then renamed into place, so that `path` is
    either absent or complete and correct. Raises DataError (no network, or a wrong file) naming the fix.
    Needs `DataError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
        digest = hashlib.md5(partial.read_bytes()).hexdigest()
        if digest != md5:
            raise DataError(f"the download of {url} is corrupted (md5 {digest}, expected {md5}): try again")
        os.replace(partial, path)
    except OSError as error:
        raise DataError(f"{path} is missing and the download from {url} failed ({error}): put the file there "
                        f"yourself, or set OSIG_DATA to a folder that holds it") from None
    finally:
        partial.unlink(missing_ok=True)


class CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batch files that builds numpy arrays and nothing else.

    A pickle can name any importable callable and call it while loading, so a tampered data file
    could run code. This one resolves only what a CIFAR batch needs (numpy's array reconstruction,
    numpy.ndarray, numpy.dtype and _codecs.encode, which Python 2 byte strings use) and refuses
    every other name with pickle.UnpicklingError.
    """
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
               ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0]}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return codecs.encode
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy "
                                     f"arrays, lists and strings")


def read_cifar_batch(path):
    """One CIFAR-10 batch file: data uint8 [10000, 3072] (CHW rows) and labels int64 [10000].

    Read with `CifarUnpickler` (no code in the file can run) and checked by structure: keys, dtype,
    shape, integer labels in 0..9. Raises DataError naming the file and the fix.
    Needs `DataError`, `CifarUnpickler`.
    """
    fix = f"delete {path.parent} and put a fresh copy of cifar-10-batches-py/ (or the archive) there"
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {fix}") from None
    except pickle.UnpicklingError as error:
        raise DataError(f"{path} is not a plain CIFAR-10 batch ({error}): {fix}") from None
    except (OSError, EOFError, KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise DataError(f"{path} is unreadable ({type(error).__name__}: {error}): {fix}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (10000, 3072):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path} is not a CIFAR-10 batch (data {getattr(data, 'dtype', type(data).__name__)} "
                        f"{shape}, expected uint8 (10000, 3072)): {fix}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != 10000 or \
            not all(isinstance(label, (int, np.integer)) and 0 <= label <= 9 for label in labels):
        raise DataError(f"{path} is not a CIFAR-10 batch (labels must be 10,000 integers in 0..9): {fix}")
    return data, np.asarray(labels, dtype=np.int64)
