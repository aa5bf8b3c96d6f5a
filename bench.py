"""bench.py: our selective scan and VMamba models next to timm's peers, in plain PyTorch.

    python bench.py                    scan table + model table (about 2 minutes on 2 CPU cores)
    python bench.py --models --batch 1,8,32   only the model table (--scan: only the scans)
    python bench.py --compile-models   add compiled rows: torch.compile(model) and, for ours,
                                       vmamba_min.compile_blocks (minutes per model on a CPU)
    python bench.py --compile-models blocks   only the compile_blocks rows (model: only the other)
    python bench.py --train            training step table (forward, backward, fused AdamW step)
    python bench.py --json             one JSON object (every row) instead of tables
    python bench.py --device cuda --batch 1,128 --compile-models   the whole table on a GPU
    python scaling.py (input-size study) and python flops.py (params, GFLOPs) are their own tools

Scan table: naive loop (scan.selective_scan_ref) vs chunked scan (scan.selective_scan), eager and
compiled, at VMamba-T's stage shapes (batch 1), fwd and fwd+bwd, errors against the naive loop.
Model table: ours (vmamba_tiny_s1l8, vanilla_vmamba_tiny) and, when timm is importable, four
peers, all in THIS process, same batch, resolution and dtype. Compiled rows (opt-in): "compiled"
is torch.compile(model), "compile_blocks" vmamba_min.compile_blocks(model) (ours only: one
compiled graph per stage, the rest eager); a compiled row's first call is reported apart as
"compile s". Without compiled rows each model is timed on its own: medians (with IQR) of
torch.utils.benchmark runs of at least --min-time seconds after --warmup calls. With them, a
model's eager and compiled versions are timed side by side, one call of each per round
(benchkit.time_paired: the machine's speed drifts more than their gap), and "t/eager" is the
median of the per-round time ratios. Peak memory is measured after all timing, on the CPU in
one fresh child process per row (benchkit.py says why: the measurement switches malloc for
good), on CUDA with max_memory_allocated.

Letters as in scan.py: B batch, K = 4 routes, D channels per route, L = H*W, N state size.
"""
import argparse
import math
import os
import statistics
import time

import benchkit as bk

# -------------------------------------------------------------------------------- constants
DEVICE = "cpu"
DTYPE = "float32"             # float32 | bfloat16 (bf16: scan inputs cast, models autocast)
BATCH = "1"                   # model and training tables: a list such as 1,8,32
RES = 224
MIN_TIME = 2.0                # seconds of timed calls per cell, at least (see benchkit)
WARMUP = 2                    # untimed calls before timing (after the compile call, if any)
STAGES = "1"                  # VMamba-T stages for the scan table, e.g. "1,2,3,4"
SCAN_BATCH = 1
# torch.compile: the scan compiles in seconds per shape, so its column is on by default; a whole
# model takes minutes of Inductor time on a 2-core CPU, so compiled model rows are opt-in.
COMPILE = True
COMPILE_MODELS = ""           # compiled model rows: none unless --compile-models is given ...
ALL_COMPILE_MODES = "model,blocks"   # ... and then these, unless it names some
OURS = ("vmamba_tiny_s1l8", "vanilla_vmamba_tiny")
PEERS = ("swin_tiny_patch4_window7_224", "convnext_tiny", "deit_small_patch16_224", "resnet50")
OUT_DIR = "bench_out"
# VMamba-T at 224x224: stage s (1..4) sees an (56 / 2^(s-1))^2 map with width C = 96 * 2^(s-1).
# v0 = vanilla_vmamba_tiny (D = 2C, N = 16), v2 = vmamba_tiny_s1l8 (D = C, N = 1); K = 4.
SCAN_GENS = {"v0": dict(ssm_ratio=2, N=16), "v2": dict(ssm_ratio=1, N=1)}


def batch_list(text):
    """argparse type: '1,8,32' -> [1, 8, 32]; distinct positive integers only."""
    try:
        out = [int(t) for t in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1 or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"want distinct positive integers such as 1,8,32, "
                                         f"got {text!r}")
    return out


def compile_modes(text):
    """argparse type: 'model,blocks' -> ["model", "blocks"]; '' -> [] (no compiled rows)."""
    out = [t for t in text.split(",") if t]
    bad = [t for t in out if t not in ("model", "blocks")]
    if bad or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"want model, blocks or model,blocks, got {text!r}")
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run (default: scan table and model table)")
    what.add_argument("--scan", action="store_true", help="the scan table")
    what.add_argument("--models", action="store_true", help="the model table")
    what.add_argument("--train", action="store_true", help="the training step table")
    p.add_argument("--device", default=DEVICE, choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=DTYPE, choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=batch_list, default=batch_list(BATCH),
                   help=f"model/train tables: batch sizes, e.g. 1,8,32 (default {BATCH})")
    p.add_argument("--res", type=int, default=RES, help="model/train tables: image size")
    p.add_argument("--min-time", type=float, default=MIN_TIME, help="timed seconds per cell, >=")
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls before timing")
    p.add_argument("--stages", default=STAGES, help="scan table: VMamba-T stages, e.g. 1,2,3,4")
    p.add_argument("--chunk", type=int, help="chunk size of the chunked scan (default: scan.py's)")
    p.add_argument("--naive-bwd", action="store_true", help="also the naive fwd+bwd (slow)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPILE,
                   help="the torch.compile column of the scan table (seconds per shape)")
    p.add_argument("--compile-models", type=compile_modes, nargs="?", metavar="MODES",
                   const=compile_modes(ALL_COMPILE_MODES), default=compile_modes(COMPILE_MODELS),
                   help="add compiled rows to the model/train tables: 'model' = "
                        "torch.compile(model), 'blocks' = vmamba_min.compile_blocks (ours "
                        "only); no value: both")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="timm's models in the model table (when timm is importable)")
    p.add_argument("--all-models", action="store_true", help="also our models with the loop scan")
    p.add_argument("--only", type=lambda t: t.split(","), metavar="NAMES",
                   help="model/train tables: these models instead of the default list "
                        "(any of ours, any timm name), e.g. vanilla_vmamba_tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object, no tables")
    p.add_argument("--no-malloc-fix", action="store_true", help="keep glibc's malloc (erratic)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.scan or args.models or args.train):
        args.scan = args.models = True
    return parser, args


# -------------------------------------------------------------------------------- scan table
def scan_inputs(gen, stage, batch, device, dtype, seed=0):
    """Inputs shaped and scaled as in VMamba-T's SS2D at official initialisation."""
    import torch
    g = torch.Generator().manual_seed(seed)
    C, L = 96 * 2 ** (stage - 1), (56 // 2 ** (stage - 1)) ** 2
    N, KD = SCAN_GENS[gen]["N"], 4 * int(SCAN_GENS[gen]["ssm_ratio"] * C)
    u = torch.randn(batch, KD, L, generator=g)
    delta = 0.1 * torch.randn(batch, KD, L, generator=g)   # dt_proj output before its bias
    # dt_projs_bias: inverse softplus of dt = exp(uniform(log 1e-3, log 1e-1)), clamped at 1e-4
    dt = torch.exp(torch.rand(KD, generator=g) * math.log(100) + math.log(1e-3)).clamp(min=1e-4)
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(KD, 1)  # -exp(A_logs), A_logs=log(1..N)
    B, Cm = torch.randn(batch, 4, N, L, generator=g), torch.randn(batch, 4, N, L, generator=g)
    ts = [u, delta, A, B, Cm, torch.ones(KD), delta_bias]
    ts = [t.to(device=device, dtype=dtype if i in (0, 1, 3, 4) else torch.float32)
          for i, t in enumerate(ts)]
    return ts, (batch, KD, L, N)


def scan_passes(inputs, shape, device):
    """{"fwd": run, "fwd+bwd": run}: run(scan_fn) returns y (fwd) or du (fwd+bwd)."""
    import torch
    gy = torch.randn(shape[:3], generator=torch.Generator().manual_seed(1)).to(device)
    leaves = [t.detach().requires_grad_() for t in inputs]

    def fwd(fn):
        with torch.no_grad():
            return fn(*inputs, delta_softplus=True)

    def fwd_bwd(fn):
        for t in leaves:
            t.grad = None
        fn(*leaves, delta_softplus=True).backward(gy)
        return leaves[0].grad
    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def errors(out, ref):
    """max |out - ref| and that over max |ref|."""
    if ref is None:
        return None, None
    e = (out.float() - ref.float()).abs().max().item()
    return e, e / max(ref.float().abs().max().item(), 1e-30)


def timed_cell(row, key, run, args):
    """Compile call (for 'compiled'), then steady-state timing into row; returns the output."""
    if key == "compiled":
        row["compile_s"] = bk.time_once(run, args.device)
    row.update({f"{key}_{k}": v for k, v in
                bk.time_steady(run, args.device, args.min_time, args.warmup).items()})
    return run().detach().clone()


def naive_cell(row, run, args):
    """The naive loop is slow: one timed call, whose output is the reference for the errors."""
    import scan
    out = []
    row["naive_ms"] = 1e3 * bk.time_once(lambda: out.append(
        run(scan.selective_scan_ref).detach().clone()), args.device)
    row["err_vs"] = "naive"
    return out[0]


def compiled_cell(row, run, chunked, ref, args):
    """torch.compile of the chunked scan (Inductor: C++ on a CPU, Triton on CUDA); a failure
    is reported in the row, since the rest of the table still means something. Returns the
    compiled callable, or None."""
    import torch
    torch._dynamo.reset()                       # fresh cache per shape: an honest compile time
    comp = torch.compile(chunked, fullgraph=True, dynamic=False)
    try:
        out = timed_cell(row, "compiled", lambda: run(comp), args)
        row["compiled_err"], row["compiled_rel"] = errors(out, ref)
        return comp
    except Exception as e:                      # noqa: BLE001 -- reported, run goes on
        row["error"] = f"compiled: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
        return None


def backward_ratio(row, runs, fns, args):
    """fwd+bwd over fwd of the same scan, timed side by side (benchkit.time_paired: one call of
    each per round), median of the per-round ratios: the cells above are timed one after
    another, and the machine's speed drifts between them. fns: {"eager": fn, "compiled": ..}."""
    calls = [(k, p) for k in fns for p in ("fwd", "fwd+bwd")]
    out = bk.time_paired([lambda k=k, p=p: runs[p](fns[k]) for k, p in calls], args.device,
                         args.min_time, args.warmup)
    t = {c: o["times_s"] for c, o in zip(calls, out)}
    for k in fns:
        row[f"{k}_bx"] = statistics.median(b / a for a, b in zip(t[k, "fwd"], t[k, "fwd+bwd"]))


def scan_shape_rows(gen, stage, args):
    import torch
    import scan
    inputs, shape = scan_inputs(gen, stage, SCAN_BATCH, args.device, getattr(torch, args.dtype))
    kw = {} if args.chunk is None else {"chunk_size": args.chunk}
    chunked = lambda *a, **k: scan.selective_scan(*a, **k, **kw)   # noqa: E731
    rows, fns = [], {"eager": chunked}
    runs = scan_passes(inputs, shape, args.device)
    for pass_, run in runs.items():
        row = {"scan": gen, "stage": stage, "shape": "x".join(map(str, shape)), "pass": pass_}
        naive = pass_ == "fwd" or args.naive_bwd
        bk.log(f"{gen} stage {stage} {pass_}: {'naive loop (one call), ' if naive else ''}"
               f"chunked eager{', compiled (first call compiles)' if args.compile else ''}")
        ref = naive_cell(row, run, args) if naive else None
        eager = timed_cell(row, "eager", lambda: run(chunked), args)
        row["eager_err"], row["eager_rel"] = errors(eager, ref)
        if ref is None:                         # no naive gradient: compare with eager
            ref, row["err_vs"] = eager, "eager"
        if args.compile:
            comp = compiled_cell(row, run, chunked, ref, args)
            fns["compiled"] = comp if comp and fns.get("compiled", True) else None
        for k in ("eager", "compiled"):
            if row.get("naive_ms") and row.get(f"{k}_ms"):
                row[f"{k}_x"] = row["naive_ms"] / row[f"{k}_ms"]
        rows.append(row)
    bk.log(f"{gen} stage {stage}: fwd+bwd / fwd side by side")
    backward_ratio(rows[-1], runs, {k: f for k, f in fns.items() if f}, args)
    return rows


SCAN_COLS = [("scan", "scan", "{}"), ("stage", "stage", "{}"), ("shape", "B x K*D x L x N", "{}"),
             ("pass", "pass", "{}"), ("naive_ms", "naive ms", "{:.1f}"),
             ("eager_ms", "chunked ms", "{:.1f}"), ("eager_iqr_ms", "iqr", "{:.1f}"),
             ("eager_x", "x", "{:.1f}x"), ("eager_bx", "bwd x", "{:.2f}"),
             ("compiled_ms", "compiled ms", "{:.1f}"), ("compiled_iqr_ms", "iqr", "{:.1f}"),
             ("compiled_x", "x", "{:.1f}x"), ("compiled_bx", "bwd x", "{:.2f}"),
             ("compile_s", "compile s", "{:.1f}"), ("err_vs", "err vs", "{}"),
             ("eager_err", "max|err| chunked", "{:.1e}"), ("eager_rel", "rel", "{:.1e}"),
             ("compiled_err", "max|err| compiled", "{:.1e}"), ("compiled_rel", "rel", "{:.1e}"),
             ("error", "error", "{}")]


def scan_table(args):
    return [r for s in args.stages.split(",") for g in SCAN_GENS
            for r in scan_shape_rows(g, int(s), args)]


# -------------------------------------------------------------------------------- model tables
def model_specs(args, train=False):
    """Every row of the model (or training) table, in timing order: per batch, ours then peers."""
    base = dict(res=args.res, device=args.device, dtype=args.dtype, train=train)
    ours_kw = {} if args.chunk is None else {"chunk_size": args.chunk}
    peers = PEERS if (args.peers and not train and bk.timm_available()) else ()
    specs = []
    names = args.only or OURS + peers
    for batch in args.batch:
        for model in names:
            modes = [False] + [m for m in args.compile_models
                               if m != "blocks" or bk.is_ours(model)]
            for compile_ in modes:
                kw = ours_kw if bk.is_ours(model) else {}
                specs.append(dict(base, model=model, batch=batch, compile=compile_, overrides=kw))
            if bk.is_ours(model) and args.all_models and not train:
                specs.append(dict(base, model=model, batch=batch, compile=False,
                                  overrides=dict(ours_kw, scan="reference")))
    return specs


def label(r):
    """Row labels: who wrote the model, which scan, eager / compiled / compile_blocks."""
    scan_ = r.get("overrides", {}).get("scan", "chunked") if bk.is_ours(r["model"]) else "-"
    return {"source": "ours" if bk.is_ours(r["model"]) else "timm", "scan": scan_,
            "mode": bk.MODE_NAMES[r["compile"]]}


def groups(specs):
    """Consecutive specs of one model, batch and overrides (eager, then its compiled modes)."""
    out = []
    for s in specs:
        if out and all(out[-1][0][k] == s[k] for k in ("model", "batch", "overrides")):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def model_rows(specs, args):
    """Time every spec in this process: a model's eager and compiled rows side by side
    (benchkit.run_group), a lone row on its own (run_row); then memory (children on CPU)."""
    rows = []
    for group in groups(specs):
        s = group[0]
        bk.log(f"rows {len(rows) + 1}-{len(rows) + len(group)}/{len(specs)}: {s['model']} batch "
               f"{s['batch']} {', '.join(label(g)['mode'] for g in group)}")
        timed = (bk.run_group(group, args.min_time, args.warmup) if len(group) > 1 else
                 [bk.run_row(s, args.min_time, args.warmup)])
        rows += [{**r, **label(r)} for r in timed]
    return bk.add_memory(rows)


MODEL_COLS = [("model", "model", "{}"), ("source", "by", "{}"), ("scan", "scan", "{}"),
              ("mode", "mode", "{}"), ("batch", "batch", "{}"), ("res", "res", "{}"),
              ("ms", "ms/batch", "{:.1f}"), ("iqr_ms", "iqr", "{:.1f}"),
              ("img_s", "img/s", "{:.2f}"), ("vs_eager", "t/eager", "{:.2f}"),
              ("calls", "calls", "{}"),
              ("peak_mb", "peak MB", "{:.0f}"), ("compile_s", "compile s", "{:.1f}"),
              ("params_m", "params M", "{:.1f}"), ("error", "error", "{}")]


def plot_models(rows, path, title):
    """Bar chart of img/s per model (and mode), one bar per batch; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.get("img_s")]
    names = list(dict.fromkeys(f"{r['model']} {r['mode']}" for r in ok))
    batches = sorted({r["batch"] for r in ok})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / max(1, len(batches))
    for j, b in enumerate(batches):
        ys = {f"{r['model']} {r['mode']}": r["img_s"] for r in ok if r["batch"] == b}
        ax.bar([i + j * width for i in range(len(names))], [ys.get(n, 0) for n in names],
               width, label=f"batch {b}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=7,
                  rotation=30, ha="right")
    ax.set(ylabel="images / s", title=title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# -------------------------------------------------------------------------------- main
def print_results(result, args):
    if "scan" in result:
        bk.print_table("selective scan: naive loop vs chunked (eager, torch.compile)",
                       result["scan"], SCAN_COLS, notes=[
                           "ms: median (iqr) over >= --min-time s after warm-up; naive: ONE "
                           "timed call (it is slow); x: speed-up over naive",
                           "fwd: under no_grad; fwd+bwd: backward of <y, g> into all 7 inputs; "
                           "inputs at official init (delta_bias, A = -(1..N)), softplus on",
                           "err: fwd rows compare y, fwd+bwd rows du; rel = max|err| / max|ref|",
                           "bwd x: fwd+bwd time / fwd time of the same scan, timed side by side "
                           "(one call of each per round), median over rounds"])
    notes = ["ms/batch: median (iqr) over >= --min-time s after warm-up, in one process; a "
             f"model's eager and compiled rows side by side (one call of each per round, >= "
             f"{bk.MIN_ROUNDS} rounds), lone rows one after another (torch.utils.benchmark)",
             "t/eager: median over rounds of the row's time / its eager row's in the same round "
             "(< 1: faster); compile s: first call (Inductor's disk cache and whatever the run "
             "compiled before count: its first compiled row pays Inductor's start-up)",
             "peak MB: extra memory of one call over what is resident before it (CPU: rise of "
             "peak RSS in a child process per row; CUDA: max_memory_allocated)"]
    for key, title in (("models", "models: inference (no_grad)"),
                       ("train", "training step: forward + cross-entropy + backward"
                                 " + fused AdamW")):
        if key in result:
            bk.print_table(f"{title}, {args.res}x{args.res}", result[key], MODEL_COLS, notes)
    if result.get("peers_note"):
        print(f"  {result['peers_note']}")
    if "plot" in result:
        print(f"  wrote {result['plot']}" if result["plot"] else
              "  no bar chart: matplotlib is not installed (pip install -e \".[plot]\")")


def run_all(args):
    result = {"header": bk.header(args.device, args.dtype)}
    if not args.json:
        bk.print_header(result["header"])
    if args.scan:
        result["scan"] = scan_table(args)
    if args.models:
        result["models"] = model_rows(model_specs(args), args)
        if args.peers and not bk.timm_available():
            result["peers_note"] = bk.PEERS_HINT
        result["plot"] = plot_models(result["models"], os.path.join(OUT_DIR, "models.png"),
                                     f"{result['header']['device']}, {args.dtype}, {args.res} px")
    if args.train:
        result["train"] = model_rows(model_specs(args, train=True), args)
    return result


def main(argv=None):
    parser, args = parse_args(argv)
    bk.reexec_with_malloc_fix(args.no_malloc_fix)  # before torch: glibc reads them at start
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch.cuda.is_available() is False on this machine "
                     f"(torch {torch.__version__}); use --device cpu")
    t0 = time.perf_counter()
    result = run_all(args)
    result["wall_s"] = time.perf_counter() - t0
    if args.json:
        import json
        print(json.dumps(result, indent=1))
    else:
        print_results(result, args)
        print(f"\ntotal {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
