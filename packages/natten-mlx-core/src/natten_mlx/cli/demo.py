"""A newcomer's first run: train a small NAT-style classifier on the scikit-learn digits.

The digits dataset (1797 grey 8x8 images, ten classes) ships inside scikit-learn, so nothing is
downloaded. The model is a two-level NAT in miniature: a 3x3 convolution turns every pixel into a
token of an ``[B, 8, 8, C1]`` map, a block of LayerNorm + :class:`natten_mlx.NeighborhoodAttention2D`
(3x3 window, dilation 2) + MLP mixes them, a strided 3x3 convolution downsamples to ``[B, 4, 4, C2]``
(NAT's downsampler), a second block (3x3 window) mixes again, and a linear head reads the token map.
Training follows a fixed schedule (``EPOCHS`` epochs from ``seed``), so a slow machine and a fast
one train the same model and reach the same accuracy; only the wall time differs.

    natten-mlx demo                      # or: python -m natten_mlx demo
    python -c "import natten_mlx.cli.demo as d; d.run(epochs=2)"
"""

from __future__ import annotations

import math
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import natten_mlx

EPOCHS = 3  # the fixed schedule: enough to pass ACCURACY_BAR on every seed tried (see run())
ACCURACY_BAR = 0.9  # test accuracy the demo must exceed to exit 0
DIMS = (16, 48)  # channels of the 8x8 and the 4x4 level
HEADS = (2, 4)
BATCH_SIZE = 32
PEAK_LR = 3e-3
WARMUP_STEPS = 30


class MissingExtra(ImportError):
    """A command needs a package of one of natten-mlx's extras; ``str()`` is the one-line fix."""

    def __init__(self, extra: str, package: str):
        self.extra, self.package = extra, package
        super().__init__(f"this command needs {package}, from natten-mlx's [{extra}] extra: pip install {package}")


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    """The digits as ``[N, 8, 8, 1]`` float32 in [0, 1] and int32 labels, split per class.

    Returns ``(x_train, y_train, x_test, y_test)`` as NumPy arrays; the split depends only on seed.
    Raises :class:`MissingExtra` without scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingExtra("demo", "scikit-learn") from exc

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


class NATBlock(nn.Module):
    """Pre-norm transformer block whose token mixer is 2D neighborhood attention; ``[B, H, W, C]``."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int = 1, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = natten_mlx.NeighborhoodAttention2D(dim, num_heads, kernel_size, dilation=dilation)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm1(x))
        # the sigmoid GELU: MLX's exact erf GELU costs several times more on the CPU
        return x + self.fc2(nn.gelu_fast_approx(self.fc1(self.norm2(x))))


class DigitsNAT(nn.Module):
    """``[B, 8, 8, 1]`` images -> ``[B, 10]`` logits.

    The head is linear over the flattened 4x4 token map rather than over their mean: on inputs
    this small, mean pooling throws away where the strokes are, and training then needs several
    times longer to pass 90%.
    """

    def __init__(self, dims=DIMS, heads=HEADS, num_classes: int = 10):
        super().__init__()
        c1, c2 = dims
        self.stem = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.pos = mx.zeros((8, 8, c1))
        self.block1 = NATBlock(c1, heads[0], kernel_size=3, dilation=2)
        self.down = nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1)
        self.norm_down = nn.LayerNorm(c2)
        self.block2 = NATBlock(c2, heads[1], kernel_size=3)
        self.norm = nn.LayerNorm(c2)
        self.head = nn.Linear(16 * c2, num_classes)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.block1(self.stem(x) + self.pos)
        x = self.block2(self.norm_down(self.down(x)))
        x = self.norm(x)
        return self.head(x.reshape(x.shape[0], -1))


def _lr_at(step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak at ``total_steps``."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    t = min(1.0, (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS))
    return PEAK_LR * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _accuracy(model: DigitsNAT, x: np.ndarray, y: np.ndarray, batch: int = 512) -> float:
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(mx.array(x[i : i + batch]))
        correct += int(mx.sum(mx.argmax(logits, axis=1) == mx.array(y[i : i + batch])).item())
    return correct / len(x)


def _backend_used(backend: str | None) -> str:
    """The backend serving the demo's attention calls (the dispatcher's choice unless forced)."""
    q = mx.zeros((1, 8, 8, HEADS[0], DIMS[0] // HEADS[0]))
    explanation = natten_mlx.explain("na2d", q, q, q, kernel_size=3, dilation=2, backend=backend)
    if explanation.chosen is None:
        raise ValueError(f"backend {backend!r} cannot serve the demo: {explanation.reasons.get(backend)}")
    return explanation.chosen


def run(epochs: int | None = None, seed: int = 0, backend: str | None = None, seconds: float | None = None,
        verbose: bool = True) -> dict:
    """Train :class:`DigitsNAT` on the digits and test it.

    epochs:  length of the schedule (default :data:`EPOCHS`); with the same seed the run is the
             same on every machine.
    seed:    fixes the split, the initialisation and the batch order.
    backend: force one natten_mlx backend by name (None: the dispatcher picks).
    seconds: instead of a fixed schedule, as many whole epochs as fit in about this much wall time
             (re-planned after every epoch); the result then depends on the machine's speed.

    Returns ``dict(test_accuracy, train_accuracy, passed, bar, backend, epochs, steps, seconds)``:
    ``passed`` is ``test_accuracy > bar``; ``seconds`` the training wall time (evaluation excluded).
    """
    if epochs is not None and seconds is not None:
        raise ValueError(f"epochs={epochs} and seconds={seconds}: give one of them, not both")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs={epochs!r}: must be a positive integer")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds={seconds!r}: must be positive")
    say = print if verbose else (lambda *a, **k: None)
    t_start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    mx.random.seed(seed)
    rng = np.random.default_rng(seed + 1)
    model = DigitsNAT()
    mx.eval(model.parameters())
    optimizer = optim.AdamW(learning_rate=PEAK_LR, weight_decay=0.05)
    used = _backend_used(backend)
    n_params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    planned_epochs = EPOCHS if epochs is None and seconds is None else (epochs or 1)
    budget = f"about {seconds:g} s" if seconds is not None else f"{planned_epochs} epochs"
    say(f"natten-mlx demo: NAT on scikit-learn digits (8x8), {len(x_train)} train / {len(x_test)} test images, "
        f"{n_params / 1e3:.1f}k parameters, backend {used!r}, device {mx.default_device()}, {budget}, seed {seed}")

    def loss_fn(m, x, y):
        logits = m(x)
        return nn.losses.cross_entropy(logits, y, label_smoothing=0.05, reduction="mean"), logits

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    # Not mx.compile'd: compiling this step costs more (10-20 s on a 2-core CPU) than it saves
    # over the demo's ~130 steps.
    def train_step(x, y):
        (loss, logits), grads = loss_and_grad(model, x, y)
        optimizer.update(model, grads)
        return loss, mx.sum(mx.argmax(logits, axis=1) == y)

    # whole batches only (the remainder is a different one every epoch): one shape for every step
    steps_per_epoch = len(x_train) // BATCH_SIZE
    step, epoch, fastest = 0, 0, float("inf")
    with natten_mlx.use_backend(used):
        t_train = time.perf_counter()
        while epoch < planned_epochs:
            perm = rng.permutation(len(x_train))
            t_epoch, loss_sum, correct = time.perf_counter(), 0.0, 0
            for b in range(steps_per_epoch):
                idx = perm[b * BATCH_SIZE : (b + 1) * BATCH_SIZE]
                optimizer.learning_rate = mx.array(_lr_at(step, planned_epochs * steps_per_epoch))
                loss, hits = train_step(mx.array(x_train[idx]), mx.array(y_train[idx]))
                mx.eval(model.state, optimizer.state, loss, hits)
                loss_sum += loss.item() * len(idx)
                correct += hits.item()
                step += 1
            epoch += 1
            now = time.perf_counter()
            fastest = min(fastest, now - t_epoch)
            if seconds is not None:
                # whole epochs at the fastest epoch time seen so far that end within the budget
                # (a loaded machine makes single epochs noisy)
                left = seconds - (now - t_start)
                planned_epochs = epoch + max(0, int(left / fastest + 0.25))
            seen = steps_per_epoch * BATCH_SIZE
            say(f"  epoch {epoch:3d}/{planned_epochs}  loss {loss_sum / seen:.4f}  train acc {correct / seen:6.2%}  "
                f"lr {_lr_at(step - 1, planned_epochs * steps_per_epoch):.1e}  ({now - t_epoch:.2f} s; "
                f"{now - t_start:.1f} s total)")
        train_seconds = time.perf_counter() - t_train
        model.eval()
        test_acc = _accuracy(model, x_test, y_test)
        train_acc = _accuracy(model, x_train, y_train)
    passed = test_acc > ACCURACY_BAR
    say(f"test accuracy {test_acc:.2%} (train {train_acc:.2%}) after {epoch} epochs ({step} steps, "
        f"{train_seconds:.1f} s of training), backend {used!r}")
    return dict(test_accuracy=test_acc, train_accuracy=train_acc, passed=passed, bar=ACCURACY_BAR, backend=used,
                epochs=epoch, steps=step, seconds=train_seconds)


def verdict(result: dict, seconds: float | None = None) -> str:
    """One line: PASSED, or FAILED and why (the accuracy, the bar and what to try)."""
    acc, bar = result["test_accuracy"], result["bar"]
    if result["passed"]:
        return f"demo PASSED: test accuracy {acc:.2%} > {bar:.0%}"
    why = f"demo FAILED: test accuracy {acc:.2%} is not above the {bar:.0%} bar after {result['epochs']} epoch(s)"
    if seconds is not None:
        why += f"; the {seconds:g} s budget fitted too few epochs on this machine: run without --seconds"
    elif result["epochs"] < EPOCHS:
        why += f"; the default schedule is {EPOCHS} epochs"
    return why + "; please report it with the output of `natten-mlx info`"


def add_arguments(parser) -> None:
    """The demo's options, shared by ``natten-mlx demo`` and ``python -m natten_mlx.cli.demo``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--epochs", type=int, default=None, metavar="N",
                       help=f"length of the fixed training schedule (default {EPOCHS}); the same result on "
                            "every machine")
    group.add_argument("--seconds", type=float, default=None, metavar="S",
                       help="train as many whole epochs as fit in about S seconds instead (the result then "
                            "depends on the machine's speed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="fixes the train/test split, the initialisation and the batch order (default 0)")
    parser.add_argument("--backend", default=None, metavar="NAME",
                        help="force one natten_mlx backend by name (see `natten-mlx info`; default: the "
                             "dispatcher picks per call)")


def command(args, out=print, before_verdict=None) -> int:
    """Run the demo from parsed arguments; 0 when the accuracy bar is passed, 1 otherwise.

    ``before_verdict()`` is called after training, before the last line (the verdict) is printed.
    """
    if args.epochs is not None and args.epochs < 1:
        out(f"demo: --epochs={args.epochs}: must be at least 1")
        return 2
    if args.seconds is not None and not args.seconds > 0:
        out(f"demo: --seconds={args.seconds}: must be positive")
        return 2
    if args.backend is not None:
        try:
            _backend_used(args.backend)
        except ValueError as exc:
            out(f"demo: --backend {args.backend}: {exc}")
            return 2
    try:
        result = run(epochs=args.epochs, seed=args.seed, backend=args.backend, seconds=args.seconds)
    except MissingExtra as exc:
        out(f"demo: {exc}")
        return 1
    if before_verdict is not None:
        before_verdict()
    out(verdict(result, args.seconds))
    return 0 if result["passed"] else 1


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="natten-mlx demo", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return command(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
