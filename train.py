"""Train a small VMamba from scratch on scikit-learn's 8x8 digits, on a CPU, in about a minute.

    python train.py [--epochs 15 --batch-size 64 --lr 2e-3 --res 32 --seed 0 --compile]
    python train.py --compile blocks          # vmamba_min.compile_blocks: compiles faster
    torchrun --nproc_per_node=2 train.py [same flags]       # data-parallel (DDP)

The digits ship with scikit-learn, so nothing is downloaded; the model is a generation-2 VMamba
at width 32, depths (1, 1, 2, 1). --batch-size is the GLOBAL batch: under torchrun each of the
world_size processes takes batch/world_size samples of every step's batch, so the optimisation
(samples per step, steps, lr) is the same for any number of processes. Rank 0 prints, shows the
progress bar and evaluates. For a model this small compiling does not pay (docs/design.md).
At 32 px the last stage sees a 1 x 1 map, a sequence of one token, whose state starts at zero:
its A_logs never get a gradient (a single step's output does not depend on the decay).
Letters as in vmamba_min.py: B batch, H = W = res.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from vmamba_min import VSSM, VSSMConfig, compile_blocks

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
    """AdamW (fused: one pass over all parameters); no decay on 1-D parameters (biases,
    LayerNorm, Ds) nor on A_logs (model.no_weight_decay(): the official code marks A_logs and
    Ds `_no_weight_decay`, Mamba's convention, though the official trainer's grouping reads
    only shapes and names, and so decays A_logs and the (K, D) dt_projs_bias, as this does the
    latter). model may be wrapped (torch.compile, DDP): the exempt parameters are found by
    identity in every submodule that names them, not by the wrapper's prefixed names.

    torch's fused AdamW on a CPU reads a gradient or a state tensor whose layout differs from
    its parameter's in the parameter's order (torch 2.13: a silently wrong step; on CUDA
    reported to raise, pytorch#106951). Such layouts arise: a contiguous conv weight gets a
    channels-last gradient from channels-last maps, and optimizer state saved from a model of
    one layout loads into one of the other. So before every step each such tensor is copied
    into its parameter's layout (`same_layouts`)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"build_optimizer: expected a model (an nn.Module with "
                        f"no_weight_decay(), or a wrapper of one), got {type(model).__name__}: "
                        f"it groups the parameters itself")
    named = [m for m in model.modules() if callable(getattr(m, "no_weight_decay", None))]
    if not named:
        raise TypeError(f"build_optimizer: expected a model with no_weight_decay() (a VSSM, "
                        f"or a wrapper of one), got {type(model).__name__}")
    skip = {id(p) for m in named for name, p in m.named_parameters()
            if name in m.no_weight_decay()}
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() < 2 or id(p) in skip else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=True)
    opt.register_step_pre_hook(same_layouts)
    return opt


def same_layouts(opt, args=(), kwargs=None):
    """An optimizer step pre-hook: every gradient and every state tensor of a parameter's shape
    in the parameter's own layout (strides), copied where it differs (build_optimizer)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None and p.grad.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(p.grad)
            state = opt.state.get(p, {})
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p).copy_(v)


def warmup_cosine(warmup_steps, total_steps):
    """Multiplier of the base lr at step s: linear from ~0 to 1 over warm-up, cosine to 0."""
    def f(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        t = (s - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def train_step(model, opt, x, y, label_smoothing=LABEL_SMOOTHING):
    """One optimiser step; returns the loss, averaged over the processes under torchrun (DDP has
    already averaged the gradients the same way)."""
    model.train()
    loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss = loss.detach()
    if dist.is_initialized():
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
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
# Processes: one (python train.py) or one per torchrun worker
# ---------------------------------------------------------------------------------------------
def processes():
    """How many processes train: torchrun's WORLD_SIZE where it set RANK (setup_processes
    joins a process group only then), else 1."""
    if "RANK" not in os.environ:
        return 1
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise SystemExit(f"train.py: WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number "
                         f"(torchrun sets it)") from None


def setup_processes():
    """(rank, world_size, device). Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK)
    joins the process group: NCCL on GPUs (one per process), gloo on CPUs. Alone: no
    torch.distributed at all."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and local >= torch.cuda.device_count():
        raise RuntimeError(
            f"train.py: this is local process {local}, but the machine has "
            f"{torch.cuda.device_count()} GPU(s) and each process needs one of its own: start at "
            f"most that many per node (torchrun --nproc_per_node), or hide the GPUs "
            f"(CUDA_VISIBLE_DEVICES=) to train on the CPU with gloo")
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="global batch: split evenly over the torchrun processes")
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--res", type=int, default=RES)
    p.add_argument("--drop-path", type=float, default=MODEL["drop_path_rate"],
                   help="stochastic depth rate of the last block (0: off)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many steps (0: all epochs); the schedule ends there")
    p.add_argument("--compile", nargs="?", const="model", choices=("model", "blocks"),
                   help="train compiled: 'model' (the default when given without a value) = "
                        "torch.compile(model, fullgraph=True, dynamic=False); 'blocks' = "
                        "vmamba_min.compile_blocks (one graph per stage, the rest eager). "
                        "Evaluation stays eager")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="every process writes DIR/rank<r>.pt: its final state dict and the "
                        "step losses (so that the processes' copies can be compared)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads; 0 keeps torch's default (one per core; torchrun "
                        "sets OMP_NUM_THREADS=1). On a CPU shared with other jobs, 1 avoids "
                        "OpenMP threads waiting on each other: the ops here are small")
    args = p.parse_args(argv)
    for flag, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--res", args.res, 4), ("--max-steps", args.max_steps, 0),
                               ("--threads", args.threads, 0)):
        if value < least:
            p.error(f"{flag} must be >= {least}, got {value}")
    if not 0 < args.lr < math.inf:
        p.error(f"--lr must be finite and > 0, got {args.lr}")
    if not 0 <= args.drop_path < 1:
        p.error(f"--drop-path must be in [0, 1), got {args.drop_path}")
    world = processes()
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} must be a multiple of the number of "
                f"processes, {world}")
    if not 0 <= args.seed < 2 ** 32:            # the split's random_state (scikit-learn)
        p.error(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        p.error(f"--save must name a folder, {args.save!r} is a file")

    rank, world, device = setup_processes()
    local_batch = args.batch_size // world
    if args.threads:
        torch.set_num_threads(args.threads)
    log = print if rank == 0 else (lambda *a, **k: None)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)                      # the same initial weights in every process
    x_tr, y_tr, x_te, y_te = load_digits_split(args.res, args.seed)
    if args.batch_size > len(y_tr):
        p.error(f"--batch-size {args.batch_size} is larger than the training set "
                f"({len(y_tr)} samples): no full batch to train on")
    if args.save:                # made after the other checks, before training: a bad path
        try:                     # fails now, and a refused run leaves no folder behind
            os.makedirs(args.save, exist_ok=True)
        except OSError as e:
            p.error(f"--save: cannot make the folder {args.save!r}: {e.strerror}")
        if not os.access(args.save, os.W_OK):
            p.error(f"--save: the folder {args.save!r} is not writable")
    model_kw = {**MODEL, "drop_path_rate": args.drop_path}
    # Conv weights channels-last, like the maps they meet (vmamba_min's `grid` views): their
    # gradients can come back channels-last, and a depthwise weight (C, 1, 3, 3) whose strides
    # differed from its gradient's (in the size-1 dim only) made DDP copy that gradient into
    # its bucket on every step, with a warning.
    raw = build_model(**model_kw).to(device, memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in raw.parameters())
    log(f"digits {args.res}x{args.res}: {len(y_tr)} train, {len(y_te)} test | VMamba "
        f"{model_kw} {n_params:,} params | torch {torch.__version__}, {device}, {world} "
        f"process(es) x {torch.get_num_threads()} threads, batch {args.batch_size} "
        f"({local_batch} per process){f' | compiled: {args.compile}' if args.compile else ''}",
        flush=True)

    opt = build_optimizer(raw, args.lr)
    model = raw
    if args.compile == "model":
        model = torch.compile(raw, fullgraph=True, dynamic=False)   # every step: one shape
    elif args.compile == "blocks":
        compile_blocks(raw)        # in place; `raw` then runs its blocks compiled
    if world > 1:   # averages the gradients over the processes in backward
        model = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    # Full global batches only, so every step sees the same input shape. The sampler shuffles
    # with (seed, epoch), identically in every process, and deals process r the samples r,
    # r + world, ... of that order: one step's global batch is the same 64 samples however many
    # processes share it.
    sampler = DistributedSampler(y_tr, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = len(y_tr) // args.batch_size           # >= 1: checked above
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    warmup = min(WARMUP_EPOCHS * steps_per_epoch, total // 5)   # one epoch, at most 1/5 of all
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total))
    gen = torch.Generator().manual_seed(args.seed + 1000 * rank)   # this process's augmentation
    torch.manual_seed(args.seed + 1000 * rank)                     # and drop-path draws
    max_shift = max(1, args.res // 8)

    step, losses = 0, []
    epochs = math.ceil(total / steps_per_epoch)                     # --max-steps may cut it
    for epoch in range(epochs):
        n = min(steps_per_epoch, total - step)
        bar = Progress(n, f"epoch {epoch + 1:>2}/{epochs}") if rank == 0 else None
        sampler.set_epoch(epoch)
        mine = torch.tensor(list(sampler))            # (len(y_tr) // world,)
        running = 0.0
        for i in range(n):
            idx = mine[i * local_batch:(i + 1) * local_batch]
            x = random_shift(x_tr[idx], max_shift, gen).to(device)
            loss = train_step(model, opt, x, y_tr[idx].to(device))
            sched.step()
            step += 1
            losses.append(loss)
            running = loss if i == 0 else 0.9 * running + 0.1 * loss
            if bar:
                bar.update(i + 1, f"loss {running:.3f}")
        if bar:
            bar.close()

    if args.save:
        torch.save({"state_dict": raw.state_dict(), "losses": losses},
                   os.path.join(args.save, f"rank{rank}.pt"))
    acc = None
    if rank == 0:   # eager: compiled code would recompile for eval mode and each batch size
        x_te, y_te, x_tr, y_tr = (t.to(device) for t in (x_te, y_te, x_tr, y_tr))
        with torch.compiler.set_stance("force_eager"):    # compile_blocks compiled `raw` too
            acc = accuracy(raw, x_te, y_te)
            wall = time.perf_counter() - t_start
            acc_tr = accuracy(raw, x_tr, y_tr)
        print(f"test accuracy {acc:.2%} ({round(acc * len(y_te))}/{len(y_te)}) | train accuracy "
              f"{acc_tr:.2%} | wall time {wall:.1f}s ({step} steps, "
              f"{step / steps_per_epoch:.3g} epochs)", flush=True)
    if world > 1:
        dist.barrier()   # the others wait for rank 0's evaluation before the group goes
        dist.destroy_process_group()
    return acc


if __name__ == "__main__":
    main()
