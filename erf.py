"""Effective receptive field (ERF) of VMamba, against a conv-only and a windowed-attention twin.

    python erf.py                                   # 128x128, random init: seconds on CPU
    python erf.py --res 1024 --n 50 --stage 3       # the paper-sized map
    python erf.py --weights path/to/official.pth    # trained weights (VMamba only)

The ERF (Luo et al. 2016; RepLKNet) of a stage is |d(sum_c y_centre) / d image|, averaged over
random inputs: how far one output pixel sees. The twins change only each block's mixer (the
scan removed; Swin-style windows), so a difference in reach is the mixer's. `summarize` defines
the printed numbers; `main` adds "beyond", the mass on pixels the conv twin cannot reach.
Letters as in vmamba_min.py, except B for the batch (no scan matrices here).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import vmamba_min
from benchkit import make_output_folder
from vmamba_min import SS2D, build, grid, load_official_checkpoint, tokens

# ---------------------------------------------------------------------------------------------
# Defaults (each one a CLI flag)
# ---------------------------------------------------------------------------------------------
MODEL = "vmamba_tiny_s1l8"
RES = 128
N_INPUTS = 8
STAGE = 1           # the conv twin's receptive field is 63 px wide after stage 1, 335 px after
                    # stage 2: at 128 px only stage 1 leaves pixels beyond its reach; use
                    # --stage 3 (the last, 495 px) at 1024 px
SEED = 0
BASELINES = ("conv", "window")
OUT_DIR = "bench_out"
WINDOW = 8
HEAD_DIM = 32


# ---------------------------------------------------------------------------------------------
# The baselines' mixers: tokens (B, L, C) of an (H, W) map -> (B, L, C), replacing SS2D in place
# ---------------------------------------------------------------------------------------------
class ConvMixer(nn.Module):
    """SS2D without the scan: the same in_proj, depthwise 3x3 conv, SiLU, out_norm, out_proj
    (and gate, in generation 0). Built from an SS2D so every shape and init is the same."""

    def __init__(self, ss2d: SS2D):
        super().__init__()
        self.in_proj, self.conv2d, self.out_norm, self.out_proj = (
            ss2d.in_proj, ss2d.conv2d, ss2d.out_norm, ss2d.out_proj)
        self.gated = ss2d.gated

    def forward(self, x, H, W):                              # (B, L, C)
        x = self.in_proj(x)                                  # (B, L, D or 2D)
        if self.gated:
            x, z = x.chunk(2, dim=-1)
        x = F.silu(self.conv2d(grid(x, H, W)))               # (B, D, H, W)
        y = self.out_norm(tokens(x))                         # (B, L, D)
        if self.gated:
            y = y * F.silu(z)
        return self.out_proj(y)                              # (B, L, C)


class WindowAttention(nn.Module):
    """Self-attention inside non-overlapping window x window tiles (Swin); `shift` rolls the map
    by window // 2 first so that alternate blocks connect neighbouring tiles. No relative
    position bias: it does not change which pixels can reach which, the ERF's question. No
    shift mask either: a shifted window that wraps around the map's edge then also mixes the
    tokens rolled in from the opposite edge, which Swin's mask keeps apart, so near the
    border this twin reaches a little further than Swin. Maps are zero-padded to a multiple
    of the window."""

    def __init__(self, dim, window=WINDOW, head_dim=HEAD_DIM, shift=False):
        super().__init__()
        self.window, self.heads = window, max(1, dim // head_dim)
        self.shift = window // 2 if shift else 0
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        for lin in (self.qkv, self.proj):    # the official init of every Linear in vmamba_min
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x, H, W):                              # (B, L, C)
        x = x.unflatten(1, (H, W))                           # (B, H, W, C)
        Bn, C = x.shape[0], x.shape[3]
        w, s = self.window, self.shift
        x = F.pad(x, (0, 0, 0, -W % w, 0, -H % w))           # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1], x.shape[2]
        if s:
            x = torch.roll(x, (-s, -s), dims=(1, 2))
        t = x.view(Bn, Hp // w, w, Wp // w, w, C).transpose(2, 3).reshape(-1, w * w, C)
        q, k, v = self.qkv(t).view(t.shape[0], w * w, 3, self.heads, C // self.heads) \
            .permute(2, 0, 3, 1, 4)                          # 3 x (B*tiles, heads, w*w, C/heads)
        t = F.scaled_dot_product_attention(q, k, v)          # (B*tiles, heads, w*w, C/heads)
        t = self.proj(t.transpose(1, 2).reshape(-1, w * w, C))   # (B*tiles, w*w, C)
        x = t.view(Bn, Hp // w, Wp // w, w, w, C).transpose(2, 3).reshape(Bn, Hp, Wp, C)
        if s:
            x = torch.roll(x, (s, s), dims=(1, 2))
        return x[:, :H, :W].flatten(1, 2)                    # (B, L, C)


def make_model(name, kind, weights=None):
    """The --model configuration with its mixers swapped for `kind` ('vmamba', 'conv',
    'window'); eval mode (no drop-path). weights: a state dict (load_official_checkpoint's),
    loaded into the VMamba only."""
    model = build(name)
    if weights is not None:
        model.load_state_dict(weights)
    for layer in model.layers:
        for j, blk in enumerate(layer.blocks):
            if kind == "conv":
                blk.self_attention = ConvMixer(blk.self_attention)
            elif kind == "window":
                dim = blk.ln_1.normalized_shape[0]
                blk.self_attention = WindowAttention(dim, shift=j % 2 == 1)
            elif kind != "vmamba":
                raise ValueError(f"unknown model kind {kind!r}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The ERF and its summary numbers
# ---------------------------------------------------------------------------------------------
def stage_output(model, x, stage):
    """The blocks' output of stage `stage` (before its downsample): (B, h, w, C_stage)."""
    return model.forward_intermediates(x, indices=[stage], intermediates_only=True,
                                       stop_early=True, output_fmt="NHWC")[0]


def erf_map(model, res, n, stage, seed=SEED):
    """Mean over n standard-normal images of |d(sum_c y[h/2, w/2, c]) / d image| summed over
    the 3 image channels: (res, res) float64, non-negative."""
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(res, res, dtype=torch.float64)
    for _ in range(n):
        x = torch.randn(1, model.config.in_chans, res, res, generator=gen, requires_grad=True)
        y = stage_output(model, x, stage)                    # (1, h, w, C)
        h, w = y.shape[1], y.shape[2]
        (grad,) = torch.autograd.grad(y[0, h // 2, w // 2].sum(), x)
        total += grad[0].abs().sum(0).double()               # (res, res)
    return total / n


def summarize(m):
    """The printed numbers, as fractions of the res*res pixels:
    reach (gradient non-zero), >1%max and >1e-4 (above that share of the maximum), A50 and A90
    (the fewest pixels, largest first, holding 50% / 90% of the gradient mass), outside (mass
    outside the central square of side res/2)."""
    flat = m.flatten().sort(descending=True).values
    cum = flat.cumsum(0) / flat.sum()
    area = lambda p: (torch.searchsorted(cum, p).item() + 1) / flat.numel()
    H, W = m.shape
    centre = m[H // 4:H - H // 4, W // 4:W - W // 4].sum()
    frac = lambda mask: mask.double().mean().item()
    return {"reach": frac(m > 0), ">1%max": frac(m > 0.01 * m.max()),
            ">1e-4": frac(m > 1e-4 * m.max()), "A50": area(0.5), "A90": area(0.9),
            "outside": (1 - centre / m.sum()).item()}


def save_heatmap(path, m, title, decades=4):
    """log10(m / max) clipped at -decades, as a heat map; needs matplotlib (the `plot` extra).
    Returns False, writing nothing, without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    v = torch.log10((m / m.max()).clamp(min=10.0 ** -decades))
    fig, ax = plt.subplots(figsize=(4.2, 4))
    im = ax.imshow(v.numpy(), cmap="hot", vmin=-decades, vmax=0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, label="log10(|grad| / max)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL, choices=sorted(vmamba_min.CONFIGS))
    p.add_argument("--res", type=int, default=RES)
    p.add_argument("--n", type=int, default=N_INPUTS, help="random inputs to average over")
    p.add_argument("--stage", type=int, default=STAGE, help="stage index; -1 = the last")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--weights", default=None, help="official checkpoint for the VMamba model")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="comma-separated subset of conv,window ('' for none)")
    p.add_argument("--out", default=OUT_DIR)
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads; 0 keeps torch's default")
    args = p.parse_args(argv)
    n_stages = len(vmamba_min.build_config(args.model).depths)
    baselines = [b for b in args.baselines.split(",") if b]
    if not -n_stages <= args.stage < n_stages:
        p.error(f"--stage: {args.model} has stages 0..{n_stages - 1} (or -{n_stages}..-1), "
                f"got {args.stage}")
    if args.n < 1 or args.res < 32 or args.threads < 0:
        p.error(f"--n must be >= 1, --res >= 32 (the last stage's map is then 1 x 1), "
                f"--threads >= 0, got {args.n}, {args.res}, {args.threads}")
    if not -2 ** 63 <= args.seed < 2 ** 64:          # torch.Generator.manual_seed's range
        p.error(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if any(b not in BASELINES for b in baselines) or len(set(baselines)) != len(baselines):
        p.error(f"--baselines: distinct names out of {','.join(BASELINES)}, got "
                f"{args.baselines!r}")
    weights = None
    if args.weights is not None:         # an official file (trainer's, bare or mmcv's), checked
        try:                             # against --model here, not after the first map
            weights = load_official_checkpoint(args.weights)
            build(args.model).load_state_dict(weights)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            p.error(f"--weights {args.weights}: {type(e).__name__}: {str(e).splitlines()[0]}")
    make_output_folder(p, "--out", args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = ["vmamba"] + baselines
    stage = args.stage % n_stages
    print(f"ERF of the centre pixel of stage {stage}, {args.model}, {args.res}x{args.res}, "
          f"mean of {args.n} random inputs, "
          f"{'weights ' + args.weights if args.weights else 'random init (official)'} | "
          f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads", flush=True)
    cols = ("reach", ">1%max", ">1e-4", "A50", "A90", "outside")
    print(f"{'model':<8}" + "".join(f"{c:>8}" for c in cols)
          + f"{'beyond':>9}{'seconds':>8}  files")
    maps, warned = {}, False
    # the conv twin first: its zero set defines "beyond" for the others
    for kind in sorted(kinds, key=lambda k: k != "conv"):
        torch.manual_seed(args.seed)
        model = make_model(args.model, kind, weights if kind == "vmamba" else None)
        t0 = time.perf_counter()
        m = erf_map(model, args.res, args.n, stage, args.seed)
        sec = time.perf_counter() - t0
        s, maps[kind] = summarize(m), m
        beyond = (m[maps["conv"] == 0].sum() / m.sum()).item() if "conv" in maps else float("nan")
        stem = f"erf_{args.model}" + ("" if kind == "vmamba" else f"_{kind}")
        base = os.path.join(args.out, stem)
        torch.save(m, base + ".pt")                          # the raw map, (res, res) float64
        png = save_heatmap(base + ".png", m,
                           f"{kind}: {args.model} stage {stage}, {args.res}px, n={args.n}")
        if not png and not warned:
            print("matplotlib not installed (pip install -e '.[plot]'): no heat maps, "
                  "only the numbers and the .pt maps", flush=True)
            warned = True
        print(f"{kind:<8}" + "".join(f"{s[c]:>8.3f}" for c in cols)
              + f"{beyond:>9.2e}{sec:>8.1f}  {base}.{'{pt,png}' if png else 'pt'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
