"""bench.py: the selective scan and VMamba models side by side, in plain PyTorch.

    python bench.py                 scan table + model table (about 3 minutes on 2 CPU cores)
    python bench.py --scan          only the scan table
    python bench.py --models        only the model table
    python bench.py --compile-models  add compiled models to the model table (minutes each)
    python bench.py --scaling       input-scaling study: VMamba-T vs a ViT of similar size
    python bench.py --flops         params and GFLOPs of the nine released configs vs the paper
    python bench.py --json          one JSON object instead of tables
    python bench.py --help          every flag (stages, batch, repeats, chunk, device, ...)

Scan table: naive loop (scan.selective_scan_ref) vs chunked scan (scan.selective_scan) eager
and under torch.compile, at VMamba-T's stage shapes, forward and forward+backward; error of the
chunked scan against the naive loop computed in the same run.
Model table: images/s and peak memory per configuration, each in its own subprocess.
All times are medians of timed runs after warm-up; a compiled function's first call (tracing
and code generation) is reported separately as "compile s".

Letters as in scan.py: B batch, K = 4 routes, D channels per route, L = H*W, N state size.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

# -------------------------------------------------------------------------------- constants
DEVICE = "cpu"
DTYPE = "float32"             # float32 | bfloat16 (bf16: scan inputs cast, models autocast)
STAGES = "1"                  # VMamba-T stages for the scan table, e.g. "1,2,3,4"
SCAN_BATCH = 1
MODEL_BATCH = 1
RES = 224
WARMUP = 1                    # untimed calls before timing (after the compile call, if any)
REPEATS = 3                   # timed calls; the median is reported
NAIVE_REPEATS = 1             # the naive loop is slow: timed calls, no warm-up
# torch.compile: the scan compiles in seconds per shape, so its column is on by default; a whole
# model takes 2-3 minutes of Inductor time on a 2-core CPU, so compiled model rows are opt-in.
COMPILE = True
COMPILE_MODELS = False
MODELS = ("vmamba_tiny_s1l8", "vanilla_vmamba_tiny")
SCALING_RES = {"cpu": (224, 320, 448, 640), "cuda": (224, 384, 512, 640, 768, 1024)}
OUT_DIR = "bench_out"
# glibc malloc gives freed blocks of 128 KB..32 MB back to the OS and faults them in again on
# the next call; that made the same eager code 2-60x slower and erratic (PERF-NOTES.md).
MALLOC_FIX = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
_REEXEC_MARK = "VMAMBA_BENCH_REEXEC"

# VMamba-T at 224x224: stage s (1..4) sees an (56 / 2^(s-1))^2 map with width C = 96 * 2^(s-1).
# v0 = vanilla_vmamba_tiny (D = 2C, N = 16), v2 = vmamba_tiny_s1l8 (D = C, N = 1); K = 4.
SCAN_GENS = {"v0": dict(ssm_ratio=2, N=16), "v2": dict(ssm_ratio=1, N=1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run (default: scan table and model table)")
    what.add_argument("--scan", action="store_true", help="the scan table")
    what.add_argument("--models", action="store_true", help="the model table")
    what.add_argument("--scaling", action="store_true",
                      help="input-scaling study (VMamba-T vs ViT); writes bench_out/scaling.csv"
                           " and, with matplotlib, scaling.png")
    what.add_argument("--flops", action="store_true",
                      help="params and GFLOPs (flops.py, meta device: seconds) vs the paper")
    p.add_argument("--device", default=DEVICE, choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=DTYPE, choices=("float32", "bfloat16"))
    p.add_argument("--stages", default=STAGES, help="scan table: VMamba-T stages, e.g. 1,2,3,4")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size (default {SCAN_BATCH} for scans, {MODEL_BATCH} for models)")
    p.add_argument("--res", default=None,
                   help=f"model table: one resolution (default {RES}); --scaling: a list "
                        "such as 224,512,768,1024")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed calls (median reported)")
    p.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls before timing")
    p.add_argument("--naive-repeats", type=int, default=NAIVE_REPEATS)
    p.add_argument("--chunk", type=int, default=None,
                   help="chunk size of the chunked scan (default: scan.py's default)")
    p.add_argument("--naive-bwd", action="store_true",
                   help="also time the naive loop's forward+backward (minutes per shape)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=COMPILE,
                   help="the torch.compile column of the scan table (seconds per shape)")
    p.add_argument("--compile-models", action=argparse.BooleanOptionalAction,
                   default=COMPILE_MODELS,
                   help="add compiled rows to the model table (2-3 minutes per model on a CPU)")
    p.add_argument("--all-models", action="store_true",
                   help="model table: also the reference (loop) scan for every model")
    p.add_argument("--scaling-compile", action="store_true",
                   help="--scaling: compile both models (default eager)")
    p.add_argument("--sdpa-math", action="store_true",
                   help="--scaling: force SDPA's math backend, which materialises the L x L "
                        "attention matrix (the default fused kernels do not)")
    p.add_argument("--json", action="store_true", help="print one JSON object, no tables")
    p.add_argument("--no-malloc-fix", action="store_true",
                   help="keep glibc's default malloc settings (eager timings become erratic)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.scan or args.models or args.scaling or args.flops):
        args.scan = args.models = True
    return args


def malloc_fix(args):
    """Re-execute this script with MALLOC_FIX in its environment, unless already set."""
    if args.no_malloc_fix or args._worker or any(k in os.environ for k in MALLOC_FIX):
        return
    env = {**os.environ, **MALLOC_FIX, _REEXEC_MARK: "1"}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    malloc_fix(ARGS)           # before importing torch: the new process starts from scratch

import torch                   # noqa: E402
import torch.nn as nn          # noqa: E402
import torch.nn.functional as F  # noqa: E402


# -------------------------------------------------------------------------------- utilities
def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds for one call of fn, and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median_time(fn, device, repeats, warmup):
    """Median seconds of `repeats` calls after `warmup` calls, and the last call's result."""
    for _ in range(warmup):
        fn()
    runs = [timed(fn, device) for _ in range(max(1, repeats))]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def load_note():
    """Other processes on the machine inflate every timing: say how busy it was."""
    try:
        one_min = os.getloadavg()[0]
    except (AttributeError, OSError):
        return "unknown"
    busy = " (other processes compete: timings inflated)" if one_min > 1.5 * os.cpu_count() \
        else ""
    return f"{one_min:.1f} on {os.cpu_count()} cores at start{busy}"


def header(args):
    if args.device == "cuda":
        dev = f"cuda ({torch.cuda.get_device_name()})"
    else:
        dev = f"cpu ({cpu_name()}, {os.cpu_count()} cores)"
    if args.no_malloc_fix:
        malloc = "glibc defaults (--no-malloc-fix): eager CPU timings may be slow and erratic"
    else:
        how = ("set by bench.py (re-executed itself)" if os.environ.get(_REEXEC_MARK)
               else "from your environment")
        malloc = " ".join(f"{k}={os.environ.get(k, '(unset)')}" for k in MALLOC_FIX) + \
            f", {how}"
    return {"torch": torch.__version__, "device": dev, "threads": torch.get_num_threads(),
            "dtype": args.dtype, "malloc": malloc, "load": load_note(),
            "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0]}


def print_table(title, rows, cols, notes=()):
    """rows: list of dicts; cols: list of (key, heading, format)."""
    def fmt(v, f):
        if v is None:
            return "-"
        return f.format(v) if not isinstance(v, str) else v
    cells = [[h for _, h, _ in cols]] + [[fmt(r.get(k), f) for k, _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    print(f"\n{title}")
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for n in notes:
        print(f"  {n}")


# -------------------------------------------------------------------------------- scan table
def scan_inputs(gen, stage, batch, device, dtype, seed=0):
    """Inputs shaped and scaled as in VMamba-T's SS2D at official initialisation."""
    g = torch.Generator().manual_seed(seed)
    C = 96 * 2 ** (stage - 1)
    L = (56 // 2 ** (stage - 1)) ** 2
    N = SCAN_GENS[gen]["N"]
    KD = 4 * int(SCAN_GENS[gen]["ssm_ratio"] * C)
    randn = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    u = randn(batch, KD, L)
    delta = 0.1 * randn(batch, KD, L)   # dt_proj output before its bias: small at init
    # dt_projs_bias: inverse softplus of dt = exp(uniform(log 1e-3, log 1e-1)), clamped at 1e-4
    dt = torch.exp(torch.rand(KD, generator=g) * math.log(100) + math.log(1e-3)).clamp(min=1e-4)
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(KD, 1)  # -exp(A_logs), A_logs=log(1..N)
    B, Cm = randn(batch, 4, N, L), randn(batch, 4, N, L)
    D = torch.ones(KD)
    ts = [u, delta, A, B, Cm, D, delta_bias]
    ts = [t.to(device=device, dtype=dtype if i in (0, 1, 3, 4) else torch.float32)
          for i, t in enumerate(ts)]
    return ts, (batch, KD, L, N)


def bench_scan_shape(gen, stage, args, log_rows):
    import scan
    device, dtype = args.device, getattr(torch, args.dtype)
    batch = args.batch or SCAN_BATCH
    inputs, shape = scan_inputs(gen, stage, batch, device, dtype)
    kw = {} if args.chunk is None else {"chunk_size": args.chunk}
    naive = scan.selective_scan_ref
    chunked = lambda *a, **k: scan.selective_scan(*a, **k, **kw)   # noqa: E731
    gy = torch.randn(shape[:3], generator=torch.Generator().manual_seed(1)).to(device)

    def fwd(fn):
        with torch.no_grad():
            return fn(*inputs, delta_softplus=True)

    leaves = [t.detach().requires_grad_() for t in inputs]

    def fwd_bwd(fn):
        for t in leaves:
            t.grad = None
        y = fn(*leaves, delta_softplus=True)
        y.backward(gy)
        return leaves[0].grad                                 # du, compared below

    def err(out, ref):
        if ref is None:
            return None, None
        e = (out.float() - ref.float()).abs().max().item()
        return e, e / max(ref.float().abs().max().item(), 1e-30)

    rows = []
    name = f"{gen} stage {stage}"
    for pass_, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        row = {"scan": gen, "stage": stage, "shape": "x".join(map(str, shape)), "pass": pass_}
        # naive loop: the reference for the error columns
        ref = None
        if pass_ == "fwd" or args.naive_bwd:
            log(f"{name} {pass_}: naive loop ({args.naive_repeats} run(s))")
            ts = [timed(lambda: run(naive), device) for _ in range(args.naive_repeats)]
            row["naive_ms"] = 1e3 * statistics.median(t for t, _ in ts)
            ref = ts[-1][1].detach().clone()
        else:
            row["naive_ms"] = "skipped (--naive-bwd)"
        log(f"{name} {pass_}: chunked eager")
        sec, out_eager = median_time(lambda: run(chunked), device, args.repeats, args.warmup)
        row["eager_ms"], out_eager = 1e3 * sec, out_eager.detach().clone()
        row["eager_err"], row["eager_rel"] = err(out_eager, ref)
        if ref is not None:
            row["err_vs"] = "naive"
        elif args.compile:              # no naive gradient: compare compiled with eager
            ref, row["err_vs"] = out_eager, "eager"
        if not args.compile:
            row["compiled_ms"] = "skipped (--compile)"
        else:
            torch._dynamo.reset()       # fresh cache per shape: no recompile limit, honest time
            comp = torch.compile(chunked, fullgraph=True, dynamic=False)
            log(f"{name} {pass_}: torch.compile (first call; can take minutes)")
            row["compile_s"], out = timed(lambda: run(comp), device)
            log(f"{name} {pass_}: chunked compiled")
            sec, out = median_time(lambda: run(comp), device, args.repeats, args.warmup)
            row["compiled_ms"] = 1e3 * sec
            row["compiled_err"], row["compiled_rel"] = err(out.detach(), ref)
        for k in ("eager", "compiled"):
            if isinstance(row.get("naive_ms"), float) and isinstance(row.get(f"{k}_ms"), float):
                row[f"{k}_x"] = row["naive_ms"] / row[f"{k}_ms"]
        rows.append(row)
        log_rows(row)
    return rows


def scan_table(args):
    rows = []
    stages = [int(s) for s in args.stages.split(",")]
    for stage in stages:
        for gen in SCAN_GENS:
            rows += bench_scan_shape(gen, stage, args, lambda r: None)
    return rows


SCAN_COLS = [("scan", "scan", "{}"), ("stage", "stage", "{}"), ("shape", "B x K*D x L x N", "{}"),
             ("pass", "pass", "{}"), ("naive_ms", "naive ms", "{:.1f}"),
             ("eager_ms", "chunked ms", "{:.1f}"), ("eager_x", "x", "{:.1f}x"),
             ("compiled_ms", "compiled ms", "{:.1f}"), ("compiled_x", "x", "{:.1f}x"),
             ("compile_s", "compile s", "{:.1f}"), ("err_vs", "err vs", "{}"),
             ("eager_err", "max|err| chunked", "{:.1e}"), ("eager_rel", "rel", "{:.1e}"),
             ("compiled_err", "max|err| compiled", "{:.1e}"), ("compiled_rel", "rel", "{:.1e}")]


# -------------------------------------------------------------------------------- models
class Attention(nn.Module):
    """Global multi-head self-attention through F.scaled_dot_product_attention."""

    def __init__(self, C, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x):                                    # (B, L, C)
        Bn, L, C = x.shape
        qkv = self.qkv(x).view(Bn, L, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                 # (B, heads, L, C/heads) each
        x = F.scaled_dot_product_attention(q, k, v)          # (B, heads, L, C/heads)
        return self.proj(x.transpose(1, 2).reshape(Bn, L, C))


class ViTBlock(nn.Module):
    def __init__(self, C, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(C), Attention(C, heads)
        self.norm2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The attention baseline of --scaling: DeiT-S shape (patch 16, width 384, depth 12, 6 heads).

    VMamba-T is hierarchical (widths 96..768), so no plain ViT matches its width and depth
    exactly; DeiT-S is the ViT the paper compares VMamba-T with, and has similar parameters
    (22M vs 30M) and FLOPs at 224 (4.6G vs 4.9G). Mean-pooled tokens, no class token.
    """

    def __init__(self, res, C=384, depth=12, heads=6, patch=16, num_classes=1000):
        super().__init__()
        self.embed = nn.Conv2d(3, C, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (res // patch) ** 2, C))
        self.blocks = nn.Sequential(*[ViTBlock(C, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(C), nn.Linear(C, num_classes)

    def forward(self, x):                                    # (B, 3, H, W)
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos   # (B, L, C)
        return self.head(self.norm(self.blocks(x)).mean(1))  # (B, num_classes)


def make_model(spec):
    if spec["model"] == "vit_deit_s":
        return ViT(spec["res"])
    import vmamba_min
    kw = {} if spec.get("chunk") is None else {"chunk_size": spec["chunk"]}
    return vmamba_min.build(spec["model"], scan=spec["scan"], **kw)


class Malloc:
    """glibc's malloc knobs, switched at run time (mallopt) for the memory measurement."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4

    def __init__(self):
        try:
            import ctypes
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt
        except (OSError, AttributeError):
            self.libc = None     # not glibc: no honest CPU memory number

    def give_back(self):
        """Large blocks from mmap, returned to the OS on free: RSS then follows live tensors."""
        self.libc.mallopt(self.M_MMAP_MAX, 1 << 16)
        self.libc.mallopt(self.M_MMAP_THRESHOLD, 128 << 10)
        self.libc.mallopt(self.M_TRIM_THRESHOLD, 128 << 10)
        self.libc.malloc_trim(0)

    def keep(self):
        """Back to MALLOC_FIX (freed memory stays with the process), unless opted out."""
        if all(k in os.environ for k in MALLOC_FIX):
            self.libc.mallopt(self.M_MMAP_MAX, int(os.environ["MALLOC_MMAP_MAX_"]))
            self.libc.mallopt(self.M_TRIM_THRESHOLD, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb(fn, device):
    """Extra memory one call of fn needs on top of what is resident before it (weights, code).

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux, glibc): rise of the process's peak RSS
    (VmHWM, reset through /proc/self/clear_refs) over one call, made while malloc returns large
    blocks to the OS (under MALLOC_FIX freed tensors would stay resident and hide the peak).
    """
    import gc
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    malloc = Malloc()
    if malloc.libc is None or not os.path.exists("/proc/self/clear_refs"):
        return None
    malloc.give_back()
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")             # resets VmHWM to the current RSS
    fn()
    peak = _status_mb("VmHWM") - base
    malloc.keep()
    return peak


def worker(spec):
    """One model configuration, in its own process: compile, memory, then timing."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    model = make_model(spec).eval().to(device)
    x = torch.randn(spec["batch"], 3, spec["res"], spec["res"], device=device)
    fn = torch.compile(model, fullgraph=True, dynamic=False) if spec["compile"] else model
    if spec.get("sdpa_math"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa_kernel(SDPBackend.MATH).__enter__()

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=dtype,
                                             enabled=dtype != torch.float32):
            out = fn(x)
        assert out.shape == (spec["batch"], 1000), out.shape
        return out

    compile_s = timed(run, device)[0] if spec["compile"] else None
    peak_mb = peak_memory_mb(run, device)           # also a warm-up call
    repeats = spec["repeats"] if spec["scan"] != "reference" else min(spec["repeats"], 2)
    sec = median_time(run, device, repeats, spec["warmup"])[0]
    return {**spec, "ms_per_batch": 1e3 * sec, "img_s": spec["batch"] / sec,
            "compile_s": compile_s, "peak_mb": peak_mb,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def run_worker(spec):
    """Run `worker(spec)` in a fresh process (isolated memory and compile caches)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {**spec, "error": f"worker exited with {proc.returncode} (see stderr)"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_specs(args):
    res = int(args.res) if args.res else RES
    base = dict(device=args.device, dtype=args.dtype, batch=args.batch or MODEL_BATCH, res=res,
                repeats=args.repeats, warmup=args.warmup, chunk=args.chunk)
    specs = []
    for m in MODELS:
        specs.append(dict(base, model=m, scan="chunked", compile=False))
        if args.compile_models:
            specs.append(dict(base, model=m, scan="chunked", compile=True))
        # The loop scan costs one Python step per position: affordable only with N = 1.
        if m == "vmamba_tiny_s1l8" or args.all_models:
            specs.append(dict(base, model=m, scan="reference", compile=False))
    return specs


def model_table(args):
    rows = []
    for i, spec in enumerate(model_specs(args)):
        log(f"model {i + 1}: {spec['model']} scan={spec['scan']} "
            f"{'compiled' if spec['compile'] else 'eager'} batch {spec['batch']} "
            f"{spec['res']}x{spec['res']}")
        rows.append(run_worker(spec))
    return rows


MODEL_COLS = [("model", "model", "{}"), ("scan", "scan", "{}"),
              ("mode", "mode", "{}"), ("batch", "batch", "{}"), ("res", "res", "{}"),
              ("ms_per_batch", "ms/batch", "{:.0f}"), ("img_s", "img/s", "{:.2f}"),
              ("peak_mb", "peak MB", "{:.0f}"), ("compile_s", "compile s", "{:.1f}"),
              ("error", "error", "{}")]


def mode_of(r):
    return "compiled" if r["compile"] else "eager"


# -------------------------------------------------------------------------------- scaling
def scaling(args):
    res_list = [int(r) for r in args.res.split(",")] if args.res else SCALING_RES[args.device]
    rows = []
    for model in ("vmamba_tiny_s1l8", "vit_deit_s"):
        for res in res_list:
            spec = dict(device=args.device, dtype=args.dtype, batch=args.batch or 1, res=res,
                        repeats=max(1, min(args.repeats, 2)), warmup=args.warmup,
                        chunk=args.chunk, model=model, scan="chunked",
                        compile=args.scaling_compile, sdpa_math=args.sdpa_math)
            log(f"scaling: {model} {res}x{res}")
            rows.append(run_worker(spec))
    os.makedirs(OUT_DIR, exist_ok=True)
    keys = ["model", "res", "batch", "ms_per_batch", "img_s", "peak_mb", "compile_s", "error"]
    with open(os.path.join(OUT_DIR, "scaling.csv"), "w") as f:
        f.write(",".join(keys) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + "\n")
    growth = {}
    for model in ("vmamba_tiny_s1l8", "vit_deit_s"):
        ok = [r for r in rows if r["model"] == model and "error" not in r]
        if len(ok) >= 2:
            a, b = ok[0], ok[-1]
            # L grows as res^2: exponent p in time ~ L^p (1 linear, 2 quadratic in tokens)
            lr = 2 * math.log(b["res"] / a["res"])
            growth[model] = {
                "from_res": a["res"], "to_res": b["res"], "L_ratio": math.exp(lr),
                "time_ratio": b["ms_per_batch"] / a["ms_per_batch"],
                "time_exponent": math.log(b["ms_per_batch"] / a["ms_per_batch"]) / lr,
                "mem_ratio": (b["peak_mb"] / a["peak_mb"]) if a.get("peak_mb") and
                b.get("peak_mb") else None}
            g = growth[model]
            g["mem_exponent"] = math.log(g["mem_ratio"]) / lr if g["mem_ratio"] else None
    plot = plot_scaling(rows)
    return rows, growth, plot


def plot_scaling(rows):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for model in ("vmamba_tiny_s1l8", "vit_deit_s"):
        ok = [r for r in rows if r["model"] == model and "error" not in r]
        a1.plot([r["res"] for r in ok], [r["ms_per_batch"] for r in ok], "o-", label=model)
        a2.plot([r["res"] for r in ok], [r["peak_mb"] for r in ok], "o-", label=model)
    for ax, yl in ((a1, "ms per batch"), (a2, "peak MB (one forward)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel(yl)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(OUT_DIR, "scaling.png")
    fig.savefig(path, dpi=120)
    return path


# -------------------------------------------------------------------------------- flops
FLOPS_COLS = [("model", "model", "{}"), ("params", "params", "{:,}"),
              ("params_ok", "= SPEC", "{}"), ("gflops", "GFLOPs", "{:.3f}"),
              ("paper_gflops", "paper", "{:.1f}"), ("diff_pct", "diff %", "{:+.2f}"),
              ("mm_conv_g", "matmul+conv G", "{:.3f}"), ("norm_g", "norm G", "{:.3f}"),
              ("scan_g", "scan G", "{:.3f}")]


def flops_table(args):
    """Params and FLOPs of the nine released configurations at --res (default 224)."""
    import flops
    res = int(args.res) if args.res else RES
    rows = flops.flops_rows(image_size=(res, res))
    if not args.json:
        print_table(f"params and FLOPs at {res}x{res}, batch 1 (flops.py: paper/fvcore "
                    "convention, a multiply-add = 1 FLOP)", rows, FLOPS_COLS, notes=[
                        "= SPEC: params equal SPEC.md's exact count of the official model",
                        "paper: the paper's GFLOPs, printed to 0.1 G (rounding alone is up to "
                        "+-1% at 4.9 G)",
                        "norm: LayerNorm at 5 FLOPs per element (fvcore); scan: "
                        "9*B*L*(K*D)*N + B*L*(K*D) per SS2D (official handle, with_D)",
                        "not counted (as fvcore): activations, residual adds, gate, "
                        "cross-scan/merge copies and sums"])
    return rows


# -------------------------------------------------------------------------------- main
def main(args):
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: --device cuda asked for, but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}); nothing run.", file=sys.stderr)
        return
    t_start = time.perf_counter()
    head = header(args)
    result = {"header": head}
    if not args.json:
        print(" | ".join(f"{k} {v}" for k, v in head.items() if k not in ("malloc", "load")))
        print(f"malloc: {head['malloc']}")
        print(f"load average: {head['load']}")
    if args.scan:
        result["scan"] = scan_table(args)
        if not args.json:
            print_table("selective scan: naive loop vs chunked (eager, torch.compile)",
                        result["scan"], SCAN_COLS, notes=[
                            "ms: median of timed calls after warm-up; naive: "
                            f"{args.naive_repeats} call(s); x: speed-up over naive",
                            "fwd: under no_grad; fwd+bwd: backward of <y, g> into all 7 inputs",
                            "err: fwd rows compare y, fwd+bwd rows du; rel = max|err| / max|ref|",
                            "inputs: official init (delta_bias, A = -(1..N)), softplus on"])
    if args.models:
        result["models"] = model_table(args)
        for r in result["models"]:
            r["mode"] = mode_of(r)
        if not args.json:
            print_table("models: inference (no_grad), images/s and peak memory",
                        result["models"], MODEL_COLS, notes=[
                            "ms/batch: median after warm-up; compile s: first call under "
                            "torch.compile (includes one forward), uses Inductor's disk cache",
                            "peak MB: memory one forward needs on top of the resident model "
                            "(CPU: rise of peak RSS; CUDA: max_memory_allocated)"])
    if args.scaling:
        rows, growth, plot = scaling(args)
        result["scaling"], result["scaling_growth"] = rows, growth
        if not args.json:
            print_table("input scaling: VMamba-T (vmamba_tiny_s1l8) vs ViT (DeiT-S shape, "
                        "SDPA)" + (" compiled" if args.scaling_compile else " eager"), rows,
                        [c for c in MODEL_COLS if c[0] not in ("scan", "mode")])
            for m, g in growth.items():
                mem = (f", memory x{g['mem_ratio']:.2f} (L^{g['mem_exponent']:.2f})"
                       if g["mem_ratio"] else "")
                print(f"  {m}: {g['from_res']} -> {g['to_res']} px, tokens x{g['L_ratio']:.1f}:"
                      f" time x{g['time_ratio']:.2f} (L^{g['time_exponent']:.2f}){mem}")
            print("  exponent p in cost ~ L^p: 1 = linear in tokens, 2 = quadratic")
            print(f"  wrote {os.path.join(OUT_DIR, 'scaling.csv')}"
                  + (f" and {plot}" if plot else " (pip install matplotlib for a PNG)"))
    if args.flops:
        result["flops"] = flops_table(args)
    result["wall_s"] = time.perf_counter() - t_start
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"\ntotal {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main(ARGS)
