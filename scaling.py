"""scaling.py: how time and memory grow with the image size, VMamba-T against timm's DeiT-S and
Swin-T (inference, batch 1 by default): the paper's resolution study.

    python scaling.py                       224..640 px on a CPU, 224..1024 px on CUDA, eager
    python scaling.py --res 224,512,1024    other sizes
    python scaling.py --compile             compiled models (minutes per size on a CPU)
    python scaling.py --json                one JSON object instead of the table
                                            (either way scaling.csv and .png go to --out,
                                            bench_out/ by default)
    python bench.py --scaling --report      the same study inside bench.py's results page

The paper's claim is linear cost in the number of tokens L = (res / patch)^2 for VMamba against
quadratic for global attention. DeiT-S (global attention) is the ViT the paper sets next to
VMamba-T; Swin-T (windowed attention, linear) the hierarchical peer. Both come from timm with
random weights, created at each size; a size a model rejects is a row that says why. Without timm
only VMamba runs. study() does the measuring (rows timed one after another, benchkit.run_row;
peak memory as in bench.py), format_study() the table and the exponent p in time ~ L^p between
the smallest and the largest size that ran (1: linear, 2: quadratic), plot() the log-log chart.
"""
import argparse
import csv
import math
import os
import re
import time

import benchkit as bk

# -------------------------------------------------------------------------------- constants
MODELS = ("vmamba_tiny_s1l8", "deit_small_patch16_224", "swin_tiny_patch4_window7_224")
RES = {"cpu": "224,320,448,640", "cuda": "224,384,512,640,768,1024"}
BATCH = 1
MIN_TIME = 1.0                # seconds of timed calls per row, at least
WARMUP = 2
OUT_DIR = "bench_out"
PATCH = {"vanilla_vmamba_": 4}  # pixels per token side of a patchifying stem; timm names say patchN
CSV_KEYS = ("model", "res", "tokens", "batch", "mode", "ms", "iqr_ms", "img_s", "peak_mb",
            "compile_s", "error")


def res_list(text):
    """'224,512' -> [224, 512]: distinct sizes >= 32 (a 32 px image is one token at VMamba's
    last stage), sorted, so that growth() spans the smallest to the largest; ValueError on
    anything else."""
    out = [int(r) for r in text.split(",")]
    if not out or min(out) < 32 or len(set(out)) != len(out):
        raise ValueError(text)
    return sorted(out)


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
    p.add_argument("--out", default=OUT_DIR, metavar="DIR",
                   help=f"where scaling.csv and scaling.png go (default {OUT_DIR}/)")
    args = p.parse_args(argv)
    try:
        args.res = res_list(RES[args.device] if args.res is None else args.res)
    except ValueError:
        p.error(f"--res: want distinct sizes >= 32 such as 224,512, got {args.res!r}")
    for flag, value, ok in (("--batch", args.batch, ">= 1"), ("--warmup", args.warmup, ">= 0"),
                            ("--min-time", args.min_time, "finite and >= 0")):
        least = 1 if flag == "--batch" else 0
        if not least <= value < math.inf:                     # nan and inf: never ended
            p.error(f"{flag} must be {ok}, got {value}")
    bk.check_output_folder(p, "--out", args.out)
    return p, args


# -------------------------------------------------------------------------------- measuring
def tokens(model, res):
    """L: tokens of the first stage: (res // patch)^2 for a patchifying stem (timm's, and
    generation 0's); generation 2's two stride-2 convs round up (ConvStem), ceil(ceil(res/2)/2)
    per side."""
    if model.startswith("vmamba_"):
        side = -(-(-(-res // 2)) // 2)
        return side * side
    m = re.search(r"patch(\d+)", model)
    patch = int(m.group(1)) if m else next(v for k, v in PATCH.items() if model.startswith(k))
    return (res // patch) ** 2


def specs(res, batch=BATCH, device="cpu", dtype="float32", compile_=False, peers=True):
    models = MODELS if peers and bk.timm_available() else MODELS[:1]
    mode = "model" if compile_ else False                 # torch.compile(model) for every model
    return [dict(model=m, res=r, batch=batch, device=device, dtype=dtype, compile=mode,
                 train=False) for m in models for r in res]


def study(res, batch=BATCH, device="cpu", dtype="float32", min_time=MIN_TIME, warmup=WARMUP,
          compile_=False, peers=True, progress=None):
    """Time every model at every size, then memory; returns {"rows", "growth", ...}.
    progress(that dict so far), if given, after each row and each memory figure."""
    rows = []

    def result(rows):
        return {"rows": rows, "growth": growth(rows), "compiled": compile_, "batch": batch,
                "dtype": dtype, "peers_missing": peers and not bk.timm_available()}
    step = (lambda rows: progress(result(rows))) if progress else None
    for spec in specs(res, batch, device, dtype, compile_, peers):
        bk.log(f"scaling: {spec['model']} {spec['res']}x{spec['res']}")
        rows.append({**bk.run_row(spec, min_time, warmup), "mode": bk.mode_label(spec),
                     "tokens": tokens(spec["model"], spec["res"])})
        if step:
            step(rows)
    return result(bk.add_memory(rows, step))


def growth(rows):
    """Per model: exponent p of time (and memory) ~ L^p from its smallest to largest size."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and r.get("ms")]
        if len(ok) < 2:
            continue
        a, b = ok[0], ok[-1]
        log_l = math.log(b["tokens"] / a["tokens"])         # L, the stem's own rounding included
        if log_l == 0:                                      # sizes with the same L: no growth
            continue
        g = {"from_res": a["res"], "to_res": b["res"], "L_ratio": math.exp(log_l),
             "time_exponent": math.log(b["ms"] / a["ms"]) / log_l}
        if a.get("peak_mb") and b.get("peak_mb"):
            g["mem_exponent"] = math.log(b["peak_mb"] / a["peak_mb"]) / log_l
        out[model] = g
    return out


# -------------------------------------------------------------------------------- output
COLS = [("model", "model", "{}"), ("res", "res", "{}"), ("tokens", "tokens L", "{}"),
        ("ms", "ms/batch", "{:.1f}"), ("iqr_ms", "iqr", "{:.1f}"), ("img_s", "img/s", "{:.2f}"),
        ("peak_mb", "peak MB", "{:.0f}"), ("compile_s", "compile s", "{:.1f}")]


def format_study(result):
    """The table and one exponent line per model, as text."""
    title = (f"input scaling: {'compiled' if result['compiled'] else 'eager'} inference, batch "
             f"{result['batch']}, {result['dtype']}")
    notes = [f"{m}: {g['from_res']} -> {g['to_res']} px (tokens x{g['L_ratio']:.1f}): time "
             f"L^{g['time_exponent']:.2f}" +
             (f", memory L^{g['mem_exponent']:.2f}" if "mem_exponent" in g else "")
             for m, g in result["growth"].items()]
    notes += ["exponent p in cost ~ L^p: 1 = linear in tokens, 2 = quadratic; tokens L = "
              "(res / patch)^2 at the first stage (patch 4 for VMamba-T and Swin-T, 16 for "
              "DeiT-S); peak MB: extra memory of one forward (CPU: rise of peak RSS in a child "
              "process per row; CUDA: max_memory_allocated)"]
    if result.get("peers_missing"):
        notes.append(bk.PEERS_HINT)
    return bk.format_table(title, result["rows"], COLS, notes, optional=("compile_s", "iqr_ms"),
                           error_col="ms")


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def plot(rows, path, title=None):
    """Time and memory against tokens L, log-log, with L^1 and L^2 guides; None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, key in enumerate(("ms", "peak_mb")):
        ax, lo = axes[i], None
        for model in dict.fromkeys(r["model"] for r in rows):
            ok = [r for r in rows if r["model"] == model and r.get(key)]
            if ok:
                ax.plot([r["tokens"] for r in ok], [r[key] for r in ok], "o-", label=model)
                lo = min(lo or ok[0], ok[0], key=lambda r: r["tokens"])
        xs = sorted({r["tokens"] for r in rows if r.get(key)})
        if lo and len(xs) > 1:                 # guides through the leftmost point
            for p, style in ((1, ":"), (2, "--")):
                ax.plot(xs, [lo[key] * (x / lo["tokens"]) ** p for x in xs], style,
                        color="grey", lw=0.8, label=f"~ L^{p}")
        ax.set(xscale="log", yscale="log", xlabel="tokens L (first stage)",
               ylabel="ms per batch" if key == "ms" else "peak MB (one forward)")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    parser, args = parse_args(argv)
    bk.reexec_with_malloc_fix(args.no_malloc_fix)   # before torch: glibc reads them at start
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    bk.make_output_folder(parser, "--out", args.out)
    bk.quiet_torch(args.device)
    t0 = time.perf_counter()
    result = {"header": bk.header(args.device, args.dtype)}
    result.update(study(args.res, args.batch, args.device, args.dtype, args.min_time,
                        args.warmup, args.compile))
    result["csv"] = write_csv(result["rows"], os.path.join(args.out, "scaling.csv"))
    result["plot"] = plot(result["rows"], os.path.join(args.out, "scaling.png"))
    result["wall_s"] = time.perf_counter() - t0
    if args.json:
        import json
        print(json.dumps(result, indent=1))
    else:
        bk.print_header(result["header"])
        print("\n" + format_study(result))
        print(f"  wrote {result['csv']}" + (f" and {result['plot']}" if result["plot"] else
                                           " (no PNG: matplotlib is not installed)"))
        print(f"\ntotal {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
