"""gpu_check.py: the one prepared GPU run, about 8 minutes on one H100/H200 with every compile
(a hard stop at 9).

    OUT=DIR python gpu_check.py                 all phases, files into $OUT (or --out DIR)
    python gpu_check.py --phases models,profile  a second run of some phases
    python gpu_check.py --phases models --rows chunked,vanilla    only model rows whose names
                                                contain one of these (names as in gpu.json)
    python gpu_check.py --phases scan --scans 'v0 b32 assoc compiled$'  likewise scan cells
                                                (';' between parts: path names hold commas; a
                                                part ending in '$' is one cell's whole name)
    python gpu_check.py --phases tests --tests all --budget-s 300   the whole test suite on the
                                                card (pytest-xdist workers if installed)
    python gpu_check.py --device cpu --dry-run  the same code paths at tiny shapes (CPU, ~4 min;
                                                aot_eager for most compiles: see _plan)

Phases, the most valuable first. Each ends at a mark, a fraction of --budget-s (480 s) from the
start (PHASE_END), and starts no item (one scan path at one shape, one model row) that its
estimate (EST_S, then what the run measured) says would not finish by then: a skipped item
says so in gpu.json, and what a phase leaves goes to the next. A phase that fails records why
(type and first line) and the next one runs. Ends on an H100/H200, in seconds from the start:
  1 card     versions, commit, device copy bandwidth (a 2 GiB clone, CUDA events), matmul
             TFLOP/s                                                                 [by 19]
  2 scan     stage-1 scans of VMamba-T, v2 (b x 384 x 3136, N = 1) and v0 (b x 768 x 3136,
             N = 16), in scan_cells' order: chunked eager / compiled, assoc compiled (v2 also
             with GROUP_SUM = "reduce") / eager, experiments (SCAN_EXPERIMENTS: assoc chunks,
             u time-major as near the compiled models, u and delta time-major, coordinate
             descent),
             big batch first; fwd and fwd+bwd ms, their ratio, "x floor" (ms over the bytes the
             call must move / the measured copy bandwidth), errors of y and all 7 gradients
             against the same scan in float64 on the device                          [by 158]
  3 models   batch 128, 224 px, in model_plan's order: vmamba_tiny_s1l8, Swin-T (timm),
             vanilla_vmamba_tiny; inference eager / compiled / compile_blocks, fp32 / bf16
             autocast; training steps (fwd + CE + bwd + fused AdamW); variants "floor" (s1l8
             with its scan replaced by elementwise work on the same inputs), "chunked"
             (compiled with the chunked scan forced), "inline" (compiled with the blocks'
             nested compile regions off), "time-major" (delta computed channels-fastest),
             "per-route" (one scan per route, delta computed in its scan kernel), "dt-fused"
             (delta computed in the one scan kernel), "conv-taps" (the depthwise convolution
             as multiply-adds, fused with its SiLU), "dt-fused+conv-taps" (both),
             "seq-tiles" (the autotuner also offered tiles of one step per program,
             R0_BLOCK 1), "tf32" (TF32 matrix products),
             "coordesc" (Inductor's coordinate_descent_tuning), "autotune" (mode
             max-autotune-no-cudagraphs), "cudagraphs" (mode reduce-overhead) and
             "assoc-chunks" (scan="assoc_chunked"); img/s, compile s, peak GB, ratio to
             Swin-T's best row of the same kind and precision; logits of each inference row
             against the eager fp32 row of its model                                 [by 374]
  4 profile  torch.profiler, top 30 ops by self device time: compiled s1l8 inference and one
             training step (eager if it was not compiled in time), s1l8's bf16 inference
             (if compiled in time), vanilla's fp32 one and s1l8's with dt-fused+conv-taps
             (if phase 3 compiled them) ->
             profile.txt; into gpu.json
             device ms by kind (scan kernels apart), the top kernels and the matrix
             products by input shapes                                                [by 403]
  5 tests    the CUDA test subset, pytest in a subprocess per set (TEST_SETS), or with
             --tests all the whole suite                                             [by 446]
  6 report   bench.py --report, if bench.py has it and time is left                  [by 480]
The parent kills the run at --hard-s (budget + HARD_GRACE_S = 540 s), for a compile that ran
long. Exit status 1 when the child failed, was killed or found no card (nothing measured);
0 otherwise, a failed later phase included (gpu.json and the summary name it). Timing: CUDA
events around each call, recorded back to back and read after one synchronize; median of
>= REPS_MIN calls after WARMUP calls (and after the compile call). Scans run with TF32 off (the
error check needs float32); models with torch's defaults (matmul TF32 off, cuDNN TF32 on),
recorded in the header.

Files in the output folder (at most 5): gpu.json (every figure, rewritten after each one),
gpu.log (all output, compiler and pytest included), profile.txt, kernels.tar.gz (the .py files
Inductor generated: per graph a wrapper that launches the Triton kernels, plus their sources;
beside each kernel the .best_config its autotuner chose, block sizes and warps; INDEX.txt
inside maps each compiled row to its wrappers) and report.tar.gz (phase 6).
How: this process (the parent, no torch) starts itself again as the child that runs the phases,
tees its output into gpu.log, ends it at the hard stop (or on SIGTERM / SIGINT), then packs the
kernels and prints the summary: a run that hangs or is killed still leaves everything measured
so far, and gpu.json names the item it was on. Without .git in the copy, GPU_CHECK_COMMIT=<hash>
names the commit (the header has a hash of every .py file in any case).

Letters as in scan.py: b batch, K = 4 routes, D channels per route, L = H*W, N state size.
"""
import argparse
import functools
import gc
import io
import json
import math
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass, field

# -------------------------------------------------------------------------------- constants
BUDGET_S = 480                # global deadline: nothing new starts after it
HARD_GRACE_S = 60             # the parent kills the child at budget + this (a compile overran)
PHASES = ("card", "scan", "models", "profile", "tests", "report")
# where each phase must end, as a fraction of the budget; time a phase leaves goes to the next
PHASE_END = {"card": 0.04, "scan": 0.33, "models": 0.78, "profile": 0.84, "tests": 0.93,
             "report": 1.0}
# the dry run rehearses every row and cell: 25 rows and 14 cells take about 195 s on the 2-core
# EPYC (torch 2.11)
DRY_BUDGET_S = 240
DRY_PHASE_END = {"card": 0.04, "scan": 0.56, "models": 0.79, "profile": 0.82, "tests": 0.87,
                 "report": 1.0}
K = 4                         # scan routes
# Stage 1 of VMamba-T at 224 px: L = 56 * 56; K*D = 4 * 96 (v2: D = C) or 4 * 192 (v0: D = 2C).
SCAN_SHAPES = {"v2": (384, 3136, 1), "v0": (768, 3136, 16)}      # (K*D, L, N)
# v0 at batch 128: one (b, K*D, L, N) float32 state is 19.7 GB; the chunked backward holds one
# while it runs, the assoc backward two (g and h of every state index), the float64 reference
# twice that: batch 32 (4.9 GB).
V0_BATCH = 32
SCAN_BIG = (("v2", 128), ("v0", V0_BATCH))          # (gen, batch); the order: scan_cells
SCAN_SMALL = (("v2", 1), ("v0", 1))
SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "delta_bias")
# float64 reference (and eager assoc) only up to this many state elements b*K*D*L*N: v2 at 128
# (154M) and v0 at batch 1 (39M) are checked, v0 at batch 32 (1.2G) is not (seconds per call).
ERR_MAX_ELEMS = 2e8
MODEL_BATCH, RES = 128, 224
OURS, VANILLA = "vmamba_tiny_s1l8", "vanilla_vmamba_tiny"
SWIN = "swin_tiny_patch4_window7_224"
COPY_BYTES = 2 << 30          # bandwidth: clone of a 2 GiB tensor
MATMUL_N = 8192
# Warm-up: WARMUP calls and at least WARM_S seconds (on the shared 2-core CPU the first calls
# after a pause ran up to 30x slower for ~0.5 s; cheap insurance). Timed calls: at least
# REPS_MIN, at most REPS_MAX, more than REPS_MIN only while under CELL_S seconds.
WARMUP, WARM_S, REPS_MIN, REPS_MAX, CELL_S = 2, 0.3, 5, 50, 1.5
# first guesses of the seconds one item takes (build, compile call, timed calls), replaced by
# what the run measures; a compiled scan item is two compiles (fwd and fwd+bwd graphs)
# (the first H200 run, torch 2.11: compiled scans 15 s (v2) and 93 s (v0, batch 32); models
# eager 5 s, compiled 33-41 s, vanilla 167 s; training steps eager 5 s, compiled s1l8 140 s)
EST_S = {"scan compiled": 40, "scan eager": 6, "model eager": 8, "model compiled": 45,
         "model blocks": 45, "train eager": 8, "train compiled": 150,
         ("model compiled", "vanilla_vmamba_tiny"): 170, ("model eager", "vanilla_vmamba_tiny"): 20,
         # vanilla through compile_blocks: its offline code generation (cuda_codegen.py model
         # --blocks) took 31-37 s for the four block graphs against 126 s for the whole model
         ("model blocks", "vanilla_vmamba_tiny"): 60,
         "model compiled cudagraphs": 50,     # a compile as usual, then CUDA graphs recorded
         # its offline code generation took about twice the model's (design.md)
         "model compiled per-route": 75,
         # its offline code generation took 34 s against the model's 21 s (design.md)
         "model compiled dt-fused": 60, "model compiled dt-fused+conv-taps": 60,
         # guesses: kernels compiled in this process, one after another, and more candidates
         # timed per looped reduction
         "model compiled seq-tiles": 90, "model blocks seq-tiles": 90,
         ("model blocks seq-tiles", "vanilla_vmamba_tiny"): 120,
         # vanilla's dt-fused blocks: 77 s of offline code generation against 25 s (design.md)
         "model blocks dt-fused": 150,
         # guesses (these benchmark kernels while compiling)
         "model compiled autotune": 180, "train compiled autotune": 400,
         "model compiled coordesc": 90, "train compiled coordesc": 250,
         "model blocks autotune": 200, "model blocks coordesc": 120,
         ("model blocks coordesc", "vanilla_vmamba_tiny"): 150,
         ("scan compiled", "v2"): 20, ("scan compiled", "v0"): 100,
         # forward only (FORWARD_ONLY): v0's forward compile took 11 s, v2's 6 s (one-pass)
         ("scan compiled", "v2 assoc chunks compiled"): 15,
         ("scan compiled", "v0 assoc chunks compiled"): 30,
         **{("scan compiled", f"v0 {p}"): 30 for p in ("assoc chunks compiled, T=32",
                                                       "assoc chunks compiled, T=128")}}
# model variants that only change how torch.compile compiles the model as it is (mode or
# options): their rows count as the model's own, and their compile time is estimated apart
COMPILER_VARIANTS = ("autotune", "coordesc", "cudagraphs")
# variants whose compile time is estimated apart (a kind of their own) so that what a row of
# theirs measured does not become the estimate of the model's other compiled rows
ESTIMATED_APART = COMPILER_VARIANTS + ("per-route", "dt-fused", "seq-tiles",
                                       "dt-fused+conv-taps")
# variants that swap functions of the model for their own (variant_patch), whose row checks
# that the swapped-in functions ran; "a+b" applies both (the inference path both would give,
# if each beats the plain row); cuda_codegen.py --variant takes the same names
PATCHED_VARIANTS = ("floor", "time-major", "per-route", "dt-fused", "conv-taps",
                    "dt-fused+conv-taps")
# a model's compiled training row, guessed from its compiled inference row: on the H200 (run 1
# of docs/results-cuda.md) s1l8's training row took 140 s against 37 s (its compiles: 135 and
# 37 s); on 2 CPU cores the compile tests took 390 s (training) and 156 s (inference)
TRAIN_OVER_INFER = 3.8
PROFILE_ROWS = 30
TOP_KERNELS = 25       # kernels and matrix-product shapes per profiled call kept in gpu.json
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::convolution",
              "aten::convolution_backward")
# (label, pytest arguments), most valuable first; each set may use all the time left in the
# phase (a set cut off reports what passed until then). On 2 CPU cores the compile tests took
# 156 s (inference), 390 s (training), 110 s (blocks) and test_scan.py ~200 s. The associative
# scan's tests come first: that path runs only on CUDA, and its compiles are of single scans;
# compiled models are also checked by the models phase (check_logits).
TEST_SETS = (
    ("assoc", ["test_scan_assoc.py"]),
    ("compile-infer",
     ["test_compile.py::test_plain_compile_inference_equals_eager_at_two_batches_and_sizes"]),
    ("compile-train", ["test_compile.py::test_compiled_training_equals_eager_two_steps"]),
    ("scan", ["test_scan.py"]),
    ("compile-blocks",
     ["test_compile.py::test_compile_blocks_inference_equals_eager_with_one_graph_per_stage"]),
)
TEST_MIN_S = 15               # a test set starts only with this much of the phase left
# --tests all: the whole suite as one set, spread over pytest-xdist workers where it is
# installed (compiles are CPU work; the GPU machines have 16 cores), without -x so that one
# run lists every failure
ALL_TESTS = ("all", ["."])
XDIST_WORKERS = 8
PYTEST_FLAGS = ["-x", "-q", "-p", "no:cacheprovider"]
KERNEL_TAR_MAX = 120 << 20    # uncompressed bytes of generated code packed (text: ~10x smaller)
LOG_MAX = 15 << 20            # gpu.log stops growing here (a file comes back only up to 16 MiB)
PAPER = {"note": "paper Table 1/6 (official CUDA kernels, one A100, fp32, batch 128), img/s "
                 "inference / training", OURS: (1686, 571), VANILLA: (638, 195), SWIN: (1244, 987)}


@dataclass
class Plan:
    """Sizes of a run: the real one, or the dry run's tiny ones (same code paths)."""
    scan_shapes: dict = field(default_factory=lambda: dict(SCAN_SHAPES))
    scan_cells: tuple = ()    # (gen, batch, path), most valuable first (see scan_cells)
    batch: int = MODEL_BATCH
    res: int = RES
    ours_overrides: dict = field(default_factory=dict)
    copy_bytes: int = COPY_BYTES
    matmul_n: int = MATMUL_N
    reps: tuple = (WARMUP, WARM_S, REPS_MIN, REPS_MAX, CELL_S)
    est: dict = field(default_factory=lambda: dict(EST_S))
    tests: tuple = TEST_SETS
    rows: tuple = ()          # model rows, most valuable first (see model_plan)
    model_backend: str = "inductor"               # torch.compile backend of the model rows
    scan_backends: dict = field(default_factory=dict)   # path -> backend, if not inductor
    phase_end: dict = field(default_factory=lambda: dict(PHASE_END))


def model_plan(dry):
    """The model rows in the order they run, each ratio's numerator and denominator (ours and
    Swin-T, same kind and dtype) next to each other (phase_models runs such a pair whole or not at
    all): eager inference (the logits every later row is checked against), float32 inference
    compiled, vanilla through compile_blocks (its target, and its compile time: whole, it compiled
    for 161 s on the H200), then with one-step tiles offered to its scan kernels' autotuner (offline
    its 16-scan kernel needs no shuffle or barrier there), s1l8 with delta computed in its one scan
    kernel per block (offline 15% fewer bytes, no dt bmm up to stage 3, more registers per scan
    kernel), s1l8 with its depthwise convolutions computed with their SiLU in one Triton kernel each
    (offline 3% fewer bytes, no cuDNN call per block), s1l8 with both (offline 18% fewer bytes: the
    path the two would give if each beats the plain row), s1l8 with one scan per route and delta
    computed in the scan kernels (offline 9% fewer bytes, no dt bmm up to stage 3, fewer registers
    per scan kernel), s1l8 with one-step tiles, s1l8 with its blocks traced in line (what the nested
    compile regions cost or save), vanilla with the chunked scan experiment, s1l8 with delta
    computed channels-fastest (what the scan cells "u time-major" and "time-major" compare, in the
    model), vanilla with tiles tuned by coordinate descent (its N = 16 scan kernel ran at 28.7x its
    floor; a ~150 s compile, after s1l8's experiments, as s1l8 is nearer its target), TF32 matrix
    products (the paper's arithmetic, docs/design.md), eager training, what may make s1l8 faster,
    bf16, compiled training (the first H200 run met its target against eager Swin-T; each such row
    compiles for ~140 s), then the rest, vanilla's dt-fused blocks last (its scan kernel, not its
    bytes, ran far from the floor).
    variant: None (the model as it is: compiled on CUDA its scans dispatch to scan_assoc), "floor"
    (the scan replaced by elementwise work: floor_scan), "chunked" (compiled with the chunked scan
    forced: scan._use_assoc off), "tf32" (float32 matrix products on TF32 tensor cores, as
    torch.set_float32_matmul_precision("high") sets), "inline" (compiled with
    vmamba_min.BLOCK_REGIONS off: every block traced into the graph in line, as the first H200 run
    compiled it, instead of one subgraph per stage), "time-major" (delta computed channels-fastest
    and routed as u is: selection_time_major), "per-route" (one scan per route, delta computed
    inside its kernel: ssm_per_route), "dt-fused" (delta computed inside the one scan kernel:
    selection_dt_fused), "conv-taps" (the depthwise convolution as multiply-adds of the shifted map,
    fused with its SiLU: conv_taps), "dt-fused+conv-taps" (both), "seq-tiles" (every looped
    reduction, the scans among them, also offered tiles of one step per program: SequentialTiles),
    "coordesc" (Inductor's coordinate_descent_tuning: each Triton kernel's block sizes and warps
    searched around the heuristic's pick; the scan kernels' tile decides whether a row's carry
    crosses warps), "autotune" (torch.compile's mode "max-autotune-no-cudagraphs": that search, plus
    GEMM templates benchmarked against cuBLAS), "cudagraphs" (mode "reduce-overhead": the compiled
    model replayed as CUDA graphs, no launch overhead; the scans' kernels have no host loop on this
    path) or "assoc-chunks" (built with scan="assoc_chunked":
    scan_assoc.selective_scan_assoc_chunked, an experiment for vanilla's N = 16, whose compiled
    inference ran at 0.13x Swin-T)."""
    def row(model, mode="eager", dtype="float32", train=False, variant=None):
        return dict(model=model, mode=mode, dtype=dtype, train=train, variant=variant)
    if dry:
        return (row(OURS), row(SWIN), row(OURS, train=True), row(OURS, "compiled"),
                row(SWIN, "compiled"), row(OURS, "compiled", train=True),
                row(OURS, "compiled", variant="floor"),
                row(OURS, "compiled", variant="chunked"), row(OURS, dtype="bfloat16"),
                row(OURS, "blocks"), row(OURS, "compiled", variant="tf32"),
                row(OURS, "compiled", variant="autotune"),
                row(OURS, "compiled", variant="coordesc"),
                row(OURS, "compiled", variant="assoc-chunks"), row(VANILLA, "blocks"),
                row(OURS, "compiled", variant="inline"),
                row(OURS, "compiled", variant="time-major"),
                row(OURS, "compiled", variant="per-route"),
                row(OURS, "compiled", variant="dt-fused"),
                row(OURS, "compiled", variant="conv-taps"),
                row(OURS, "compiled", variant="dt-fused+conv-taps"),
                row(VANILLA, "blocks", variant="seq-tiles"),
                row(OURS, "compiled", variant="seq-tiles"),
                row(VANILLA, "blocks", variant="coordesc"), row(OURS, "compiled", "bfloat16"),
                row(VANILLA, "blocks", variant="dt-fused"))
    bf = "bfloat16"
    return (row(OURS), row(SWIN), row(VANILLA),
            row(OURS, "compiled"), row(SWIN, "compiled"),
            row(VANILLA, "blocks"), row(VANILLA, "blocks", variant="seq-tiles"),
            row(OURS, "compiled", variant="dt-fused"), row(OURS, "compiled", variant="conv-taps"),
            row(OURS, "compiled", variant="dt-fused+conv-taps"),
            row(OURS, "compiled", variant="per-route"),
            row(OURS, "compiled", variant="seq-tiles"),
            row(OURS, "compiled", variant="inline"), row(VANILLA, "blocks", variant="assoc-chunks"),
            row(OURS, "compiled", variant="time-major"),
            row(VANILLA, "blocks", variant="coordesc"),
            row(OURS, "compiled", variant="tf32"), row(SWIN, "compiled", variant="tf32"),
            row(OURS, train=True), row(SWIN, train=True),
            row(OURS, "compiled", variant="cudagraphs"),
            row(SWIN, "compiled", variant="cudagraphs"),
            row(OURS, "compiled", variant="coordesc"), row(SWIN, "compiled", variant="coordesc"),
            row(OURS, "blocks"), row(OURS, dtype=bf), row(SWIN, dtype=bf),
            row(OURS, "compiled", bf), row(SWIN, "compiled", bf),
            row(OURS, "compiled", train=True), row(SWIN, "compiled", train=True),
            row(OURS, "compiled", bf, train=True), row(SWIN, "compiled", bf, train=True),
            row(OURS, "compiled", variant="autotune"), row(SWIN, "compiled", variant="autotune"),
            row(VANILLA, "compiled"), row(VANILLA, "compiled", variant="assoc-chunks"),
            row(VANILLA, dtype=bf), row(VANILLA, "blocks", bf), row(OURS, "blocks", bf),
            row(OURS, "compiled", variant="chunked"), row(OURS, "compiled", variant="floor"),
            row(OURS, "compiled", train=True, variant="tf32"),
            row(SWIN, "compiled", train=True, variant="tf32"),
            row(OURS, "compiled", train=True, variant="floor"),
            row(OURS, "compiled", train=True, variant="chunked"),
            row(VANILLA, "compiled", train=True),
            row(VANILLA, "compiled", train=True, variant="assoc-chunks"),
            row(VANILLA, "compiled", bf, train=True),
            row(OURS, "compiled", variant="assoc-chunks"),
            row(VANILLA, "blocks", variant="dt-fused"))


def make_plan(args):
    """The plan of a run, its model rows narrowed to --rows if given."""
    plan = _plan(args)
    import dataclasses
    plan = dataclasses.replace(plan, phase_end=asked_phase_ends(plan.phase_end, args.phases))
    if args.rows:
        plan = dataclasses.replace(plan, rows=tuple(
            r for r in plan.rows if any(part in row_name(r) for part in args.rows)))
    if args.scans:
        plan = dataclasses.replace(plan, scan_cells=tuple(
            c for c in plan.scan_cells if any(scan_part_matches(p, c) for p in args.scans)))
    if args.tests == "all":
        plan = dataclasses.replace(plan, tests=(ALL_TESTS,))
    return plan


def asked_phase_ends(ends, asked):
    """The phases' end marks when only some run: each asked phase keeps its share of the budget
    (its mark minus the previous one's), the shares scaled to fill the whole budget; a phase not
    asked ends where the last asked one before it ends (card always runs)."""
    share, prev = {}, 0.0
    for name in PHASES:
        share[name], prev = ends[name] - prev, ends[name]
    runs = [n for n in PHASES if n in asked or n == "card"]
    total = sum(share[n] for n in runs)
    out, at = {}, 0.0
    for name in PHASES:
        if name in runs:
            at += share[name] / total
        out[name] = at
    out[PHASES[-1] if PHASES[-1] in runs else runs[-1]] = 1.0     # no rounding left over
    return out


def cell_name(cell):
    gen, batch, path = cell
    return f"{gen} b{batch} {path}"


def scan_part_matches(part, cell):
    """--scans: a part ending in '$' names one cell exactly; any other, every cell whose name
    contains it ('v0 b32 assoc compiled' also picks its ', reduce', ', time-major'...)."""
    name = cell_name(cell)
    return name == part[:-1] if part.endswith("$") else part in name


def _plan(args):
    if not args.dry_run:
        big = tuple((g, args.v0_batch if g == "v0" else b) for g, b in SCAN_BIG)
        return Plan(scan_cells=scan_cells(big, SCAN_SMALL), rows=model_plan(False))
    # Tiny: 8 x 8 maps, few channels, one-block stages, 1-2 timed calls. Inductor compiles the
    # chunked scan at the first shape (its kernels fill kernels.tar.gz); the assoc scan (on a
    # CPU its generic mode, not the GPU's pointwise one) and the models compile with aot_eager
    # (Dynamo and AOTAutograd as on the GPU, no codegen): Inductor's C++ builds of them take
    # minutes on a 2-core CPU, and the repository's tests cover them.
    tiny_tests = (("scan", ["test_scan.py", "-k", "golden_selective_scan and plain"]),)
    est = {**EST_S, "scan compiled": 30, "model compiled": 10, "model blocks": 10,
           "train compiled": 15, ("scan compiled", "v2"): 10, ("scan compiled", "v0"): 10,
           **{("scan compiled", f"v2 {p}"): 10 for p in SCAN_COMPILED_PATHS},
           "model compiled autotune": 10, "train compiled autotune": 15,
           "model compiled per-route": 10, "model compiled dt-fused": 10,
           "model compiled dt-fused+conv-taps": 10,
           "model compiled seq-tiles": 10,
           ("model blocks seq-tiles", VANILLA): 10, "model blocks dt-fused": 10,
           "model compiled coordesc": 10, "train compiled coordesc": 15,
           "model blocks coordesc": 10, "model blocks autotune": 10,
           ("model compiled", VANILLA): 10, ("model blocks", VANILLA): 10,
           ("model eager", VANILLA): 8, ("model blocks coordesc", VANILLA): 10,
           ("scan compiled", "v2 assoc chunks compiled"): 20,
           ("scan compiled", "v2 assoc chunks compiled, T=32"): 20}
    # every path once; coordesc right after assoc compiled: aot_eager takes no options, so
    # Dynamo reuses that graph (on the card coordesc compiles anew)
    cells = tuple(("v2", 2, p) for p in ("chunked eager", "chunked compiled", "assoc compiled",
                                         "assoc compiled, coordesc",
                                         "assoc compiled, u time-major",
                                         "assoc compiled, time-major", "assoc compiled, reduce",
                                         "assoc compiled, seq-tiles", "assoc eager")) + \
        (("v2", 2, "assoc chunks compiled"), ("v2", 2, "assoc chunks compiled, T=32"),
         ("v0", 2, "chunked eager"),
         ("v0", 2, "assoc eager"), ("v2", 1, "chunked eager"))
    return Plan(scan_shapes={"v2": (8, 64, 1), "v0": (16, 64, 16)},
                scan_cells=cells, batch=2, res=64,
                ours_overrides=dict(depths=(1, 1, 1, 1), dim=16), copy_bytes=16 << 20,
                matmul_n=256, reps=(1, 0.0, 2, 2, 0.0), est=est, tests=tiny_tests,
                rows=model_plan(True), model_backend="aot_eager",
                scan_backends={"assoc compiled": "aot_eager",
                               "assoc chunks compiled": "aot_eager",
                               "assoc chunks compiled, T=32": "aot_eager"},
                phase_end=DRY_PHASE_END)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu_out)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes, tiny budget: every code path once (the CPU rehearsal)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"global deadline in seconds (default {BUDGET_S}; dry run "
                        f"{DRY_BUDGET_S})")
    p.add_argument("--hard-s", type=float, default=None,
                   help=f"kill the run at this many seconds (default: budget + {HARD_GRACE_S}; "
                        f"dry run + 40)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (card always runs)")
    p.add_argument("--v0-batch", type=int, default=V0_BATCH, help="big batch of the v0 scan")
    p.add_argument("--rows", type=lambda t: [x for x in t.split(",") if x], default=None,
                   metavar="PARTS", help="model rows whose name contains one of these (comma-"
                   "separated), e.g. 'vanilla,chunked' (names: 's1l8 compiled fp32 train')")
    p.add_argument("--scans", type=lambda t: [x.strip() for x in t.split(";") if x.strip()],
                   default=None, metavar="PARTS", help="scan cells whose name contains one of "
                   "these (';'-separated: paths hold commas), e.g. 'v0 b32 assoc compiled'; "
                   "one ending in '$' is a whole name (names: 'v2 b128 assoc compiled, "
                   "reduce')")
    p.add_argument("--tests", choices=("subset", "all"), default="subset",
                   help="tests phase: the CUDA subset (TEST_SETS, most valuable first) or the "
                        "whole suite in one pytest (xdist workers if installed), e.g. "
                        "--phases tests --tests all")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.budget_s is None:
        args.budget_s = float(DRY_BUDGET_S if args.dry_run else BUDGET_S)
    if args.hard_s is None:
        args.hard_s = args.budget_s + (40 if args.dry_run else HARD_GRACE_S)
    # finite, and the hard stop no earlier than the budget: nan reached select() in the parent
    # (a ValueError after the child had started, outside the cleanup), inf meant no hard stop
    if not (0 < args.budget_s <= args.hard_s < math.inf) or args.v0_batch < 1:
        build_parser().error(f"--budget-s must be > 0, --hard-s finite and >= --budget-s, and "
                             f"--v0-batch >= 1, got {args.budget_s}, {args.hard_s}, "
                             f"{args.v0_batch}")
    args.phases = [s for s in args.phases.split(",") if s]
    bad = [s for s in args.phases if s not in PHASES]
    if bad or not args.phases or len(set(args.phases)) != len(args.phases):
        build_parser().error(f"--phases: distinct names out of {','.join(PHASES)}, got "
                             f"{args.phases}")
    if args.out is None:
        args.out = os.environ.get("OUT") or "gpu_out"
    # a filter for a phase the run does not have was ignored: a device run spent on the
    # wrong thing
    for flag, given, phase in (("--rows", args.rows is not None, "models"),
                               ("--scans", args.scans is not None, "scan"),
                               ("--tests all", args.tests == "all", "tests")):
        if given and phase not in args.phases:
            build_parser().error(f"{flag} is for the {phase} phase, which --phases "
                                 f"{','.join(args.phases)} does not run")
    if args.rows is not None:
        names = [row_name(r) for r in model_plan(args.dry_run)]
        bad = [p for p in args.rows if not any(p in n for n in names)] or \
            ([] if args.rows else ["(empty)"])
        if bad:
            build_parser().error(f"--rows: {', '.join(map(repr, bad))} in no model row's name; "
                                 f"rows: {'; '.join(names)}")
    if args.scans is not None:
        cells = _plan(args).scan_cells
        names = [cell_name(c) for c in cells]
        bad = [p for p in args.scans if not any(scan_part_matches(p, c) for c in cells)] or \
            ([] if args.scans else ["(empty)"])
        if bad:
            build_parser().error(f"--scans: {', '.join(map(repr, bad))} in no scan cell's "
                                 f"name; cells: {'; '.join(names)}")
    return args


# -------------------------------------------------------------------------------- small helpers
def error_text(e):
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"


def write_json(path, obj):
    """Atomic: a reader (or a kill) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def code_files(root):
    """Inductor's generated sources under its cache dir (.py: wrappers and Triton kernels; .cpp
    on a CPU), skipping the compiled binaries under triton/."""
    out = set()
    for d, subdirs, files in os.walk(root):
        subdirs[:] = [s for s in subdirs if s not in ("triton", "fxgraph", "aotautograd")]
        out.update(os.path.relpath(os.path.join(d, f), root) for f in files
                   if f.endswith((".py", ".cpp")))
    return out


def tuned_files(root):
    """The autotuner's choice for each Triton kernel it benchmarked (XBLOCK, R0_BLOCK, warps,
    stages), a .best_config file of a few hundred bytes in the kernel's own folder."""
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
            for f in files if f.endswith(".best_config")}


def is_wrapper(path):
    """Inductor's output code for one graph (it launches the kernels) defines call(args)
    (call(self, args) in newer versions)."""
    try:
        with open(path, errors="replace") as f:
            return re.search(r"def call\((self, )?args\)", f.read()) is not None
    except OSError:
        return False


def kill_group(pid, grace=5.0, reap=None):
    """End a process group that this script started (by its leader's id). reap: the leader's
    Popen.poll, if it is this process's child: until reaped, a leader that has ended stays in
    its group as a zombie, and the group looked alive for both graces (6 s of every run)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if reap:
            reap()
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        t_end = time.time() + grace
        while time.time() < t_end:
            if reap:
                reap()
            try:
                os.killpg(pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.2)


# -------------------------------------------------------------------------------- the child's run
class Run:
    """The child's state: deadline, results (saved after every figure), log, kept callables."""

    def __init__(self, args, plan):
        self.args, self.plan = args, plan
        self.t0 = args.t0 or time.time()
        self.dev = args.device
        self.path = os.path.join(args.out, "gpu.json")
        self.cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
        self.res = {"header": {}, "phases": {}, "card": {}, "scan": [], "models": [],
                    "profile": {}, "tests": [], "report": {}, "notes": []}
        self.keep = {}                    # PROFILE_ITEMS -> (callable, mode), for phase_profile
        self.ref_logits = {}              # model -> eager fp32 logits (check_logits)
        self.measured = {}                # what the compile calls took, for the estimates

    def now(self):
        return time.time() - self.t0

    def phase_end(self, phase):
        return self.args.budget_s * self.plan.phase_end[phase]

    def fits(self, phase, need_s):
        return self.now() + need_s <= self.phase_end(phase)

    def estimate(self, kind, who=None):
        """Seconds one item of this kind takes: measured for `who` (a model, a scan path), else
        the plan's guess for who, else (training) TRAIN_OVER_INFER x its inference row, else
        the longest measured for the kind, else the plan's guess for the kind (EST_S)."""
        for table, key in ((self.measured, (kind, who)), (self.plan.est, (kind, who))):
            if key in table:
                return table[key]
        if kind == "train compiled" and ("model compiled", who) in self.measured:
            return TRAIN_OVER_INFER * self.measured[("model compiled", who)]
        return self.measured.get(kind, self.plan.est[kind])

    def learn(self, kind, who, seconds):
        self.measured[(kind, who)] = seconds
        self.measured[kind] = max(seconds, self.measured.get(kind, 0.0))

    def log(self, msg):
        print(f"[gpu_check {time.strftime('%H:%M:%S')} +{self.now():5.0f}s] {msg}", flush=True)

    def save(self):
        add_swin_ratios(self.res["models"])
        self.res["seconds_per_item"] = {k if isinstance(k, str) else " / ".join(k): v
                                        for k, v in self.measured.items()}
        write_json(self.path, self.res)

    def begin(self, what):
        """Log and record the item starting now (a killed run's gpu.json names it)."""
        self.log(what)
        self.res["current"] = {"item": what, "at_s": self.now()}
        self.save()

    def skip(self, phase, what, need_s):
        """Log and return the note a skipped item gets."""
        note = (f"skipped: needs ~{need_s:.0f} s, "
                f"{max(0.0, self.phase_end(phase) - self.now()):.0f} s left in phase {phase}")
        self.log(f"{what}: {note}")
        return note

    def sync(self):
        if self.dev == "cuda":
            import torch
            torch.cuda.synchronize()

    def time_once(self, fn):
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def measure(self, fn):
        """Median ms per call after warm-up: CUDA events recorded around each call back to back,
        read after one synchronize (perf_counter on a CPU)."""
        import torch
        warmup, warm_s, reps_min, reps_max, cell_s = self.plan.reps
        t_end, calls = time.perf_counter() + warm_s, 0
        while calls < warmup or (time.perf_counter() < t_end and calls < 100):
            fn()
            self.sync()          # on CUDA fn only queues: unsynced, warm_s queued up to 100 calls
            calls += 1
        one = self.time_once(fn)
        n = int(min(reps_max, max(reps_min, cell_s / max(one, 1e-6))))
        if self.dev == "cuda":
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
            for a, b in ev:
                a.record()
                fn()
                b.record()
            torch.cuda.synchronize()
            ms = [a.elapsed_time(b) for a, b in ev]
        else:
            ms = [1e3 * self.time_once(fn) for _ in range(n)]
        q = statistics.quantiles(ms, n=4) if len(ms) >= 4 else None
        med = statistics.median(ms)
        return {"ms": med, "min_ms": min(ms), "reps": n,
                "iqr_rel": (q[2] - q[0]) / med if q and med else None}

    def peak_gb(self, fn):
        """Extra device memory of one call over what is allocated before it (None on a CPU)."""
        if self.dev != "cuda":
            fn()
            return None
        import torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 1e9

    def free(self):
        """Collect garbage and return cached device memory. Never raises: after a sticky CUDA
        error (an illegal address in a generated kernel) empty_cache raises too, and the phases
        that follow (tests, report) run in processes of their own and can still measure."""
        try:
            gc.collect()
            if self.dev == "cuda":
                import torch
                torch.cuda.empty_cache()
        except Exception as e:                   # noqa: BLE001 -- recorded, the run goes on
            self.res.setdefault("free_errors", []).append(error_text(e))
            self.log(f"free: {error_text(e)}")

    def tracked(self, row, first_call):
        """Run the first (compile) call, recording the generated wrappers it added and the
        graph breaks Dynamo counted. Returns its seconds."""
        from torch._dynamo.utils import counters
        before = code_files(self.cache) if self.cache else set()
        breaks = sum(counters["graph_break"].values())
        seconds = self.time_once(first_call)
        if self.cache:
            new = sorted(code_files(self.cache) - before)
            wrappers = [f for f in new if is_wrapper(os.path.join(self.cache, f))]
            row.setdefault("code", []).extend(wrappers)
            row["code_files"] = row.get("code_files", 0) + len(new)
        row["graph_breaks"] = row.get("graph_breaks", 0) + \
            sum(counters["graph_break"].values()) - breaks
        return seconds


def raise_recompile_limits():
    """One process compiles the same code objects (scan.selective_scan, VSSM.forward, ...) for
    every shape, grad mode, dtype and model: more cache entries than Dynamo's default limit of
    8 per code object (past it, fullgraph=True fails and the rest runs eager)."""
    import torch._dynamo
    for name in ("recompile_limit", "cache_size_limit"):       # the name changed across versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)


def precision(row):
    """What a row's arithmetic is: its dtype, or "tf32" for float32 with TF32 matrix products."""
    return "tf32" if row.get("variant") == "tf32" else row["dtype"]


def add_swin_ratios(rows):
    """Each row's img/s over the best Swin-T row of its kind (inference or training) and
    precision, eager or compiled: a float32 row is never divided by a bfloat16 or TF32 one."""
    best = {}
    for r in rows:
        if r.get("model") == SWIN and r.get("img_s"):
            key = (r["train"], precision(r))
            best[key] = max(best.get(key, 0), r["img_s"])
    for r in rows:
        if r.get("img_s") and best.get((r["train"], precision(r))):
            r["vs_swin_best"] = r["img_s"] / best[(r["train"], precision(r))]


def run_phase(run, name, fn):
    """One phase: its own exceptions are recorded (type and first line), never raised."""
    rec = run.res["phases"].setdefault(name, {})
    if name not in run.args.phases and name != "card":
        rec.update(status="not asked")
        run.save()
        return
    if name != "card" and run.now() >= run.args.budget_s:
        rec.update(status="skipped: budget spent", at_s=run.now())
        run.log(f"phase {name}: skipped, the budget of {run.args.budget_s:.0f} s is spent")
        run.save()
        return
    run.log(f"phase {name}: start (ends by +{run.phase_end(name):.0f}s)")
    rec.update(status="running", start_s=run.now())
    run.save()
    try:
        fn(run)
        rec["status"] = "done"
    except Exception as e:                   # noqa: BLE001 -- recorded, the next phase runs
        rec.update(status="failed", error=error_text(e))
        traceback.print_exc()
    rec["wall_s"] = run.now() - rec["start_s"]
    run.log(f"phase {name}: {rec['status']} in {rec['wall_s']:.0f} s")
    run.free()
    run.save()


# -------------------------------------------------------------------------------- 1. card
def git(*cmd, strip=True):
    try:
        out = subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=20,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout
        return out.strip() if strip else out
    except (OSError, subprocess.SubprocessError):
        return None


def source_hashes():
    """sha256 (12 hex digits) of the project's .py files: ties the run to the code even where
    the copy has no .git (then GPU_CHECK_COMMIT=<hash> in the environment names the commit)."""
    import hashlib
    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    for f in sorted(os.listdir(here)):
        if f.endswith(".py"):
            with open(os.path.join(here, f), "rb") as fh:
                out[f] = hashlib.sha256(fh.read()).hexdigest()[:12]
    return out


def version_of(module):
    try:
        return __import__(module).__version__
    except Exception:                        # noqa: BLE001 -- absent or broken: say so
        return None


def phase_card(run):
    """Header (versions, commit, settings) and card facts: copy bandwidth, matmul TFLOP/s.
    Seconds (CUDA start-up and two short loops)."""
    import torch
    h = run.res["header"]
    dirty = git("status", "--porcelain", "--untracked-files=normal", strip=False)
    h.update(torch=torch.__version__, cuda=torch.version.cuda, triton=version_of("triton"),
             timm=version_of("timm"), python=sys.version.split()[0], device=run.dev,
             commit=git("rev-parse", "HEAD") or os.environ.get("GPU_CHECK_COMMIT"),
             worktree=(dirty or "").splitlines()[:30], sources=source_hashes(),
             command=os.environ.get("GPU_CHECK_COMMAND"),
             env={k: v for k, v in os.environ.items()
                  if k.startswith(("TORCHINDUCTOR", "TORCH_", "VMAMBA", "CUDA_VISIBLE", "OUT"))},
             dry_run=run.args.dry_run, budget_s=run.args.budget_s,
             date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if run.dev == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device cuda, but torch.cuda.is_available() is False "
                               f"(torch {torch.__version__}); without a card, "
                               f"--device cpu --dry-run rehearses the run")
        p = torch.cuda.get_device_properties(0)
        h.update(gpu=p.name, sms=p.multi_processor_count, memory_gb=p.total_memory / 1e9,
                 capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
        try:
            h["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    h["tf32_default"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                         "cudnn": torch.backends.cudnn.allow_tf32,
                         "float32_matmul_precision": torch.get_float32_matmul_precision()}
    run.save()
    card = run.res["card"]
    x = torch.empty(run.plan.copy_bytes // 4, device=run.dev).normal_()
    t = run.measure(lambda: x.clone())
    card["copy_gb_s"] = 2 * x.numel() * 4 / (t["ms"] * 1e6)       # read + write
    card["copy_bytes"] = x.numel() * 4
    del x
    n = run.plan.matmul_n
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=run.dev, dtype=dtype)
        t = run.measure(lambda: a @ a)
        card[f"matmul_tflops_{str(dtype)[6:]}"] = 2 * n ** 3 / (t["ms"] * 1e9)
    card["matmul_n"] = n
    run.log(f"card: {h.get('gpu', 'cpu')} | torch {h['torch']} | triton {h['triton']} | "
            f"timm {h['timm']} | copy {card['copy_gb_s']:.0f} GB/s | matmul fp32 "
            f"{card['matmul_tflops_float32']:.1f} / bf16 {card['matmul_tflops_bfloat16']:.1f} "
            f"TFLOP/s (TF32 off)")


# -------------------------------------------------------------------------------- 2. scan
class Patch:
    """Swap module.name for value while a row compiles and runs: Dynamo bakes the function it
    traced into the graph and guards on it, so the swap must last the whole row. With mark,
    the stand-in sets self.hit when it runs (a store, not a count: Dynamo guards on values a
    traced function reads, so `calls += 1` recompiled on every call).
    Dynamo guards a module global it read (vmamba_min.selective_scan), not a method swapped
    on a class: a fresh model compiled under Patch(SS2D, "selection", ...) alone reused the
    graph an earlier row had compiled without it (torch 2.13, backend "eager"). Such a swap
    goes with a guarded global's (Patches, selection_patch)."""

    def __init__(self, module, name, value, mark=False):
        self.module, self.name, self.value, self.mark, self.hit = module, name, value, mark, False

    def __enter__(self):
        self.orig = getattr(self.module, self.name)
        stand_in = self.value
        if self.mark:
            def stand_in(*a, **kw):
                self.hit = True
                return self.value(*a, **kw)
            stand_in.__wrapped__ = self.value                 # which function it stands for
        setattr(self.module, self.name, stand_in)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.orig)


class Patches:
    """Several Patch swaps at once; hit and name are those of the marked one."""

    def __init__(self, *patches):
        self.patches = patches
        self.marked = next(p for p in patches if p.mark)

    def __enter__(self):
        for p in self.patches:
            p.__enter__()
        return self

    def __exit__(self, *exc):
        for p in reversed(self.patches):
            p.__exit__(*exc)

    hit = property(lambda self: self.marked.hit)
    name = property(lambda self: self.marked.name)


class AllPatches(Patches):
    """The patches of a combined variant ("a+b"), entered and undone as Patches' are; hit when
    every part that checks its swap was hit, named by the parts' names."""

    def __init__(self, parts):
        self.patches = tuple(parts)

    hit = property(lambda self: all(p.hit for p in self.patches if hasattr(p, "hit")))
    name = property(lambda self: "+".join(getattr(p, "name", "?") for p in self.patches))


def selection_patch(selection):
    """The "time-major" and "dt-fused" variants: SS2D.selection swapped for theirs, and, as
    Dynamo does not guard a class's method, vmamba_min.route_each for a new function object
    that their selection calls: graphs compiled before it (guarded on the original
    route_each) are not reused under it, nor its graph after it (guarded on the new one)."""
    import vmamba_min
    route_each = vmamba_min.route_each

    def routed(t):
        return route_each(t)
    return Patches(Patch(vmamba_min, "route_each", routed),
                   Patch(vmamba_min.SS2D, "selection", selection, mark=True))


def never(*args, **kwargs):
    """Stands in for scan._use_assoc (whatever its arguments): never the associative scan."""
    return False


def group_sums_by_reduction():
    """scan_assoc's backward with dB and dC summed by a reduction kernel instead of atomic adds
    (scan_assoc.GROUP_SUM = "reduce"); a no-op where scan_assoc has no such setting."""
    import contextlib
    import scan_assoc
    if not hasattr(scan_assoc, "GROUP_SUM"):
        return contextlib.nullcontext()
    return Patch(scan_assoc, "GROUP_SUM", "reduce")


def force_chunked():
    """scan.selective_scan with its dispatch to scan_assoc turned off (scan._use_assoc: on CUDA
    under torch.compile), so that the chunked scan itself compiles; a no-op where there is no
    such dispatch."""
    import contextlib
    import scan
    if not hasattr(scan, "_use_assoc"):
        return contextlib.nullcontext()
    return Patch(scan, "_use_assoc", never)


def compiled_scan_path(device):
    """Which scan scan.selective_scan runs under torch.compile on this device."""
    import scan
    if hasattr(scan, "_use_assoc") and device == "cuda":
        return "assoc (scan._use_assoc)"
    return "chunked"


def assoc_scan_fn(name="selective_scan_assoc"):
    try:
        import scan_assoc
        return getattr(scan_assoc, name), f"scan_assoc.{name}"
    except (ImportError, AttributeError) as e:
        return None, error_text(e)


def scan_inputs(run, KD, L, N, batch, seed=0):
    """Inputs at VMamba-T's official init (bench.py's scan_inputs), made on the device."""
    import torch
    dev = run.dev
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, device=dev)
    dt = torch.exp(torch.rand(KD, generator=g, device=dev) * math.log(100) + math.log(1e-3))
    dt = dt.clamp(min=1e-4)
    inputs = [randn(batch, KD, L), 0.1 * randn(batch, KD, L),
              -torch.arange(1, N + 1, dtype=torch.float32, device=dev).repeat(KD, 1),
              randn(batch, K, N, L), randn(batch, K, N, L), torch.ones(KD, device=dev),
              dt + torch.log(-torch.expm1(-dt))]                # delta_bias = softplus^-1(dt)
    return inputs, randn(batch, KD, L)


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def scan_floor(run, inputs, gy):
    """ms the call must take at the measured copy bandwidth. fwd: read the inputs, write y;
    the state stays on chip (a fused kernel never writes it). fwd+bwd: that, then read the
    inputs and dy again and write the 7 gradients (no saved state either: recomputed)."""
    nbytes = sum(t.numel() * t.element_size() for t in inputs)
    y = gy.numel() * 4
    bw = run.res["card"].get("copy_gb_s")
    fwd, fb = nbytes + y, 3 * nbytes + 2 * y
    ms = (lambda b: b / (bw * 1e6)) if bw else (lambda b: None)
    return {"fwd_bytes": fwd, "fwd_floor_ms": ms(fwd), "fwd_bwd_bytes": fb,
            "fwd_bwd_floor_ms": ms(fb)}


def scan_reference(inputs, gy, fn):
    """The same scan in float64 on the device: y and the 7 gradients."""
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    y = fn(*leaves, delta_softplus=True)
    y.backward(gy.double())
    ref = {"y": y.detach()}
    ref.update({n: t.grad for n, t in zip(SCAN_ARGS, leaves)})
    return ref


def scan_cell(run, row, fn, kind, inputs, gy, ref, backward=True):
    """Time one path: fwd under no_grad, then (backward) fwd+bwd of <y, gy> into all 7 inputs;
    errors."""
    import torch

    def fwd():
        with torch.no_grad():
            return fn(*inputs, delta_softplus=True)
    leaves = [t.detach().requires_grad_() for t in inputs]

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn(*leaves, delta_softplus=True).backward(gy)
    compiled = kind == "scan compiled"
    first = run.tracked(row, fwd) if compiled else run.time_once(fwd)
    row["first_fwd_s"] = first
    if ref is not None:
        row["err_y"] = rel_err(fwd(), ref["y"])
    t = run.measure(fwd)
    row.update(fwd_ms=t["ms"], fwd_reps=t["reps"], fwd_iqr_rel=t["iqr_rel"])
    if row.get("fwd_floor_ms"):
        row["fwd_x_floor"] = row["fwd_ms"] / row["fwd_floor_ms"]
    run.save()
    if not backward:
        if "err_y" in row:
            row["err_max"] = row["err_y"]
        return
    first_b = run.tracked(row, fwd_bwd) if compiled else run.time_once(fwd_bwd)
    row["first_fwd_bwd_s"] = first_b
    if ref is not None:
        row["err_grads"] = {n: rel_err(t.grad, ref[n]) for n, t in zip(SCAN_ARGS, leaves)}
        row["err_max"] = max([row["err_y"]] + list(row["err_grads"].values()))
    t = run.measure(fwd_bwd)
    row.update(fwd_bwd_ms=t["ms"], fwd_bwd_reps=t["reps"], fwd_bwd_iqr_rel=t["iqr_rel"],
               fwd_bwd_over_fwd=t["ms"] / row["fwd_ms"],
               fwd_bwd_peak_gb=run.peak_gb(fwd_bwd))
    for p in ("fwd", "fwd_bwd"):
        if row.get(f"{p}_floor_ms"):
            row[f"{p}_x_floor"] = row[f"{p}_ms"] / row[f"{p}_floor_ms"]


# The chunked experiment's chunk sizes besides its default 64, for v0 only: offline code
# generation (stage-1 v0, batch 32) put them at 2.31x (T = 32), 1.98x (64) and 1.83x (128)
# the floor, with different tiles (docs/design.md).
CHUNK_SWEEP = (32, 128)
CHUNK_SWEEP_PATHS = tuple(f"assoc chunks compiled, T={t}" for t in CHUNK_SWEEP)
SCAN_COMPILED_PATHS = ("assoc compiled", "assoc chunks compiled", *CHUNK_SWEEP_PATHS,
                       "assoc compiled, reduce", "assoc compiled, seq-tiles",
                       "assoc compiled, u time-major",
                       "assoc compiled, time-major", "assoc compiled, coordesc",
                       "chunked compiled")
SCAN_EXPERIMENTS = ("assoc chunks compiled", *CHUNK_SWEEP_PATHS, "assoc compiled, seq-tiles",
                    "assoc compiled, u time-major", "assoc compiled, time-major",
                    "assoc compiled, coordesc")
# paths whose backward is another path's code, timed there: only their forward is timed (the
# chunked experiment's backward is scan_assoc._grads, "assoc compiled"'s; its compile took 82
# of v0's 93 s)
FORWARD_ONLY = ("assoc chunks compiled", *CHUNK_SWEEP_PATHS)


def time_major(inputs, which=2):
    """The scan's inputs with u and delta (which=2), or u alone (which=1), (b, K*D, L), stored
    time-major: same values and shapes, strides (K*D, 1, b*K*D)."""
    moved = tuple(t.permute(2, 0, 1).contiguous().permute(1, 2, 0) for t in inputs[:which])
    return moved + tuple(inputs[which:])


def u_time_major(inputs):
    """u time-major, delta along L: near what the compiled models pass. There u is gathered
    from the channels-last map along each route (channels fastest, the batch outermost: not
    (L, b, K*D) exactly) and delta is the dt projection's (b, K, D, L) output; eager models
    pass both contiguous, as the plain cells do."""
    return time_major(inputs, which=1)


def scan_cells(big, small):
    """(gen, batch, path) in the order they run, the most valuable first: the big batches'
    eager baseline, then v2's assoc compiled (what the compiled models run on CUDA), the same
    with its group sums as a reduction kernel instead of atomic adds (it decides
    scan_assoc.GROUP_SUM's default) and chunked compiled (what they ran before), then the same
    for v0 (whose first compiles took 93 s on an H200, v2's 15 s), then the experiments
    (below; v2's first), then batch 1 (comparable with earlier GPU runs), then assoc eager (a
    log-depth recursion of slices: slow, and only where the state is small). Experiments,
    none of them a target's cell: "u time-major" (u
    channels-fastest, delta along L: near what the compiled models pass the scan, which the
    plain cells do not), "time-major" (u and delta stored time-major, (L, b, K*D),
    as the scan's output already is: do loads contiguous along the channels, like its stores,
    make the scan kernel faster? Against "u time-major": what a dt projection writing delta
    channels-fastest would give the models), "coordesc" (Inductor's
    coordinate_descent_tuning: does another tile?), "seq-tiles" (tiles of one step per
    program offered too: SequentialTiles) and "assoc chunks"
    (scan_assoc.selective_scan_assoc_chunked: scans along chunks of 64 steps that a Triton
    program holds whole, chained by a scan over chunks; for v0, whose one-pass kernel ran at
    28.7x its floor on the H200; v0 also with chunks of 32 and 128 steps)."""
    def compiled(paths):
        return [(g, b, p) for g, b in big for p in paths
                if (g == "v2" or p != "assoc compiled, reduce")
                and (g == "v0" or p not in CHUNK_SWEEP_PATHS)]
    main = [p for p in SCAN_COMPILED_PATHS if p not in SCAN_EXPERIMENTS]
    experiments = [p for p in SCAN_COMPILED_PATHS if p in SCAN_EXPERIMENTS]
    # both generations' own paths before any experiment: interleaved, v2's experiments (about
    # 150 s on a card) left no time for v0's compiled cells in the scan phase
    return tuple([(g, b, "chunked eager") for g, b in big] + compiled(main) +
                 compiled(experiments) +
                 [(g, b, p) for g, b in small
                  for p in ("chunked eager", "assoc compiled", "chunked compiled")] +
                 [(g, b, "assoc eager") for g, b in big + small])


def scan_estimate(run, kind, gen, name):
    """Seconds a scan cell takes, the first known of: measured for this generation and path,
    the plan's guess for them, the longest measured for this generation, the plan's guess for
    it, then Run.estimate's fallbacks. By generation: v0's compiles took 93 s on the H200,
    v2's 15 s."""
    for table, who in ((run.measured, f"{gen} {name}"), (run.plan.est, f"{gen} {name}"),
                       (run.measured, gen), (run.plan.est, gen)):
        if (kind, who) in table:
            return table[(kind, who)]
    return run.estimate(kind, name)


def phase_scan(run):
    """Stage-1 scans in scan_cells' order: per path fwd and fwd+bwd ms, ratio, x floor, errors
    against float64. Compiles dominate (two per compiled path and shape): ~150 s."""
    import contextlib
    import torch
    import scan
    torch.backends.cuda.matmul.allow_tf32 = False       # float32 for the error check
    torch.backends.cudnn.allow_tf32 = False
    raise_recompile_limits()
    chunked = scan.selective_scan            # eager: always the chunked scan
    assoc, assoc_name = assoc_scan_fn()
    assoc_chunked, assoc_chunked_name = assoc_scan_fn("selective_scan_assoc_chunked")
    run.res["scan_notes"] = {
        "chunked": "scan.selective_scan (compiled: with scan._use_assoc off, if it exists)",
        "assoc": assoc_name, "tf32": "off", "ms": "median per call, CUDA events",
        "assoc compiled, reduce": "the same with scan_assoc.GROUP_SUM = 'reduce' (dB, dC summed "
                                  "by a reduction kernel; default: atomic adds); its first "
                                  "calls include a Dynamo recompile of the same function",
        "reference": "scan.selective_scan in float64, eager, on the device",
        "assoc compiled, u time-major": "the same with u stored time-major, (L, b, K*D), "
                                        "delta along L: near the compiled models' layout "
                                        "(their u is gathered channels-fastest)",
        "assoc compiled, time-major": "the same with u and delta stored time-major, (L, b, "
                                      "K*D) (an experiment: the models' delta is along L)",
        "assoc compiled, coordesc": "the same compiled with Inductor's "
                                    "coordinate_descent_tuning (an experiment)",
        "assoc compiled, seq-tiles": "the same with tiles of one step per program among the "
                                     "autotuner's candidates (SequentialTiles, compiled with "
                                     "compile_threads=1; an experiment)",
        "assoc chunks compiled": f"{assoc_chunked_name}, chunks of 64 steps (an experiment); "
                                 f"forward only: its backward is assoc compiled's",
        **{p: f"the same in chunks of {t} steps" for t, p in zip(CHUNK_SWEEP, CHUNK_SWEEP_PATHS)},
        "floor": "bytes the call must move (scan_floor) / measured copy bandwidth; a memory "
                 "floor only: at N = 16 the exps (one per state) may bound first",
        "v0 batch": f"{run.args.v0_batch}: at 128 one (b, K*D, L, N) float32 state is "
                    f"19.7 GB (see V0_BATCH)", "backends": run.plan.scan_backends or "inductor"}

    def compiled(name, fn, **options):
        backend = run.plan.scan_backends.get(name, "inductor")
        return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend,
                             options=options if options and backend == "inductor" else None)
    # path -> (function, kind, what it runs under[, what it does to the inputs])
    paths = {"chunked eager": (chunked, "scan eager", contextlib.nullcontext),
             "chunked compiled": (compiled("chunked compiled", chunked), "scan compiled",
                                  force_chunked)}
    if assoc is not None:
        paths.update({"assoc compiled": (compiled("assoc compiled", assoc), "scan compiled",
                                         contextlib.nullcontext),
                      "assoc compiled, reduce": (compiled("assoc compiled", assoc),
                                                 "scan compiled", group_sums_by_reduction),
                      "assoc compiled, u time-major": (compiled("assoc compiled", assoc),
                                                       "scan compiled", contextlib.nullcontext,
                                                       u_time_major),
                      "assoc compiled, time-major": (compiled("assoc compiled", assoc),
                                                     "scan compiled", contextlib.nullcontext,
                                                     time_major),
                      "assoc compiled, coordesc": (compiled("assoc compiled", assoc,
                                                            coordinate_descent_tuning=True),
                                                   "scan compiled", contextlib.nullcontext),
                      "assoc compiled, seq-tiles": (compiled("assoc compiled", assoc,
                                                             compile_threads=1),
                                                    "scan compiled", SequentialTiles),
                      "assoc eager": (assoc, "scan eager", contextlib.nullcontext)})
    else:
        run.res["notes"].append(f"assoc paths skipped: {assoc_name}")
    if assoc_chunked is not None:
        paths["assoc chunks compiled"] = (compiled("assoc chunks compiled", assoc_chunked),
                                           "scan compiled", contextlib.nullcontext)
        for t, name in zip(CHUNK_SWEEP, CHUNK_SWEEP_PATHS):
            paths[name] = (compiled(name, functools.partial(assoc_chunked, chunk_size=t)),
                           "scan compiled", contextlib.nullcontext)
    shapes = {}                              # (gen, batch) -> inputs, gy, floor, ref: made once
    for gen, batch, name in run.plan.scan_cells:
        KD, L, N = run.plan.scan_shapes[gen]
        elems = batch * KD * L * N
        row = dict(gen=gen, batch=batch, shape=f"{batch}x{KD}x{L}x{N}", path=name)
        what = f"scan {gen} {row['shape']} {name}"
        if name not in paths:
            row["skipped"] = assoc_chunked_name if "chunks" in name else assoc_name
        elif name == "assoc eager" and elems > ERR_MAX_ELEMS:
            row["skipped"] = (f"eager assoc keeps g and h of every state index for its "
                              f"backward: only up to {ERR_MAX_ELEMS:.0e} state elements")
        elif not run.fits("scan", scan_estimate(run, paths[name][1], gen, name)):
            row["skipped"] = run.skip("scan", what, scan_estimate(run, paths[name][1], gen, name))
        else:
            fn, kind, context, *transform = paths[name]
            if (gen, batch) not in shapes:
                shapes[(gen, batch)] = scan_shape(run, gen, batch, chunked)
            inputs, gy, floor, ref = shapes[(gen, batch)]
            for t in transform:
                inputs = t(inputs)
            row.update(floor)
            run.begin(what)
            t = time.time()
            try:
                with context() as under:
                    scan_cell(run, row, fn, kind, inputs, gy, ref,
                              backward=name not in FORWARD_ONLY)
                if isinstance(under, SequentialTiles):
                    row["seq_tile_kernels"], row["seq_tiles_timed"] = under.hits, under.timed
                    if not under.hits and run.dev == "cuda" and \
                            run.plan.scan_backends.get("assoc compiled", "inductor") == \
                            "inductor":            # the backend compiled() gave this cell
                        row["error"] = "the patch missed: no kernel was offered SEQ_TILES"
            except Exception as e:           # noqa: BLE001 -- recorded in the row
                row["error"] = error_text(e)
                traceback.print_exc()
            if "error" not in row:
                took = time.time() - t
                run.learn(kind, f"{gen} {name}", took)
                run.measured[(kind, gen)] = max(took, run.measured.get((kind, gen), 0.0))
            run.free()
            run.log("  " + scan_line(row))
        run.res["scan"].append(row)
        run.save()


def scan_shape(run, gen, batch, chunked):
    """Inputs, upstream gradient, memory floor and (small enough shapes) the float64 reference
    of one scan shape."""
    KD, L, N = run.plan.scan_shapes[gen]
    checked = batch * KD * L * N <= ERR_MAX_ELEMS
    run.log(f"scan {gen} batch {batch}: inputs{', float64 reference' if checked else ''}")
    inputs, gy = scan_inputs(run, KD, L, N, batch)
    ref = None
    try:
        ref = scan_reference(inputs, gy, chunked) if checked else None
    except Exception as e:                   # noqa: BLE001 -- the timings still mean something
        run.res["notes"].append(f"{gen} batch {batch}: no reference ({error_text(e)})")
        run.free()
    return inputs, gy, scan_floor(run, inputs, gy), ref


def scan_line(r):
    def f(k, fmt):
        return "-" if r.get(k) is None else fmt.format(r[k])
    return (f"fwd {f('fwd_ms', '{:.3f}')} ms ({f('fwd_x_floor', '{:.1f}')}x floor) | fwd+bwd "
            f"{f('fwd_bwd_ms', '{:.3f}')} ms ({f('fwd_bwd_x_floor', '{:.1f}')}x floor, "
            f"{f('fwd_bwd_over_fwd', '{:.2f}')}x fwd) | first calls {f('first_fwd_s', '{:.1f}')}"
            f" + {f('first_fwd_bwd_s', '{:.1f}')} s | max rel err {f('err_max', '{:.1e}')}"
            + (f" | {r['error']}" if r.get("error") else ""))


# -------------------------------------------------------------------------------- 3. models
def floor_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
               chunk_size=None, h0=None, return_last_state=False):
    """Stand-in for the selective scan with no recurrence: reads the same inputs, writes y of
    the same shape and dtype (float32) with elementwise work, y = u delta' <B_t, 1> <C_t, 1>
    exp(delta' A[:, 0]) + D u. What the model costs apart from the scan's recurrence."""
    import torch.nn.functional as F
    if return_last_state or h0 is not None:
        raise ValueError("floor_scan: no state, so no h0 and no return_last_state")
    batch, KD, L = u.shape
    groups = B.shape[1]
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    bc = B.float().sum(2, keepdim=True) * C.float().sum(2, keepdim=True)    # (b, K, 1, L)
    bc = bc.expand(batch, groups, KD // groups, L).reshape(batch, KD, L)    # (b, K*D, L)
    y = u * delta * bc * (delta * A.float()[:, :1]).exp()
    return y if D is None else y + D.float()[:, None] * u


def selection_time_major(self, x):
    """SS2D.selection with delta computed time-major: dt_proj applied to the unrouted map as
    dts^T W^T, (b, K, L, D) with the channels fastest, then routed as u is, so that compiled,
    the scan kernel reads delta along the channels, as it reads u (in the model delta is
    the bmm's (b, K, D, L) output, along L). The same values."""
    import torch
    import vmamba_min
    route_each = vmamba_min.route_each          # read at trace time: see selection_patch
    batch, D, H, W = x.shape
    K, R, N = vmamba_min.K, self.dt_rank, self.d_state
    x_dbl = self.x_proj(x)                                   # (b, K, R+2N, H, W)
    delta = torch.matmul(x_dbl[:, :, :R].flatten(3).transpose(-1, -2),
                         self.dt_projs_weight.transpose(-1, -2))          # (b, K, L, D)
    delta = route_each(delta.transpose(-1, -2).view(batch, K, D, H, W))  # (b, K, D, L)
    Bs, Cs = route_each(x_dbl[:, :, R:]).split([N, N], dim=2)
    return delta, Bs, Cs


# The per-route and dt-fused variants compute delta inside the scan kernel up to this dt rank
# (VMamba-T: R = 6, 12, 24, 48 at its four stages); above it, by the model's matmul. The bytes
# and code-generation seconds of each choice: docs/design.md, "One scan per route" and
# "Delta inside the scan kernel".
DT_TERMS_MAX_RANK = 24
SCAN_FUNCTIONS = ("selective_scan", "selective_scan_ref", "selective_scan_assoc",
                  "selective_scan_assoc_chunked")     # vmamba_min's names, read by run_scan


def dt_terms(weight, dts):
    """(..., D, R) weight, (b, ..., R, L) low-rank dt -> (b, ..., D, L) delta as R
    multiply-adds (one route: (D, R) and (b, R, L); all four: (K, D, R) and (b, K, R, L)), in
    float32 (float64 for a float64 model): pointwise, so Inductor computes delta inside the
    scan kernel that reads it, where the dt projection's bmm writes delta, K*D values per
    token, to memory for the scan to read back. The scans compute in that dtype anyway; under
    bf16 (autocast or a converted model) this delta is the more precise one."""
    import torch
    dtype = torch.promote_types(weight.dtype, torch.float32)
    weight, dts = weight.to(dtype), dts.to(dtype)
    delta = weight[..., 0, None] * dts[..., 0, None, :]
    for r in range(1, weight.shape[-1]):
        delta = delta + weight[..., r, None] * dts[..., r, None, :]
    return delta


def selection_dt_fused(self, x):
    """SS2D.selection with delta computed by dt_terms from the routed low-rank dt (by the
    model's matmul above DT_TERMS_MAX_RANK). The same values in float32 and float64 (the
    R-term sums may round in another order); under bf16 this delta is float32, the more precise
    one. Why (docs/design.md, "Delta inside the scan kernel"): compiled, the model's dt
    projection is a bmm that writes delta, K*D values per token, for the scan kernel to read
    back; as multiply-adds, Inductor computes delta inside the one scan kernel per block."""
    import torch
    import vmamba_min
    route_each = vmamba_min.route_each          # read at trace time: see selection_patch
    R, N = self.dt_rank, self.d_state
    dts, Bs, Cs = route_each(self.x_proj(x)).split([R, N, N], dim=2)   # (b, K, R|N|N, L)
    if R > DT_TERMS_MAX_RANK:
        return torch.matmul(self.dt_projs_weight, dts), Bs, Cs
    return dt_terms(self.dt_projs_weight, dts), Bs, Cs


def conv_taps(self, x):                                       # (b, D, H, W)
    """SS2D.conv with the depthwise k x k convolution written as k*k multiply-adds: the
    zero-padded map shifted by each tap, times that tap's weight per channel (plus the bias),
    then SiLU, in the dtype conv2d computes in (under autocast, autocast's: in float32 the
    map that x_proj and the scan read would double in bytes). The same values up to the sums'
    rounding order. Why (docs/design.md, "The depthwise convolution as taps"): compiled,
    cuDNN's convolution writes its output and a Triton kernel reads it back for the SiLU; as
    taps, Inductor computes both in one pointwise kernel (nine masked loads of the map per
    output). Inference only: in training the taps' weight gradients are reductions of their
    own, and the backward moves more."""
    import torch
    import torch.nn.functional as F
    conv = self.conv2d
    weight, bias = conv.weight, conv.bias
    D, _, kh, kw = weight.shape
    if conv.groups != D or conv.stride != (1, 1) or conv.dilation != (1, 1) or \
            conv.padding != ((kh - 1) // 2, (kw - 1) // 2) or conv.padding_mode != "zeros" or \
            kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv_taps: a depthwise, stride-1, odd-sized, 'same'-padded "
                         f"convolution is written here, got {conv}")
    if torch.is_autocast_enabled(x.device.type):   # conv2d computes in autocast's dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    (ph, pw), (H, W) = conv.padding, x.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph))
    y = None
    for i in range(kh):
        for j in range(kw):
            term = padded[:, :, i:i + H, j:j + W] * weight[:, 0, i, j].view(D, 1, 1)
            y = term if y is None else y + term
    if bias is not None:
        y = y + bias.view(D, 1, 1)
    return F.silu(y)


def conv_patch():
    """The "conv-taps" variant: SS2D.conv swapped for conv_taps and, as in selection_patch,
    vmamba_min.grid (which SS2D.forward calls) for a new function object, so that no graph
    compiled without the swap is reused under it, nor its graph after it."""
    import vmamba_min
    grid = vmamba_min.grid

    def gridded(x, H, W):
        return grid(x, H, W)
    return Patches(Patch(vmamba_min, "grid", gridded),
                   Patch(vmamba_min.SS2D, "conv", conv_taps, mark=True))


def ssm_per_route(self, x):                                  # (b, D, H, W)
    """SS2D.ssm with one selective scan per route: route k's u, dt, B and C read along route k
    (scan.route) from the unrouted map and x_proj's output, its delta computed by dt_terms (a
    matmul per route above DT_TERMS_MAX_RANK), the four outputs merged as cross_merge merges
    them. The same values as SS2D.ssm in float32 and float64 (delta's sums may round in another
    order). Why (docs/design.md, "One scan per route"): compiled, the model's ssm is one scan
    kernel over the channels of all four routes, each load a select among four route gathers,
    reading delta from memory; here each route's kernel reads its own route and computes
    delta, and no dt bmm runs up to DT_TERMS_MAX_RANK."""
    import torch
    import vmamba_min
    from scan import route
    K, R, N = vmamba_min.K, self.dt_rank, self.d_state
    batch, D, H, W = x.shape
    x_dbl = self.x_proj(x)                                   # (b, K, R+2N, H, W)
    state = torch.promote_types(self.A_logs.dtype, torch.float32)   # the scans' dtype
    A = -torch.exp(self.A_logs.to(state)).view(K, D, N)      # (K, D, N)
    bias = self.dt_projs_bias.to(state)                      # (K, D)
    ys = []
    for k in range(K):
        dts, Bk, Ck = route(x_dbl[:, k], k).split([R, N, N], dim=1)      # (b, R|N|N, L)
        delta = (dt_terms(self.dt_projs_weight[k], dts) if R <= DT_TERMS_MAX_RANK
                 else torch.matmul(self.dt_projs_weight[k], dts))         # (b, D, L)
        # B and C as views of this route only: stacked with the other routes', Inductor fused
        # the four scans into one kernel again (design.md)
        ys.append(self.run_scan(route(x, k), delta, A[k], Bk[:, None], Ck[:, None], None,
                                bias[k]))                                 # (b, D, L)
    # cross_merge of the four outputs, read where they are: stacked into the (b, K, D, H, W)
    # tensor cross_merge takes, they were copied by a kernel of their own
    rows = ys[0] + ys[2].flip(-1)
    cols = (ys[1] + ys[3].flip(-1)).view(batch, D, W, H).transpose(2, 3).reshape(batch, D, -1)
    y = rows + cols                                          # (b, D, L)
    y = y + x.flatten(2).to(y.dtype) * self.Ds.to(y.dtype).view(K, D, 1).sum(0)
    return y.transpose(1, 2).to(self.Ds.dtype)               # (b, L, D)


def per_route_patch():
    """The "per-route" variant: SS2D.ssm swapped for ssm_per_route and, as Dynamo does not guard
    a class's method, each scan function vmamba_min's run_scan may call (SCAN_FUNCTIONS) for a
    new function object (guarded globals, whichever VSSMConfig.scan picks): graphs compiled
    before the patch are not reused under it, nor its graph after it."""
    import vmamba_min

    def fresh(f):
        def call(*args, **kwargs):
            return f(*args, **kwargs)
        return call
    return Patches(*(Patch(vmamba_min, name, fresh(getattr(vmamba_min, name)))
                     for name in SCAN_FUNCTIONS),
                   Patch(vmamba_min.SS2D, "ssm", ssm_per_route, mark=True))


# (XBLOCK, warps) of the tiles SequentialTiles offers, each with R0_BLOCK 1
SEQ_TILES = ((64, 2), (128, 4), (256, 8))


class SequentialTiles:
    """The "seq-tiles" variant (an experiment): Inductor's heuristics offer a looped reduction,
    a scan kernel among them, no tile of one step along the scanned axis (R0_BLOCK 1, where
    each thread walks its row's steps in order with the states in its registers, as the
    official CUDA kernels do). Offline, vanilla's stage-1 kernel (16 scans) at that tile needs
    70 registers and no shuffle or barrier on sm_90, against 194 barriers and up to 7.7 KB
    spilled per thread at the tiles offered (docs/design.md). While the row runs, every looped
    reduction's candidates gain SEQ_TILES, and the autotuner times them with the others. It
    patches private parts of Inductor (torch 2.11's triton_heuristics._reduction_configs, read
    where the kernels are loaded: the row compiles with compile_threads=1, in this process).
    The row's kernels have the same source as an earlier row's: Inductor's in-memory kernel
    caches are emptied before and after the row (else its kernels come back with their old
    candidates, or later rows get these), and torch.compiler's cache_key_tag is set for it
    (the FX graph cache, which ignores compile_threads, and the .best_config files are keyed
    by it). kernels: the kernels given the tiles (none with the dry run's aot_eager); timed:
    per kernel autotuned, the fastest one-step tile's ms, the fastest other's and the one
    chosen."""

    def __init__(self):
        self.kernels, self.timed = [], []

    hits = property(lambda self: len(self.kernels))

    @staticmethod
    def forget_kernels():
        from torch._inductor.async_compile import CompiledTritonKernels
        from torch._inductor.codecache import PyCodeCache
        PyCodeCache.cache_clear(purge=False)
        CompiledTritonKernels.cache_clear()

    def __enter__(self):
        import torch.compiler
        from torch._inductor.runtime import triton_heuristics as th
        self.th, self.orig = th, th._reduction_configs
        self.bench = th.CachingAutotuner.benchmark_all_configs
        self.tag = torch.compiler.config.cache_key_tag

        def configs(*, size_hints, inductor_meta, triton_meta, **kw):
            out = self.orig(size_hints=size_hints, inductor_meta=inductor_meta,
                            triton_meta=triton_meta, **kw)
            if set(size_hints) != {"x", "r0_"} or triton_meta.get("native_matmul"):
                return out
            self.kernels.append(inductor_meta.get("kernel_name"))
            return out + [th.triton_config_reduction(size_hints, x, 1, num_warps=w)
                          for x, w in SEQ_TILES]

        def benchmark_all_configs(tuner, *args, **kwargs):
            timings = self.bench(tuner, *args, **kwargs)
            one = [t for launcher, t in timings.items()
                   if launcher.config.kwargs.get("R0_BLOCK") == 1]
            rest = [t for launcher, t in timings.items()
                    if launcher.config.kwargs.get("R0_BLOCK") != 1]
            if one and rest:
                best = min(timings, key=timings.get).config
                self.timed.append(dict(kernel=tuner.inductor_meta.get("kernel_name"),
                                       one_step_ms=min(one), other_ms=min(rest),
                                       chosen=dict(best.kwargs, num_warps=best.num_warps)))
            return timings
        th._reduction_configs = configs
        th.CachingAutotuner.benchmark_all_configs = benchmark_all_configs
        torch.compiler.config.cache_key_tag = f"{self.tag}seq-tiles"
        self.forget_kernels()
        return self

    def __exit__(self, *exc):
        import torch.compiler
        self.th._reduction_configs = self.orig
        self.th.CachingAutotuner.benchmark_all_configs = self.bench
        torch.compiler.config.cache_key_tag = self.tag
        self.forget_kernels()


def variant_patch(variant):
    """The patch a model variant runs under: vmamba_min imports selective_scan by name, so the
    floor swaps that name for floor_scan; "chunked" turns off the dispatch to scan_assoc;
    "tf32" allows TF32 matrix products for the row (compile and timed calls); "inline" turns
    off the blocks' nested compile regions (Dynamo guards on the flag it read); "time-major"
    swaps SS2D.selection for selection_time_major, "dt-fused" for selection_dt_fused,
    "per-route" SS2D.ssm for ssm_per_route, "conv-taps" SS2D.conv for conv_taps; "a+b" applies
    a's patch and b's (AllPatches); the COMPILER_VARIANTS need none (build_runner passes them
    to torch.compile)."""
    import contextlib
    import vmamba_min
    if "+" in variant:
        return AllPatches([variant_patch(part) for part in variant.split("+")])
    if variant == "floor":
        return Patch(vmamba_min, "selective_scan", floor_scan, mark=True)
    if variant == "tf32":
        return tf32_matmuls()
    if variant == "inline":
        return Patch(vmamba_min, "BLOCK_REGIONS", False)
    if variant == "time-major":
        return selection_patch(selection_time_major)
    if variant == "dt-fused":
        return selection_patch(selection_dt_fused)
    if variant == "per-route":
        return per_route_patch()
    if variant == "conv-taps":
        return conv_patch()
    if variant == "seq-tiles":
        return SequentialTiles()
    return force_chunked() if variant == "chunked" else contextlib.nullcontext()


class tf32_matmuls:
    """torch.backends.cuda.matmul.allow_tf32 on while the row runs, as it was afterwards."""

    def __enter__(self):
        import torch
        self.was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        return self

    def __exit__(self, *exc):
        import torch
        torch.backends.cuda.matmul.allow_tf32 = self.was
        return False


def row_name(spec):
    short = {OURS: "s1l8", VANILLA: "vanilla", SWIN: "swin-t"}[spec["model"]]
    return (f"{short}{'-' + spec['variant'] if spec['variant'] else ''} {spec['mode']} "
            f"{'bf16' if spec['dtype'] == 'bfloat16' else 'fp32'} "
            f"{'train' if spec['train'] else 'infer'}")


def build_runner(run, spec):
    """A no-argument callable: one inference forward (no_grad) or one training step (forward,
    cross-entropy on random labels, backward, fused AdamW step), on a model built for spec."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    if spec["model"] == SWIN:
        import timm
        kw = {"img_size": run.plan.res} if run.plan.res != 224 else {}
        model = timm.create_model(SWIN, pretrained=False, **kw)
    else:
        import vmamba_min
        overrides = dict(run.plan.ours_overrides)
        if spec["variant"] == "assoc-chunks":
            overrides["scan"] = "assoc_chunked"
        model = vmamba_min.build(spec["model"], **overrides)
    model = model.to(run.dev).train(spec["train"])
    fwd = model
    # Given to torch.compile, not set globally: Dynamo reuses the graph an equal earlier
    # torch.compile made (same mode and options) whatever the config says now. Both are
    # Inductor's (the dry run's aot_eager takes neither).
    inductor = run.plan.model_backend == "inductor"
    mode = {"autotune": "max-autotune-no-cudagraphs", "cudagraphs": "reduce-overhead"}.get(
        spec["variant"]) if inductor else None
    options = {"coordesc": {"coordinate_descent_tuning": True},
               # in this process (SequentialTiles patches it), and a graph of its own
               "seq-tiles": {"compile_threads": 1}}.get(spec["variant"]) if inductor else None
    if spec["mode"] == "compiled":
        fwd = torch.compile(model, dynamic=False, backend=run.plan.model_backend, mode=mode,
                            options=options)
    elif spec["mode"] == "blocks":
        import vmamba_min
        vmamba_min.compile_blocks(model, backend=run.plan.model_backend, mode=mode,
                                  options=options)
    batch, res = run.plan.batch, run.plan.res
    x = torch.randn(batch, 3, res, res, device=run.dev)
    dtype = getattr(torch, spec["dtype"])

    def amp():
        return torch.autocast(run.dev, dtype=dtype, enabled=dtype != torch.float32)
    if not spec["train"]:
        def infer():
            with torch.no_grad(), amp():
                return fwd(x)
        return infer
    labels = torch.randint(0, 1000, (batch,), device=run.dev)
    opt = torch.optim.AdamW(model.parameters(), fused=True)

    def step():
        with amp():
            loss = F.cross_entropy(fwd(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def model_row(run, spec, row):
    """Build, first (compile) call, timed calls, peak memory: into row. Returns the callable."""
    fn = build_runner(run, spec)
    first = run.tracked(row, fn) if spec["mode"] != "eager" else run.time_once(fn)
    row["compile_s" if spec["mode"] != "eager" else "first_call_s"] = first
    t = run.measure(fn)
    row.update(ms=t["ms"], reps=t["reps"], iqr_rel=t["iqr_rel"],
               img_s=1e3 * run.plan.batch / t["ms"], peak_gb=run.peak_gb(fn))
    if not spec["train"] and spec["variant"] != "floor":
        check_logits(run, spec, row, fn())
    return fn


def check_logits(run, spec, row, logits):
    """The eager fp32 row of a model keeps its logits (same seed, weights and input in every
    row of that model); every later inference row of the model records its largest difference
    from them, relative to their largest magnitude: a compiled path that computes something
    else shows here, not only in the tests phase. cuDNN's TF32 default applies to both sides."""
    key = spec["model"]
    if spec["mode"] == "eager" and spec["dtype"] == "float32" and spec["variant"] is None:
        run.ref_logits[key] = logits.detach().double().cpu()
    elif key in run.ref_logits:
        row["err_vs_eager_fp32"] = rel_err(logits.detach().cpu(), run.ref_logits[key])


def phase_models(run):
    """Model rows in model_plan's order, each skipped if its estimate does not fit: img/s,
    compile s, peak GB, ratio to Swin-T. Compiles dominate: ~225 s, the eager rows and the
    first compiled ones (s1l8 inference and training)."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = run.res["header"]["tf32_default"]["matmul"]
    torch.backends.cudnn.allow_tf32 = run.res["header"]["tf32_default"]["cudnn"]
    raise_recompile_limits()
    try:
        import timm  # noqa: F401
        have_timm = True
    except ImportError as e:
        have_timm = False
        run.res["notes"].append(f"Swin-T rows skipped: timm not importable ({error_text(e)})")
    run.res["models_notes"] = {
        "batch": run.plan.batch, "res": run.plan.res, "tf32": "torch defaults (header)",
        "ms": "median per batch, CUDA events", "peak_gb": "extra over what was allocated before "
        "the call", "compile_s": "first call (compile + one run)",
        "floor": "s1l8 with vmamba_min.selective_scan replaced by elementwise work (floor_scan)",
        "chunked": "compiled with scan._use_assoc off: the chunked scan, not scan_assoc",
        "inline": "compiled with vmamba_min.BLOCK_REGIONS off: every block traced in line, "
                  "not one nested compile region per stage",
        "time-major": "delta computed channels-fastest (gpu_check.selection_time_major) and "
                      "routed as u is; the model's is along L (an experiment)",
        "per-route": "one scan per route, each route's delta computed in its scan kernel "
                     "(gpu_check.ssm_per_route, dt rank <= DT_TERMS_MAX_RANK; an experiment)",
        "dt-fused": "delta computed in the one scan kernel per block (gpu_check."
                    "selection_dt_fused, dt rank <= DT_TERMS_MAX_RANK; an experiment)",
        "conv-taps": "the depthwise convolution as k*k multiply-adds, computed with its SiLU "
                     "in one Triton kernel (gpu_check.conv_taps; an experiment)",
        "dt-fused+conv-taps": "both dt-fused and conv-taps: the inference path the two would "
                              "give together",
        "assoc-chunks": "built with scan='assoc_chunked': "
                         "scan_assoc.selective_scan_assoc_chunked (an experiment)",
        "autotune": "torch.compile mode 'max-autotune-no-cudagraphs' (Triton kernels' tiles "
                    "and GEMM templates benchmarked while compiling)",
        "coordesc": "Inductor's coordinate_descent_tuning (each Triton kernel's tile and warps "
                    "searched around the heuristic's pick)",
        "cudagraphs": "torch.compile mode 'reduce-overhead' (replayed as CUDA graphs)",
        "seq-tiles": "every looped reduction (the scans among them) also offered tiles of one "
                     "step per program (gpu_check.SequentialTiles; an experiment)",
        "compiled": "torch.compile(model, dynamic=False)", "backend": run.plan.model_backend,
        "paper": PAPER}
    rows = run.plan.rows
    for i, spec in enumerate(rows):
        name = row_name(spec)
        row = dict(spec, name=name, batch=run.plan.batch, res=run.plan.res)
        if spec["model"] != SWIN and spec["variant"] != "floor":
            row["scan_path"] = (
                "assoc in chunks (scan='assoc_chunked')" if spec["variant"] == "assoc-chunks"
                else "chunked" if spec["mode"] == "eager" or spec["variant"] == "chunked"
                else compiled_scan_path(run.dev))
        kind = f"{'train' if spec['train'] else 'model'} {spec['mode']}" + (
            f" {spec['variant']}" if spec["variant"] in ESTIMATED_APART else "")
        if spec["model"] == SWIN and not have_timm:
            row["skipped"] = "timm not importable"
        elif spec["model"] == SWIN and spec["mode"] == "blocks":
            row["skipped"] = "compile_blocks is ours only"
        elif i and swin_partner(rows[i - 1], spec) and run.res["models"][-1].get("skipped"):
            row["skipped"] = "its pair's s1l8 row was skipped"
        elif not run.fits("models", pair_estimate(run, kind, rows, i, have_timm)):
            row["skipped"] = run.skip("models", name, pair_estimate(run, kind, rows, i, have_timm))
        else:
            run.begin(f"model {name}")
            t = time.time()
            from torch._dynamo.utils import counters
            graph_skips = counters["inductor"]["cudagraph_skips"]
            try:
                what = profile_item(spec)
                keep = what and what not in run.keep and "profile" in run.args.phases
                if spec["variant"]:
                    with variant_patch(spec["variant"]) as patch:
                        fn = model_row(run, spec, row)
                    if spec["variant"] in PATCHED_VARIANTS \
                            and not patch.hit:
                        row["error"] = (f"the patch missed: {patch.name} never called (a graph "
                                        f"compiled without it reused?)")
                    if spec["variant"] == "seq-tiles":
                        row["seq_tile_kernels"], row["seq_tiles_timed"] = patch.hits, patch.timed
                        if not patch.hits and run.dev == "cuda" and \
                                run.plan.model_backend == "inductor":
                            row["error"] = "the patch missed: no kernel was offered SEQ_TILES"
                    if keep and "error" not in row:   # called again under the same patch,
                        run.keep[what] = (fn, spec["mode"], patch)   # so no graph recompiles
                    fn = None
                else:
                    fn = model_row(run, spec, row)
                    if keep:
                        run.keep[what] = (fn, spec["mode"], None)        # for phase_profile
                    fn = None
                if spec["variant"] == "cudagraphs":
                    # Inductor falls back to plain launches where it cannot graph (a CPU op,
                    # a mutated input): then the row is no CUDA-graph row, and says so. The
                    # graphs' memory is a pool reserved once, not allocated per call.
                    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - \
                        graph_skips
                    row["peak_gb"] = None
            except Exception as e:           # noqa: BLE001 -- recorded in the row
                row["error"] = error_text(e)
                traceback.print_exc()
            if "error" not in row:       # a quick failure says nothing about the next row
                run.learn(kind, spec["model"], time.time() - t)
            run.free()
            run.log("  " + model_line(row))
        run.res["models"].append(row)
        run.save()


def swin_partner(ours, swin):
    """Whether swin is the Swin-T row of ours' ratio: same mode, dtype, kind and variant."""
    return ours["model"] == OURS and swin["model"] == SWIN and \
        all(ours[k] == swin[k] for k in ("mode", "dtype", "train", "variant"))


def pair_estimate(run, kind, rows, i, have_timm):
    """Seconds row i needs: its own estimate, plus its Swin-T partner's when that is the next
    row, so that a ratio's numerator is not measured without its denominator (and
    phase_models skips the partner of a skipped s1l8 row)."""
    own = run.estimate(kind, rows[i]["model"])
    if have_timm and i + 1 < len(rows) and swin_partner(rows[i], rows[i + 1]):
        return own + run.estimate(kind, SWIN)
    return own


def model_line(r):
    def f(k, fmt):
        return "-" if r.get(k) is None else fmt.format(r[k])
    return (f"{r['name']}: {f('img_s', '{:.0f}')} img/s ({f('ms', '{:.1f}')} ms/batch), "
            f"compile {f('compile_s', '{:.0f}')} s, peak {f('peak_gb', '{:.1f}')} GB"
            + (f" | {r['error']}" if r.get("error") else ""))


# -------------------------------------------------------------------------------- 4. profile
def profile_table(prof, dev):
    """Top PROFILE_ROWS ops by self device time (self CPU time on a CPU); the sort key's name
    changed across torch versions, so the first one that works is used."""
    keys = (("self_device_time_total", "self_cuda_time_total") if dev == "cuda"
            else ("self_cpu_time_total",))
    for key in keys:
        try:
            return key, prof.key_averages().table(sort_by=key, row_limit=PROFILE_ROWS,
                                                  max_name_column_width=70)
        except (AttributeError, KeyError, ValueError, RuntimeError):
            continue
    return None, prof.key_averages().table(row_limit=PROFILE_ROWS)


KERNEL_KINDS = (("triton", ("triton",)),           # Inductor's generated kernels
                # before gemm: cuDNN's convolutions are implicit GEMMs, named such as
                # sm90_xmma_fprop_implicit_gemm_... or cutlass_..._fprop_...
                ("conv", ("conv", "winograd", "implicit", "fprop", "dgrad", "wgrad")),
                ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "s1688", "s884")),
                ("copy", ("memcpy", "memset", "copy")))


def device_events(prof, dev):
    """(name, self time in us, count) of each event the time is counted on: on CUDA only the
    device's own events (kernels, copies), since the CPU op that launched a kernel reports the
    same time again as its self device time; on a CPU, every op's self CPU time."""
    for e in prof.key_averages():
        if dev == "cuda" and not str(getattr(e, "device_type", "")).endswith("CUDA"):
            continue
        us = event_us(e, dev, "self_")
        if us:
            yield e.key, us, e.count


def event_us(e, dev, kind=""):
    """An averaged profiler event's total time in us (kind "self_": its self time): device
    time on CUDA (named cuda_* before torch 2.4's device_*), CPU time on a CPU."""
    if dev != "cuda":
        return getattr(e, f"{kind}cpu_time_total")
    us = getattr(e, f"{kind}device_time_total", None)
    return getattr(e, f"{kind}cuda_time_total", 0) if us is None else us


def scan_kernel_names(cache):
    """Names of the Triton kernels in Inductor's cache (sources, under `cache`) whose code holds
    a tl.associative_scan: the fused scan kernels. Inductor names a kernel after the ops fused
    into it, and a scan's name does not say "scan"; a wrapper module holds every kernel of its
    graph, so each `def triton_...` is judged by its own body."""
    names = set()
    for f in code_files(cache) if cache and os.path.isdir(cache) else ():
        try:
            with open(os.path.join(cache, f)) as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError):
            continue
        if "tl.associative_scan(" not in text:
            continue
        parts = re.split(r"\bdef (triton_\w+)\(", text)    # [before, name, body, name, ...]
        names.update(name for name, body in zip(parts[1::2], parts[2::2])
                     if "tl.associative_scan(" in body)
    return names


def kernel_kind(name, scans=()):
    """A kernel's kind: "scan" (its name in `scans`, from scan_kernel_names), else by marks in
    its name (KERNEL_KINDS), else "other"."""
    if name in scans:
        return "scan"
    name = name.lower()
    return next((k for k, marks in KERNEL_KINDS if any(m in name for m in marks)), "other")


def kernel_groups(prof, dev, calls, scans=()):
    """Self time per call (ms) by kind of kernel: the scans (Triton kernels with a
    tl.associative_scan), Inductor's other Triton kernels, GEMMs, convs, copies, the rest."""
    groups = {}
    for name, us, _ in device_events(prof, dev):
        kind = kernel_kind(name, scans)
        groups[kind] = groups.get(kind, 0.0) + us / 1e3 / calls
    return groups


def top_kernels(prof, dev, calls, scans=(), n=TOP_KERNELS):
    """The n kernels (ops on a CPU) with the most self time: name (cut to 160 characters),
    kind, ms and launches per call. Kept in gpu.json, where the profiler's table (profile.txt)
    is not: which GEMM kernel cuBLAS picked (SIMT sgemm or tensor cores) shows in its name."""
    rows = [dict(name=name[:160], kind=kernel_kind(name, scans), ms=us / 1e3 / calls,
                 launches=count / calls) for name, us, count in device_events(prof, dev)]
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def matmul_shapes(prof, dev, calls, n=TOP_KERNELS):
    """Device time per call (CPU time on a CPU) of each matrix product and convolution by its
    input shapes (the profile records shapes), most first: which of the model's products
    cost what. Inductor's compiled code calls them as ATen ops (extern kernels)."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in MATMUL_OPS:
            continue
        us = event_us(e, dev)
        if us:
            rows.append(dict(op=e.key, shapes=str(e.input_shapes)[:200], ms=us / 1e3 / calls,
                             calls=e.count / calls))
    return sorted(rows, key=lambda r: -r["ms"])[:n]


# What the profile phase profiles: (item, model, dtype, training, calls, what it does when the
# models phase did not compile the item: compile it here if the estimate fits, else profile it
# eager ("eager") or leave it out ("skip"); None: leave it out). The models phase keeps the
# callable of the first compiled row (the model as it is: no variant) that matches an item.
# (name, model, dtype, train, calls, if phase 3 kept no compiled call: "eager", "skip" (compile
# it if time allows, else leave it out) or None (leave it out), variant)
PROFILE_ITEMS = (("infer", OURS, "float32", False, 3, "eager", None),
                 ("swin infer", SWIN, "float32", False, 3, None, None),
                 ("train", OURS, "float32", True, 2, "eager", None),
                 ("vanilla infer", VANILLA, "float32", False, 2, None, None),
                 ("bf16 infer", OURS, "bfloat16", False, 3, "skip", None),
                 # the inference path dt-fused and conv-taps would make: where its time goes,
                 # kernel by kernel, beside the plain model's
                 ("dt-fused+conv-taps infer", OURS, "float32", False, 3, None,
                  "dt-fused+conv-taps"))


def profile_item(spec):
    """The PROFILE_ITEMS name a model row serves, or None."""
    if spec["mode"] == "eager":
        return None
    return next((what for what, model, dtype, train, _, _, variant in PROFILE_ITEMS
                 if (model, dtype, train, variant) ==
                 (spec["model"], spec["dtype"], spec["train"], spec["variant"])), None)


def phase_profile(run):
    """torch.profiler over the compiled calls kept from phase 3 (PROFILE_ITEMS): s1l8's
    inference (3 calls) and training step (2), each compiled here if the models phase did not
    and the estimate fits, else eager (said in the file); s1l8's bf16 inference likewise, but
    left out rather than eager; Swin-T's and vanilla's fp32 inference, and s1l8's under the
    dt-fused+conv-taps variant (called under the row's own patch), only as the models phase
    compiled them (Swin-T's matrix products by shape beside s1l8's say whether s1l8's run
    further from the card's figure than Swin-T's). ~35 s with all kept."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.dev == "cuda" else [])
    out = [f"torch.profiler, batch {run.plan.batch}, {run.plan.res} px, TF32 defaults, "
           f"{run.res['header'].get('gpu', run.dev)}, torch {run.res['header'].get('torch')}; "
           f"compiled: its scans {compiled_scan_path(run.dev)}\n"]
    import contextlib
    for what, model, dtype, train, calls, otherwise, variant in PROFILE_ITEMS:
        kind = "train compiled" if train else "model compiled"
        if what not in run.keep and (otherwise is None or otherwise == "skip" and
                                     not run.fits("profile", run.estimate(kind, model))):
            if otherwise:
                run.skip("profile", f"compiled {what}", run.estimate(kind, model))
            continue
        fn, mode, patch = run.keep.pop(what, (None, "compiled", None))
        mode = {"blocks": "compile_blocks"}.get(mode, mode)
        try:
            run.begin(f"profile {what}")
            if fn is None:
                if not run.fits("profile", run.estimate(kind, model)):
                    run.skip("profile", f"compiled {what}", run.estimate(kind, model))
                    mode = "eager (no time to compile)"
                spec = dict(model=model, mode="compiled" if mode == "compiled" else "eager",
                            dtype=dtype, train=train, variant=None)
                fn = build_runner(run, spec)
                fn()
            with patch or contextlib.nullcontext():   # a variant's call under its patch
                fn()
                run.sync()
                with profile(activities=acts, record_shapes=True) as prof:
                    for _ in range(calls):
                        fn()
                    run.sync()
            key, table = profile_table(prof, run.dev)
            task = "training steps: fwd + CE + bwd + fused AdamW" if train else "inference, no_grad"
            out.append(f"\n=== {what}, {model}, {dtype}, {mode}"
                       f"{f', variant {variant}' if variant else ''}: {calls} calls ({task}), top "
                       f"{PROFILE_ROWS} by {key} ===\n{table}\n")
            scans = scan_kernel_names(run.cache)
            groups = kernel_groups(prof, run.dev, calls, scans)
            run.res["profile"][what] = {
                "model": model, "dtype": dtype, "mode": mode, "variant": variant,
                "calls": calls, "sort": key,
                "ms_per_call_by_kind": groups,
                "top_kernels": top_kernels(prof, run.dev, calls, scans),
                "matmul_shapes": matmul_shapes(prof, run.dev, calls)}
            out.append("device time per call by kind of kernel (ms): "
                       + ", ".join(f"{k} {v:.2f}" for k, v in sorted(groups.items())) + "\n")
            with open(os.path.join(run.args.out, "profile.txt"), "w") as f:
                f.write("".join(out))
            run.save()
            del prof
        except Exception as e:               # noqa: BLE001 -- recorded; the other item runs
            run.res["profile"][what] = {"model": model, "dtype": dtype, "mode": mode,
                                        "error": error_text(e)}
            traceback.print_exc()
            run.save()
        fn = prof = patch = None
        run.free()
    run.keep.clear()


# -------------------------------------------------------------------------------- 5. tests
def pump(proc, deadline, write):
    """Copy proc's piped output to this process's stdout and to write(chunk) until the output
    ends (True) or the deadline passes (False). A process that exited while a grandchild (a
    compile worker) still holds the pipe counts as ended after 3 s of quiet."""
    fd, quiet_since = proc.stdout.fileno(), None
    while True:
        left = deadline - time.time()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], min(left, 1.0))
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                return True
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            write(chunk)
            quiet_since = None
        elif proc.poll() is not None:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since > 3:
                return True


def run_logged(run, cmd, timeout, env, cwd):
    """Run cmd in its own process group with a timeout, its output through this process's
    (into gpu.log); the group's id goes to the work folder so the parent can end it too.
    Returns (exit code or None if timed out, the output's last 60 lines)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd, start_new_session=True)   # its own process group
    with open(os.path.join(run.args.work, "groups.txt"), "a") as f:
        f.write(f"{proc.pid}\n")
    tail, buf = [], b""

    def keep_tail(chunk):
        nonlocal tail, buf
        buf += chunk
        *lines, buf = buf.split(b"\n")
        tail = (tail + [ln.decode(errors="replace") for ln in lines])[-60:]
    if not pump(proc, time.time() + timeout, keep_tail):
        kill_group(proc.pid)
        proc.wait()
        return None, tail + ([buf.decode(errors="replace")] if buf else [])
    proc.wait()
    if buf:
        tail.append(buf.decode(errors="replace"))
    kill_group(proc.pid, grace=1.0)          # what it left behind (compile workers)
    return proc.returncode, tail


def pytest_summary(tail):
    """Counts from pytest's last line; without one (cut off), from -q's progress characters."""
    counts = {}
    for line in reversed(tail):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)",
                           line)
        if found:
            counts = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in found}
            break
    if not counts:
        marks = "".join(ln.split("[")[0].strip() for ln in tail
                        if re.fullmatch(r"[.sFExX]+\s*(\[\s*\d+%\])?", ln.strip()))
        names = {".": "passed", "F": "failed", "E": "error", "s": "skipped", "x": "xfailed",
                 "X": "xpassed"}
        for ch in marks:
            counts[names[ch]] = counts.get(names[ch], 0) + 1
        counts["cut_off"] = True
    bad = [ln.strip()[:200] for ln in tail if ln.startswith(("FAILED", "ERROR"))]
    return counts, bad


def existing_test(here, target):
    """file::test_name as given while the file still defines the test, else the whole file (a
    renamed test would make pytest stop with "not found")."""
    path, _, name = target.partition("::")
    if not name:
        return target
    with open(os.path.join(here, path)) as f:
        return target if f"def {name}(" in f.read() else path


def pytest_flags(label):
    """PYTEST_FLAGS; for the whole suite without -x, on xdist workers when xdist is there."""
    if label != ALL_TESTS[0]:
        return PYTEST_FLAGS
    import importlib.util
    flags = [f for f in PYTEST_FLAGS if f != "-x"]
    if importlib.util.find_spec("xdist") is None:
        return flags
    workers = max(1, min(XDIST_WORKERS, (os.cpu_count() or 2) // 2))
    return flags + ["-n", str(workers), "--dist", "worksteal"]


def phase_tests(run):
    """pytest in a subprocess per test set (VMAMBA_TEST_DEVICE, -x), most valuable first, each
    with what is left of the phase; the summary into gpu.json, the output into gpu.log. ~70 s:
    the first one or two sets (the rest: `VMAMBA_TEST_DEVICE=cuda python -m pytest ...`)."""
    run.keep.clear()            # models the profile phase had no time for: free for the tests
    run.free()
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, VMAMBA_TEST_DEVICE=run.dev,
               TORCHINDUCTOR_CACHE_DIR=os.path.join(run.args.work, "inductor_tests"))
    sets = [(label, [existing_test(here, t) for t in a]) for label, a in run.plan.tests
            if os.path.exists(os.path.join(here, a[0].split("::")[0]))]
    for label, a in run.plan.tests:
        if label not in dict(sets):
            run.res["tests"].append({"set": label, "skipped": f"{a[0]} does not exist"})
    for label, targets in sets:
        share = run.phase_end("tests") - run.now()
        rec = {"set": label, "args": targets, "timeout_s": share}
        if share < TEST_MIN_S:
            rec["skipped"] = run.skip("tests", f"pytest {label}", TEST_MIN_S)
            run.res["tests"].append(rec)
            continue
        cmd = [sys.executable, "-m", "pytest", *pytest_flags(label), *targets]
        run.begin(f"tests {label}: {' '.join(cmd[1:])} (timeout {share:.0f} s)")
        t = time.time()
        code, tail = run_logged(run, cmd, share, env, here)
        counts, bad = pytest_summary(tail)
        rec.update(exit_code=code, timed_out=code is None, wall_s=time.time() - t,
                   counts=counts, failed=bad, last_line=tail[-1] if tail else "")
        run.res["tests"].append(rec)
        run.save()


# -------------------------------------------------------------------------------- 6. report
def phase_report(run):
    """bench.py --report into a folder of the work dir, with what is left of the budget; the
    files go into one tar in the output folder (the parent packs it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        helptext = subprocess.run([sys.executable, "bench.py", "--help"], cwd=here, timeout=60,
                                  capture_output=True, text=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        run.res["report"]["skipped"] = f"bench.py --help: {error_text(e)}"
        return
    if "--report" not in helptext:
        run.res["report"]["skipped"] = "bench.py has no --report"
        return
    left = run.phase_end("report") - run.now()
    if left < 30:
        run.res["report"]["skipped"] = run.skip("report", "bench.py --report", 30)
        return
    report = os.path.join(run.args.work, "report")
    cmd = [sys.executable, "bench.py", "--report", "--report-dir", report, "--device", run.dev,
           "--batch", str(run.plan.batch), "--res", str(run.plan.res), "--min-time",
           "0.1" if run.args.dry_run else "0.5", "--warmup", "1"]
    if run.args.dry_run:
        cmd += ["--models", "--only", OURS, "--no-peers"]
    else:
        cmd += ["--scan", "--models", "--train"]
        if "--compile-models" in helptext:
            cmd += ["--compile-models", "model"]
    cmd = [c for c in cmd if not c.startswith("--") or c in helptext]
    run.begin(f"report: {' '.join(cmd[1:])} (timeout {left:.0f} s)")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(run.args.work, "inductor_report"))
    code, tail = run_logged(run, cmd, left, env, here)
    run.res["report"].update(cmd=" ".join(cmd[1:]), exit_code=code, timed_out=code is None,
                             last_line=tail[-1] if tail else "", dir=report)


def child(args):
    plan = make_plan(args)
    run = Run(args, plan)
    run.log(f"child: phases {','.join(args.phases)}, budget {args.budget_s:.0f} s, "
            f"out {args.out}, Inductor cache {run.cache or '(default)'}")
    run.save()
    for name, fn in (("card", phase_card), ("scan", phase_scan), ("models", phase_models),
                     ("profile", phase_profile), ("tests", phase_tests),
                     ("report", phase_report)):
        run_phase(run, name, fn)
        if name == "card" and run.res["phases"]["card"]["status"] != "done":
            run.log("card failed: no device to measure on, stopping")
            break
    run.log("child: done")


# -------------------------------------------------------------------------------- the parent
def pack_kernels(cache, out, res):
    """kernels.tar.gz: the generated .py (and .cpp) files of the child's Inductor cache, the
    newest first up to KERNEL_TAR_MAX bytes, every .best_config (which of a kernel's configs
    ran: the sources list them all), and INDEX.txt: compiled row -> wrapper files."""
    files = sorted(code_files(cache), key=lambda f: -os.path.getmtime(os.path.join(cache, f)))
    rows = [r for r in res.get("scan", []) + res.get("models", []) if r.get("code")]
    index = ["Inductor output code of each compiled row (wrapper modules: `def call(args)` "
             "launches the kernels; the kernels' sources are the other .py files)\n"]
    for r in rows:
        label = r.get("name") or f"scan {r['gen']} {r['shape']} {r['path']}"
        index.append(f"{label}: {r.get('code_files', 0)} new files; wrappers:\n" +
                     "".join(f"    {w}\n" for w in r["code"]))
    limit = KERNEL_TAR_MAX
    path = os.path.join(out, "kernels.tar.gz")
    while True:
        total, packed = 0, []
        with tarfile.open(path, "w:gz", compresslevel=6) as tar:
            data = "".join(index).encode()
            info = tarfile.TarInfo("kernels/INDEX.txt")
            info.size, info.mtime = len(data), time.time()
            tar.addfile(info, io.BytesIO(data))
            for f in sorted(tuned_files(cache)):
                tar.add(os.path.join(cache, f), arcname=os.path.join("kernels", f))
            for f in files:
                size = os.path.getsize(os.path.join(cache, f))
                if total + size > limit:
                    continue
                tar.add(os.path.join(cache, f), arcname=os.path.join("kernels", f))
                total += size
                packed.append(f)
        if os.path.getsize(path) <= 15 << 20 or limit < 1 << 20:
            return {"files": len(packed), "of": len(files), "bytes": total,
                    "tuned": len(tuned_files(cache)), "gz_bytes": os.path.getsize(path)}
        limit //= 2


def pack_report(work, out):
    report = os.path.join(work, "report")
    if not os.path.isdir(report) or not os.listdir(report):
        return None
    path = os.path.join(out, "report.tar.gz")
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        tar.add(report, arcname="report")
    return path


def table(rows, cols):
    """Fixed-width text: cols = [(key or callable, heading, format)]; None prints '-'."""
    def cell(r, k, fmt):
        v = k(r) if callable(k) else r.get(k)
        return "-" if v is None else v if isinstance(v, str) else fmt.format(v)
    cells = [[h for _, h, _ in cols]] + [[cell(r, k, f) for k, h, f in cols] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    last = len(cols) - 1                 # the first and last columns are text: left-aligned
    lines = ["  ".join(c.ljust(x) if i in (0, last) else c.rjust(x) for i, (c, x) in
                       enumerate(zip(row, w))).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def summary(res):
    """The final summary, at most 120 columns."""
    h, c = res.get("header", {}), res.get("card", {})
    out = [f"gpu_check: {h.get('gpu', h.get('device'))} | torch {h.get('torch')} | triton "
           f"{h.get('triton')} | timm {h.get('timm')} | commit {str(h.get('commit'))[:10]}"
           f"{' (+ uncommitted changes)' if h.get('worktree') else ''}"]
    if c.get("copy_gb_s"):
        out.append(f"copy bandwidth {c['copy_gb_s']:.0f} GB/s; matmul "
                   f"{c['matmul_tflops_float32']:.1f} TFLOP/s fp32 (TF32 off), "
                   f"{c['matmul_tflops_bfloat16']:.1f} bf16")

    def note(r):
        text = r.get("error") or r.get("skipped") or ""
        return text[:27]
    if res.get("scan"):
        out += ["", "scans (stage 1; ms: median; xfl: x the memory floor; f+b/f: fwd+bwd over fwd;"
                " err: max rel vs float64)",
                table(res["scan"], [
                    ("gen", "gen", "{}"), ("batch", "b", "{}"), ("path", "path", "{}"),
                    ("fwd_ms", "fwd ms", "{:.3f}"), ("fwd_x_floor", "xfl", "{:.1f}"),
                    ("fwd_bwd_ms", "f+b ms", "{:.3f}"), ("fwd_bwd_x_floor", "xfl", "{:.1f}"),
                    ("fwd_bwd_over_fwd", "f+b/f", "{:.2f}"),
                    (lambda r: (r["first_fwd_s"] + r["first_fwd_bwd_s"])
                     if r.get("first_fwd_bwd_s") is not None else None, "1st s", "{:.0f}"),
                    ("err_max", "err", "{:.0e}"), (note, "note", "{}")])]
    if res.get("models"):
        out += ["", f"models (batch {res['models'][0].get('batch')}, {res['models'][0].get('res')} "
                "px; vs swin: img/s / Swin-T's best of the same kind and precision; err: logits vs "
                "eager fp32)",
                table(res["models"], [
                    ("name", "row", "{}"), ("img_s", "img/s", "{:.0f}"), ("ms", "ms", "{:.1f}"),
                    ("vs_swin_best", "vs swin", "{:.2f}"), ("compile_s", "compile s", "{:.0f}"),
                    ("peak_gb", "peak GB", "{:.1f}"), ("graph_breaks", "breaks", "{}"),
                    ("err_vs_eager_fp32", "err", "{:.0e}"), (note, "note", "{}")])]
    if res.get("profile"):
        for k, v in res["profile"].items():
            if isinstance(v, dict) and v.get("error"):
                out.append(f"profile {k} {v['mode']}: {v['error'][:80]}")
            elif isinstance(v, dict):
                out.append(f"profile {k} {v['mode']}: ms per call by kind: " + ", ".join(
                    f"{a} {b:.1f}" for a, b in sorted(v["ms_per_call_by_kind"].items())))
    for t in res.get("tests", []):
        failed = " ".join(t.get("failed", []))[:80]
        out.append(f"tests {t['set']}: " + (t.get("skipped") or (
            f"{t.get('counts')} exit {t.get('exit_code')}"
            f"{' TIMED OUT' if t.get('timed_out') else ''} {failed}").rstrip()))
    if res.get("report"):
        r = res["report"]
        out.append(f"report: {r.get('skipped') or ('exit %s' % r.get('exit_code'))}")
    out += ["", "phases: " + ", ".join(f"{k} {v.get('status')} ({v.get('wall_s', 0):.0f} s)"
                                       for k, v in res.get("phases", {}).items())]
    out += [f"note: {n}" for n in res.get("notes", [])]
    return "\n".join(line if "\n" in line or len(line) <= 120 else     # tables stay as they are
                     textwrap.fill(line, 120, subsequent_indent="    ") for line in out)


def parent(args):
    """Start the child, tee its output into gpu.log, end it at the hard deadline, then pack
    the kernels and the report, finish gpu.json and print the summary."""
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               GPU_CHECK_COMMAND=" ".join(["python", "gpu_check.py", *sys.argv[1:]]))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(work, "inductor"))
    cache = env["TORCHINDUCTOR_CACHE_DIR"]
    hard = args.hard_s
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", "--t0",
           str(t0), "--work", work, "--out", args.out]
    log = open(os.path.join(args.out, "gpu.log"), "wb")

    def say(text):
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        log.write((text + "\n").encode())
        log.flush()
    say(f"[gpu_check] parent: budget {args.budget_s:.0f} s, hard stop at {hard:.0f} s, "
        f"out {os.path.abspath(args.out)}, work {work}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)   # its own process group
    def stop(signum, frame):              # the child has a process group of its own: end it too
        raise InterruptedError(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    killed = None

    def to_log(chunk):
        if log.tell() < LOG_MAX:
            log.write(chunk)
            log.flush()
    try:
        if not pump(proc, t0 + hard, to_log):
            killed = f"the hard stop at {hard:.0f} s"
            say(f"[gpu_check] parent: {killed}: ending the child")
    except InterruptedError as e:
        killed = str(e)
        say(f"[gpu_check] parent: {killed}: ending the child, packing what there is")
    groups = [proc.pid]
    try:
        with open(os.path.join(work, "groups.txt")) as f:
            groups += [int(x) for x in f.read().split()]
    except OSError:
        pass
    for g in groups:
        kill_group(g, grace=3.0, reap=proc.poll if g == proc.pid else None)
    code = proc.wait()
    path = os.path.join(args.out, "gpu.json")
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        res = {"notes": [f"no readable gpu.json from the child ({error_text(e)})"]}
    res["run"] = {"child_exit": code, "ended_by": killed, "hard_stop_s": hard,
                  "wall_s": time.time() - t0, "inductor_cache": cache}
    for name, rec in res.get("phases", {}).items():
        if rec.get("status") == "running":
            rec["status"] = f"ended by {killed}" if killed else "died"
            cur = res.get("current") or {}
            res.setdefault("notes", []).append(
                f"phase {name} {rec['status']} during {cur.get('item')} (started at "
                f"+{cur.get('at_s', 0):.0f} s)")
    try:
        res["kernels"] = pack_kernels(cache, args.out, res)
    except Exception as e:                   # noqa: BLE001
        res["kernels"] = {"error": error_text(e)}
    res["report_tar"] = pack_report(work, args.out)
    shutil.rmtree(work, ignore_errors=True)   # caches and the report folder: packed above
    res["run"]["wall_s"] = time.time() - t0
    write_json(path, res)
    say("\n" + summary(res))
    say(f"\nfiles: {', '.join(sorted(os.listdir(args.out)))} in {os.path.abspath(args.out)}; "
        f"{res['run']['wall_s']:.0f} s")
    log.close()
    card = res.get("phases", {}).get("card", {}).get("status")
    return 0 if code == 0 and not killed and card == "done" else 1   # no card: nothing measured


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
