"""gpu_report.py: docs/results-cuda.md and .json, written from the gpu.json of gpu_check runs.

    python gpu_report.py docs/gpu/RUN.json [RUN.json ...]   -> docs/results-cuda.md, .json
    python gpu_report.py --out-dir DIR RUN.json ...          elsewhere

A device lease is short, so one gpu_check run may leave rows out (skipped for time) and a second
run on the same machine measures them. This page joins such runs without hiding it: every row
names its run, every ratio against Swin-T names the runs of its numerator and denominator, and
rows measured by more than one run are shown side by side (how far the runs agree). The targets
of the GPU issue are computed from the rows; a target no row measured says "not measured".
Nothing here is typed by hand: the files in docs/gpu/ are gpu_check's own output, unedited.

Letters as in scan.py: b batch, K = 4 routes, D channels per route, L = H*W, N state size.
"""
import argparse
import ast
import json
import os
import sys

from gpu_check import (COMPILER_VARIANTS, OURS, PAPER, SCAN_EXPERIMENTS, SWIN, VANILLA,
                       precision, table)
import benchkit as bk
from report import _cell, _write, clean  # bench.py's page writer: cells, files, JSON values

PLATFORM = "cuda"
# The GPU issue's targets: (label, what it asks). Values come from target_rows().
MODEL_TARGETS = (
    # (label, model, train, precision, goal: ratio to Swin-T's best row of the kind and
    # precision). fp32: float32 matrix products, as torch's default; tf32: on TF32 cores.
    ("s1l8 compiled inference, fp32, x Swin-T's best", OURS, False, "float32", 1.0),
    ("s1l8 compiled inference, fp32 with TF32 matmuls, x Swin-T's best", OURS, False, "tf32",
     None),
    ("s1l8 compiled inference, bf16, x Swin-T's best", OURS, False, "bfloat16", None),
    ("s1l8 compiled training step, fp32, x Swin-T's best", OURS, True, "float32", 0.58),
    ("s1l8 compiled training step, bf16, x Swin-T's best", OURS, True, "bfloat16", 0.58),
    ("vanilla compiled inference, fp32, x Swin-T's best", VANILLA, False, "float32", 0.51),
    ("vanilla compiled training step, fp32, x Swin-T's best", VANILLA, True, "float32", None),
)
SCAN_FLOOR_GOAL, SCAN_FWD_BWD_GOAL, COMPILE_S_GOAL = 2.0, 3.0, 60.0
# how gpu_check has always compiled a model row (build_runner), for runs whose notes predate
# the "compiled" note
COMPILED = "torch.compile(model, dynamic=False)"
COMPILERS = {"compiled": "torch.compile(model)", "blocks": "compile_blocks"}
# What the paper's throughput compares (read in the official code; see docs/design.md).
PAPER_ARITHMETIC = (
    "The paper's VMamba-T (norm_layer=\"ln2d\" in the official code) computes its "
    "projections and MLP as 1x1 convolutions, which cuDNN may run on TF32 tensor cores under "
    "torch's defaults, while Swin-T's nn.Linear products stay float32 (the official "
    "analyze/tp.py sets no precision): its 1.36x likely sets TF32 products against float32 "
    "ones. The line with TF32 matmuls over Swin-T's fp32 row is the one to compare with it; "
    "the fp32 and TF32 lines give each model the same arithmetic.")


def load(paths):
    """[(label, gpu.json)]: runs labelled 1, 2, ... in the order given, which must be the
    order of their dates (of those whose headers have one)."""
    runs, seen = [], {}
    for i, p in enumerate(paths, 1):
        try:
            with open(p) as f:
                res = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{p}: cannot read a gpu.json ({type(e).__name__}: {e})")
        why = _not_a_run(res)
        if why:
            raise SystemExit(f"{p}: not a gpu_check gpu.json ({why})")
        # a figure that is NaN or infinite (not JSON) is one not measured; a section that is
        # null, one not written
        res = {k: v for k, v in clean(res).items() if v is not None}
        # one run given twice would show as two runs agreeing to 0.00%
        same = json.dumps(res.get("header"), sort_keys=True)
        if same in seen:
            raise SystemExit(f"{p}: the same run as {seen[same]} (the same header)")
        seen[same] = p
        runs.append((str(i), res))
    # labels follow the order given, and the page calls run 1 the first: oldest first, as dated
    # (gpu_check writes the date; runs without one are not ordered)
    dates = [(res["header"]["date"], p) for (_, res), p in zip(runs, paths)
             if res["header"].get("date")]
    if [d for d, _ in dates] != sorted(d for d, _ in dates):
        raise SystemExit("give the runs oldest first; by their headers' dates: " + ", ".join(
            p for _, p in sorted(dates)))
    return runs


def _not_a_run(res):
    """Why res cannot be a gpu.json gpu_check wrote (a run cut off anywhere still has a header
    and a list of model rows, each with these keys), or None."""
    if not isinstance(res, dict) or not isinstance(res.get("header"), dict):
        return "no header"
    models = res.get("models")
    if not isinstance(models, list):
        return "no list of model rows"
    keys = {"name": str, "model": str, "mode": str, "dtype": str, "train": bool}
    for r in models:
        if not isinstance(r, dict) or any(not isinstance(r.get(k), t) for k, t in keys.items()):
            return f"a model row without {', '.join(keys)}: {str(r)[:80]}"
    for name in ("scan", "tests"):
        if not isinstance(res.get(name) or [], list) or \
                not all(isinstance(x, dict) for x in res.get(name) or []):
            return f"{name} is not a list of records"
    for name in ("card", "run", "models_notes", "scan_notes", "profile", "phases"):
        if not isinstance(res.get(name) or {}, dict):
            return f"{name} is not a record"
    return None


def model_rows(runs):
    """Every measured model row of every run, with its run's label under "run"."""
    return [dict(r, run=label) for label, res in runs for r in res.get("models", [])
            if r.get("img_s")]


def best_swin(rows, train, prec, modes=("eager", "compiled")):
    ok = [r for r in rows if r["model"] == SWIN and r["train"] == train and precision(r) == prec
          and r["mode"] in modes]
    return max(ok, key=lambda r: r["img_s"]) if ok else None


def with_ratios(rows):
    """Each row with its img/s over Swin-T's best row of the same kind and precision (dtype, or
    TF32 matrix products; any run), and that row's name and run; and apart, over Swin-T's
    eager row and over its best compiled row (None where that row was not run)."""
    out = []
    for r in rows:
        key = (rows, r["train"], precision(r))
        ref, eager, comp = (best_swin(*key), best_swin(*key, modes=("eager",)),
                            best_swin(*key, modes=("compiled",)))
        out.append(dict(r, x_swin=ref and r["img_s"] / ref["img_s"],
                        swin_row=ref and f"{ref['name']} (run {ref['run']})",
                        x_swin_eager=eager and r["img_s"] / eager["img_s"],
                        x_swin_compiled=comp and r["img_s"] / comp["img_s"]))
    return out


def not_run(runs):
    """Rows some run planned but none measured: (name, run, why)."""
    done = {r["name"] for r in model_rows(runs)}
    out = {}
    for label, res in runs:
        for r in res.get("models", []):
            if r["name"] not in done and r["name"] not in out:
                out[r["name"]] = (label, r.get("skipped") or r.get("error") or "no figure")
    return [(n, label, why) for n, (label, why) in out.items()]


def check_comparable(runs):
    """Runs joined on one page must share the card, torch, batch and image size."""
    def key(res):
        h, m = res["header"], (res.get("models") or [{}])[0]
        return h.get("gpu"), h.get("torch"), m.get("batch"), m.get("res")
    keys = {key(res) for _, res in runs if res.get("models")}
    if len(keys) > 1:
        raise SystemExit(f"runs differ in card, torch, batch or image size: "
                         f"{sorted(keys, key=repr)}")


def target_rows(runs):
    """The GPU issue's targets, each with the measured value and whether it is met."""
    rows = with_ratios(model_rows(runs))
    out = []
    for label, model, train, prec, goal in MODEL_TARGETS:
        best = best_compiled(rows, model, train, prec)
        if best is None or best["x_swin"] is None:
            value = "not measured" if best is None else (
                f"{best['img_s']:.0f} img/s; no Swin-T row of this kind and precision")
            met = "-"
        else:
            value = (f"{best['x_swin']:.2f}x ({best['name']}: {best['img_s']:.0f} img/s, run "
                     f"{best['run']}; Swin-T: {best['swin_row']})")
            met = "-" if goal is None else ("yes" if best["x_swin"] >= goal else "no")
            if not any(r["model"] == SWIN and r["train"] == train and precision(r) == prec
                       and r["mode"] == "compiled" for r in rows):
                value += "; Swin-T compiled: not measured"      # its best may be higher
                met = "-" if goal is None else f"{met}, against eager Swin-T only"
        out.append({"target": label, "goal": f">= {goal:.2f}x" if goal else "reported",
                    "measured": value, "met": met})
    out.append(paper_arithmetic(rows))
    scans = [dict(s, run=label) for label, res in runs for s in res.get("scan", [])
             if s.get("fwd_ms") and s["gen"] == "v2" and s["batch"] >= 128
             and "compiled" in s["path"] and s["path"] not in SCAN_EXPERIMENTS]
    # ours, no experiment: of the cells with the figure, the fastest forward (a cell cut off
    # after its forward has no backward figure; a card without a copy bandwidth, no floor)
    for target, goal, key, text in (
            ("stage-1 v2 scan compiled forward, x memory floor", SCAN_FLOOR_GOAL, "fwd_x_floor",
             lambda s: f"{s['fwd_x_floor']:.1f}x ({s['fwd_ms']:.3f} ms, floor "
                       f"{s['fwd_floor_ms']:.3f} ms"),
            ("the same scan, forward+backward over forward", SCAN_FWD_BWD_GOAL,
             "fwd_bwd_over_fwd",
             lambda s: f"{s['fwd_bwd_over_fwd']:.2f}x ({s['fwd_bwd_ms']:.3f} ms")):
        fast = min((s for s in scans if s.get(key) is not None), key=lambda s: s["fwd_ms"],
                   default=None)
        measured = "not measured" if fast is None else (
            f"{text(fast)}; {fast['path']}, b {fast['batch']}, run {fast['run']})")
        out.append({"target": target, "goal": f"<= {goal:.0f}x", "measured": measured,
                    "met": "-" if fast is None else "yes" if fast[key] <= goal else "no"})
    for model, train, mode in ((OURS, False, "compiled"), (OURS, False, "blocks"),
                               (SWIN, False, "compiled"), (VANILLA, False, "compiled"),
                               (VANILLA, False, "blocks"), (OURS, True, "compiled")):
        comp = [r for r in rows if r["model"] == model and r["mode"] == mode
                and r["train"] == train and r["dtype"] == "float32" and r.get("compile_s")
                and not r.get("variant")]
        slow = max(comp, key=lambda r: r["compile_s"]) if comp else None
        out.append({"target": f"compile time, {model}, fp32 "
                              f"{'training step' if train else 'inference'}, {COMPILERS[mode]}",
                    "goal": "reported" if train else f"<= {COMPILE_S_GOAL:.0f} s",
                    "measured": f"{slow['compile_s']:.0f} s (run {slow['run']})" if slow
                    else "not measured",
                    "met": "-" if slow is None or train else
                    ("yes" if slow["compile_s"] <= COMPILE_S_GOAL else "no")})
    return out


def best_compiled(rows, model, train, prec):
    """The fastest compiled row (torch.compile(model) or compile_blocks) of the model as it is,
    however the compiler was asked to tune it (no scan experiment, no stand-in), or None."""
    mine = [r for r in rows if r["model"] == model and r["train"] == train
            and precision(r) == prec and r["mode"] in COMPILERS
            and r.get("variant") in (None, "tf32") + COMPILER_VARIANTS]
    return max(mine, key=lambda r: r["img_s"]) if mine else None


def paper_arithmetic(rows):
    """s1l8 with TF32 matrix products over Swin-T's best fp32 row: the paper's own arithmetic
    (PAPER_ARITHMETIC), the line to set beside its 1.36x."""
    ours, swin = best_compiled(rows, OURS, False, "tf32"), best_swin(rows, False, "float32")
    value = ("not measured" if ours is None or swin is None else
             f"{ours['img_s'] / swin['img_s']:.2f}x ({ours['name']}: {ours['img_s']:.0f} img/s, "
             f"run {ours['run']}; Swin-T: {swin['name']} (run {swin['run']}))")
    return {"target": "s1l8 compiled inference, TF32 matmuls, x Swin-T's best fp32 row (the "
                      "paper's arithmetic, below)", "goal": "reported", "measured": value,
            "met": "-"}


def short(prof):
    """A profiled item's model, dtype and compiler in a few words (runs before these were
    recorded profiled s1l8 in float32)."""
    name = {OURS: "s1l8", VANILLA: "vanilla", SWIN: "swin-t"}.get(prof.get("model", OURS))
    variant = f"-{prof['variant']}" if prof.get("variant") else ""
    return f"{name}{variant}, {prof.get('dtype', 'float32')}, {prof['mode']}"


def profile_tables(what, prof, kernels=12, products=10):
    """The kernels with the most device time per call, and the matrix products and
    convolutions by input shapes (runs that recorded them)."""
    out = []
    if prof.get("top_kernels"):
        out += ["", f"{what} ({short(prof)}), the {kernels} kernels with the most device time "
                f"(ms and launches per call):", "", "```text",
                table([dict(r, name=r["name"][:100]) for r in prof["top_kernels"][:kernels]],
                      [("kind", "kind", "{}"), ("ms", "ms", "{:.3f}"),
                       ("launches", "launches", "{:.0f}"), ("name", "kernel", "{}")]), "```"]
    if prof.get("matmul_shapes"):
        out += ["", f"{what} ({short(prof)}), matrix products and convolutions by input shapes "
                f"(device ms and calls per call of the model; TFLOP/s of a matrix product from "
                f"its shapes, to set beside the card's matmul figure in the header):", "",
                "```text",
                table(prof["matmul_shapes"][:products],
                      [("op", "op", "{}"), ("ms", "ms", "{:.3f}"), ("calls", "calls", "{:.0f}"),
                       (product_tflops, "TFLOP/s", "{:.1f}"),
                       ("shapes", "input shapes", "{}")]), "```"]
    return out


def product_tflops(r):
    """TFLOP/s of a profiled matrix product (2 M K N multiply-adds per matrix, times the batch
    and the calls, over the device time); None for a convolution, shapes not read whole
    (gpu_check cuts the shapes' text at 200 characters), or no time. The operands: mm and
    bmm's first two inputs, addmm and baddbmm's second and third (the first is the added
    term); an out= tensor or empty entries follow them."""
    first = {"aten::mm": 0, "aten::bmm": 0, "aten::addmm": 1, "aten::baddbmm": 1}.get(r.get("op"))
    if first is None or not r.get("ms") or not r.get("calls"):
        return None
    try:
        shapes = ast.literal_eval(r.get("shapes", ""))
        a, b = shapes[first], shapes[first + 1]
    except (TypeError, ValueError, SyntaxError, IndexError, KeyError):
        return None
    if len(a) != len(b) or len(a) not in (2, 3) or a[-1] != b[-2]:
        return None
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1] * r["calls"] / (r["ms"] * 1e-3) / 1e12


def repeats(runs):
    """Rows measured by more than one run: img/s per run and the spread (max / min - 1)."""
    by_name = {}
    for r in model_rows(runs):
        by_name.setdefault(r["name"], []).append(r)
    return [{"name": n, "img_s": {r["run"]: r["img_s"] for r in rs},
             "spread": max(r["img_s"] for r in rs) / min(r["img_s"] for r in rs) - 1}
            for n, rs in by_name.items() if len(rs) > 1]


def tests(runs):
    out = []
    for label, res in runs:
        for t in res.get("tests", []):
            state = t.get("skipped") or (
                f"{t.get('counts')} exit {t.get('exit_code')}"
                f"{' (cut off by the phase end)' if t.get('timed_out') else ''}")
            args = " ".join(map(str, t.get("args") or []))
            out.append(f"run {label}, {t.get('set')} (`{args}`): {state}")
    return out


def _run_rows(label, res):
    h, c = res["header"], res.get("card", {})
    card = (f"{h.get('gpu')} ({h.get('sms')} SMs, {h.get('memory_gb', 0):.0f} GB, capability "
            f"{h.get('capability')}), CUDA {h.get('cuda')}, cuDNN {h.get('cudnn')}")
    if c.get("copy_gb_s"):
        card += (f"; copy {c['copy_gb_s']:.0f} GB/s, matmul {c['matmul_tflops_float32']:.1f} "
                 f"TFLOP/s fp32 (TF32 off), {c['matmul_tflops_bfloat16']:.1f} bf16")
    commit = str(h.get("commit"))[:10] + (" (+ uncommitted changes)" if h.get("worktree")
                                          else "")
    return [(f"run {label}", f"`{h.get('command')}`, {h.get('date')}, commit {commit}, "
                             f"{res.get('run', {}).get('wall_s', 0):.0f} s"),
            (f"run {label} machine", f"{card}; torch {h.get('torch')}, triton "
                                     f"{h.get('triton')}, timm {h.get('timm')}, python "
                                     f"{h.get('python')}")]


def tf32_text(runs):
    """The TF32 settings the model rows ran with (torch's defaults, read by gpu_check)."""
    seen = {json.dumps(res["header"].get("tf32_default"), sort_keys=True) for _, res in runs}
    if len(seen) != 1 or seen == {"null"}:
        return "torch's defaults (not recorded alike by every run)"
    d = json.loads(seen.pop())
    return (f"torch's defaults, matrix products {'on' if d.get('matmul') else 'off'}, cuDNN "
            f"convolutions {'on' if d.get('cudnn') else 'off'}")


def markdown(runs, command):
    rows = with_ratios(model_rows(runs))
    head = [("command", f"`{command}`")]
    for label, res in runs:
        head += _run_rows(label, res)
    notes = {}                  # every run's notes (a later run may hold a variant's alone)
    for _, res in reversed(runs):
        notes.update(res.get("models_notes", {}))
    out = ["<!-- generated by gpu_report.py: do not edit; re-run the command below -->",
           f"# Benchmark results: {PLATFORM}", "",
           f"Generated by `python gpu_report.py` from the gpu.json of {len(runs)} gpu_check "
           f"run(s), the files the command below names: do not edit by hand, re-run it. "
           f"`results-{PLATFORM}.json` holds the same figures. Each row names its run; a ratio "
           f"divides by Swin-T's best row of the same kind (inference or training step) and "
           f"precision (dtype, or TF32 matrix products), from whichever run measured it.", "",
           "| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in head]
    out += ["", "## Against the GPU issue's targets", "",
            "| target | goal | measured | met |", "|---|---|---|---|"]
    out += [f"| {_cell(t['target'])} | {_cell(t['goal'])} | {_cell(t['measured'])} | "
            f"{t['met']} |" for t in target_rows(runs)]
    paper = ", ".join(f"{k} {v[0]} / {v[1]}" for k, v in PAPER.items() if k != "note")
    out += ["", f"For comparison, {PAPER['note']}: {paper}; there VMamba-T runs at 1.36x "
                f"Swin-T (inference) and 0.58x (training). {PAPER_ARITHMETIC}"]
    out += ["", f"## Models: batch {notes.get('batch')}, {notes.get('res')} px", "",
            "img/s and ms: median of CUDA-event timings per batch; compile s: the first call; "
            "peak GB: allocated over what was resident; err: logits against the eager fp32 row "
            "of the same model; x eager, x comp: img/s over Swin-T's eager row and over its best "
            "compiled row of the same kind and precision; x swin: over the Swin-T row named in "
            "the last column, the faster of the two. "
            f"compiled: {notes.get('compiled', COMPILED)}. floor: {notes.get('floor')}. "
            f"chunked: {notes.get('chunked')}. TF32: {tf32_text(runs)}."
            + "".join(f" {v}: {notes[v]}." for v in dict.fromkeys(r.get("variant") for r in rows)
                      if v not in (None, "floor", "chunked", "tf32") and notes.get(v)),
            "", "```text",
            table(rows, [("name", "row", "{}"), ("run", "run", "{}"),
                         ("img_s", "img/s", "{:.0f}"), ("ms", "ms", "{:.1f}"),
                         ("x_swin_eager", "x eager", "{:.2f}x"),
                         ("x_swin_compiled", "x comp", "{:.2f}x"),
                         ("x_swin", "x swin", "{:.2f}x"), ("compile_s", "compile s", "{:.0f}"),
                         ("peak_gb", "peak GB", "{:.1f}"), ("err_vs_eager_fp32", "err",
                                                            "{:.0e}"),
                         ("swin_row", "against", "{}")]), "```"]
    floor = [r for r in rows if r.get("variant") == "floor"]
    for f in floor:
        real = [r for r in rows if r["model"] == f["model"] and r["train"] == f["train"] and
                r["dtype"] == f["dtype"] and r["mode"] == f["mode"] and not r.get("variant")]
        if real and f["img_s"] < max(r["img_s"] for r in real):
            out += ["", f"{f['name']} ran slower than the model with its real scan: on this "
                        f"card the stand-in is no lower bound."]
    for r in rows:
        if r.get("variant") == "cudagraphs":
            out += ["", f"{r['name']} (run {r['run']}): " + (
                f"Inductor skipped CUDA graphs {r['cudagraph_skips']} time(s): the row ran "
                f"without them, as a plain compiled row." if r.get("cudagraph_skips") else
                "replayed as CUDA graphs (torch.compile mode reduce-overhead); no peak memory: "
                "the graphs' pool is reserved once.")]
    missing = not_run(runs)
    if missing:
        out += ["", "Rows planned but not measured by any run:", ""] + [
            f"- {n} (run {label}): {_cell(why)}" for n, label, why in missing]
    rep = repeats(runs)
    if rep:
        out += ["", "Rows measured by more than one run (img/s per run; spread: max / min - 1):",
                ""] + [f"- {r['name']}: " + ", ".join(f"run {k} {v:.1f}" for k, v in
                                                        r["img_s"].items())
                       + f"; spread {100 * r['spread']:.2f}%" for r in rep]
    for label, res in runs:
        if res.get("scan"):
            sn = res.get("scan_notes", {})
            out += ["", f"## Selective scan, stage 1 of VMamba-T (run {label})", "",
                    f"ms: median per call; x floor: ms over the bytes the call must move / the "
                    f"measured copy bandwidth; f+b/f: forward+backward over forward; err: max "
                    f"relative error of y and the 7 gradients against {sn.get('reference')}. "
                    f"chunked: {sn.get('chunked')}; assoc: {sn.get('assoc')}.", "", "```text",
                    table([s for s in res["scan"] if s.get("fwd_ms")], [
                        ("gen", "gen", "{}"), ("shape", "b x K*D x L x N", "{}"),
                        ("path", "path", "{}"), ("fwd_ms", "fwd ms", "{:.3f}"),
                        ("fwd_x_floor", "x floor", "{:.1f}"),
                        ("fwd_bwd_ms", "f+b ms", "{:.3f}"),
                        ("fwd_bwd_x_floor", "x floor", "{:.1f}"),
                        ("fwd_bwd_over_fwd", "f+b/f", "{:.2f}"),
                        ("err_max", "err", "{:.0e}"), ("fwd_floor_ms", "floor ms", "{:.3f}")]),
                    "```"]
        prof = {k: v for k, v in (res.get("profile") or {}).items()
                if isinstance(v, dict) and v.get("ms_per_call_by_kind")}
        if prof:
            scans = any("scan" in v["ms_per_call_by_kind"] for v in prof.values())
            out += ["", f"## Where the device time goes (run {label}, torch.profiler)", "",
                    f"Batch {notes.get('batch')}; device ms per call by kind of "
                    f"kernel (gemm: cuBLAS/CUTLASS matrix products; "
                    + ("scan: Inductor's kernels that hold a tl.associative_scan; triton: its "
                       "other fused kernels):" if scans else
                       "triton: Inductor's fused kernels, the scans among them):"), ""]
            out += [f"- {k} ({short(v)}): " + ", ".join(
                f"{a} {b:.2f}" for a, b in sorted(v["ms_per_call_by_kind"].items(),
                                                   key=lambda kv: -kv[1]))
                + f"; total {sum(v['ms_per_call_by_kind'].values()):.2f}"
                for k, v in prof.items()]
            for k, v in prof.items():
                out += profile_tables(k, v)
    out += one_step_tiles(runs)
    t = tests(runs)
    if t:
        out += ["", "## CUDA tests", ""] + [f"- {_cell(x)}" for x in t]
    out += ["", "## Rows (JSON)", "", "`results-cuda.json`: every row above with its run.", ""]
    return "\n".join(out)


def one_step_tiles(runs):
    """The seq-tiles rows and scan cells: per kernel their autotuner timed with one-step tiles
    among its candidates (gpu_check.SequentialTiles), the fastest one-step tile's ms beside
    the fastest other tile's, and the tile it chose."""
    timed = []
    for label, res in runs:
        for r in res.get("models", []) + res.get("scan", []):
            name = r.get("name") or f"scan {r.get('gen')} b{r.get('batch')} {r.get('path')}"
            for k in r.get("seq_tiles_timed") or ():
                chosen = k.get("chosen") or {}
                timed.append(dict(k, item=f"{name} (run {label})",
                                  ratio=k["one_step_ms"] / k["other_ms"] if k.get("other_ms")
                                  else None,
                                  tile=" x ".join(str(v) for key, v in chosen.items()
                                                  if key.endswith("BLOCK"))
                                  + f", {chosen.get('num_warps')} warps"))
    if not timed:
        return []
    return ["", "## One-step tiles (seq-tiles rows and cells)", "",
            "Per kernel whose autotuner also timed tiles of one step per program (R0_BLOCK 1, "
            "gpu_check.SequentialTiles): ms of the fastest such tile and of the fastest other, "
            "their ratio, and the tile chosen (XBLOCK x R0_BLOCK).", "", "```text",
            table(timed, [("item", "row or cell", "{}"), ("one_step_ms", "1-step ms", "{:.3f}"),
                          ("other_ms", "other ms", "{:.3f}"), ("ratio", "ratio", "{:.2f}"),
                          ("tile", "chosen", "{}"), ("kernel", "kernel", "{}")]), "```"]


def page_json(runs, command):
    return {"generated_by": "gpu_report.py: do not edit", "command": command,
            "runs": {label: {"header": res["header"], "card": res.get("card"),
                             "phases": res.get("phases"), "tests": res.get("tests")}
                     for label, res in runs},
            "targets": target_rows(runs), "models": with_ratios(model_rows(runs)),
            "not_run": [dict(name=n, run=label, why=why) for n, label, why in not_run(runs)],
            "repeats": repeats(runs),
            "scan": [dict(s, run=label) for label, res in runs for s in res.get("scan", [])],
            "profile": {label: res.get("profile") for label, res in runs if res.get("profile")}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="gpu.json files of gpu_check runs, oldest first")
    p.add_argument("--out-dir", default="docs", help="where results-cuda.md/.json go")
    args = p.parse_args(argv)
    bk.check_output_folder(p, "--out-dir", args.out_dir)
    runs = load(args.runs)
    check_comparable(runs)
    command = " ".join(["python gpu_report.py", *(["--out-dir", args.out_dir]
                                                  if args.out_dir != "docs" else []),
                        *args.runs])
    bk.make_output_folder(p, "--out-dir", args.out_dir)
    md = os.path.join(args.out_dir, f"results-{PLATFORM}.md")
    _write(os.path.join(args.out_dir, f"results-{PLATFORM}.json"),
           json.dumps(page_json(runs, command), indent=1) + "\n")
    _write(md, markdown(runs, command) + "\n")
    print(f"wrote {md} and results-{PLATFORM}.json from {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
