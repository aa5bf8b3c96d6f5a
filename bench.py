"""bench.py: our selective scan and VMamba models next to timm's peers, in plain PyTorch.

    python bench.py                    scan tables + model table (about 2.5 minutes on 2 CPU cores)
    python bench.py --models --batch 1,8,32   only the model table (--scan: only the scans)
    python bench.py --train            training step table (forward, backward, fused AdamW step)
    python bench.py --scaling          the paper's resolution study (scaling.py's functions)
    python bench.py --compile-models   add compiled rows: torch.compile(model) and, for ours,
                                       vmamba_min.compile_blocks (minutes per model on a CPU)
    python bench.py --compile-models blocks   only the compile_blocks rows (model: only the other)
    python bench.py --compile-models --compile-mode default,max-autotune-no-cudagraphs
                                       compiled rows per torch.compile mode, tagged in the label
    python bench.py --dtype float32,bfloat16   rows per dtype (bfloat16: autocast)
    python bench.py --report ...       also docs/results-<cpu|cuda>.md/.json and charts (report.py;
                                       --report-dir: elsewhere than docs/; it never replaces a
                                       page another program wrote, as gpu_report.py's cuda page)
    python bench.py --json             one JSON object (every row) instead of tables
    python bench.py --device cuda --scan --models --train --batch 1,128 --compile-models
        --report --report-dir DIR      on a GPU (naming one table, e.g. --train, runs only it)
Without --report or --json, the charts go to bench_out/ in the current folder. Exit status 1
when a table asked for failed or timed no row.

Scan tables: naive loop (scan.selective_scan_ref) against the chunked scan (scan.selective_scan),
eager and compiled, at VMamba-T's stage shapes (batch 1), fwd and fwd+bwd; a timing table and a
table of compile times and errors against the naive loop. Model tables: ours (vmamba_tiny_s1l8,
vanilla_vmamba_tiny) and, when timm is importable, four peers, all in THIS process, same batch,
resolution and dtype; inference and (--train) training step. A model's eager and compiled rows
are timed side by side, one call of each per round (benchkit.time_paired: the machine's speed
drifts more than their gap), and "t/eager" is the median of the per-round time ratios; a lone
row runs under torch.utils.benchmark. A compiled row's first call is reported apart as "compile
s". Peak memory: on the CPU in a fresh child process per row (benchkit.py says why), on CUDA
with max_memory_allocated in this process. Tables fit 120 columns.

Letters as in scan.py: B batch, K = 4 routes, D channels per route, L = H*W, N state size.
"""
import argparse
import math
import os
import statistics
import sys
import time
import traceback

import benchkit as bk
import report
import scaling

# -------------------------------------------------------------------------------- constants
DEVICE = "cpu"
DTYPE = "float32"             # a list such as float32,bfloat16 (bf16: scan inputs cast, autocast)
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
COMPILE_MODE = "default"      # torch.compile mode of the compiled model rows (a list)
OURS = ("vmamba_tiny_s1l8", "vanilla_vmamba_tiny")
PEERS = ("swin_tiny_patch4_window7_224", "convnext_tiny", "deit_small_patch16_224", "resnet50")
OUT_DIR = "bench_out"         # charts of a run without --report
REPORT_DIR = "docs"
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


def name_list(choices, what):
    """argparse type: a comma list of distinct names out of choices."""
    def parse(text):
        out = [t for t in text.split(",") if t]
        if not out or any(t not in choices for t in out) or len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"want {what} out of {', '.join(choices)}, "
                                             f"got {text!r}")
        return out
    return parse


def compile_modes(text):
    """argparse type: 'model,blocks' -> ["model", "blocks"]; '' -> [] (no compiled rows)."""
    out = [t for t in text.split(",") if t]
    bad = [t for t in out if t not in ("model", "blocks")]
    if bad or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"want model, blocks or model,blocks, got {text!r}")
    return out


def scaling_sizes(text):
    """argparse type of --scaling-res: scaling.res_list's sizes (distinct, >= 32, sorted)."""
    try:
        return scaling.res_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want distinct sizes >= 32 such as 224,320, got "
                                         f"{text!r}") from None


dtype_list = name_list(("float32", "bfloat16"), "dtypes")
stage_list = name_list(("1", "2", "3", "4"), "VMamba-T stages")
inductor_modes = name_list(tuple(bk.INDUCTOR_MODES), "torch.compile modes")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run (default: scan tables and model table)")
    what.add_argument("--scan", action="store_true", help="the scan tables")
    what.add_argument("--models", action="store_true", help="the model table (inference)")
    what.add_argument("--train", action="store_true", help="the training step table")
    what.add_argument("--scaling", action="store_true",
                      help="the resolution study: VMamba-T, DeiT-S, Swin-T from 224 px up")
    p.add_argument("--device", default=DEVICE, choices=("cpu", "cuda"))
    p.add_argument("--dtype", type=dtype_list, default=dtype_list(DTYPE),
                   help="float32, bfloat16 (autocast) or both: float32,bfloat16")
    p.add_argument("--batch", type=batch_list, default=batch_list(BATCH),
                   help=f"model/train tables: batch sizes, e.g. 1,8,32 (default {BATCH})")
    p.add_argument("--res", type=int, default=RES, help="model/train tables: image size")
    p.add_argument("--min-time", type=float, default=MIN_TIME, help="timed seconds per cell, >=")
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls before timing")
    p.add_argument("--stages", type=stage_list, default=stage_list(STAGES),
                   help="scan table: VMamba-T stages, e.g. 1,2,3,4")
    p.add_argument("--chunk", type=int, help="chunk size of the chunked scan (default: scan.py's)")
    p.add_argument("--naive-bwd", action="store_true", help="also the naive fwd+bwd (slow)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPILE,
                   help="the torch.compile column of the scan table (seconds per shape)")
    p.add_argument("--compile-models", type=compile_modes, nargs="?", metavar="MODES",
                   const=compile_modes(ALL_COMPILE_MODES), default=compile_modes(COMPILE_MODELS),
                   help="add compiled rows to the model/train tables: 'model' = "
                        "torch.compile(model), 'blocks' = vmamba_min.compile_blocks (ours "
                        "only); no value: both")
    p.add_argument("--compile-mode", type=inductor_modes, metavar="MODES",
                   help=f"torch.compile mode(s) of the compiled model rows, out of "
                        f"{', '.join(bk.INDUCTOR_MODES)} (the last two: CUDA graphs, CUDA "
                        f"only); a list gives rows per mode (default {COMPILE_MODE})")
    p.add_argument("--scaling-res", type=scaling_sizes, metavar="SIZES",
                   help="--scaling: image sizes (default: scaling.py's, by device)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="timm's models in the model, train and scaling tables (if importable)")
    p.add_argument("--all-models", action="store_true", help="also our models with the loop scan")
    p.add_argument("--only", type=lambda t: t.split(","), metavar="NAMES",
                   help="model/train tables: these models instead of the default list "
                        "(any of ours, any timm name), e.g. vanilla_vmamba_tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object, no tables")
    p.add_argument("--report", action="store_true",
                   help="write results-<device>.md, .json and charts (report.py) to --report-dir")
    p.add_argument("--report-dir", default=REPORT_DIR, metavar="DIR",
                   help=f"where --report writes (default {REPORT_DIR})")
    p.add_argument("--no-malloc-fix", action="store_true", help="keep glibc's malloc (erratic)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.scan or args.models or args.train or args.scaling):
        args.scan = args.models = True
    if args.compile_mode is None:
        args.compile_mode = inductor_modes(COMPILE_MODE)
    elif not args.compile_models:
        parser.error("--compile-mode: it sets the mode of compiled model rows; add "
                     "--compile-models")
    graphs = [m for m in args.compile_mode if m in bk.CUDA_GRAPH_MODES]
    if graphs and args.device != "cuda":
        parser.error(f"--compile-mode {','.join(graphs)}: CUDA graphs need --device cuda")
    for flag, value, least in (("--res", args.res, 4), ("--warmup", args.warmup, 0),
                               ("--chunk", args.chunk, 1), ("--min-time", args.min_time, 0)):
        if value is not None and not least <= value < math.inf:   # nan and inf: never ended
            parser.error(f"{flag} must be finite and >= {least}, got {value}")
    if args.scaling and len(args.dtype) > 1:
        parser.error("--scaling runs one dtype: give --dtype float32 or --dtype bfloat16")
    # an option for a table the run does not make was ignored (and recorded in the report's
    # configuration as if it applied)
    model_tables, models = args.models or args.train, "--models or --train"
    for flag, given, needs, tables in (
            ("--only", args.only is not None, model_tables, models),
            ("--batch", args.batch != batch_list(BATCH), model_tables, models),
            ("--res", args.res != RES, model_tables, models),
            ("--compile-models", args.compile_models != compile_modes(COMPILE_MODELS),
             model_tables, models),
            ("--all-models", args.all_models, args.models, "--models"),
            ("--stages", args.stages != stage_list(STAGES), args.scan, "--scan"),
            ("--naive-bwd", args.naive_bwd, args.scan, "--scan"),
            ("--no-compile", args.compile != COMPILE, args.scan, "--scan"),
            ("--chunk", args.chunk is not None, args.scan or model_tables,
             "--scan, --models or --train"),
            ("--scaling-res", args.scaling_res is not None, args.scaling, "--scaling"),
            ("--report-dir", args.report_dir != REPORT_DIR, args.report, "--report")):
        if given and not needs:
            parser.error(f"{flag} is for {tables}, which this run does not make")
    if args.only is not None:
        check_model_names(parser, args.only, args.peers)
    if args.report:
        bk.check_output_folder(parser, "--report-dir", args.report_dir)
    page = os.path.join(args.report_dir, f"results-{args.device}.md")
    author = report.written_by_another(page) if args.report else None
    if author:
        parser.error(f"--report would replace {page}, which {author} wrote (README quotes "
                     f"it): give --report-dir DIR to write elsewhere")
    return parser, args


def check_model_names(parser, names, peers_allowed=True):
    """--only: distinct names, each one of our configurations or (unless --no-peers) a timm
    model name."""
    import vmamba_min
    if not names or "" in names or len(set(names)) != len(names):
        parser.error(f"--only: want distinct model names (ours: {', '.join(vmamba_min.CONFIGS)}; "
                     f"or timm's), got {','.join(names)!r}")
    bad = [n for n in names if bk.is_ours(n) and n not in vmamba_min.CONFIGS]
    peers = [n for n in names if not bk.is_ours(n)]
    if peers and not peers_allowed:
        parser.error(f"--only {','.join(peers)}: timm models, which --no-peers leaves out")
    if peers and bk.timm_available():
        import timm
        bad += [n for n in peers if not timm.is_model(n)]
    elif peers:
        parser.error(f"--only {','.join(peers)}: not ours ({', '.join(vmamba_min.CONFIGS)}), so "
                     f"timm models, and timm is not importable here")
    if bad:
        parser.error(f"--only: want distinct model names (ours: {', '.join(vmamba_min.CONFIGS)}; "
                     f"or timm's), got {','.join(names)!r}; unknown: {bad}")


# -------------------------------------------------------------------------------- scan tables
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


def scan_shape_rows(gen, stage, args, dtype="float32"):
    import torch
    import scan
    inputs, shape = scan_inputs(gen, stage, SCAN_BATCH, args.device, getattr(torch, dtype))
    kw = {} if args.chunk is None else {"chunk_size": args.chunk}
    chunked = lambda *a, **k: scan.selective_scan(*a, **k, **kw)   # noqa: E731
    rows, fns = [], {"eager": chunked}
    runs = scan_passes(inputs, shape, args.device)
    for pass_, run in runs.items():
        row = {"scan": gen, "stage": stage, "shape": "x".join(map(str, shape)), "pass": pass_,
               "dtype": dtype}
        naive = pass_ == "fwd" or args.naive_bwd
        bk.log(f"{gen} stage {stage} {pass_} {dtype}: {'naive loop (one call), ' if naive else ''}"
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


SCAN_TIME_COLS = [
    ("scan", "scan", "{}"), ("stage", "stage", "{}"), ("shape", "shape", "{}"),
    ("pass", "pass", "{}"), ("naive_ms", "naive ms", "{:.1f}"), ("eager_ms", "eager ms", "{:.1f}"),
    ("eager_iqr_ms", "iqr", "{:.1f}"), ("eager_x", "x", "{:.1f}x"), ("eager_bx", "bwd x", "{:.2f}"),
    ("compiled_ms", "compiled ms", "{:.1f}"), ("compiled_iqr_ms", "iqr", "{:.1f}"),
    ("compiled_x", "x", "{:.1f}x"), ("compiled_bx", "bwd x", "{:.2f}")]
SCAN_ACCURACY_COLS = [
    ("scan", "scan", "{}"), ("stage", "stage", "{}"), ("pass", "pass", "{}"),
    ("compile_s", "compile s", "{:.1f}"), ("err_vs", "err vs", "{}"),
    ("eager_err", "max|err| eager", "{:.1e}"), ("eager_rel", "rel", "{:.1e}"),
    ("compiled_err", "max|err| compiled", "{:.1e}"), ("compiled_rel", "rel", "{:.1e}")]
SCAN_TIME_NOTES = [
    "shape: B x K*D x L x N; eager, compiled: scan.selective_scan, eager and under "
    "torch.compile (the chunked scan; compiled on CUDA it dispatches to the associative scan, "
    "scan_assoc); naive: the loop (scan.selective_scan_ref), ONE timed call (it is slow)",
    "ms: median (iqr) over >= --min-time s after warm-up; x: speed-up over naive; bwd x: fwd+bwd "
    "time / fwd time of the same scan, timed side by side (one call of each per round), median "
    "over rounds",
    "fwd: under no_grad; fwd+bwd: backward of <y, g> into all 7 inputs; inputs at official init "
    "(delta_bias, A = -(1..N)), softplus on"]
SCAN_COMPILE_NOTE = ("compile s: first call of the compiled scan (fresh Dynamo cache per shape; "
                     "Inductor's disk cache counts)")
SCAN_ERROR_NOTE = ("err: fwd rows compare y, fwd+bwd rows du, against the naive loop or, where "
                   "it was not run, eager (err vs); rel = max|err| / max|ref|")


def scan_table(args, progress=None):
    """Every scan row; progress(rows), if given, after each shape."""
    rows = []
    for dtype in args.dtype:
        for s in args.stages:
            for g in SCAN_GENS:
                rows += scan_shape_rows(g, int(s), args, dtype)
                if progress:
                    progress(rows)
    return rows


# -------------------------------------------------------------------------------- model tables
def model_specs(args, train=False):
    """Every row of the model (or training) table, in timing order: per dtype and batch, ours
    then peers, each model's eager row followed by its compiled rows (kinds x torch.compile
    modes)."""
    base = dict(res=args.res, device=args.device, train=train)
    ours_kw = {} if args.chunk is None else {"chunk_size": args.chunk}
    peers = PEERS if (args.peers and bk.timm_available()) else ()
    names = args.only or OURS + peers
    compiled = [(kind, mode) for kind in args.compile_models for mode in args.compile_mode]
    specs = []
    for dtype in args.dtype:
        for batch in args.batch:
            for model in names:
                ours = bk.is_ours(model)
                row = dict(base, model=model, batch=batch, dtype=dtype,
                           overrides=ours_kw if ours else {})
                specs.append(dict(row, compile=False, compile_mode=None))
                specs += [dict(row, compile=kind, compile_mode=mode) for kind, mode in compiled
                          if kind != "blocks" or ours]
                if ours and args.all_models and not train:
                    specs.append(dict(row, compile=False, compile_mode=None,
                                      overrides=dict(scan="reference")))   # no chunks
    return specs


def label(r):
    """Row labels: who wrote the model, which scan, eager / compiled[tag] / compile_blocks[tag]
    (the loop-scan rows of --all-models: "loop scan", eager)."""
    scan_ = r.get("overrides", {}).get("scan", "chunked") if bk.is_ours(r["model"]) else "-"
    return {"source": "ours" if bk.is_ours(r["model"]) else "timm", "scan": scan_,
            "mode": "loop scan" if scan_ == "reference" else bk.mode_label(r)}


def groups(specs):
    """Consecutive specs of one model, batch, dtype and overrides (eager, then compiled)."""
    out = []
    keys = ("model", "batch", "dtype", "overrides")
    for s in specs:
        if out and all(out[-1][0][k] == s[k] for k in keys):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def model_rows(specs, args, progress=None):
    """Time every spec in this process: a model's eager and compiled rows side by side
    (benchkit.run_group), a lone row on its own (run_row); then memory (children on CPU).
    progress(rows), if given, is called with the rows so far after each group and after each
    row's memory."""
    rows = []
    for group in groups(specs):
        s = group[0]
        bk.log(f"rows {len(rows) + 1}-{len(rows) + len(group)}/{len(specs)}: {s['model']} batch "
               f"{s['batch']} {s['dtype']} {', '.join(label(g)['mode'] for g in group)}")
        timed = (bk.run_group(group, args.min_time, args.warmup) if len(group) > 1 else
                 [bk.run_row(s, args.min_time, args.warmup)])
        rows += [{**r, **label(r)} for r in timed]
        if progress:
            progress(rows)
    return bk.add_memory(rows, progress)


MODEL_COLS = [("model", "model", "{}"), ("mode", "mode", "{}"), ("batch", "batch", "{}"),
              ("ms", "ms/batch", "{:.1f}"), ("iqr_ms", "iqr", "{:.1f}"),
              ("img_s", "img/s", bk.img_s), ("vs_eager", "t/eager", "{:.2f}"),
              ("calls", "calls", "{}"), ("peak_mb", "peak MB", "{:.0f}"),
              ("compile_s", "compile s", "{:.1f}")]
TAG_MEANING = {"max-autotune-no-cudagraphs": "", "reduce-overhead": " (CUDA graphs)",
               "max-autotune": " (CUDA graphs)"}


def model_notes(rows):
    notes = ["ms/batch: median (iqr) over >= --min-time s after warm-up, in one process; a "
             f"model's eager and compiled rows side by side (one call of each per round, >= "
             f"{bk.MIN_ROUNDS} rounds), lone rows one after another (torch.utils.benchmark)",
             "t/eager: median over rounds of the row's time / its eager row's in the same round "
             "(< 1: faster)",
             "peak MB: extra memory of one call over what is resident before it (CPU: rise of "
             "peak RSS in a child process per row; CUDA: max_memory_allocated, a CUDA graph's "
             "pool not counted)"]
    if any(r["compile"] for r in rows):
        modes = dict.fromkeys(r.get("compile_mode") or "default" for r in rows if r["compile"])
        tags = [f"[{bk.INDUCTOR_MODES[m]}] mode={m}{TAG_MEANING[m]}" for m in modes
                if bk.INDUCTOR_MODES.get(m)]
        kinds = {r["compile"] for r in rows}
        what = (["compiled: torch.compile(model)"] if "model" in kinds else []) + \
            (["compile_blocks: vmamba_min.compile_blocks (each block compiled, ours only)"]
             if "blocks" in kinds else [])
        notes.append("; ".join(what + (tags or ["torch.compile's default mode"])))
        notes.append("compile s: first call (Inductor's disk cache and what the run compiled "
                     "before count: the run's first compiled row pays Inductor's start-up)")
    if any(r.get("scan") == "reference" for r in rows):
        notes.append("loop scan: our model, eager, with the naive loop scan (--all-models)")
    params = {r["model"]: r["params_m"] for r in rows if r.get("params_m")}
    if params:
        notes.append("params M: " + ", ".join(f"{m} {p:.1f}" for m, p in params.items()))
    return notes


def dtype_title(dtype):
    return "float32" if dtype == "float32" else f"{dtype} autocast"


# -------------------------------------------------------------------------------- main
def render(result):
    """Every table as printed: [(name, text)], name one of scan, scan_accuracy, models, train,
    scaling, summary."""
    out, res = [], result["config"]["res"]
    for dtype in dict.fromkeys(r["dtype"] for r in result.get("scan", [])):
        rows = [r for r in result["scan"] if r["dtype"] == dtype]
        compiled = any("compile_s" in r or "compiled" in r.get("error", "") for r in rows)
        out.append(("scan", bk.format_table(
            f"selective scan ({dtype}): naive loop vs chunked" +
            (", eager and torch.compile" if compiled else "") + ", ms",
            rows, SCAN_TIME_COLS, SCAN_TIME_NOTES, error_col="compiled_ms",
            optional=("compiled_ms", "compiled_iqr_ms", "compiled_x", "compiled_bx"))))
        out.append(("scan_accuracy", bk.format_table(
            f"selective scan ({dtype}): {'compile time and ' if compiled else ''}errors", rows,
            SCAN_ACCURACY_COLS,
            ([SCAN_COMPILE_NOTE] if compiled else []) + [SCAN_ERROR_NOTE],
            error_col="compiled_err",
            optional=("compile_s", "compiled_err", "compiled_rel"))))
    for key, title in (("models", "models: inference (no_grad)"),
                       ("train", "training step: forward + cross-entropy + backward"
                                 " + fused AdamW")):
        for dtype in dict.fromkeys(r["dtype"] for r in result.get(key, [])):
            rows = [r for r in result[key] if r["dtype"] == dtype]
            out.append((key, bk.format_table(
                f"{title}, {res}x{res}, {dtype_title(dtype)}", rows, MODEL_COLS,
                model_notes(rows), optional=("iqr_ms", "vs_eager", "compile_s"),
                error_col="ms")))
    if "scaling" in result:
        out.append(("scaling", scaling.format_study(result["scaling"])))
    out += [("summary", t) for t in report.format_summary(result.get("summary", []))]
    return out


def print_results(result):
    for _, text in render(result):
        print("\n" + text)
    for note in result.get("notes", []):
        print(*bk.wrap(note), sep="\n")
    for name, path in result.get("charts", {}).items():
        print(f"  wrote {path}" if path else f"  no {name} chart: {report.MATPLOTLIB_HINT}")


def run_all(args, t0=None):
    """Every table asked for, in order. A table that raises is a note and the others still run;
    with --report the page is rewritten after each table (marked partial until the end), so a
    run killed at a time limit leaves what it measured."""
    t0 = time.perf_counter() if t0 is None else t0
    result = {"header": bk.header(args.device, args.dtype),
              "config": {k: getattr(args, k) for k in (
                  "device", "dtype", "batch", "res", "min_time", "warmup", "stages", "chunk",
                  "compile", "compile_models", "compile_mode", "peers", "only", "all_models",
                  "scaling_res")},
              "notes": []}
    if not args.json:
        bk.print_header(result["header"])
    if args.peers and not bk.timm_available() and (args.models or args.train) and \
            args.only is None:          # --only names the models: none of timm's was asked for
        result["notes"].append(bk.PEERS_HINT)
    scaling_res = args.scaling_res or scaling.res_list(scaling.RES[args.device])
    def partial(name):
        """After each shape, row group or memory figure: the page so far, for a run that is
        cut off."""
        def write(rows):
            if not args.report:
                return
            result[name] = rows
            result["summary"] = report.summarize(result)
            result["wall_s"] = time.perf_counter() - t0
            rest = ", ".join(todo[1:])
            result["partial"] = (f"partial: the run is in its {name} table"
                                 + (f" and has yet to do {rest}" if rest else ""))
            report.write(result, render(result), args.report_dir, args.device)
        return write
    tables = [("scan", args.scan, lambda: scan_table(args, partial("scan"))),
              ("models", args.models,
               lambda: model_rows(model_specs(args), args, partial("models"))),
              ("train", args.train,
               lambda: model_rows(model_specs(args, train=True), args, partial("train"))),
              ("scaling", args.scaling, lambda: scaling.study(
                  scaling_res, scaling.BATCH, args.device, args.dtype[0], args.min_time,
                  args.warmup, peers=args.peers, progress=partial("scaling")))]
    todo = [name for name, wanted, _ in tables if wanted]
    for name, wanted, run in tables:
        if not wanted:
            continue
        try:
            result[name] = run()
        except Exception as e:           # noqa: BLE001 -- the other tables still mean something
            traceback.print_exc()
            result["notes"].append(f"the {name} table failed: {bk.error_text(e)}")
        todo.remove(name)
        result["summary"] = report.summarize(result)
        result["wall_s"] = time.perf_counter() - t0
        if args.report and todo:
            result["partial"] = f"partial: the run has yet to do {', '.join(todo)}"
            report.write(result, render(result), args.report_dir, args.device)
    result.pop("partial", None)
    result["summary"] = report.summarize(result)
    return result


def main(argv=None):
    parser, args = parse_args(argv)
    bk.reexec_with_malloc_fix(args.no_malloc_fix)  # before torch: glibc reads them at start
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch.cuda.is_available() is False on this machine "
                     f"(torch {torch.__version__}); use --device cpu")
    if args.report:
        bk.make_output_folder(parser, "--report-dir", args.report_dir)
    bk.quiet_torch(args.device)
    t0 = time.perf_counter()
    result = run_all(args, t0)
    result["wall_s"] = time.perf_counter() - t0
    if args.report:
        written = report.write(result, render(result), args.report_dir, args.device)
        result["notes"].append("wrote " + ", ".join(written["paths"]))
        result["charts"] = {k: v for k, v in written["charts"].items() if v is None}
    elif not args.json:
        result["charts"] = report.make_charts(result, OUT_DIR)
    if args.json:
        import json
        print(json.dumps(report.clean(result), indent=1))
    else:
        print_results(result)
        print(f"\ntotal {result['wall_s']:.0f} s")
    empty = unmeasured(result, [name for name in ("scan", "models", "train", "scaling")
                                if getattr(args, name)])
    if empty:                           # a script or CI must not take this run for a result
        print(f"bench.py: nothing measured in {', '.join(empty)} (see the errors above)",
              file=sys.stderr)
        return 1
    return 0


def unmeasured(result, tables):
    """The tables asked for that failed, or in which no row has a timing (a scan row keeps
    its naive and eager times when its compile fails, with "error" set)."""
    def rows(table):
        got = result.get(table)
        return got.get("rows", []) if isinstance(got, dict) else (got or [])

    def timed(row):
        return any(isinstance(row.get(k), (int, float))
                   for k in ("ms", "naive_ms", "eager_ms", "compiled_ms"))
    return [t for t in tables if not any(timed(r) for r in rows(t))]


if __name__ == "__main__":
    sys.exit(main())
