"""report.py: bench.py's results page, written from the rows of one run, never by hand.

    python bench.py --report [tables]      docs/results-<platform>.md and .json, charts
                                           docs/results-<platform>-<table>.png

<platform> is cpu or cuda (bench.py's --device), so a CPU run leaves the CUDA page alone and the
other way round. The page: the header (machine, torch, timm, commit, date, command, malloc), a
summary computed from the rows (each of our models against Swin-T in the same run: img/s ratios
per batch, eager against eager and best compiled against best compiled, peak memory, compile
times), the tables as bench.py prints them, the charts and the JSON of every row. Charts need
matplotlib (optional); without it the page says which chart was skipped.
"""
import json
import math
import os
import re

import benchkit as bk

# -------------------------------------------------------------------------------- constants
REFERENCE = "swin_tiny_patch4_window7_224"       # the peer the summary divides by
REFERENCE_SHORT = "Swin-T"
CHARTS = ("models", "train", "scaling")          # one PNG per table that has rows
KINDS = {"models": "inference", "train": "training step"}
MATPLOTLIB_HINT = 'matplotlib is not installed (pip install -e ".[plot]")'


# -------------------------------------------------------------------------------- summary
def _best(rows):
    ok = [r for r in rows if r.get("img_s")]
    return max(ok, key=lambda r: r["img_s"]) if ok else None


def _ratio(a, b):
    return a["img_s"] / b["img_s"] if a and b else None


def summarize(result):
    """One entry per table (inference, training), dtype, batch and model of ours: img/s against
    Swin-T's in the same table and batch (eager against eager; our best compiled row against
    Swin-T's best compiled row, whatever the mode), peak MB and compile times."""
    out = []
    for table, kind in KINDS.items():
        rows = [r for r in result.get(table, []) if r.get("scan", "chunked") != "reference"]
        for key in dict.fromkeys((r["dtype"], r["batch"]) for r in rows):
            same = [r for r in rows if (r["dtype"], r["batch"]) == key]
            ref = [r for r in same if r["model"] == REFERENCE]
            ref_eager = _best([r for r in ref if not r["compile"]])
            ref_comp = _best([r for r in ref if r["compile"]])
            for model in dict.fromkeys(r["model"] for r in same if bk.is_ours(r["model"])):
                mine = [r for r in same if r["model"] == model]
                eager = _best([r for r in mine if not r["compile"]])
                comp = _best([r for r in mine if r["compile"]])
                out.append({
                    "kind": kind, "dtype": key[0], "batch": key[1], "model": model,
                    "eager_img_s": eager and eager["img_s"], "eager_x": _ratio(eager, ref_eager),
                    "compiled": comp and comp["mode"], "compiled_img_s": comp and comp["img_s"],
                    "compiled_x": _ratio(comp, ref_comp),
                    "peak_mb": eager and eager.get("peak_mb"),
                    "compiled_peak_mb": comp and comp.get("peak_mb"),
                    "compile_s": comp and comp.get("compile_s"),
                    "compile_s_by_mode": {r["mode"]: r["compile_s"] for r in mine
                                          if r.get("compile_s") is not None},
                    "reference": {"model": REFERENCE,
                                  "eager_img_s": ref_eager and ref_eager["img_s"],
                                  "peak_mb": ref_eager and ref_eager.get("peak_mb"),
                                  "compiled": ref_comp and ref_comp["mode"],
                                  "compiled_img_s": ref_comp and ref_comp["img_s"],
                                  "compile_s": ref_comp and ref_comp.get("compile_s")}})
    return out


SUMMARY_COLS = [("model", "model", "{}"), ("batch", "batch", "{}"),
                ("eager_img_s", "eager img/s", bk.img_s), ("eager_x", "x Swin-T", "{:.2f}x"),
                ("compiled", "best compiled", "{}"), ("compiled_img_s", "img/s", bk.img_s),
                ("compiled_x", "x Swin-T", "{:.2f}x"), ("peak_mb", "peak MB", "{:.0f}"),
                ("compile_s", "compile s", "{:.1f}")]


def format_summary(entries):
    """[(title, text)] per kind and dtype."""
    out = []
    for kind, dtype in dict.fromkeys((e["kind"], e["dtype"]) for e in entries):
        rows = [e for e in entries if (e["kind"], e["dtype"]) == (kind, dtype)]
        compiled = any(e["compiled"] for e in rows)
        notes = [f"x {REFERENCE_SHORT}: our img/s over {REFERENCE}'s, same table and batch: "
                 f"eager vs eager" + (", our best compiled row vs its best compiled row (any "
                                      "mode)" if compiled else "") +
                 "; peak MB: the eager row's" +
                 (" (one training step)" if kind == "training step" else "")]
        for e in rows:
            if e["model"] != rows[0]["model"]:
                continue
            r = e["reference"]
            if r["eager_img_s"] is None and r["compiled_img_s"] is None:
                notes.append(f"batch {e['batch']}: no {REFERENCE} row in this run, so no ratios "
                             f"(timm missing, --no-peers or --only)")
                continue
            text = f"{REFERENCE_SHORT}, batch {e['batch']}:"
            if r["eager_img_s"] is not None:
                text += f" eager {bk.img_s(r['eager_img_s'])} img/s"
                text += f", peak {r['peak_mb']:.0f} MB" if r["peak_mb"] is not None else ""
            if r["compiled_img_s"] is not None:
                text += (f"; best compiled ({r['compiled']}) {bk.img_s(r['compiled_img_s'])} "
                         f"img/s, compile {r['compile_s']:.1f} s")
            notes.append(text)
        title = f"summary, {kind} ({dtype}): ours against {REFERENCE_SHORT}, same run"
        out.append(bk.format_table(title, rows, SUMMARY_COLS, notes,
                                   optional=("eager_x", "compiled", "compiled_img_s",
                                             "compiled_x", "compile_s", "peak_mb")))
    return out


# -------------------------------------------------------------------------------- charts
def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_bars(rows, path, title):
    """img/s per model and mode, one bar per batch; None without matplotlib."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("img_s")]
    if plt is None or not ok:
        return None
    dtypes = len({r["dtype"] for r in ok}) > 1
    name = lambda r: f"{r['model']} {r['mode']}" + (f" {r['dtype']}" if dtypes else "")  # noqa
    names = list(dict.fromkeys(name(r) for r in ok))
    batches = sorted({r["batch"] for r in ok})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / len(batches)
    for j, b in enumerate(batches):
        ys = {name(r): r["img_s"] for r in ok if r["batch"] == b}
        ax.bar([i + j * width for i in range(len(names))], [ys.get(n, 0) for n in names],
               width, label=f"batch {b}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=7,
                  rotation=30, ha="right")
    ax.set(ylabel="images / s", title=title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_charts(result, directory, prefix=""):
    """One chart per table with a timed row: {name: path, or None where matplotlib is
    missing} (a table of errors only gets no entry, not the matplotlib hint)."""
    import scaling
    head, cfg = result["header"], result["config"]
    where = f"{head['device']}, {cfg['res']} px"
    out = {}
    for table, kind in KINDS.items():
        if table in result and any(r.get("img_s") for r in result[table]):
            out[table] = plot_bars(result[table], os.path.join(directory, f"{prefix}{table}.png"),
                                   f"{kind}, {where}")
    if "scaling" in result and any(r.get("ms") for r in result["scaling"]["rows"]):
        out["scaling"] = scaling.plot(result["scaling"]["rows"],
                                      os.path.join(directory, f"{prefix}scaling.png"),
                                      f"input scaling, {head['device']}")
    return out


# -------------------------------------------------------------------------------- the page
def clean(v):
    """JSON without NaN or infinity (not JSON): None instead."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def _short(v):
    """Floats to 6 significant digits: the page's JSON stays readable (the .json file has all)."""
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, dict):
        return {k: _short(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_short(x) for x in v]
    return v


def rows_json(result):
    """Every row, one line each: {"scan": [...], "models": [...], ...}."""
    tables = [("scan", result.get("scan")), ("models", result.get("models")),
              ("train", result.get("train")),
              ("scaling", result.get("scaling", {}).get("rows"))]
    parts = []
    for name, rows in tables:
        if rows is not None:
            body = ",\n".join(f"  {json.dumps(_short(clean(r)))}" for r in rows)
            parts.append(f" {json.dumps(name)}: [\n{body}\n ]")
    return "{\n" + ",\n".join(parts) + "\n}"


def _cell(v):
    return str(v).replace("|", "\\|")


def markdown(result, sections, platform, charts):
    """The page. sections: [(name, text)] as bench.py printed them."""
    head = result["header"]
    rows = [("command", f"`{head['command']}`"),
            ("CPU", f"{head['cpu']}, {head['cores']} cores, {head['threads']} torch threads")]
    if "gpu" in head:
        rows += [("GPU", f"{head['gpu']}, CUDA {head['cuda']}, TF32 {head['tf32']}")]
    rows += [("torch", f"{head['torch']} (python {head['python']})"), ("timm", head["timm"]),
             ("commit", head["git"]), ("date", head["date"]), ("dtype", head["dtype"]),
             ("malloc", head["malloc"]), ("load average", head["load"])]
    if head.get("env"):
        rows.append(("environment", " ".join(f"{k}={v}" for k, v in head["env"].items())))
    rows.append(("wall time", f"{result['wall_s']:.0f} s"))
    out = ["<!-- generated by bench.py --report: do not edit; re-run the command below -->",
           f"# Benchmark results: {platform}", "",
           f"Generated by `python bench.py --report` from one run: do not edit by hand, re-run "
           f"the command below. `results-{platform}.json` holds the same figures.", ""]
    if result.get("partial"):
        out += [f"**Incomplete** ({result['partial']}): the run stopped or is still going.", ""]
    out += ["| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows]
    compiled = any(r.get("compile_s") is not None for r in result.get("scan") or [])
    titles = {"summary": "Summary", "scan": "Selective scan: timing",
              "scan_accuracy": "Selective scan: " + ("compile time and accuracy" if compiled
                                                    else "accuracy"),
              "models": "Models: inference", "train": "Models: training step",
              "scaling": "Input scaling (the paper's resolution study)"}
    order = ["summary"] + [k for k in titles if k != "summary"]
    for key in order:
        texts = [t for k, t in sections if k == key]
        if texts:
            out += ["", f"## {titles[key]}"]
            for t in texts:
                out += ["", "```text", t, "```"]
    if result.get("notes"):
        out += [""] + [f"- {note}" for note in result["notes"]]
    if charts:
        out += ["", "## Charts", ""]
        for name, path in charts.items():
            out.append(f"![{name}]({os.path.basename(path)})" if path else
                       f"- chart `{name}` skipped: {MATPLOTLIB_HINT}")
    out += ["", "## Rows (JSON)", "", "```json", rows_json(result), "```", ""]
    return "\n".join(out)


def _write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)                # a page is whole or absent, never half-written


def written_by_another(path):
    """The program named in path's "generated by" first line if it is not bench.py (the GPU
    page docs/results-cuda.md comes from gpu_report.py), else None: no such line (no file, an
    empty or hand-written one: replaced as before) or bench.py's own."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return None
    found = re.match(r"<!-- generated by ([^\s:]+)", first)
    return found.group(1) if found and found.group(1) != "bench.py" else None


def write(result, sections, directory, platform):
    """results-<platform>.md, .json and charts in directory; charts of this platform that this
    run did not make are removed (they would belong to another run). Returns {"paths": the
    files written, "charts": {name: path or None (skipped)}}."""
    os.makedirs(directory, exist_ok=True)
    prefix = f"results-{platform}-"
    charts = make_charts(result, directory, prefix)
    for name in CHARTS:
        stale = os.path.join(directory, f"{prefix}{name}.png")
        if not charts.get(name) and os.path.exists(stale):
            os.remove(stale)
    md, js = (os.path.join(directory, f"results-{platform}.{ext}") for ext in ("md", "json"))
    page = dict(result, charts={k: v and os.path.basename(v) for k, v in charts.items()},
                generated_by="bench.py --report: do not edit")
    _write(js, json.dumps(clean(page), indent=1) + "\n")
    _write(md, markdown(result, sections, platform, charts))
    return {"paths": [md, js] + [p for p in charts.values() if p], "charts": charts}


USAGE = ("report.py is a module: bench.py writes the results page with it. Run "
         "`python bench.py --report` (see bench.py --help).")

if __name__ == "__main__":
    import sys
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(USAGE)
        raise SystemExit(0)
    raise SystemExit(USAGE)
