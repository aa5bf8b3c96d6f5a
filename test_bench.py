"""Tests of bench.py and benchkit.py that need no timing figures: argument parsing, the CUDA usage
error, the shape of table and JSON rows (tiny model, short --min-time), the peers' rows (only
where timm is importable), and that measuring memory leaves the timing process's malloc alone.

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
    _, args = bench.parse_args(["--train", "--compile-models", "blocks"])
    assert [s["compile"] for s in bench.model_specs(args, train=True)] == [False, "blocks"] * 2
    _, args = bench.parse_args(["--models"])
    assert args.compile_models == [] and {s["compile"] for s in bench.model_specs(args)} == {False}
    for bad in ("block", "model,model", "model,eager"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.compile_modes(bad)
    _, args = bench.parse_args(["--models", "--all-models", "--no-peers"])
    scans = [bench.label(s)["scan"] for s in bench.model_specs(args)]
    assert scans == ["chunked", "reference"] * len(bench.OURS)


def test_groups_are_a_models_modes():
    _, args = bench.parse_args(["--models", "--batch", "1,8", "--compile-models", "blocks",
                                "--no-peers", "--all-models"])
    groups = bench.groups(bench.model_specs(args))
    assert [[bench.label(s)["mode"] for s in g] for g in groups] == [
        ["eager", "compile_blocks"], ["eager"]] * 4           # the loop-scan row stands alone
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
    result = json.loads(json.dumps({"models": rows[:1], "train": rows[1:]}))
    bench.print_results(result, bench.parse_args(["--res", "64"])[1])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("vmamba_tiny_s1l8")]
    assert len(lines) == 3 and "ValueError" in lines[-1]
    assert "models: inference" in out and "training step" in out


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
    rows = [dict(model="m", res=224, ms=10.0, peak_mb=100.0),
            dict(model="m", res=448, ms=40.0, peak_mb=200.0),     # L x4: time x4, memory x2
            dict(model="n", res=224, error="skipped: size")]      # nothing ran: no exponent
    g = scaling.growth(rows)
    assert set(g) == {"m"} and g["m"]["L_ratio"] == pytest.approx(4.0)
    assert g["m"]["time_exponent"] == pytest.approx(1.0)
    assert g["m"]["mem_exponent"] == pytest.approx(0.5)
    _, args = scaling.parse_args(["--res", "224,512"])
    assert args.res == [224, 512]
    with pytest.raises(SystemExit) as e:
        scaling.parse_args(["--res", "224,big"])
    assert e.value.code == 2
