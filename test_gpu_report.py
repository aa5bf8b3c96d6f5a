"""gpu_report.py: the CUDA results page is what the command in its header writes from the
gpu_check runs in docs/gpu/, and its ratios and targets are computed as the page says."""
import json
import re
from pathlib import Path

import pytest

import gpu_check as gc
import gpu_report as gr

ROOT = Path(__file__).resolve().parent


def committed_command():
    page = (ROOT / "docs/results-cuda.md").read_text()
    m = re.search(r"^\| command \| `([^`]+)` \|$", page, flags=re.M)
    assert m, "docs/results-cuda.md: no command in its header"
    return m.group(1)


def test_committed_page_is_what_its_command_writes(tmp_path):
    """Nobody edited the page or its JSON by hand: regenerating from the runs it names gives the
    same text."""
    command = committed_command()
    words = command.split()
    assert words[:2] == ["python", "gpu_report.py"] and "--out-dir" not in words
    paths = [str(ROOT / w) for w in words[2:]]
    assert gr.main(["--out-dir", str(tmp_path), *paths]) == 0
    for ext in ("md", "json"):
        fresh = (tmp_path / f"results-cuda.{ext}").read_text()
        fresh = fresh.replace(" ".join(["python gpu_report.py", "--out-dir", str(tmp_path),
                                        *paths]), command)
        assert fresh == (ROOT / f"docs/results-cuda.{ext}").read_text(), ext


def row(model, mode, dtype, train, img_s, run_name=None, variant=None, **kw):
    short = {gc.OURS: "s1l8", gc.SWIN: "swin-t", gc.VANILLA: "vanilla"}[model]
    name = run_name or f"{short} {mode} {'fp32' if dtype == 'float32' else 'bf16'} " \
                       f"{'train' if train else 'infer'}"
    return dict(model=model, mode=mode, dtype=dtype, train=train, img_s=img_s, name=name,
                variant=variant, **kw)


def fake_run(models, scan=()):
    return {"header": {"command": "python gpu_check.py", "gpu": "G", "commit": "c" * 40},
            "models": list(models), "scan": list(scan)}


def test_targets_ratio_within_kind_and_dtype_across_runs():
    runs = [("1", fake_run([row(gc.OURS, "compiled", "float32", False, 3000.0, compile_s=40.0),
                            row(gc.SWIN, "eager", "bfloat16", False, 9000.0),
                            row(gc.OURS, "compiled", "float32", True, 700.0),
                            row(gc.SWIN, "eager", "float32", True, 1000.0)])),
            ("2", fake_run([row(gc.SWIN, "compiled", "float32", False, 2500.0, compile_s=20.0),
                            row(gc.SWIN, "compiled", "float32", False, 7000.0,
                                run_name="swin-t-tf32 compiled fp32 infer", variant="tf32"),
                            row(gc.OURS, "compiled", "float32", False, 5600.0,
                                run_name="s1l8-tf32 compiled fp32 infer", variant="tf32"),
                            row(gc.SWIN, "eager", "float32", False, 2000.0),
                            row(gc.VANILLA, "compiled", "float32", False, 500.0,
                                compile_s=90.0),
                            row(gc.VANILLA, "blocks", "float32", False, 1000.0,
                                compile_s=50.0),
                            row(gc.VANILLA, "compiled", "float32", False, 1500.0,
                                run_name="vanilla-assoc-chunks compiled fp32 infer",
                                variant="assoc-chunks")]))]
    t = {x["target"]: x for x in gr.target_rows(runs)}
    tf32 = t["s1l8 compiled inference, fp32 with TF32 matmuls, x Swin-T's best"]
    assert tf32["measured"].startswith("0.80x (s1l8-tf32 compiled fp32 infer: 5600 img/s, run "
                                       "2; Swin-T: swin-t-tf32 ")
    # the paper's arithmetic: TF32 ours over Swin-T's best float32 row (2500)
    paper = next(v for k, v in t.items() if "the paper's arithmetic" in k)
    assert paper["measured"].startswith("2.24x (s1l8-tf32 compiled fp32 infer: 5600 img/s") \
        and "swin-t compiled fp32 infer (run 2)" in paper["measured"]
    infer = t["s1l8 compiled inference, fp32, x Swin-T's best"]
    assert infer["measured"].startswith("1.20x (s1l8 compiled fp32 infer: 3000 img/s, run 1; "
                                        "Swin-T: swin-t compiled fp32 infer (run 2))") \
        and infer["met"] == "yes"
    train = t["s1l8 compiled training step, fp32, x Swin-T's best"]
    assert train["measured"].startswith("0.70x") and "Swin-T compiled: not measured" in \
        train["measured"] and train["met"] == "yes, against eager Swin-T only"
    # compile_blocks counts as compiled; a scan experiment (assoc-chunks) does not
    vanilla = t["vanilla compiled inference, fp32, x Swin-T's best"]
    assert vanilla["measured"].startswith("0.40x (vanilla blocks fp32 infer: 1000 img/s") and \
        vanilla["met"] == "no"
    assert t["s1l8 compiled inference, bf16, x Swin-T's best"]["measured"] == "not measured"
    assert t["stage-1 v2 scan compiled forward, x memory floor"]["measured"] == "not measured"
    compile_s = "compile time, {}, fp32 inference, {}"
    assert t[compile_s.format(gc.VANILLA, "torch.compile(model)")]["met"] == "no"
    assert t[compile_s.format(gc.VANILLA, "compile_blocks")]["met"] == "yes"    # 50 s
    assert t[compile_s.format(gc.OURS, "torch.compile(model)")]["met"] == "yes"
    assert t[compile_s.format(gc.OURS, "compile_blocks")]["measured"] == "not measured"


def test_scan_targets_take_the_fastest_compiled_big_batch_v2_scan_the_models_run():
    scan = [dict(gen="v2", batch=128, path="assoc compiled", fwd_ms=1.0, fwd_floor_ms=0.4,
                 fwd_x_floor=2.5, fwd_bwd_ms=3.5, fwd_bwd_over_fwd=3.5),
            dict(gen="v2", batch=128, path="chunked compiled", fwd_ms=0.7, fwd_floor_ms=0.4,
                 fwd_x_floor=1.75, fwd_bwd_ms=2.0, fwd_bwd_over_fwd=2.86),
            dict(gen="v2", batch=1, path="assoc compiled", fwd_ms=0.01, fwd_floor_ms=0.003,
                 fwd_x_floor=3.3, fwd_bwd_ms=0.02, fwd_bwd_over_fwd=2.0),
            dict(gen="v2", batch=128, path="chunked eager", fwd_ms=0.5, fwd_floor_ms=0.4,
                 fwd_x_floor=1.25, fwd_bwd_ms=1.0, fwd_bwd_over_fwd=2.0),
            dict(gen="v2", batch=128, path="assoc compiled, time-major", fwd_ms=0.45,
                 fwd_floor_ms=0.4, fwd_x_floor=1.1, fwd_bwd_ms=1.0, fwd_bwd_over_fwd=2.2)]
    t = {x["target"]: x for x in gr.target_rows([("1", fake_run([], scan))])}
    floor = t["stage-1 v2 scan compiled forward, x memory floor"]
    assert floor["measured"].startswith("1.8x (0.700 ms") and "chunked compiled" in \
        floor["measured"] and floor["met"] == "yes"
    assert t["the same scan, forward+backward over forward"]["met"] == "yes"     # 2.86 <= 3


def test_scan_targets_of_a_run_cut_off_or_without_a_copy_bandwidth():
    """gpu_check writes a cell after its forward: one cut off before its backward has no f+b
    figure, and a run whose card phase failed no floor. Each target then takes the fastest
    cell that has its figure, or says not measured (it ended in a KeyError)."""
    scan = [dict(gen="v2", batch=128, path="assoc compiled", fwd_ms=1.0, fwd_floor_ms=0.4,
                 fwd_x_floor=2.5, fwd_bwd_ms=3.5, fwd_bwd_over_fwd=3.5),
            dict(gen="v2", batch=128, path="chunked compiled", fwd_ms=0.7, fwd_floor_ms=0.4,
                 fwd_x_floor=1.75)]                                        # cut off
    t = {x["target"]: x for x in gr.target_rows([("1", fake_run([], scan))])}
    assert "chunked compiled" in t["stage-1 v2 scan compiled forward, x memory floor"][
        "measured"]
    fb = t["the same scan, forward+backward over forward"]
    assert fb["measured"].startswith("3.50x") and "assoc compiled" in fb["measured"]
    no_floor = [dict(c, fwd_x_floor=None, fwd_floor_ms=None) for c in scan]
    t = {x["target"]: x for x in gr.target_rows([("1", fake_run([], no_floor))])}
    assert t["stage-1 v2 scan compiled forward, x memory floor"]["measured"] == "not measured"
    assert t["the same scan, forward+backward over forward"]["met"] == "no"


def test_malformed_runs_are_refused_and_non_finite_figures_are_not_measured(tmp_path):
    """bench.py's own JSON, null or empty sections and rows without their keys are refused by
    name (they ended in KeyError, TypeError or AttributeError); NaN is no figure (it was
    written into the page's JSON, which is then not JSON); --out-dir under a file is a usage
    error."""
    good = fake_run([row(gc.SWIN, "eager", "float32", False, 2000.0),
                     row(gc.OURS, "compiled", "float32", False, float("nan"))])
    bad = [{"header": {"command": "python bench.py"}, "models": [{"model": "x", "img_s": 1}]},
           dict(good, models=None), dict(good, models={}), dict(good, models=["row"]),
           dict(good, scan={"a": 1}), dict(good, card=[1])]
    for i, res in enumerate(bad):
        (tmp_path / f"bad{i}.json").write_text(json.dumps(res))
        with pytest.raises(SystemExit, match="not a gpu_check gpu.json"):
            gr.main(["--out-dir", str(tmp_path / "out"), str(tmp_path / f"bad{i}.json")])
    (tmp_path / "run.json").write_text(json.dumps(dict(good, card=None, run=None)))
    gr.main(["--out-dir", str(tmp_path / "out"), str(tmp_path / "run.json")])
    page = json.loads((tmp_path / "out" / "results-cuda.json").read_text())   # strict JSON
    assert [r["name"] for r in page["models"]] == ["swin-t eager fp32 infer"]
    assert "nan" not in (tmp_path / "out" / "results-cuda.md").read_text()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        gr.main(["--out-dir", str(tmp_path / "a_file" / "sub"), str(tmp_path / "run.json")])
    assert e.value.code == 2


def test_rows_measured_twice_are_shown_with_their_spread():
    runs = [("1", fake_run([row(gc.SWIN, "eager", "float32", False, 2000.0)])),
            ("2", fake_run([row(gc.SWIN, "eager", "float32", False, 2020.0)]))]
    (rep,) = gr.repeats(runs)
    assert rep["img_s"] == {"1": 2000.0, "2": 2020.0} and rep["spread"] == pytest.approx(0.01)


def test_a_file_that_is_not_gpu_check_output_is_refused(tmp_path):
    bad = tmp_path / "bench.json"
    bad.write_text(json.dumps({"models": []}))
    with pytest.raises(SystemExit, match="not a gpu_check gpu.json"):
        gr.main(["--out-dir", str(tmp_path), str(bad)])


def test_one_run_given_twice_or_an_unreadable_file_is_refused(tmp_path):
    """The same gpu.json twice made a page of two runs agreeing to 0.00%; a missing or
    non-JSON file, or an --out-dir that is a file, ended in a traceback."""
    run = str(ROOT / "docs" / "gpu" / "h200-2026-12-04-1.json")
    with pytest.raises(SystemExit, match="the same run as"):
        gr.main(["--out-dir", str(tmp_path), run, run])
    (tmp_path / "notes.txt").write_text("not json")
    for bad in (tmp_path / "missing.json", tmp_path / "notes.txt"):
        with pytest.raises(SystemExit, match="cannot read a gpu.json"):
            gr.main(["--out-dir", str(tmp_path), str(bad)])
    with pytest.raises(SystemExit):
        gr.main(["--out-dir", str(tmp_path / "notes.txt"), run])


def test_runs_given_newest_first_are_refused(tmp_path):
    """Given newest first, the runs were renumbered silently and every "run 1" on the page
    named the other run."""
    old, new = (str(ROOT / "docs" / "gpu" / f"h200-2026-12-04-{i}.json") for i in (1, 2))
    with pytest.raises(SystemExit, match=f"oldest first; by their headers' dates: {old}, {new}"):
        gr.main(["--out-dir", str(tmp_path), new, old])
    assert gr.main(["--out-dir", str(tmp_path), old, new]) == 0


def test_rows_no_run_measured_are_listed_with_why():
    skipped = dict(row(gc.SWIN, "compiled", "float32", True, None), skipped="needs ~138 s")
    skipped_then_run = dict(row(gc.SWIN, "compiled", "float32", False, None), skipped="x")
    runs = [("1", fake_run([skipped, skipped_then_run])),
            ("2", fake_run([row(gc.SWIN, "compiled", "float32", False, 2500.0)]))]
    assert gr.not_run(runs) == [("swin-t compiled fp32 train", "1", "needs ~138 s")]


def test_runs_of_other_cards_or_batches_are_not_joined():
    a = fake_run([row(gc.SWIN, "eager", "float32", False, 2000.0, batch=128, res=224)])
    b = fake_run([row(gc.SWIN, "eager", "float32", False, 2000.0, batch=64, res=224)])
    with pytest.raises(SystemExit, match="differ"):
        gr.check_comparable([("1", a), ("2", b)])
    gr.check_comparable([("1", a), ("2", a)])


def test_profile_tables_show_the_top_kernels_and_matrix_products():
    prof = {"mode": "compiled", "calls": 3, "sort": "k", "ms_per_call_by_kind": {"gemm": 2.0},
            "top_kernels": [dict(name="sm90_xmma_gemm_f32f32_" + "x" * 200, kind="gemm", ms=1.5,
                                 launches=14.0),
                            dict(name="triton_red_fused_0", kind="triton", ms=0.5, launches=1.0)],
            "matmul_shapes": [dict(op="aten::mm", shapes="[[401408, 96], [96, 384]]", ms=0.9,
                                   calls=2.0),
                              dict(op="aten::bmm", shapes="[[128, 32, 96], [128, 96, 3136], "
                                   "[128, 32, 3136]]", ms=0.1, calls=2.0),
                              dict(op="aten::addmm", shapes="[[1000], [128, 768], [768, 1000]]",
                                   ms=0.02, calls=1.0),
                              dict(op="aten::convolution", shapes="[[128, 96, 56, 56]]", ms=0.1,
                                   calls=14.0),
                              dict(op="aten::mm", shapes="[[401408, 96], [96, 3", ms=0.1,
                                   calls=1.0),
                              dict(op="aten::mm", shapes="[[8, 4], [4, 2]]", ms=0.0,
                                   calls=1.0)]}
    res = fake_run([row(gc.OURS, "compiled", "float32", False, 3000.0)])
    res["profile"] = {"infer": prof}
    page = gr.markdown([("1", res)], "python gpu_report.py x.json")
    lines = page.splitlines()
    gemm = next(ln for ln in lines if ln.startswith("gemm "))
    assert gemm.split()[1:3] == ["1.500", "14"] and len(gemm) < 140      # the name cut to 100
    # 2 M K N per product: 2 * 401408 * 96 * 384 * 2 calls / 0.9 ms = 65.8 TFLOP/s
    assert any(ln.split()[:4] == ["aten::mm", "0.900", "2", "65.8"] and "[[401408, 96]" in ln
               for ln in lines)
    assert any(ln.split()[:4] == ["aten::bmm", "0.100", "2", "49.3"] for ln in lines)
    assert any(ln.split()[:4] == ["aten::addmm", "0.020", "1", "9.8"] for ln in lines)
    assert any(ln.split()[:4] == ["aten::convolution", "0.100", "14", "-"] for ln in lines)
    assert any(ln.split()[:4] == ["aten::mm", "0.100", "1", "-"] for ln in lines)   # cut text
    assert any(ln.split()[:4] == ["aten::mm", "0.000", "1", "-"] for ln in lines)   # no time
    assert "- infer (s1l8, float32, compiled): gemm 2.00; total 2.00" in lines


def test_a_cudagraphs_row_says_whether_inductor_kept_the_graphs():
    res = fake_run([row(gc.OURS, "compiled", "float32", False, 3300.0,
                        run_name="s1l8-cudagraphs compiled fp32 infer", variant="cudagraphs",
                        cudagraph_skips=0),
                    row(gc.SWIN, "compiled", "float32", False, 3600.0,
                        run_name="swin-t-cudagraphs compiled fp32 infer", variant="cudagraphs",
                        cudagraph_skips=2)])
    page = gr.markdown([("1", res)], "python gpu_report.py x.json")
    assert "s1l8-cudagraphs compiled fp32 infer (run 1): replayed as CUDA graphs" in page
    assert "swin-t-cudagraphs compiled fp32 infer (run 1): Inductor skipped CUDA graphs 2 " \
           "time(s)" in page


def test_the_page_says_what_each_variant_of_its_rows_is():
    """A variant row is explained by the note gpu_check recorded for it (the floor and chunked
    notes are always printed, TF32 from the header); variants no row has are not listed."""
    res = fake_run([row(gc.OURS, "compiled", "float32", False, 3000.0),
                    row(gc.OURS, "compiled", "float32", False, 3100.0,
                        run_name="s1l8-per-route compiled fp32 infer", variant="per-route")])
    res["models_notes"] = {"batch": 128, "res": 224, "floor": "F", "chunked": "C",
                           "per-route": "one scan per route", "time-major": "T"}
    page = gr.markdown([("1", res)], "python gpu_report.py x.json")
    assert "per-route: one scan per route." in page and "time-major: T" not in page


def test_the_page_lists_what_the_one_step_tiles_timed():
    """Each kernel a seq-tiles row or cell timed with one-step tiles: both figures, their ratio
    and the tile chosen; no section without such a row."""
    timed = [dict(kernel="triton_red_fused_7", one_step_ms=0.5, other_ms=2.0,
                  chosen={"XBLOCK": 128, "R0_BLOCK": 1, "num_warps": 4})]
    res = fake_run([row(gc.VANILLA, "blocks", "float32", False, 900.0,
                        run_name="vanilla-seq-tiles blocks fp32 infer", variant="seq-tiles",
                        seq_tile_kernels=3, seq_tiles_timed=timed)],
                   scan=[dict(gen="v0", batch=32, path="assoc compiled, seq-tiles",
                              seq_tile_kernels=1, seq_tiles_timed=[])])
    lines = gr.markdown([("1", res)], "python gpu_report.py x.json").splitlines()
    line = next(ln for ln in lines if ln.startswith("vanilla-seq-tiles blocks fp32 infer (run"))
    assert line.split()[6:] == ["0.500", "2.000", "0.25", "128", "x", "1,", "4", "warps",
                                "triton_red_fused_7"]
    assert "## One-step tiles" not in gr.markdown([("1", fake_run([]))], "x")
