"""scaling.py: how time and memory grow with the image size, VMamba-T against timm's DeiT-S and
Swin-T (inference, batch 1 by default).

    python scaling.py                       224..640 px on a CPU, 224..1024 px on CUDA, eager
    python scaling.py --res 224,512,1024    other sizes
    python scaling.py --compile             compiled models (minutes per size on a CPU)
    python scaling.py --json                one JSON object instead of the table

The paper's claim is linear cost in the number of tokens L = (res / patch)^2 for VMamba against
quadratic for global attention. DeiT-S (deit_small_patch16_224, global attention) is the ViT the
paper sets next to VMamba-T; Swin-T (swin_tiny_patch4_window7_224, windowed attention, linear)
is the hierarchical peer. Both come from timm with random weights, created at each size
(img_size=res); a size a model rejects is a row that says why. Without timm only VMamba runs.
Timing and memory as in bench.py (benchkit.py): rows timed one after another in this process,
median over at least --min-time seconds; peak memory in a child process per row (CPU).
Output: the table, the exponent p in time ~ L^p between the smallest and the largest size that
ran (1: linear, 2: quadratic), bench_out/scaling.csv and, with matplotlib, scaling.png.
"""
import argparse
import csv
import math
import os
import time

import benchkit as bk

# -------------------------------------------------------------------------------- constants
MODELS = ("vmamba_tiny_s1l8", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
RES = {"cpu": "224,320,448,640", "cuda": "224,384,512,640,768,1024"}
BATCH = 1
MIN_TIME = 1.0                # seconds of timed calls per row, at least
WARMUP = 2
OUT_DIR = "bench_out"
CSV_KEYS = ("model", "res", "batch", "mode", "ms", "iqr_ms", "img_s", "peak_mb", "compile_s",
            "error")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default=None, help=f"sizes (default {RES['cpu']} on a CPU, "
                                                f"{RES['cuda']} on CUDA)")
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--min-time", type=float, default=MIN_TIME)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-malloc-fix", action="store_true")
    args = p.parse_args(argv)
    try:
        args.res = [int(r) for r in (args.res or RES[args.device]).split(",")]
    except ValueError:
        p.error(f"--res: want sizes such as 224,512, got {args.res!r}")
    return p, args


def specs(args):
    models = MODELS if bk.timm_available() else MODELS[:1]
    mode = "model" if args.compile else False            # torch.compile(model) for every model
    return [dict(model=m, res=r, batch=args.batch, device=args.device, dtype=args.dtype,
                 compile=mode, train=False) for m in models for r in args.res]


def growth(rows):
    """Per model: exponent p of time (and memory) ~ L^p from its smallest to largest size."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and r.get("ms")]
        if len(ok) < 2:
            continue
        a, b = ok[0], ok[-1]
        log_l = 2 * math.log(b["res"] / a["res"])           # L grows as res^2
        g = {"from_res": a["res"], "to_res": b["res"], "L_ratio": math.exp(log_l),
             "time_exponent": math.log(b["ms"] / a["ms"]) / log_l}
        if a.get("peak_mb") and b.get("peak_mb"):
            g["mem_exponent"] = math.log(b["peak_mb"] / a["peak_mb"]) / log_l
        out[model] = g
    return out


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def plot(rows, path):
    """Time and memory against size, log-log; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and r.get("ms")]
        axes[0].plot([r["res"] for r in ok], [r["ms"] for r in ok], "o-", label=model)
        mem = [r for r in ok if r.get("peak_mb")]
        axes[1].plot([r["res"] for r in mem], [r["peak_mb"] for r in mem], "o-", label=model)
    for ax, ylabel in zip(axes, ("ms per batch", "peak MB (one forward)")):
        ax.set(xscale="log", yscale="log", xlabel="image size (px)", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


MODEL_COLS = [("model", "model", "{}"), ("res", "res", "{}"), ("batch", "batch", "{}"),
              ("ms", "ms/batch", "{:.1f}"), ("iqr_ms", "iqr", "{:.1f}"),
              ("img_s", "img/s", "{:.2f}"), ("peak_mb", "peak MB", "{:.0f}"),
              ("compile_s", "compile s", "{:.1f}"), ("error", "error", "{}")]


def report(result):
    bk.print_table(f"input scaling, {'compiled' if result['compiled'] else 'eager'}",
                   result["rows"], MODEL_COLS)
    for m, g in result["growth"].items():
        mem = f", memory L^{g['mem_exponent']:.2f}" if "mem_exponent" in g else ""
        print(f"  {m}: {g['from_res']} -> {g['to_res']} px (tokens x{g['L_ratio']:.1f}): "
              f"time L^{g['time_exponent']:.2f}{mem}")
    print("  exponent p in cost ~ L^p: 1 = linear in tokens, 2 = quadratic")
    if not bk.timm_available():
        print(f"  {bk.PEERS_HINT}")
    print(f"  wrote {result['csv']}" + (f" and {result['plot']}" if result["plot"] else
                                       " (no PNG: matplotlib is not installed)"))


def main(argv=None):
    parser, args = parse_args(argv)
    bk.reexec_with_malloc_fix(args.no_malloc_fix)   # before torch: glibc reads them at start
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    t0 = time.perf_counter()
    result = {"header": bk.header(args.device, args.dtype), "compiled": args.compile}
    rows = []
    for spec in specs(args):
        bk.log(f"scaling: {spec['model']} {spec['res']}x{spec['res']}")
        rows.append({**bk.run_row(spec, args.min_time, args.warmup),
                     "mode": "compiled" if args.compile else "eager"})
    result["rows"] = bk.add_memory(rows)
    result["growth"] = growth(rows)
    result["csv"] = write_csv(rows, os.path.join(OUT_DIR, "scaling.csv"))
    result["plot"] = plot(rows, os.path.join(OUT_DIR, "scaling.png"))
    result["wall_s"] = time.perf_counter() - t0
    if args.json:
        import json
        print(json.dumps(result, indent=1))
    else:
        bk.print_header(result["header"])
        report(result)
        print(f"\ntotal {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
