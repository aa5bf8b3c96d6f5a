"""Tests of bench.py, benchkit.py, scaling.py and report.py that need no timing figures: argument
parsing, the CUDA usage error, the shape of table and JSON rows (tiny model, short --min-time),
the peers' rows (only where timm is importable), that measuring memory leaves the timing
process's malloc alone, that printed tables fit 120 columns, that a run warns of nothing, and
the results page (summary ratios, one page per platform, charts optional).

The malloc test asks glibc (mallinfo2) whether a block larger than the whole heap is served by
mmap: never under bench's MALLOC_FIX (MALLOC_MMAP_MAX_=0), always after the give-back switch that
a memory measurement makes (and that makes later eager calls fault their pages in again). The
probe runs after bench's own time-then-memory path; the same probe after the switch, in the same
process, is the control that shows it can fail.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest

import bench
import benchkit as bk
import report
import vmamba_min as vm

HERE = os.path.dirname(os.path.abspath(__file__))
# A VMamba small enough for seconds: one block per stage, width 16, 64 x 64 images.
TINY = dict(model="vmamba_tiny_s1l8", res=64, batch=2, device="cpu", dtype="float32",
            compile=False, train=False, overrides={"depths": [1, 1, 1, 1], "dim": 16})
SHORT = dict(min_time=0.05, warmup=2)


def test_batch_list_parses_and_rejects():
    assert bench.batch_list("1,8,32") == [1, 8, 32]
    assert bench.batch_list("4") == [4]
    for bad in ("", "0", "1,-2", "a,b", "1,,2", "1,8,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.batch_list(bad)
    _, args = bench.parse_args(["--batch", "1,2"])
    assert args.batch == [1, 2] and args.scan and args.models and not args.train
    _, args = bench.parse_args(["--train"])
    assert args.train and not args.scan and not args.models


def test_cuda_without_gpu_is_a_usage_error():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "bench.py", "--device", "cuda"], cwd=HERE,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--device cuda" in proc.stderr and "is_available() is False" in proc.stderr
    assert proc.stdout == ""              # nothing was run


def test_specs_cover_every_batch_and_mode():
    _, args = bench.parse_args(["--models", "--batch", "1,8", "--compile-models", "--no-peers"])
    specs = bench.model_specs(args)
    assert [(s["model"], s["batch"], s["compile"]) for s in specs] == [
        (m, b, c) for b in (1, 8) for m in bench.OURS for c in (False, "model", "blocks")]
    assert [bench.label(s)["mode"] for s in specs[:3]] == ["eager", "compiled", "compile_blocks"]
    train = bench.model_specs(args, train=True)
    assert all(s["train"] for s in train) and {s["model"] for s in train} == set(bench.OURS)
    _, args = bench.parse_args(["--train", "--compile-models", "blocks", "--no-peers"])
    assert [s["compile"] for s in bench.model_specs(args, train=True)] == [False, "blocks"] * 2
    _, args = bench.parse_args(["--models"])
    assert args.compile_models == [] and {s["compile"] for s in bench.model_specs(args)} == {False}
    for bad in ("block", "model,model", "model,eager"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.compile_modes(bad)
    _, args = bench.parse_args(["--models", "--all-models", "--no-peers"])
    scans = [bench.label(s)["scan"] for s in bench.model_specs(args)]
    assert scans == ["chunked", "reference"] * len(bench.OURS)
    # --chunk reaches the chunked rows only: a chunk size with the reference loop is an error
    _, args = bench.parse_args(["--models", "--all-models", "--no-peers", "--chunk", "16"])
    for spec in bench.model_specs(args):
        cfg = vm.build_config(spec["model"], **spec["overrides"])
        assert cfg.chunk_size == (16 if cfg.scan == "chunked" else None), spec


def test_groups_are_a_models_modes():
    _, args = bench.parse_args(["--models", "--batch", "1,8", "--compile-models", "blocks",
                                "--no-peers", "--all-models"])
    groups = bench.groups(bench.model_specs(args))
    assert [[bench.label(s)["mode"] for s in g] for g in groups] == [
        ["eager", "compile_blocks"], ["loop scan"]] * 4       # the loop-scan row stands alone
    assert [(g[0]["model"], g[0]["batch"]) for g in groups[::2]] == [
        (m, b) for b in (1, 8) for m in bench.OURS]


def test_compile_blocks_row_is_ours_only_and_runs_beside_eager():
    peer = dict(TINY, model="resnet50", compile="blocks")
    assert "ours only" in bk.run_row(peer, **SHORT)["error"]
    assert "want one of" in bk.run_row(dict(TINY, compile=True), **SHORT)["error"]
    one_stage = dict(TINY, overrides={"depths": [2], "dim": 16})   # one graph: seconds
    specs = [one_stage, dict(one_stage, compile="blocks"), dict(one_stage, compile="bad")]
    eager, blocks, bad = bk.run_group(specs, **SHORT)
    assert "error" not in eager and "error" not in blocks, (eager, blocks)
    assert "want one of" in bad["error"]                   # the others still timed
    assert eager["vs_eager"] == 1 and "compile_s" not in eager
    assert blocks["compile_s"] > 0 and blocks["ms"] > 0 and blocks["vs_eager"] > 0
    assert eager["calls"] == blocks["calls"] >= bk.MIN_ROUNDS
    assert bench.label(blocks)["mode"] == "compile_blocks"
    assert json.loads(json.dumps([eager, blocks, bad])) == [eager, blocks, bad]


def test_a_group_whose_eager_row_fails_times_the_others_alone():
    specs = [dict(TINY, overrides={"no_such_option": 1}), dict(TINY, compile="bad")]
    eager, other = bk.run_group(specs, **SHORT)
    assert "no_such_option" in eager["error"] and "want one of" in other["error"]
    rows = bk.run_group([dict(TINY, overrides={"no_such_option": 1}), TINY], **SHORT)
    assert "error" in rows[0] and "error" not in rows[1] and rows[1]["ms"] > 0
    assert rows[1].get("vs_eager") is None                  # no eager row to compare with


def test_time_steady_with_min_time_zero_ends_however_noisy_the_calls():
    """torch reads a max_run_time of 0 as no limit: --min-time 0 timed until the spread fell
    below 5%, which calls of random length never reach (a run hung). Run in a thread, so that
    a regression fails here instead of hanging the suite."""
    import random
    import threading
    import time as time_
    gen, out = random.Random(0), []

    def noisy():
        time_.sleep(gen.choice((0.0, 0.002)))
    worker = threading.Thread(target=lambda: out.append(bk.time_steady(noisy, "cpu", 0.0, 0)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert out and out[0]["calls"] >= 1


def test_time_paired_alternates_and_pairs_rounds():
    """Fake callables: they log their calls; the clock is the real one, so the times are small
    but positive, and the first callable's ratio to itself is exactly 1."""
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    out = bk.time_paired(fns, "cpu", min_time=0.0, warmup=1)
    rounds = bk.MIN_ROUNDS
    assert calls[:3] == [0, 1, 2]                               # warm-up, one each
    timed = calls[3:]
    assert len(timed) == 3 * rounds
    assert timed[:6] == [0, 1, 2, 2, 1, 0]                      # order reversed every round
    assert [o["calls"] for o in out] == [rounds] * 3 and out[0]["vs_first"] == 1
    assert all(o["ms"] >= 0 and o["vs_first"] > 0 for o in out)


def test_model_rows_table_and_json_shape(capsys):
    specs = [TINY, dict(TINY, train=True), dict(TINY, overrides={"no_such_option": 1})]
    rows = [{**bk.run_row(s, **SHORT), **bench.label(s)} for s in specs]
    for r in rows[:2]:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["calls"] >= 1 and (r["iqr_ms"] or 0) >= 0
        assert r["img_s"] == pytest.approx(1e3 * r["batch"] / r["ms"])
        assert r["params_m"] > 0 and r["mode"] == "eager" and r["source"] == "ours"
    assert "no_such_option" in rows[2]["error"]          # a failing row says why, run goes on
    result = json.loads(json.dumps({"models": rows[:1], "train": rows[1:],
                                    "config": {"res": 64}}))
    bench.print_results(result)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("vmamba_tiny_s1l8")]
    assert len(lines) == 3 and lines[-1].split()[3] == "[1]"   # the error's note number
    assert "[1] ValueError" in out and "no_such_option" in out
    assert "models: inference (no_grad), 64x64, float32" in out and "training step" in out


def test_scan_rows_shape():
    # stage 4 of VMamba-T: L = 49, so the naive loop takes milliseconds
    _, args = bench.parse_args(["--scan", "--no-compile", "--min-time", "0.05"])
    rows = bench.scan_shape_rows("v2", 4, args)
    assert [r["pass"] for r in rows] == ["fwd", "fwd+bwd"]
    assert rows[0]["shape"] == "1x3072x49x1" and rows[0]["err_vs"] == "naive"
    assert rows[0]["naive_ms"] > 0 and rows[0]["eager_x"] > 0
    assert rows[0]["eager_rel"] < 1e-5                 # chunked vs naive, float32
    assert "naive_ms" not in rows[1] and rows[1]["err_vs"] == "eager"
    assert rows[1]["eager_ms"] > 0 and "compiled_ms" not in rows[1]
    assert rows[1]["eager_bx"] > 0 and "compiled_bx" not in rows[1] and "eager_bx" not in rows[0]
    json.dumps(rows)


def test_peak_rss_refuses_to_run_in_a_timing_process():
    with pytest.raises(RuntimeError, match="child"):
        bk.peak_rss_mb(lambda: None)


PROBE = """
import ctypes, json, sys
import torch
import benchkit as bk

libc = ctypes.CDLL("libc.so.6")
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
libc.mallinfo2.restype = type("MallInfo2", (ctypes.Structure,),
                              {"_fields_": [(f, ctypes.c_size_t) for f in FIELDS.split()]})

def mmapped_share_of_a_big_block():
    # a block larger than the whole heap: glibc serves it by mmap if allowed, else grows the heap
    size = libc.mallinfo2().arena + (64 << 20)
    before = libc.mallinfo2().hblkhd
    t = torch.empty(size, dtype=torch.uint8)          # never touched: costs no memory
    during = libc.mallinfo2().hblkhd
    del t
    return (during - before) / size

spec = json.loads(sys.argv[1])
rows = bk.add_memory([bk.run_row(spec, 0.05, 2)])   # bench's path: time, then memory
after = mmapped_share_of_a_big_block()
bk.malloc_give_back(libc)                            # what a memory measurement does
control = mmapped_share_of_a_big_block()
print(json.dumps({"peak_mb": rows[0]["peak_mb"], "after": after, "control": control}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_step_leaves_the_timing_process_malloc_alone():
    env = {**os.environ, **bk.MALLOC_FIX}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(TINY)], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=180)
    if "mallinfo2" in proc.stderr:
        pytest.skip("glibc without mallinfo2 (older than 2.33)")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["peak_mb"] is not None and out["peak_mb"] > 0   # the child did measure
    assert out["after"] == 0, out          # MALLOC_MMAP_MAX_=0 still in force in the parent
    assert out["control"] >= 1, out        # after the switch the same block is mmapped


def test_peers_rows_when_timm_is_importable():
    pytest.importorskip("timm")
    _, args = bench.parse_args(["--models", "--batch", "1"])
    specs = bench.model_specs(args)
    assert [s["model"] for s in specs] == list(bench.OURS + bench.PEERS)
    for spec in specs[len(bench.OURS):]:
        row = {**bk.run_row(spec, min_time=0.01, warmup=2), **bench.label(spec)}
        assert "error" not in row, row
        assert row["source"] == "timm" and row["batch"] == 1 and row["res"] == 224
        assert row["img_s"] > 0 and row["params_m"] > 1


def test_scaling_growth_exponent_and_res_parsing():
    import scaling
    rows = [dict(model="m", res=224, tokens=3136, ms=10.0, peak_mb=100.0),
            dict(model="m", res=448, tokens=12544, ms=40.0, peak_mb=200.0),  # L x4: time x4,
            dict(model="n", res=224, tokens=3136, error="skipped: size")]    # memory x2; n: none
    g = scaling.growth(rows)
    assert set(g) == {"m"} and g["m"]["L_ratio"] == pytest.approx(4.0)
    assert g["m"]["time_exponent"] == pytest.approx(1.0)
    assert g["m"]["mem_exponent"] == pytest.approx(0.5)
    _, args = scaling.parse_args(["--res", "224,512"])
    assert args.res == [224, 512]
    with pytest.raises(SystemExit) as e:
        scaling.parse_args(["--res", "224,big"])
    assert e.value.code == 2


def test_compile_mode_and_dtype_lists():
    _, args = bench.parse_args(["--models", "--no-peers", "--dtype", "float32,bfloat16",
                                "--compile-models", "model", "--compile-mode",
                                "default,max-autotune-no-cudagraphs"])
    specs = bench.model_specs(args)
    assert [(s["dtype"], bench.label(s)["mode"]) for s in specs[:3]] == [
        ("float32", "eager"), ("float32", "compiled"), ("float32", "compiled[at]")]
    assert {s["dtype"] for s in specs} == {"float32", "bfloat16"}
    assert [len(g) for g in bench.groups(specs)] == [3] * 4      # per dtype, batch and model
    for argv in (["--compile-models", "--compile-mode", "reduce-overhead"],   # CUDA graphs: CUDA
                 ["--compile-mode", "max-autotune-no-cudagraphs"],           # no compiled rows
                 ["--compile-models", "--compile-mode", "fast"], ["--dtype", "float16"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(argv)
        assert e.value.code == 2
    spec = dict(TINY, compile="model", compile_mode="reduce-overhead")
    assert "CUDA only" in bk.run_row(spec, **SHORT)["error"]


def test_train_table_has_the_peers(monkeypatch):
    monkeypatch.setattr(bk, "timm_available", lambda: True)
    _, args = bench.parse_args(["--train", "--compile-models", "model"])
    models = [s["model"] for s in bench.model_specs(args, train=True)]
    assert models == [m for m in bench.OURS + bench.PEERS for _ in range(2)]


def test_scaling_tokens():
    """L as the stems make it: generation 2's convs round an odd size up (250 px: 63 x 63
    tokens, not 62 x 62); the growth exponent divides by the tokens' ratio, not res^2's."""
    import scaling
    import torch
    import vmamba_min
    assert scaling.tokens("vmamba_tiny_s1l8", 224) == 56 ** 2
    for res in (250, 251):
        stem = vmamba_min.build("vmamba_tiny_s1l8", dim=8, depths=(1,)).patch_embed
        _, h, w = stem(torch.zeros(1, 3, res, res))
        assert scaling.tokens("vmamba_tiny_s1l8", res) == h * w
    rows = [dict(model="m", res=r, tokens=196, ms=10.0) for r in (224, 239)]
    assert scaling.growth(rows) == {}                       # the same L: no exponent
    assert scaling.tokens("swin_tiny_patch4_window7_224", 448) == 112 ** 2
    assert scaling.tokens("deit_small_patch16_224", 224) == 14 ** 2


def test_reexec_keeps_interpreter_flags():
    code = "import benchkit; print(benchkit.interpreter_flags())"
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], cwd=HERE,
                         capture_output=True, text=True, check=True).stdout
    assert "-Werror::UserWarning" in out


# -------------------------------------------------------------------------------- fake results
def _model_rows(train, dtype, device="cuda"):
    """Rows as bench.py makes them, with figures as wide as a GPU at batch 128 gives."""
    rows = []
    for i, model in enumerate(bench.OURS + bench.PEERS):
        for compile_, mode in [(False, None), ("model", "default"), ("model", "max-autotune"),
                               ("blocks", "max-autotune")]:
            if compile_ == "blocks" and not bk.is_ours(model):
                continue
            spec = dict(model=model, res=224, batch=128, device=device, dtype=dtype,
                        compile=compile_, compile_mode=mode, train=train, overrides={})
            r = dict(spec, ms=25352.8 / (i + 1), iqr_ms=131.9, calls=1000, peak_mb=19157.0,
                     params_m=28.3, vs_eager=0.43 if compile_ else 1.0)
            r["img_s"] = 1e3 * 128 / r["ms"] * (2 if compile_ == "model" else 1)
            if compile_:
                r["compile_s"] = 267.5
            rows.append({**r, **bench.label(spec)})
    rows.append({**dict(rows[0], ms=None, img_s=None, peak_mb=None, compile="model",
                        compile_mode="max-autotune-no-cudagraphs", compile_s=None,
                        error="OutOfMemoryError: CUDA out of memory. Tried to allocate 19.62 GiB."
                              " GPU 0 has a total capacity of 139.81 GiB of which 2.2 GiB is "
                              "free. Including non-PyTorch memory, this process has 137 GiB"),
                 "mode": "compiled[at]"})
    return rows


def fake_result():
    scan_rows = []
    for gen, shape in (("v0", "1x768x3136x16"), ("v2", "1x384x3136x1")):
        for pass_ in ("fwd", "fwd+bwd"):
            scan_rows.append(dict(scan=gen, stage=1, shape=shape, pass_=pass_, dtype="float32",
                                  naive_ms=10054.3 if pass_ == "fwd" else None, eager_ms=1330.9,
                                  eager_iqr_ms=15.3, eager_x=127.7, eager_bx=2.72,
                                  compiled_ms=1108.7, compiled_iqr_ms=3.6, compiled_x=123.8,
                                  compiled_bx=2.63, compile_s=114.5, err_vs="naive",
                                  eager_err=9.5e-07, eager_rel=1.2e-07, compiled_err=1.4e-06,
                                  compiled_rel=1.7e-07))
    for r in scan_rows:
        r["pass"] = r.pop("pass_")
    scan_rows[-1].update(compiled_ms=None, compiled_err=None, compiled_rel=None,
                         error="compiled: BackendCompilerFailed: backend='inductor' raised: "
                               "CppCompileError: C++ compile error " + "x" * 100)
    scal = [dict(model=m, res=r, tokens=(r // 4) ** 2, batch=1, ms=1530.4, iqr_ms=61.4,
                 img_s=0.87, peak_mb=19157.0, mode="eager", dtype="float32")
            for m in ("vmamba_tiny_s1l8", "swin_tiny_patch4_window7_224") for r in (224, 1024)]
    scal.append(dict(model="deit_small_patch16_224", res=1024, tokens=4096, batch=1, mode="eager",
                     dtype="float32", error="RuntimeError: " + "too big " * 30))
    import scaling
    result = {"header": bk.header("cpu", ["float32", "bfloat16"]), "config": {"res": 224},
              "scan": scan_rows, "wall_s": 12.0,
              "models": _model_rows(False, "float32") + _model_rows(False, "bfloat16"),
              "train": _model_rows(True, "float32"),
              "scaling": {"rows": scal, "growth": scaling.growth(scal), "compiled": False,
                          "batch": 1, "dtype": "float32", "peers_missing": False},
              "notes": [bk.PEERS_HINT]}
    result["summary"] = report.summarize(result)
    return result


def test_printed_tables_and_notes_fit_120_columns(capsys):
    bench.print_results(fake_result())
    bk.print_header(fake_result()["header"])
    out = capsys.readouterr().out
    assert "compile_blocks[at+cg]" in out and "[1] OutOfMemoryError" in out
    assert "selective scan (float32): compile time and errors" in out
    assert "input scaling" in out and "summary, training step (float32)" in out
    too_wide = [ln for ln in out.splitlines() if len(ln) > bk.TABLE_WIDTH]
    assert not too_wide, "\n".join(too_wide)


def test_summary_ratios_against_swin():
    rows = []
    for model, eager, comp, blocks in (("vmamba_tiny_s1l8", 6.0, 9.0, 9.5),
                                       ("swin_tiny_patch4_window7_224", 12.0, 13.0, None)):
        for compile_, img_s in ((False, eager), ("model", comp), ("blocks", blocks)):
            if img_s is not None:
                spec = dict(model=model, batch=1, dtype="float32", compile=compile_,
                            compile_mode="default" if compile_ else None, overrides={})
                rows.append({**spec, **bench.label(spec), "img_s": img_s, "peak_mb": 50.0,
                             "compile_s": 30.0 if compile_ else None})
    [s] = report.summarize({"models": rows})
    assert s["model"] == "vmamba_tiny_s1l8" and s["kind"] == "inference"
    assert s["eager_x"] == pytest.approx(0.5)                # eager against eager
    assert s["compiled"] == "compile_blocks"                 # our best compiled row ...
    assert s["compiled_x"] == pytest.approx(9.5 / 13.0)      # ... against Swin-T's best
    assert s["reference"]["compiled"] == "compiled"
    assert s["compile_s_by_mode"] == {"compiled": 30.0, "compile_blocks": 30.0}


def test_report_one_page_per_platform(tmp_path, monkeypatch):
    result = fake_result()
    sections = bench.render(result)
    (tmp_path / "results-cpu-scan.png").write_text("")      # not a chart name: left alone
    (tmp_path / "results-cpu-train.png").write_text("stale")
    del result["train"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # no matplotlib: charts skipped
    cuda = report.write(result, sections, str(tmp_path), "cuda")["paths"]
    written = report.write(result, sections, str(tmp_path), "cpu")
    assert all(os.path.exists(p) for p in cuda + written["paths"])   # the CUDA page stays
    assert written["charts"] == {"models": None, "scaling": None}    # skipped, and said so
    assert not (tmp_path / "results-cpu-train.png").exists()  # stale: another run's chart
    assert (tmp_path / "results-cpu-scan.png").exists()
    md = (tmp_path / "results-cpu.md").read_text()
    assert "do not edit" in md.splitlines()[0] and "Incomplete" not in md
    head = result["header"]
    for field in ("torch", "timm", "git", "date", "command", "malloc", "cpu"):
        assert str(head[field]).replace("|", "\\|") in md, field
    assert "UTC" in head["date"] and f"{head['cores']} cores" in md
    assert "chart `models` skipped: matplotlib is not installed" in md
    assert "```text\nsummary, inference (float32)" in md and "## Rows (JSON)" in md
    page = json.loads((tmp_path / "results-cpu.json").read_text())
    assert page["header"]["git"] == head["git"] and page["summary"] == json.loads(
        json.dumps(result["summary"]))
    rows_block = md.split("```json\n")[1].split("\n```")[0]
    assert len(json.loads(rows_block)["models"]) == len(result["models"])
    result["header"].update(gpu="NVIDIA H200, 140 GiB, capability 9.0", cuda="13.0",
                            tf32="matmul False, cudnn True")      # what a CUDA run adds
    report.write(result, sections, str(tmp_path), "cuda")
    assert "| GPU | NVIDIA H200, 140 GiB" in (tmp_path / "results-cuda.md").read_text()
    assert all(len(ln) <= bk.TABLE_WIDTH for ln in bk.header_lines(result["header"]))


def test_a_tiny_run_warns_of_nothing():
    """Warnings as errors around what a default run does with a model, a training step, the
    scan rows and the tables."""
    import warnings
    _, args = bench.parse_args(["--scan", "--no-compile", "--min-time", "0.01"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = [bk.run_row(TINY, **SHORT), bk.run_row(dict(TINY, train=True), **SHORT)]
        assert all("error" not in r for r in rows), rows
        scan_rows = bench.scan_shape_rows("v2", 4, args)
        bench.render({"config": {"res": 64}, "scan": scan_rows,
                      "models": [{**r, **bench.label(r)} for r in rows]})


def test_a_failing_table_is_a_note_and_the_page_follows_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "scan_table", lambda args, progress=None: 1 / 0)
    monkeypatch.setattr(bench, "model_rows",
                        lambda specs, args, progress=None: _model_rows(False, "float32",
                                                                       "cpu")[:2])
    pages, write = [], report.write
    monkeypatch.setattr(report, "write", lambda result, *a: pages.append(
        result.get("partial")) or write(result, *a))
    _, args = bench.parse_args(["--scan", "--models", "--no-peers", "--report", "--report-dir",
                                str(tmp_path)])
    result = bench.run_all(args)
    assert "the scan table failed: ZeroDivisionError" in result["notes"][0]
    assert pages == ["partial: the run has yet to do models"]   # after the first table
    assert "Incomplete" in (tmp_path / "results-cpu.md").read_text()
    assert "partial" not in result and result["summary"][0]["model"] == "vmamba_tiny_s1l8"


def test_a_run_cut_off_in_the_scan_table_or_the_memory_phase_keeps_what_it_measured(
        tmp_path, monkeypatch):
    """The page was written only after a whole scan table, and not after a model table's last
    row group nor during its memory phase: an interrupt there lost every figure since."""
    real, calls = bench.scan_shape_rows, []

    def scan_shape_rows(*a):                    # the second shape: the run is killed
        calls.append(a)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(bench, "scan_shape_rows", scan_shape_rows)
    _, args = bench.parse_args(["--scan", "--stages", "4", "--no-compile", "--min-time", "0.01",
                                "--report", "--report-dir", str(tmp_path / "scan")])
    with pytest.raises(KeyboardInterrupt):
        bench.run_all(args)
    page = (tmp_path / "scan" / "results-cpu.md").read_text()
    assert "Incomplete" in page and "1x6144x49x16" in page      # v0's stage-4 rows, timed
    assert "## Selective scan: accuracy\n" in page              # no compiled scan: no compile s

    monkeypatch.setattr(bk, "run_row", lambda spec, min_time, warmup: dict(
        spec, ms=100.0, iqr_ms=1.0, calls=10, img_s=10.0, vs_eager=1.0))
    figures = []

    def measure_memory(spec):                   # the second row's: the run is killed
        if figures:
            raise KeyboardInterrupt
        figures.append(123.0)
        return 123.0
    monkeypatch.setattr(bk, "measure_memory", measure_memory)
    _, args = bench.parse_args(["--models", "--only", "vmamba_tiny_s1l8,vanilla_vmamba_tiny",
                                "--report", "--report-dir", str(tmp_path / "models")])
    with pytest.raises(KeyboardInterrupt):
        bench.run_all(args)
    data = json.loads((tmp_path / "models" / "results-cpu.json").read_text())
    assert [(r["model"], r.get("peak_mb")) for r in data["models"]] == [
        ("vmamba_tiny_s1l8", 123.0), ("vanilla_vmamba_tiny", None)]


def test_a_run_cut_off_inside_a_table_leaves_the_rows_it_timed(tmp_path, monkeypatch):
    def run_row(spec, min_time, warmup):          # the second model's row: the run is killed
        if spec["model"] != "vmamba_tiny_s1l8":
            raise KeyboardInterrupt
        return dict(spec, ms=100.0, iqr_ms=1.0, calls=10, img_s=10.0, vs_eager=1.0)
    monkeypatch.setattr(bk, "run_row", run_row)
    _, args = bench.parse_args(["--train", "--only", "vmamba_tiny_s1l8,vanilla_vmamba_tiny",
                                "--report", "--report-dir", str(tmp_path)])
    with pytest.raises(KeyboardInterrupt):
        bench.run_all(args)
    page = (tmp_path / "results-cpu.md").read_text()
    assert "Incomplete" in page and "partial: the run is in its train table" in page
    assert "vmamba_tiny_s1l8" in page and "vanilla_vmamba_tiny" not in page


@pytest.mark.parametrize("argv, match", [
    (["--res", "0"], "--res"), (["--chunk", "0"], "--chunk"), (["--warmup", "-1"], "--warmup"),
    (["--min-time", "-5"], "--min-time"), (["--min-time", "inf"], "--min-time"),
    (["--min-time", "nan"], "--min-time"), (["--stages", "5"], "--stages"),
    (["--scaling", "--dtype", "float32,bfloat16"], "one dtype"),
    (["--models", "--only", "vmamba_nosuch"], "vmamba_nosuch"),
    (["--models", "--only", "vmamba_tiny_s1l8,vmamba_tiny_s1l8"], "distinct"),
    (["--scaling", "--scaling-res", "32,32"], "--scaling-res"),
    (["--report", "--report-dir", "bench.py"], "not a folder"),
    (["--scan", "--only", "vmamba_tiny_s1l8"], "--only"),
    (["--models", "--scaling-res", "224,320"], "--scaling-res"),
    (["--models", "--report-dir", "elsewhere"], "--report-dir"),
    # options of tables the run does not make were ignored, and recorded as if applied
    (["--scaling", "--batch", "2"], "--batch is for"), (["--scan", "--res", "64"], "--res is"),
    (["--scaling", "--chunk", "4"], "--chunk is"), (["--train", "--all-models"], "--all-models"),
    (["--scaling", "--compile-models"], "--compile-models is"),
    (["--models", "--stages", "2"], "--stages is"), (["--train", "--naive-bwd"], "--naive-bwd"),
    (["--models", "--no-compile"], "--no-compile is"),
    (["--models", "--no-peers", "--only", "resnet50"], "--no-peers leaves out"),
    (["--models", "--only", "vmamba_tiny_s1l8,"], "distinct model names")])
def test_bad_options_are_usage_errors(argv, match, capsys, monkeypatch):
    """Each of these was accepted and then ignored, or failed after minutes of timing."""
    monkeypatch.chdir(HERE)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_an_unknown_name_without_timm_lists_ours(capsys, monkeypatch):
    """Without timm a name that is not ours is taken for a timm model: the usage error also
    lists our names, as a typo is the likelier mistake."""
    monkeypatch.setattr(bench.bk, "timm_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--models", "--only", "nosuch"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not ours (" in err and "vmamba_tiny_s1l8" in err


def test_report_refuses_to_replace_gpu_reports_page(tmp_path, capsys, monkeypatch):
    """docs/results-cuda.md is gpu_report.py's page (README quotes it): bench.py --report on
    a GPU replaced it silently. Its own pages (and a missing one) it writes as before."""
    monkeypatch.chdir(HERE)
    assert report.written_by_another(os.path.join("docs", "results-cuda.md")) == "gpu_report.py"
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cuda", "--report"])
    assert e.value.code == 2 and "gpu_report.py" in capsys.readouterr().err
    page = tmp_path / "results-cuda.md"
    page.write_text("<!-- generated by gpu_report.py: do not edit -->\n")
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cuda", "--report", "--report-dir", str(tmp_path)])
    page.write_text("<!-- generated by bench.py --report: do not edit -->\n")
    bench.parse_args(["--device", "cuda", "--report", "--report-dir", str(tmp_path)])
    page.unlink()
    bench.parse_args(["--device", "cuda", "--report", "--report-dir", str(tmp_path)])
    bench.parse_args(["--report"])                       # docs/results-cpu.md is bench.py's
    page.write_text("\ufeff<!-- generated by gpu_report.py: do not edit -->\n")   # a BOM
    assert report.written_by_another(str(page)) == "gpu_report.py"
    page.write_text("<!-- generated by gpu_report.py -->\n", encoding="utf-16")
    assert report.written_by_another(str(page)) is None  # unreadable as UTF-8: no error either


@pytest.mark.parametrize("argv", [["--res", ""], ["--res", "32,32"], ["--res", "16"],
                                  ["--batch", "0"], ["--min-time", "inf"],
                                  ["--min-time", "nan"], ["--out", __file__]])
def test_scaling_rejects_bad_sizes_and_batches(argv):
    import scaling
    with pytest.raises(SystemExit) as e:
        scaling.parse_args(argv)
    assert e.value.code == 2


def test_scaling_sizes_are_sorted_so_growth_spans_smallest_to_largest():
    import scaling
    _, args = scaling.parse_args(["--res", "448,224,320"])
    assert args.res == [224, 320, 448]
    _, args = bench.parse_args(["--scaling", "--scaling-res", "320,224"])
    assert args.scaling_res == [224, 320]


def test_a_run_that_measured_nothing_exits_nonzero(monkeypatch, capsys):
    """Seen: every row of the only table asked for failed (a peer at too small a size), and
    bench.py exited 0. unmeasured names each table asked for that failed or has no timed row
    (a scan row whose compile failed keeps its eager times: measured); main returns 1 then,
    0 otherwise."""
    ok, bad = {"model": "a", "ms": 5.0, "img_s": 1.0}, {"model": "b", "error": "RuntimeError: x"}
    scan_row = {"naive_ms": 50.0, "eager_ms": 5.0, "error": "compiled: RuntimeError: x"}
    result = {"models": [bad], "train": [ok, bad], "scaling": {"rows": [bad]}, "scan": [scan_row]}
    assert bench.unmeasured(result, ["models", "train", "scaling", "scan"]) == \
        ["models", "scaling"]
    assert bench.unmeasured({}, ["scan"]) == ["scan"]           # the table itself failed
    for rows, status in (([bad], 1), ([ok], 0)):
        monkeypatch.setattr(bench, "run_all", lambda args, t0=None, rows=rows: {
            "header": {}, "notes": [], "models": rows, "summary": {}})
        monkeypatch.setattr(bench, "print_results", lambda result: None)
        monkeypatch.setattr(bench.report, "make_charts", lambda result, out: {})
        assert bench.main(["--models", "--no-malloc-fix"]) == status
    capsys.readouterr()


def test_a_table_of_errors_gets_no_chart_and_no_matplotlib_hint(tmp_path):
    """Seen: a run whose only rows failed said "no models chart: matplotlib is not installed"
    with matplotlib installed; a table with no timed row now gets no chart entry at all."""
    import report
    bad = {"model": "b", "mode": "eager", "batch": 1, "dtype": "float32", "error": "x"}
    result = {"header": {"device": "cpu"}, "config": {"res": 32}, "models": [bad],
              "scaling": {"rows": [dict(bad, res=224)]}}
    assert report.make_charts(result, str(tmp_path)) == {}


def test_load_note_warns_when_other_processes_hold_the_cores(monkeypatch):
    """A timing beside other work came out 60x slow with only 'load average: 2.6 on 2 cores' in
    its header: a load near the core count at the start now says the timings are inflated."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    for load, warned in ((0.3, False), (1.7, False), (1.8, True), (2.6, True)):
        monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
        assert ("timings inflated" in bk.load_note()) == warned, load


def test_report_py_run_as_a_script_points_to_bench_and_help_exits_zero():
    """report.py is a module; run as a script it says what writes the page: --help succeeds,
    anything else is an error."""
    here = os.path.dirname(os.path.abspath(__file__))
    for argv, code in ((["--help"], 0), (["-h"], 0), ([], 1), (["--out", "x"], 1)):
        r = subprocess.run([sys.executable, os.path.join(here, "report.py"), *argv],
                           capture_output=True, text=True)
        assert r.returncode == code, (argv, r)
        assert "bench.py --report" in (r.stdout if code == 0 else r.stderr)


@pytest.mark.parametrize("argv", [
    ["bench.py", "--report", "--scan", "--no-compile", "--report-dir"],
    ["scaling.py", "--res", "32,48", "--out"], ["erf.py", "--out"]])
def test_an_output_folder_that_cannot_be_made_is_a_usage_error_before_any_work(argv, tmp_path):
    """A folder under a file (or anywhere not writable) failed with a traceback only when the
    results were written, after the run: its figures were lost."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, argv[0]), *argv[1:],
                        str(a_file / "sub")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r
    assert f"{a_file / 'sub'}: cannot make the folder" in r.stderr and not r.stdout, r


def test_the_commit_is_dirty_for_a_changed_tracked_file_only(tmp_path, monkeypatch):
    """A report folder an earlier run wrote (untracked) marked the next run's commit dirty."""
    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c",
                        "user.email=t@t", *a], check=True, capture_output=True)
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "c")
    monkeypatch.setattr(bk, "HERE", str(tmp_path))
    (tmp_path / "myout").mkdir()
    (tmp_path / "myout" / "results-cpu.md").write_text("a page")
    assert "dirty" not in bk.git_commit()
    (tmp_path / "code.py").write_text("x = 2\n")
    assert bk.git_commit().endswith("(dirty)")


@pytest.mark.parametrize("argv", [["--check", "vmamba_tiny_s1l8", "--batch", "0"],
                                  ["--check", "vmamba_nosuch"], ["--res", "64"]])
def test_benchkit_check_refuses_what_it_cannot_time(argv):
    """A batch of 0 printed a timing; a name of no model ended in a traceback; no --check
    printed the help and exited 0."""
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, "benchkit.py"), *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and not r.stdout, r


def test_no_timm_hint_when_only_our_models_were_asked_for(monkeypatch):
    monkeypatch.setattr(bk, "timm_available", lambda: False)
    monkeypatch.setattr(bench, "model_rows", lambda specs, args, progress=None: [])
    for only, hint in ((["--only", "vmamba_tiny_s1l8"], False), ([], True)):
        _, args = bench.parse_args(["--models", "--json", *only])
        assert (bk.PEERS_HINT in bench.run_all(args)["notes"]) == hint
