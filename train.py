"""Train a small VMamba from scratch on scikit-learn's 8x8 digits, on a CPU, in a few minutes.

    python train.py                       # defaults below; prints test accuracy and wall time
    python train.py --epochs 15 --res 32 --batch-size 64 --lr 2e-3 --seed 0 \
        [--threads 1]

The data: `sklearn.datasets.load_digits` (1,797 grey 8x8 images of the digits 0-9, bundled with
scikit-learn, so nothing is downloaded), scaled to [0, 1], upscaled bilinearly to res x res,
copied to 3 channels and normalised with the training set's mean and std. The train/test split
(80/20, stratified) is fixed by --seed. Augmentation: a random shift of up to res/8 pixels
(pad with the background, random crop), nothing else: digits must not be flipped.

The model: generation 2 (the released VMamba-T/S/B architecture: conv stem, SS2D with d_state 1,
MLP in every block, conv downsampling) at width C = 32, depths (1, 1, 2, 1), ssm_ratio 1, ten
classes: 1.5M parameters (0.7M of them in the last stage, width 256). At res 32 the four stages see
8x8, 4x4, 2x2, 1x1 maps.

Training: AdamW (weight decay 0.05, none on biases, norms, A_logs and Ds), linear warm-up then a
cosine decay to zero, per step; cross-entropy with label smoothing 0.1. A plain-text progress
bar goes to stderr (updated in place on a terminal, one line per epoch otherwise).

Eager only: compiling the whole model for training fails with torch 2.13 on CPU (Inductor
raises DataDependentOutputException while lowering the backward of torch's `scan` operator inside
the full model; the compiled scan's own forward and backward work and are tested).

Letters as in vmamba_min.py: B batch, H = W = res.
"""
import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from vmamba_min import VSSM, VSSMConfig

# ---------------------------------------------------------------------------------------------
# Defaults (each one a CLI flag)
# ---------------------------------------------------------------------------------------------
EPOCHS = 15
BATCH_SIZE = 64
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 1
LABEL_SMOOTHING = 0.1
RES = 32
SEED = 0
TEST_FRACTION = 0.2
MODEL = dict(generation=2, dim=32, depths=(1, 1, 2, 1), ssm_ratio=1.0, drop_path_rate=0.05)
NUM_CLASSES = 10


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_digits_split(res=RES, seed=SEED, test_fraction=TEST_FRACTION):
    """The digits as tensors: x_train (n_train, 3, res, res) float32, y_train (n_train,) int64
    in 0..9, x_test, y_test likewise; n_train + n_test = 1797. Normalised per channel with the
    training set's mean and std (the test set never informs the preprocessing)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0        # (1797, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)                 # (1797,)
    x = F.interpolate(x[:, None], size=(res, res), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()                           # (1797, 3, res, res)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    mean, std = x[idx_train].mean(), x[idx_train].std()   # grey copied to 3 channels: one value
    x = (x - mean) / std
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def random_shift(x, max_shift, generator=None):
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift]: pad by max_shift
    with the image's minimum (the background: 0 before normalisation), crop at a random offset."""
    if max_shift == 0:
        return x
    Bn, Cc, H, W = x.shape
    s = max_shift
    bg = x.amin(dim=(1, 2, 3), keepdim=True)                            # (B, 1, 1, 1)
    xp = F.pad(x - bg, (s, s, s, s)) + bg                               # (B, 3, H+2s, W+2s)
    oy = torch.randint(0, 2 * s + 1, (Bn,), generator=generator)
    ox = torch.randint(0, 2 * s + 1, (Bn,), generator=generator)
    rows = oy[:, None] + torch.arange(H)                                # (B, H)
    cols = ox[:, None] + torch.arange(W)                                # (B, W)
    b = torch.arange(Bn)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, 3)
    return out.permute(0, 3, 1, 2).contiguous()                         # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------
# Model and optimiser
# ---------------------------------------------------------------------------------------------
def build_model(**overrides):
    return VSSM(VSSMConfig(**{**MODEL, "num_classes": NUM_CLASSES, **overrides}))


def build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY):
    """AdamW; no decay on 1-D parameters (biases, LayerNorm, Ds) nor on A_logs (official)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name in skip else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def warmup_cosine(warmup_steps, total_steps):
    """Multiplier of the base lr at step s: linear from ~0 to 1 over warm-up, cosine to 0."""
    def f(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        t = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def train_step(model, opt, x, y, label_smoothing=LABEL_SMOOTHING):
    model.train()
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(model, x, y, batch_size=256):
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


# ---------------------------------------------------------------------------------------------
# Progress bar: plain text on stderr
# ---------------------------------------------------------------------------------------------
class Progress:
    """`epoch 3/15 [########------------] 12/23 loss 0.512 1.9s`; on a terminal it rewrites one
    line with '\\r', otherwise (CI logs, pipes) it prints only each epoch's final line."""

    def __init__(self, total, prefix, width=24, stream=sys.stderr):
        self.total, self.prefix, self.width, self.stream = total, prefix, width, stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, done, suffix=""):
        if not self.tty and done < self.total:
            return
        fill = self.width * done // self.total
        line = (f"{self.prefix} [{'#' * fill}{'-' * (self.width - fill)}] {done}/{self.total} "
                f"{suffix} {time.perf_counter() - self.t0:.1f}s")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--res", type=int, default=RES)
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads; 0 keeps torch's default (one per core). On a "
                        "CPU shared with other jobs, 1 avoids OpenMP threads waiting on each "
                        "other: the ops here are small")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(args.res, args.seed)
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits {args.res}x{args.res}: {len(y_tr)} train, {len(y_te)} test | VMamba "
          f"{MODEL} {n_params:,} params | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)

    opt = build_optimizer(model, args.lr)
    # Full batches only (a fresh shuffle each epoch, so every sample is seen over the epochs):
    # every step sees the same input shape.
    steps_per_epoch = len(y_tr) // args.batch_size
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(WARMUP_EPOCHS * steps_per_epoch, total))
    gen = torch.Generator().manual_seed(args.seed)
    max_shift = max(1, args.res // 8)

    for epoch in range(args.epochs):
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1:>2}/{args.epochs}")
        perm = torch.randperm(len(y_tr), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = random_shift(x_tr[idx], max_shift, gen)
            loss = train_step(model, opt, x, y_tr[idx])
            sched.step()
            running = loss if i == 0 else 0.9 * running + 0.1 * loss
            bar.update(i + 1, f"loss {running:.3f}")
        bar.close()

    acc = accuracy(model, x_te, y_te)
    wall = time.perf_counter() - t_start
    print(f"test accuracy {acc:.2%} ({round(acc * len(y_te))}/{len(y_te)}) | train accuracy "
          f"{accuracy(model, x_tr, y_tr):.2%} | wall time {wall:.1f}s "
          f"({args.epochs} epochs)")
    return acc


if __name__ == "__main__":
    main()
