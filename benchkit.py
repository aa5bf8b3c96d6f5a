"""benchkit.py: the plumbing that bench.py and scaling.py share, so that they hold only their study.

    malloc        re-execute the calling script with MALLOC_FIX before torch is loaded
    header        what a result needs to be read later: CPU or GPU, cores, threads, torch, timm,
                  git commit, date (UTC), command line, malloc, load
    rows          one configuration ("spec": model, batch, res, dtype, eager / torch.compile /
                  compile_blocks and the torch.compile mode, inference or training step) built
                  the same way in every process that touches it
    timing        one row: torch.utils.benchmark's adaptive_autorange, at least --min-time
                  seconds and until IQR/median < 5% (at most MAX_TIME_FACTOR * min-time), after
                  warm-up; a model's eager and compiled rows: time_paired, side by side. CUDA is
                  synchronised around every timed call.
    memory        peak memory of one call: on the CPU in a fresh child process per row, on CUDA
                  with max_memory_allocated in the timing process
    tables        fixed-width text tables that fit TABLE_WIDTH columns (notes wrapped, errors as
                  numbered notes)

Why memory lives in a child on the CPU: an honest peak needs glibc to give freed blocks back to
the OS (mallopt), and that switch cannot be undone; a process that measured memory runs eager
models 2x slower afterwards (docs/design.md, "glibc's malloc"). So no timing process ever calls
mallopt: peak_rss_mb() refuses to run outside a child started by measure_memory().

torch is imported inside the functions: glibc reads the malloc variables when a process starts,
so the calling script re-executes itself before it pays for importing torch.

    python benchkit.py --check MODEL    plain steady-state time of one model (2 warm-ups, median
                                        of calls over 4 s, no torch.utils.benchmark): a cross-check
                                        of bench.py's eager rows, run in a process of its own
"""
import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time

# -------------------------------------------------------------------------------- constants
# glibc malloc gives freed blocks of 128 KB..32 MB back to the OS and faults them in again on the
# next call; that made the same eager code 2-60x slower and erratic (docs/design.md).
MALLOC_FIX = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
REEXEC_MARK = "VMAMBA_BENCH_REEXEC"        # set when a script re-executed itself with MALLOC_FIX
MEMORY_CHILD_MARK = "VMAMBA_BENCH_MEMORY_CHILD"
IQR_THRESHOLD = 0.05          # adaptive_autorange stops once IQR/median is below this ...
MAX_TIME_FACTOR = 2.0         # ... or after this many times --min-time
MIN_ROUNDS = 3                # time_paired: at least this many rounds (one call of each)
CHECK_SECONDS = 4.0           # --check: plain timing loop length
OURS_PREFIXES = ("vmamba_", "vanilla_vmamba_")
TIMM_SIZED = ("deit", "swin", "vit")      # timm models that take img_size at creation
# spec["compile"]: False (eager), "model" (torch.compile(model)) or "blocks" (ours only:
# vmamba_min.compile_blocks, one compiled graph per stage, stem/downsampling/head eager)
COMPILE_MODES = (False, "model", "blocks")
MODE_NAMES = {False: "eager", "model": "compiled", "blocks": "compile_blocks"}   # row labels
# spec["compile_mode"]: torch.compile's mode for the compiled rows; the row label carries the tag
# ("compiled[at]"), and tables list what each tag means. The last two capture CUDA graphs.
INDUCTOR_MODES = {"default": "", "max-autotune-no-cudagraphs": "at", "reduce-overhead": "cg",
                  "max-autotune": "at+cg"}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
TABLE_WIDTH = 120             # tables and their notes fit a terminal this wide
# environment variables that change a result: recorded in the header when set
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR",
            "TORCHINDUCTOR_MAX_AUTOTUNE", "TORCHINDUCTOR_LAYOUT_OPTIMIZATION",
            "TORCHINDUCTOR_FORCE_LAYOUT_OPT", "TORCH_COMPILE_DEBUG", "PYTORCH_CUDA_ALLOC_CONF")
HERE = os.path.dirname(os.path.abspath(__file__))
PEERS_HINT = ('timm peers skipped: timm is not importable here; install it in a separate venv '
              'with pip install -e ".[peers]" (README, "Peers (timm)")')


# -------------------------------------------------------------------------------- malloc, header
def reexec_with_malloc_fix(opt_out=False):
    """Re-execute the running script with MALLOC_FIX in its environment, unless already set."""
    if opt_out or any(k in os.environ for k in MALLOC_FIX):
        return
    env = {**os.environ, **MALLOC_FIX, REEXEC_MARK: "1"}
    os.execve(sys.executable, [sys.executable] + interpreter_flags() + sys.argv, env)


def interpreter_flags():
    """-W, -X, -O ... of this interpreter, so that the re-executed script warns (or fails on a
    warning) as the command asked."""
    try:
        return subprocess._args_from_interpreter_flags()   # what multiprocessing uses
    except AttributeError:
        return [f"-W{w}" for w in sys.warnoptions]


def check_output_folder(parser, option, path):
    """At argument parsing, without making anything: a usage error naming the option when path
    cannot be the folder a script's results go to (a file, a path under a file, a folder it may
    not write in), instead of a traceback when the results are written, after the run."""
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{option} {path}: exists and is not a folder")
    nearest = os.path.abspath(path)
    while not os.path.exists(nearest):
        nearest = os.path.dirname(nearest)
    if not os.path.isdir(nearest):
        parser.error(f"{option} {path}: cannot make the folder ({nearest} is a file)")
    if not os.access(nearest, os.W_OK | os.X_OK):
        parser.error(f"{option} {path}: cannot make the folder (no write access to {nearest})")


def make_output_folder(parser, option, path):
    """Make the folder the results go to, before the script measures anything (what
    check_output_folder cannot foresee, such as a file system that refuses it, is then still a
    usage error, not a traceback after the run)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parser.error(f"{option} {path}: cannot make the folder ({e.strerror or e})")


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
    # The run itself has barely started, so a load near the core count is other processes:
    # every core taken by them slows the timed threads (a run beside a compile: 60x).
    busy = (" (other processes compete: timings inflated; time on an idle machine)"
            if one_min >= 0.9 * os.cpu_count() else "")
    return f"{one_min:.1f} on {os.cpu_count()} cores at start{busy}"


def malloc_note():
    if not all(k in os.environ for k in MALLOC_FIX):
        return "glibc defaults (--no-malloc-fix): eager CPU timings may be slow and erratic"
    how = "set by the script (re-executed itself)" if os.environ.get(REEXEC_MARK) \
        else "from your environment"
    return " ".join(f"{k}={os.environ[k]}" for k in MALLOC_FIX) + f", {how}"


def timm_version():
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("timm")
    except PackageNotFoundError:
        return "not installed"


def git_commit():
    """Short hash of HEAD, "(dirty)" if a tracked file differs from it (results files aside;
    untracked files, such as a report folder an earlier run wrote, do not count: the code run
    is the tracked files')."""
    def git(*a):
        return subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                    ":(exclude)docs/results-*")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{head} (dirty)" if dirty else head


def header(device, dtype):
    """What a figure needs to be read later. dtype: a name or a list of names."""
    import torch
    head = {"torch": torch.__version__, "timm": timm_version(), "python": sys.version.split()[0],
            "git": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        head.update(gpu=f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, "
                        f"capability {props.major}.{props.minor}",
                    cuda=torch.version.cuda,
                    tf32=f"matmul {torch.backends.cuda.matmul.allow_tf32}, "
                         f"cudnn {torch.backends.cudnn.allow_tf32}")
        dev = f"cuda ({props.name})"
    else:
        dev = f"cpu ({head['cpu']}, {head['cores']} cores)"
    head.update(device=dev, dtype=dtype if isinstance(dtype, str) else ",".join(dtype),
                malloc=malloc_note(), load=load_note(),
                command=shlex.join(["python"] + sys.argv), interpreter=sys.executable,
                env={k: os.environ[k] for k in ENV_KEYS if k in os.environ})
    return head


def header_lines(head):
    """The header as lines of at most TABLE_WIDTH characters."""
    where = (f"gpu {head['gpu']}, CUDA {head['cuda']}, TF32 {head['tf32']}; host "
             if "gpu" in head else "")
    text = [f"torch {head['torch']} | timm {head['timm']} | python {head['python']} | "
            f"commit {head['git']} | {head['date']}",
            f"device {where}{head['cpu']}, {head['cores']} cores, {head['threads']} torch "
            f"threads | dtype {head['dtype']}",
            f"malloc: {head['malloc']}", f"load average: {head['load']}",
            f"command: {head['command']}"]
    if head.get("env"):
        text.append("env: " + " ".join(f"{k}={v}" for k, v in head["env"].items()))
    return [ln for t in text for ln in wrap(t, indent="")]


def print_header(head):
    print("\n".join(header_lines(head)))


def wrap(text, indent="  "):
    """A note as lines of at most TABLE_WIDTH characters, continuation lines indented more."""
    return textwrap.wrap(text, TABLE_WIDTH, initial_indent=indent,
                         subsequent_indent=indent + "  ", break_on_hyphens=False) or [indent]


def format_table(title, rows, cols, notes=(), optional=(), error_col=None):
    """A fixed-width table as text. rows: dicts; cols: (key, heading, format) with format a
    str.format pattern or a function; None prints as '-'. Columns in `optional` are left out
    when no row has a value. A row's "error" becomes a numbered note, its number shown in the
    error_col cell. Notes are wrapped to TABLE_WIDTH."""
    def fmt(v, f):
        return "-" if v is None else v if isinstance(v, str) else f(v) if callable(f) \
            else f.format(v)
    cols = [c for c in cols if c[0] not in optional or any(r.get(c[0]) is not None
                                                           for r in rows)]
    errors = list(dict.fromkeys(r["error"] for r in rows if error_col and r.get("error")))
    text = [any(isinstance(r.get(k), str) for r in rows) and
            all(isinstance(r.get(k), str) or r.get(k) is None for r in rows) for k, _, _ in cols]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = [fmt(r.get(k), f) for k, _, f in cols]
        if error_col and r.get("error"):
            i = [k for k, _, _ in cols].index(error_col)
            mark = f"[{errors.index(r['error']) + 1}]"
            line[i] = mark if line[i] == "-" else f"{line[i]} {mark}"
        cells.append(line)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = [title]
    for j, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if text[i] else c.rjust(w)     # words left, numbers right
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = list(notes) + [f"[{i + 1}] {e}" for i, e in enumerate(errors)]
    out += [ln for n in notes for ln in wrap(n)]
    return "\n".join(out)


def img_s(v):
    """Images per second with 3 or 4 significant digits."""
    return f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def print_table(title, rows, cols, notes=(), optional=(), error_col=None):
    print("\n" + format_table(title, rows, cols, notes, optional, error_col))


def quiet_torch(device):
    """Two messages of torch's that say nothing about a benchmark's figures. On CUDA, Inductor
    advises TF32 for float32 matmuls: this benchmark keeps torch's default, which the header
    records. On a CPU, a CUDA build of torch (timm's venv) warns at every compile that it found
    no CUDA runtime: the C++ kernels it compiles do not need one."""
    if device == "cuda":
        import warnings
        warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores")
    else:
        import logging
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------- timing
def sync(device):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def time_once(fn, device):
    """Seconds of one call (a compile call, the slow naive loop)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class PairedCallError(RuntimeError):
    """time_paired: callable `index` raised (the exception is the __cause__)."""

    def __init__(self, index):
        super().__init__(f"callable {index} raised")
        self.index = index


def time_paired(fns, device, min_time, warmup):
    """Time callables side by side: after `warmup` calls of each, rounds of one call of each
    (the order reversed every other round) until each has min_time seconds of calls and there
    were MIN_ROUNDS rounds; after MAX_TIME_FACTOR * min_time * len(fns) seconds, MIN_ROUNDS
    rounds suffice. Why: the machine's speed drifts over minutes by more than the gap between
    an eager and a compiled step (docs/design.md), so rows timed one after another could not
    tell them apart; in alternation the drift hits all alike. torch.utils.benchmark's Timer
    times one statement at a time, so the rounds are timed here, one call per sample.
    Returns per callable: median and IQR (ms) of its calls, calls, times_s (each call's
    seconds, round by round) and vs_first: the median over rounds of its time / the first
    callable's in the same round."""
    import statistics

    def call(i):
        try:
            return time_once(fns[i], device)
        except Exception as e:
            raise PairedCallError(i) from e
    for i in range(len(fns)):
        for _ in range(warmup):
            call(i)
    times, t0, rounds = [[] for _ in fns], time.perf_counter(), 0
    cap = MAX_TIME_FACTOR * min_time * len(fns)
    while rounds < MIN_ROUNDS or (min(sum(t) for t in times) < min_time and
                                  time.perf_counter() - t0 < cap):
        for i in (range(len(fns)) if rounds % 2 == 0 else reversed(range(len(fns)))):
            times[i].append(call(i))
        rounds += 1
    out = []
    for t in times:
        q = statistics.quantiles(t, n=4) if len(t) >= 4 else None     # no spread from 1-3
        out.append({"ms": 1e3 * statistics.median(t), "iqr_ms": 1e3 * (q[2] - q[0]) if q else None,
                    "calls": len(t), "times_s": t,
                    "vs_first": statistics.median(a / b for a, b in zip(t, times[0]))})
    return out


def time_steady(fn, device, min_time, warmup):
    """Median and IQR (ms) of fn after `warmup` calls, over at least min_time seconds.

    On CUDA the clock synchronises the device before each reading (torch.utils.benchmark's
    default clock does too in recent torch; here it does not depend on the version);
    num_threads is passed because Timer would otherwise time with a single thread.
    """
    import torch
    from torch.utils.benchmark import Timer
    for _ in range(warmup):
        fn()
    sync(device)

    def clock():
        sync(device)
        return time.perf_counter()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), timer=clock)
    # torch reads a max_run_time of 0 as no limit: --min-time 0 then ran until the spread fell
    # below IQR_THRESHOLD, which on a busy machine may be never. A positive one stops it.
    m = timer.adaptive_autorange(IQR_THRESHOLD, min_run_time=min_time,
                                 max_run_time=max(MAX_TIME_FACTOR * min_time, 1e-9))
    iqr = 1e3 * m.iqr if len(m.raw_times) >= 4 else None    # no spread from 1-3 samples
    return {"ms": 1e3 * m.median, "iqr_ms": iqr, "calls": m.number_per_run * len(m.raw_times)}


# -------------------------------------------------------------------------------- rows
def is_ours(name):
    return name.startswith(OURS_PREFIXES)


def mode_label(spec):
    """The row's mode: eager, compiled or compile_blocks, with its torch.compile mode's tag
    unless that is the default, e.g. compiled[cg]."""
    tag = INDUCTOR_MODES.get(spec.get("compile_mode") or "default", "?") if spec["compile"] else ""
    return MODE_NAMES[spec["compile"]] + (f"[{tag}]" if tag else "")


def timm_available():
    try:
        import timm  # noqa: F401
        return True
    except ImportError:
        return False


def make_model(spec):
    """Ours by name (vmamba_min.build with spec's overrides) or a timm model, random weights."""
    if is_ours(spec["model"]):
        import vmamba_min
        return vmamba_min.build(spec["model"], **spec.get("overrides", {}))
    import timm
    sized = spec["model"].startswith(TIMM_SIZED) and spec["res"] != 224
    kw = {"img_size": spec["res"]} if sized else {}
    return timm.create_model(spec["model"], pretrained=False, **kw)


def make_runner(spec):
    """A no-argument callable for spec: one inference forward (no_grad) or one training step
    (forward, cross-entropy on random labels, backward, fused AdamW step, zero_grad), and the
    params. spec["compile_mode"] is torch.compile's mode (default if absent); with CUDA graphs
    every call starts a new graph step, since no output is kept between calls."""
    import torch
    import torch.nn.functional as F
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    mode = spec["compile"]
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile: want one of {COMPILE_MODES}, got {mode!r}")
    if mode == "blocks" and not is_ours(spec["model"]):
        raise ValueError(f"compile 'blocks' is vmamba_min.compile_blocks: ours only, "
                         f"not {spec['model']}")
    inductor_mode = spec.get("compile_mode") or "default"
    if inductor_mode not in INDUCTOR_MODES:
        raise ValueError(f"compile_mode: want one of {tuple(INDUCTOR_MODES)}, got "
                         f"{inductor_mode!r}")
    cuda_graphs = bool(mode) and inductor_mode in CUDA_GRAPH_MODES
    if cuda_graphs and device != "cuda":
        raise ValueError(f"compile_mode {inductor_mode!r} captures CUDA graphs: CUDA only")
    kw = {} if inductor_mode == "default" else {"mode": inductor_mode}
    model = make_model(spec).to(device).train(spec["train"])
    fwd = model
    if mode == "model":
        fwd = torch.compile(model, dynamic=False, **kw)
    elif mode == "blocks":
        import vmamba_min
        vmamba_min.compile_blocks(model, **kw)  # in place: the blocks compile on the first call
    step_begin = torch.compiler.cudagraph_mark_step_begin if cuda_graphs else lambda: None
    x = torch.randn(spec["batch"], 3, spec["res"], spec["res"], device=device)
    amp = lambda: torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)  # noqa
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    if not spec["train"]:
        def infer():
            step_begin()
            with torch.no_grad(), amp():
                return fwd(x)
        return infer, params_m
    labels = torch.randint(0, 1000, (spec["batch"],), device=device)
    # fused: one pass over all parameters, as a user who times training would pick (AdamW step of
    # vmamba_tiny_s1l8's 30M parameters, 2-core AMD EPYC, torch 2.13: 15 ms, for-loop 52 ms).
    opt = torch.optim.AdamW(model.parameters(), fused=True)

    def step():
        step_begin()
        with amp():
            loss = F.cross_entropy(fwd(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, params_m


def cuda_peak_mb(fn):
    """Extra CUDA memory one call needs on top of what is allocated before it (a CUDA graph's
    pool was allocated at capture: not counted). None if the call fails (out of memory): the
    row's timing stands."""
    import torch
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    except Exception as e:               # noqa: BLE001
        log(f"peak memory call failed: {error_text(e)}")
        return None


def error_text(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def run_group(specs, min_time, warmup):
    """Time specs that differ only in their compile mode, eager first, side by side in this
    process: build each and make its compile call (if any), then time_paired over those that
    built. Rows get ms, iqr_ms, calls, img_s and vs_eager (time over eager's, per round). All
    of them stay in memory while timing (models, optimizer states: more at once than rows timed
    one by one). A compile call counts whatever this process compiled before (Inductor's start-
    up of ~9 s, paid by the first compiled row of a run). If eager fails to build, the others
    are timed one by one (run_row); a spec that fails says why, the others go on."""
    import torch
    if specs[0]["compile"] is not False:
        raise ValueError("run_group: the first spec must be the eager one")
    torch._dynamo.reset()                # fresh caches per group
    rows, live = [dict(s) for s in specs], []
    for i, (row, spec) in enumerate(zip(rows, specs)):
        try:
            fn, row["params_m"] = make_runner(spec)
        except Exception as e:           # noqa: BLE001 -- reported in the row, run goes on
            row["error"] = error_text(e)
            if i == 0:                   # nothing to pair with: time the rest on their own
                return [row] + [run_row(s, min_time, warmup) for s in specs[1:]]
            continue
        try:
            if spec["compile"]:
                row["compile_s"] = time_once(fn, spec["device"])
            live.append((row, fn))
        except Exception as e:           # noqa: BLE001
            row["error"] = error_text(e)
    try:
        timed = time_paired([fn for _, fn in live], specs[0]["device"], min_time, warmup)
        for (row, fn), t in zip(live, timed):
            row.update(ms=t["ms"], iqr_ms=t["iqr_ms"], calls=t["calls"],
                       img_s=1e3 * row["batch"] / t["ms"], vs_eager=t["vs_first"])
            if row["device"] == "cuda":
                row["peak_mb"] = cuda_peak_mb(fn)
    except PairedCallError as e:
        bad = live[e.index][0]
        bad["error"] = error_text(e.__cause__)
        for row, _ in live:
            row.setdefault("error", f"not timed: the {mode_label(bad)} row of its "
                                    f"group failed while timing")
    live = fn = None
    gc.collect()
    if specs[0]["device"] == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_row(spec, min_time, warmup):
    """Time one spec in this process: compile call (if any), warm-up, steady state. A row that
    fails (out of memory, a size a model rejects, a compile error) says why instead of stopping
    the run."""
    import torch
    row = dict(spec)
    try:
        torch._dynamo.reset()            # fresh caches per row: an honest compile time
        fn, row["params_m"] = make_runner(spec)
        if spec["compile"]:
            row["compile_s"] = time_once(fn, spec["device"])
        row.update(time_steady(fn, spec["device"], min_time, warmup))
        row["img_s"] = 1e3 * spec["batch"] / row["ms"]
        if spec["device"] == "cuda":
            row["peak_mb"] = cuda_peak_mb(fn)
    except Exception as e:               # noqa: BLE001 -- reported in the row, run goes on
        row["error"] = error_text(e)
    fn = None
    gc.collect()
    if spec["device"] == "cuda":
        torch.cuda.empty_cache()
    return row


# -------------------------------------------------------------------------------- memory
def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def malloc_give_back(libc):
    """glibc: large blocks from mmap, returned on free, so RSS follows live tensors. One-way."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
    libc.mallopt(M_MMAP_MAX, 1 << 16)
    libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
    libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)
    libc.malloc_trim(0)


def peak_rss_mb(fn):
    """Rise of peak RSS (VmHWM, reset through /proc/self/clear_refs) over one call of fn, with
    malloc in give-back mode. Only in a memory child: it slows every later call of the process."""
    import ctypes
    if os.environ.get(MEMORY_CHILD_MARK) != "1":
        raise RuntimeError("peak_rss_mb switches malloc for good: call it only in a child "
                           "started by measure_memory()")
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt
    except (OSError, AttributeError):
        return None                      # not glibc: no honest CPU number
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    gc.collect()
    malloc_give_back(libc)
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                     # resets VmHWM to the current RSS
    fn()
    return _status_mb("VmHWM") - base


def memory_child(spec):
    """In the child: build, one call (compile, optimizer state, warm-up), then the measured one."""
    fn, _ = make_runner(spec)
    fn()
    return peak_rss_mb(fn)


def measure_memory(spec):
    """Peak MB of one call of spec's runner, measured in a fresh process (see the docstring)."""
    env = {**os.environ, MEMORY_CHILD_MARK: "1"}
    cmd = [sys.executable, *interpreter_flags(), os.path.abspath(__file__), "--memory",
           json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        log(f"memory child for {spec['model']} exited with {proc.returncode}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def add_memory(rows, progress=None):
    """CPU rows that timed without error get peak_mb from a child process each; progress(rows),
    if given, is called after each (a run cut off keeps the figures so far). Timing is over,
    so first this process hands its freed heap back (malloc_trim): under MALLOC_FIX it still
    held the peak of every row timed, and with a child at its own peak beside it the machine ran
    out of memory (vanilla_vmamba_tiny training at batch 8: 14.8 + 9 GB on 24 GB)."""
    if any(r["device"] == "cpu" for r in rows):
        gc.collect()
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass                         # not glibc: nothing to hand back this way
    for r in rows:
        if r["device"] == "cpu" and "error" not in r:
            spec = {k: r[k] for k in ("model", "res", "batch", "device", "dtype", "compile",
                                      "compile_mode", "train", "overrides") if k in r}
            log(f"memory: {r['model']} batch {r['batch']} (child process)")
            r["peak_mb"] = measure_memory(spec)
            if progress:
                progress(rows)
    return rows


# -------------------------------------------------------------------------------- CLI
def check(model, res, batch):
    """Plain steady state, independent of torch.utils.benchmark: median of calls over 4 s."""
    import statistics
    fn, _ = make_runner(dict(model=model, res=res, batch=batch, device="cpu",
                             dtype="float32", compile=False, train=False))
    fn(), fn()
    times, t_end = [], time.perf_counter() + CHECK_SECONDS
    while time.perf_counter() < t_end or len(times) < 3:
        times.append(time_once(fn, "cpu"))
    return 1e3 * statistics.median(times), len(times)


def main():
    p = argparse.ArgumentParser(description="benchkit: --check MODEL (plain timing)")
    p.add_argument("--check", metavar="MODEL", help="plain steady-state ms of one model")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--memory", help=argparse.SUPPRESS)   # internal: the memory child
    args = p.parse_args()
    if not args.memory and not args.check:
        p.error("--check MODEL is what to run (one of vmamba_min.CONFIGS, or a timm name)")
    if args.res < 4 or args.batch < 1:
        p.error(f"--res must be >= 4 and --batch >= 1, got {args.res} and {args.batch}")
    if args.check and is_ours(args.check):
        import vmamba_min
        if args.check not in vmamba_min.CONFIGS:
            p.error(f"--check {args.check}: not one of {', '.join(vmamba_min.CONFIGS)}")
    elif args.check and not timm_available():
        p.error(f"--check {args.check}: not ours, so a timm model, and timm is not importable")
    if args.memory:
        spec = json.loads(args.memory)
        quiet_torch(spec["device"])
        print(json.dumps(memory_child(spec)))
    elif args.check:
        reexec_with_malloc_fix()
        import torch
        ms, n = check(args.check, args.res, args.batch)
        print(f"{args.check} batch {args.batch} {args.res}px eager: {ms:.1f} ms median of {n} "
              f"calls ({torch.get_num_threads()} threads; {malloc_note()})")


if __name__ == "__main__":
    main()
