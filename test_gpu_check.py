"""gpu_check.py's cheap parts on the CPU (a few seconds): arguments, the card phase, one eager
scan cell at a tiny shape against float64, the floor model's stand-in scan, the patches, the
pytest summary parser and the summary table's width. The whole dry run (compiles included,
~4 minutes) is `python gpu_check.py --device cpu --dry-run`."""
import json

import pytest
import torch

import gpu_check as gc
import scan


def dry_run(tmp_path, *extra):
    args = gc.parse_args(["--device", "cpu", "--dry-run", "--out", str(tmp_path),
                          "--phases", "card,scan", *extra])
    args.work = str(tmp_path)
    return gc.Run(args, gc.make_plan(args))


def test_arguments():
    args = gc.parse_args(["--out", "x"])
    assert args.budget_s == gc.BUDGET_S and args.device == "cuda" and args.phases == list(gc.PHASES)
    assert gc.parse_args(["--dry-run", "--out", "x"]).budget_s == gc.DRY_BUDGET_S
    for bad in (["--phases", "scan,nonsense"], ["--phases", "models,models"], ["--phases", ""],
                ["--budget-s", "nan"], ["--budget-s", "inf"], ["--hard-s", "inf"],
                ["--budget-s", "300", "--hard-s", "10"],
                ["--phases", "scan", "--rows", "tf32"], ["--phases", "models", "--scans", "v2"],
                ["--phases", "card,models", "--tests", "all"]):
        with pytest.raises(SystemExit):
            gc.parse_args(["--out", "x", *bad])
    plan = gc.make_plan(gc.parse_args(["--v0-batch", "16", "--out", "x"]))
    assert ("v0", 16, "assoc compiled") in plan.scan_cells and plan.model_backend == "inductor"
    assert ('v2', 128, 'assoc compiled, reduce') in plan.scan_cells
    # 4 shapes x 4 paths (chunked eager and compiled, assoc compiled and eager), + reduce,
    # seq-tiles, u time-major, time-major, coordesc and assoc chunks at both big batches
    # (reduce: v2 only), assoc chunks of 32 and 128 steps (v0 only)
    assert len(set(plan.scan_cells)) == len(plan.scan_cells) == 29
    assert ("v0", 16, "assoc chunks compiled") in plan.scan_cells
    assert ("v0", 16, "assoc chunks compiled, T=32") in plan.scan_cells
    assert ("v2", 128, "assoc chunks compiled, T=32") not in plan.scan_cells
    # the chunked experiment's names do not contain "chunked": --rows chunked and --scans
    # 'chunked compiled' pick what they picked before
    assert not any("chunked" in gc.cell_name(c) for c in plan.scan_cells
                   if c[2] == "assoc chunks compiled")
    ends = [plan.phase_end[p] for p in gc.PHASES]
    assert ends == sorted(ends) and ends[-1] == 1.0
    # --rows narrows the model rows to names containing a part, in model_plan's order
    rows = gc.make_plan(gc.parse_args(["--rows", "chunked,floor compiled fp32 train",
                                       "--out", "x"])).rows
    assert [gc.row_name(r) for r in rows] == ["s1l8-chunked compiled fp32 infer",
                                              "s1l8-floor compiled fp32 train",
                                              "s1l8-chunked compiled fp32 train"]
    for bad in ("resnet", "chunked,vanila", ","):         # every part must name a row
        with pytest.raises(SystemExit):
            gc.parse_args(["--rows", bad, "--out", "x"])


def test_tests_all_is_the_whole_suite_without_x(monkeypatch):
    """--tests all: one set, the whole suite, no -x (every failure listed), on xdist workers
    where xdist is installed (half the cores, at most XDIST_WORKERS), serial where not."""
    plan = gc.make_plan(gc.parse_args(["--tests", "all", "--out", "x"]))
    assert plan.tests == (gc.ALL_TESTS,)
    assert gc.make_plan(gc.parse_args(["--out", "x"])).tests == gc.TEST_SETS
    assert gc.pytest_flags("assoc") == gc.PYTEST_FLAGS and "-x" in gc.PYTEST_FLAGS
    import importlib.util
    monkeypatch.setattr(gc.os, "cpu_count", lambda: 16)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "xdist" else found(name, *a))
    assert gc.pytest_flags("all") == ["-q", "-p", "no:cacheprovider", "-n", "8", "--dist",
                                      "worksteal"]
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "xdist" else found(name, *a))
    assert gc.pytest_flags("all") == ["-q", "-p", "no:cacheprovider"]
    with pytest.raises(SystemExit):
        gc.parse_args(["--tests", "some", "--out", "x"])


def test_a_forward_only_cell_times_no_backward(tmp_path):
    """FORWARD_ONLY paths (the chunked experiment: its backward is assoc compiled's code) get
    forward figures, their error and x floor, and no fwd+bwd figure."""
    assert gc.FORWARD_ONLY == ("assoc chunks compiled", "assoc chunks compiled, T=32",
                               "assoc chunks compiled, T=128")
    run = dry_run(tmp_path)
    gc.phase_card(run)
    KD, L, N = run.plan.scan_shapes["v0"]
    inputs, gy = gc.scan_inputs(run, KD, L, N, 1)
    ref = gc.scan_reference(inputs, gy, scan.selective_scan)
    row = dict(path="assoc chunks compiled", **gc.scan_floor(run, inputs, gy))
    gc.scan_cell(run, row, scan.selective_scan, "scan eager", inputs, gy, ref, backward=False)
    assert row["fwd_ms"] > 0 and row["fwd_x_floor"] > 0 and row["err_max"] == row["err_y"] < 1e-5
    timed_bwd = ("fwd_bwd_ms", "fwd_bwd_x_floor", "fwd_bwd_over_fwd", "first_fwd_bwd_s",
                 "err_grads")
    assert not [k for k in timed_bwd if k in row]


def test_card_and_one_eager_scan_cell(tmp_path):
    run = dry_run(tmp_path)
    gc.phase_card(run)
    assert run.res["card"]["copy_gb_s"] > 0
    KD, L, N = run.plan.scan_shapes["v0"]
    inputs, gy = gc.scan_inputs(run, KD, L, N, 1)
    ref = gc.scan_reference(inputs, gy, scan.selective_scan)
    row = dict(path="chunked eager", **gc.scan_floor(run, inputs, gy))
    gc.scan_cell(run, row, scan.selective_scan, "scan eager", inputs, gy, ref)
    assert set(row["err_grads"]) == set(gc.SCAN_ARGS)
    assert row["err_max"] < 1e-5             # float32 against float64 at L = 64
    assert row["fwd_ms"] > 0 and row["fwd_bwd_over_fwd"] > 0 and row["fwd_x_floor"] > 0
    run.save()
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["card"]["copy_gb_s"] == run.res["card"]["copy_gb_s"]


def test_floor_scan_has_the_scans_shape_and_gradients():
    g = torch.Generator().manual_seed(0)
    b, K, Dk, N, L = 2, 4, 3, 2, 5
    args = [torch.randn(b, K * Dk, L, generator=g), torch.randn(b, K * Dk, L, generator=g),
            -torch.rand(K * Dk, N, generator=g), torch.randn(b, K, N, L, generator=g),
            torch.randn(b, K, N, L, generator=g), torch.randn(K * Dk, generator=g),
            torch.randn(K * Dk, generator=g)]
    args = [a.requires_grad_() for a in args]
    y = gc.floor_scan(*[a.bfloat16() if i < 2 else a for i, a in enumerate(args)],
                      delta_softplus=True, chunk_size=8)
    assert y.shape == (b, K * Dk, L) and y.dtype == torch.float32
    y.sum().backward()
    assert all(a.grad is not None for a in args)


def test_patches_swap_and_restore():
    import vmamba_min
    orig = vmamba_min.selective_scan
    with gc.variant_patch("floor") as p:
        assert vmamba_min.selective_scan is not orig
        vmamba_min.selective_scan(torch.randn(1, 4, 3), torch.randn(1, 4, 3), -torch.ones(4, 1),
                                  torch.randn(1, 4, 1, 3), torch.randn(1, 4, 1, 3))
        assert p.hit
    assert vmamba_min.selective_scan is orig
    if hasattr(scan, "_use_assoc"):
        before = scan._use_assoc
        with gc.force_chunked():
            assert scan._use_assoc is gc.never
        assert scan._use_assoc is before
    from torch._inductor.runtime import triton_heuristics as th
    heuristic = th._reduction_configs
    with gc.variant_patch("seq-tiles") as tiles:
        assert th._reduction_configs is not heuristic and tiles.hits == 0
    assert th._reduction_configs is heuristic


def test_sequential_tiles_record_what_the_autotuner_timed(monkeypatch):
    """SequentialTiles keeps, per kernel the autotuner timed with one-step tiles among its
    candidates, the fastest one-step tile, the fastest other and the one chosen, and gives
    its row a cache key tag of its own; everything is restored after."""
    import types
    import torch.compiler
    from torch._inductor.runtime import triton_heuristics as th

    class Launcher:                        # hashable, as the autotuner's launchers are
        def __init__(self, x, r, warps):
            self.config = types.SimpleNamespace(kwargs={"XBLOCK": x, "R0_BLOCK": r},
                                                num_warps=warps)
    launcher = Launcher
    times = {launcher(32, 64, 4): 3.0, launcher(128, 1, 4): 1.0, launcher(64, 1, 2): 2.0}
    monkeypatch.setattr(th.CachingAutotuner, "benchmark_all_configs",
                        lambda tuner, *a, **kw: dict(times))
    bench, tag = th.CachingAutotuner.benchmark_all_configs, torch.compiler.config.cache_key_tag
    tuner = types.SimpleNamespace(inductor_meta={"kernel_name": "triton_red_fused_0"})
    with gc.SequentialTiles() as tiles:
        assert torch.compiler.config.cache_key_tag.endswith("seq-tiles")
        assert th.CachingAutotuner.benchmark_all_configs(tuner) == times
        del times[next(iter(times))]                         # one-step tiles only: no pair
        th.CachingAutotuner.benchmark_all_configs(tuner)
    assert tiles.timed == [dict(kernel="triton_red_fused_0", one_step_ms=1.0, other_ms=3.0,
                                chosen={"XBLOCK": 128, "R0_BLOCK": 1, "num_warps": 4})]
    assert th.CachingAutotuner.benchmark_all_configs is bench
    assert torch.compiler.config.cache_key_tag == tag


def test_pytest_summary_with_and_without_the_last_line():
    counts, bad = gc.pytest_summary(["..F", "FAILED test_x.py::test_y - assert 0",
                                     "1 failed, 2 passed, 3 deselected in 4.0s"])
    assert counts == {"failed": 1, "passed": 2, "deselected": 3}
    assert bad == ["FAILED test_x.py::test_y - assert 0"]
    counts, _ = gc.pytest_summary(["....s.                      [ 40%]", ".."])
    assert counts == {"passed": 7, "skipped": 1, "cut_off": True}


def test_summary_fits_120_columns():
    res = {"header": {"gpu": "H200", "torch": "2.11", "commit": "abc", "worktree": ["M x"]},
           "card": {"copy_gb_s": 4000.0, "matmul_tflops_float32": 50.0,
                    "matmul_tflops_bfloat16": 700.0},
           "scan": [dict(gen="v2", batch=128, path="chunked compiled", fwd_ms=1.2,
                         fwd_x_floor=3.0, fwd_bwd_ms=5.0, fwd_bwd_x_floor=4.0,
                         fwd_bwd_over_fwd=4.1, first_fwd_s=10.0, first_fwd_bwd_s=20.0,
                         err_max=1e-7),
                    dict(gen="v0", batch=32, path="assoc compiled", skipped="x" * 200)],
           "models": [dict(name="s1l8-chunked compiled bf16 train", img_s=900.0, ms=1400.0,
                           train=True, dtype="bfloat16", compile_s=80.0, peak_gb=30.0,
                           graph_breaks=0,
                           batch=128, res=224, error="E" * 300, err_vs_eager_fp32=3e-4)],
           "profile": {"infer": {"mode": "compiled", "error": "RuntimeError: " + "r" * 200},
                       "train": {"mode": "eager", "calls": 2, "sort": "k",
                                 "ms_per_call_by_kind": {"gemm": 1.0}}},
           "tests": [dict(set="assoc", counts={"passed": 3}, exit_code=0, failed=[])],
           "phases": {"card": {"status": "done", "wall_s": 3.0}}, "notes": ["n" * 300]}
    gc.add_swin_ratios(res["models"])
    text = gc.summary(res)
    assert max(len(line) for line in text.splitlines()) <= 120
    lines = text.splitlines()
    assert any(ln.startswith("gen ") and "fwd ms" in ln and ln.endswith("note") for ln in lines)
    assert any(ln.startswith("s1l8-chunked compiled bf16 train ") for ln in lines)


def test_swin_ratio_divides_by_swin_of_the_same_kind_and_precision():
    """Seen on the first H200 run: s1l8's float32 row was divided by Swin-T's bfloat16 row."""
    rows = [dict(model=gc.SWIN, train=False, dtype="float32", img_s=2000.0),
            dict(model=gc.SWIN, train=False, dtype="float32", img_s=2500.0),
            dict(model=gc.SWIN, train=False, dtype="bfloat16", img_s=5000.0),
            dict(model=gc.SWIN, train=True, dtype="float32", img_s=1000.0),
            dict(model=gc.OURS, train=False, dtype="float32", img_s=3000.0),
            dict(model=gc.OURS, train=False, dtype="bfloat16", img_s=4000.0),
            dict(model=gc.OURS, train=True, dtype="float32", img_s=500.0),
            dict(model=gc.OURS, train=True, dtype="bfloat16", img_s=600.0),
            dict(model=gc.SWIN, train=False, dtype="float32", variant="tf32", img_s=6000.0),
            dict(model=gc.OURS, train=False, dtype="float32", variant="tf32", img_s=4500.0),
            dict(model=gc.OURS, train=False, dtype="float32", variant="autotune", img_s=2000.0)]
    gc.add_swin_ratios(rows)
    assert [r.get("vs_swin_best") for r in rows[4:8]] == [1.2, 0.8, 0.5, None]
    assert [r.get("vs_swin_best") for r in rows[9:]] == [0.75, 0.8]   # TF32 apart, autotune not


@pytest.mark.parametrize("argv", [["--budget-s", "-1"], ["--hard-s", "0"], ["--v0-batch", "0"]])
def test_bad_budgets_are_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        gc.parse_args(argv + ["--dry-run", "--device", "cpu"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv", [["scan", "--name", "vanilla_vmamba_tiny"], ["scan", "--res=64"],
                                  ["model", "--gen", "v0"], ["model", "--path", "chunked"],
                                  ["model", "--batch", "0"]])
def test_cuda_codegen_refuses_options_it_would_ignore(argv, capsys):
    """cuda_codegen.py checks its options before it looks for a CUDA build of torch, so this
    runs anywhere. `scan` ignored --name/--res/--dtype/--chunked, `model` --gen/--path."""
    import cuda_codegen
    with pytest.raises(SystemExit) as e:
        cuda_codegen.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_each_inference_row_is_checked_against_its_models_eager_fp32_logits():
    class Run:
        ref_logits = {}
    run, ref = Run(), torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    spec = dict(model="m", mode="eager", dtype="float32", train=False, variant=None)
    row = {}
    gc.check_logits(run, spec, row, ref)
    assert row == {} and torch.equal(run.ref_logits["m"], ref.double())
    compiled = dict(spec, mode="compiled")
    gc.check_logits(run, compiled, row, ref + torch.tensor([[0.0, 0.02], [0.0, 0.0]]))
    assert row["err_vs_eager_fp32"] == pytest.approx(0.02 / 4.0)
    other = {}
    gc.check_logits(run, dict(compiled, model="n"), other, ref)   # no eager row of "n" yet
    assert other == {}


def test_kernel_tar_holds_sources_and_the_autotuners_choices_not_binaries(tmp_path):
    """kernels.tar.gz: every generated source and .best_config (which launch config of a
    kernel ran; the source lists all it tried), INDEX.txt naming each row's wrappers, and
    nothing of Triton's compiled binaries."""
    import os
    import tarfile
    cache, out = tmp_path / "cache", tmp_path / "out"
    (cache / "ab").mkdir(parents=True)
    (cache / "triton" / "0" / "x").mkdir(parents=True)
    out.mkdir()
    (cache / "ab" / "wrapper.py").write_text("def call(args):\n    pass\n")
    (cache / "ab" / "kernel.py").write_text("@triton.jit\ndef triton_per_fused_0(): pass\n")
    (cache / "ab" / "f00d.best_config").write_text('{"XBLOCK": 64, "R0_BLOCK": 8}')
    (cache / "triton" / "0" / "x" / "kernel.cubin").write_bytes(b"\0" * 64)
    res = {"models": [{"name": "s1l8 compiled fp32 infer", "code": ["ab/wrapper.py"]}]}
    info = gc.pack_kernels(str(cache), str(out), res)
    assert info["files"] == info["of"] == 2 and info["tuned"] == 1
    with tarfile.open(os.path.join(out, "kernels.tar.gz")) as tar:
        names = set(tar.getnames())
        index = tar.extractfile("kernels/INDEX.txt").read().decode()
    assert names == {"kernels/INDEX.txt", "kernels/ab/wrapper.py", "kernels/ab/kernel.py",
                     "kernels/ab/f00d.best_config"}
    assert "s1l8 compiled fp32 infer" in index and "ab/wrapper.py" in index


def test_variants_that_change_the_compiler_are_compile_arguments(tmp_path, monkeypatch):
    """Dynamo reuses the graph an equal earlier torch.compile made (same mode and options),
    whatever Inductor's global config says by then: a "coordesc" row set through
    inductor_config.patch would have timed the plain row's kernels again. So the autotune and
    coordesc rows must reach torch.compile as arguments, and only Inductor gets them."""
    import dataclasses
    seen = []

    def fake_compile(model, **kw):
        seen.append(kw)
        return model
    monkeypatch.setattr(torch, "compile", fake_compile)
    run = dry_run(tmp_path)
    spec = dict(model=gc.OURS, mode="compiled", dtype="float32", train=False)
    for backend in ("inductor", "aot_eager"):
        run.plan = dataclasses.replace(run.plan, model_backend=backend)
        for variant in (None, "tf32", "coordesc", "autotune", "cudagraphs"):
            gc.build_runner(run, dict(spec, variant=variant))
    mode_options = [(kw["mode"], kw["options"]) for kw in seen]
    assert mode_options == [(None, None), (None, None),
                            (None, {"coordinate_descent_tuning": True}),
                            ("max-autotune-no-cudagraphs", None),
                            ("reduce-overhead", None)] + [(None, None)] * 5
    assert all(kw["dynamic"] is False for kw in seen)
    # compile_blocks hands them to every block's compile (nn.Module.compile)
    blocks = []
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: blocks.append(kw), raising=False)
    run.plan = dataclasses.replace(run.plan, model_backend="inductor")
    gc.build_runner(run, dict(spec, model=gc.VANILLA, mode="blocks", variant="coordesc"))
    assert blocks and all(kw["options"] == {"coordinate_descent_tuning": True} and
                          kw["mode"] is None and kw["dynamic"] is False for kw in blocks)
    was = torch.backends.cuda.matmul.allow_tf32
    with gc.variant_patch("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == was
    import vmamba_min
    with gc.variant_patch("inline"):
        assert vmamba_min.BLOCK_REGIONS is False
    assert vmamba_min.BLOCK_REGIONS is True


@pytest.mark.parametrize("generation", [0, 2])
def test_time_major_selection_is_the_models_with_delta_stored_channels_fastest(generation):
    """The "time-major" variant's SS2D.selection: the same delta, B and C (delta's R-term sums
    may round in another order: at most R eps of the sum of the terms' magnitudes); the model
    under the patch gives the same logits. (The layout it is for is Inductor's: compiled, the
    scan kernel reads the matmul's (b, K, L, D) output through the route gathers.)"""
    import vmamba_min
    torch.manual_seed(0)
    model = vmamba_min.VSSM(vmamba_min.VSSMConfig(generation=generation, dim=16,
                                                   depths=(1, 1), num_classes=3)).eval()
    ss2d = model.layers[0].blocks[0].self_attention
    x = torch.randn(2, ss2d.dt_projs_weight.shape[1], 5, 7)
    with torch.no_grad():
        want, got = ss2d.selection(x), gc.selection_time_major(ss2d, x)
        magnitude = vmamba_min.SS2D.selection(_absolute(ss2d), x.abs())[0]
        orig = vmamba_min.SS2D.selection
        with gc.variant_patch("time-major") as patch:
            logits = model(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        assert patch.hit and vmamba_min.SS2D.selection is orig
        plain = model(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    eps = torch.finfo(torch.float32).eps
    assert ((got[0] - want[0]).abs() <= ss2d.dt_rank * eps * magnitude).all()
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert got[0].shape == want[0].shape    # eager stacks the routes: the layout is compiled
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant, method", [("time-major", "selection"), ("per-route", "ssm"),
                                             ("dt-fused", "selection"), ("conv-taps", "conv")])
def test_a_variant_row_compiles_its_own_graph_and_leaves_none_behind(variant, method):
    """Dynamo does not guard a method swapped on a class: a fresh model compiled under
    Patch(SS2D, "selection", ...) alone reused the graph of the row before it, silently
    measuring the unpatched model. Each such patch also swaps module globals the graphs read
    for new function objects (time-major and dt-fused: vmamba_min.route_each; per-route: the
    scan functions run_scan may call; conv-taps: vmamba_min.grid): its stand-in runs even
    after an unpatched compile of the same shapes, and an unpatched compile after it does not
    run its graph (the mark, a store Dynamo replays, tells which graph ran)."""
    import vmamba_min
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def compiled():
        torch.manual_seed(0)
        model = vmamba_min.VSSM(vmamba_min.VSSMConfig(generation=2, dim=16, depths=(1, 1),
                                                      num_classes=3)).eval()
        return torch.compile(model, backend="eager", dynamic=False, fullgraph=True)(x)
    orig, grid = getattr(vmamba_min.SS2D, method), vmamba_min.grid
    with torch.no_grad():
        plain = compiled()                                   # the row before: no patch
        with gc.variant_patch(variant) as patch:
            swapped = compiled()
        assert patch.hit and patch.name == method
        patch.marked.hit = False
        after = compiled()
        assert not patch.hit                                 # the variant's graph: not rerun
        with gc.variant_patch(variant) as again:             # a second row of the variant
            compiled()
        assert again.hit
    assert getattr(vmamba_min.SS2D, method) is orig and vmamba_min.grid is grid
    assert vmamba_min.route_each is scan.route_each
    assert all(getattr(vmamba_min, f) is getattr(scan, f, None) or
               getattr(vmamba_min, f) is getattr(scan.scan_assoc, f) for f in gc.SCAN_FUNCTIONS)
    # float32: delta's R-term sums (or the convolution's k*k terms) round in another order
    # than the matmul's (~ R eps relative), carried through a scan whose decays are <= 1 and
    # three layers of a tiny model
    torch.testing.assert_close(swapped, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)


def _float64_variant_case(generation, max_rank, monkeypatch):
    """A tiny float64 model with a dt rank of 3, its first SS2D and a map for it that is not
    square, DT_TERMS_MAX_RANK set to max_rank. A, D and the dt_proj weights are drawn per
    route and channel (the init's A and D are equal across routes): a route read in another
    route's order, another route's A, D or weights, a transposed merge or a term left out of
    a sum is off by O(1) here."""
    import vmamba_min
    monkeypatch.setattr(gc, "DT_TERMS_MAX_RANK", max_rank)
    torch.manual_seed(0)
    model = vmamba_min.VSSM(vmamba_min.VSSMConfig(generation=generation, dim=16, depths=(1, 1),
                                                   dt_rank=3, num_classes=3)).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, vmamba_min.SS2D):
                m.A_logs.normal_(0, 0.5)
                m.Ds.normal_()
                m.dt_projs_weight.normal_()
    ss2d = model.layers[0].blocks[0].self_attention
    return model, ss2d, torch.randn(2, ss2d.d_inner, 5, 7, dtype=torch.float64)


def _logits_with_and_without(variant, function, model):
    """The model's logits for one image under the variant's patch (which must install
    `function`, run it and be undone), then without it."""
    import vmamba_min
    methods = vmamba_min.SS2D.ssm, vmamba_min.SS2D.selection, vmamba_min.SS2D.conv
    image = torch.randn(1, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        with gc.variant_patch(variant) as patch:
            assert patch.marked.value is function
            logits = model(image)
        assert patch.hit and (vmamba_min.SS2D.ssm, vmamba_min.SS2D.selection,
                              vmamba_min.SS2D.conv) == methods
        return logits, model(image)


@pytest.mark.parametrize("generation", [0, 2])
@pytest.mark.parametrize("max_rank", [0, 64])
def test_per_route_ssm_is_the_models(generation, max_rank, monkeypatch):
    """The "per-route" variant's SS2D.ssm (one scan per route, delta as R multiply-adds, or a
    matmul per route above DT_TERMS_MAX_RANK) gives the model's ssm output in float64
    (_float64_variant_case); the differences are the sums' rounding (~ R eps of the terms,
    carried by a scan whose decays are <= 1, then merged: far under 1e-12 at these sizes)."""
    model, ss2d, x = _float64_variant_case(generation, max_rank, monkeypatch)
    with torch.no_grad():
        want, got = ss2d.ssm(x), gc.ssm_per_route(ss2d, x)
    assert got.shape == want.shape == (2, 35, ss2d.d_inner) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(*_logits_with_and_without("per-route", gc.ssm_per_route, model),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("generation", [0, 2])
@pytest.mark.parametrize("max_rank", [0, 64])
def test_dt_fused_selection_is_the_models(generation, max_rank, monkeypatch):
    """The "dt-fused" variant's SS2D.selection (delta as R multiply-adds of the routed low-rank
    dt, or the model's matmul above DT_TERMS_MAX_RANK) gives the model's delta, B and C in
    float64 (_float64_variant_case), delta up to the sums' rounding (~ R eps of the terms)."""
    model, ss2d, x = _float64_variant_case(generation, max_rank, monkeypatch)
    with torch.no_grad():
        want, got = ss2d.selection(x), gc.selection_dt_fused(ss2d, x)
    assert got[0].shape == want[0].shape == (2, 4, ss2d.d_inner, 35)
    assert got[0].dtype == torch.float64
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    torch.testing.assert_close(*_logits_with_and_without("dt-fused", gc.selection_dt_fused,
                                                         model), rtol=0, atol=1e-12)


@pytest.mark.parametrize("generation", [0, 2])
def test_conv_taps_is_the_models_convolution(generation, monkeypatch):
    """The "conv-taps" variant's SS2D.conv (the depthwise convolution as k*k multiply-adds of
    the shifted, zero-padded map, then SiLU) gives the model's in float64, on a map that is
    not square, with the init's weights (not symmetric: a tap read from the mirrored position,
    or the padding on the wrong side, is off by O(1)) and, in generation 0, its bias; the
    differences are the nine terms' rounding order."""
    model, ss2d, x = _float64_variant_case(generation, 0, monkeypatch)
    assert (ss2d.conv2d.bias is not None) == (generation == 0)
    with torch.no_grad():
        want, got = ss2d.conv(x), gc.conv_taps(ss2d, x)
    assert got.shape == want.shape == (2, ss2d.d_inner, 5, 7) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(*_logits_with_and_without("conv-taps", gc.conv_taps, model),
                               rtol=0, atol=1e-12)
    import types
    for other in (dict(padding=0), dict(padding=1, stride=2), dict(padding=2, dilation=2)):
        conv = torch.nn.Conv2d(8, 8, 3, groups=8, **other)   # taps would give another shape
        with pytest.raises(ValueError, match="depthwise, stride-1, odd-sized"):
            gc.conv_taps(types.SimpleNamespace(conv2d=conv), torch.randn(1, 8, 5, 7))


def test_conv_taps_computes_in_autocasts_dtype():
    """Under autocast conv2d computes in autocast's dtype, and so must the taps: in float32
    (the weights' dtype) the map that x_proj and the scan read doubled in bytes (offline, s1l8
    under bf16 autocast moved more than without the variant). Bound: in eager each product
    and partial sum of the taps rounds to bf16 (8 significant bits: half an ulp is 2^-8
    relative), 2 k*k = 18 roundings of values no larger than sum |w x| + |bias|, and the
    convolution's output one more; the SiLU's slope is below 1.1, and each side rounds its
    SiLU once more."""
    import vmamba_min
    torch.manual_seed(0)
    ss2d = vmamba_min.SS2D(16, vmamba_min.VSSMConfig(generation=0))       # with a bias
    x = torch.randn(2, ss2d.d_inner, 5, 7)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = ss2d.conv(x), gc.conv_taps(ss2d, x)
        conv = ss2d.conv2d
        scale = torch.nn.functional.conv2d(x.abs(), conv.weight.abs(), conv.bias.abs(),
                                           padding=conv.padding, groups=conv.groups)
    assert got.dtype == want.dtype == torch.bfloat16
    assert ((got.float() - want.float()).abs() <= 1.1 * 19 * 2 ** -8 * scale
            + 2 * 2 ** -8 * want.float().abs()).all()


def test_combined_variant_applies_both_and_undoes_both(monkeypatch):
    """"dt-fused+conv-taps" runs both swaps (each checked by its own mark: a part that never
    ran leaves the row unhit), gives the model's logits in float64, and undoes both."""
    import vmamba_min
    model, ss2d, x = _float64_variant_case(2, 64, monkeypatch)
    methods = vmamba_min.SS2D.selection, vmamba_min.SS2D.conv, vmamba_min.grid
    image = torch.randn(1, 3, 32, 48, dtype=torch.float64)
    with torch.no_grad():
        with gc.variant_patch("dt-fused+conv-taps") as patch:
            assert patch.name == "selection+conv" and not patch.hit
            assert vmamba_min.SS2D.selection.__wrapped__ is gc.selection_dt_fused
            assert vmamba_min.SS2D.conv.__wrapped__ is gc.conv_taps
            ss2d.selection(x)
            assert not patch.hit                              # the conv's swap has not run
            logits = model(image)
            assert patch.hit
        assert (vmamba_min.SS2D.selection, vmamba_min.SS2D.conv, vmamba_min.grid) == methods
        torch.testing.assert_close(logits, model(image), rtol=0, atol=1e-12)


def _absolute(ss2d):
    """A copy of ss2d with |weights|: the selection of |x| then bounds each term's size."""
    import copy
    twin = copy.deepcopy(ss2d)
    for p in twin.parameters():
        p.data.abs_()
    return twin


def test_time_major_inputs_are_the_same_values_stored_channels_fastest():
    g = torch.Generator().manual_seed(0)
    b, KD, L, N = 2, 8, 5, 3
    inputs = (torch.randn(b, KD, L, generator=g), torch.randn(b, KD, L, generator=g),
              -torch.rand(KD, N, generator=g), torch.randn(b, 2, N, L, generator=g),
              torch.randn(b, 2, N, L, generator=g), torch.randn(KD, generator=g),
              torch.randn(KD, generator=g))
    moved = gc.time_major(inputs)
    assert [m.stride() for m in moved[:2]] == [(KD, 1, b * KD)] * 2
    assert all(torch.equal(a, m) for a, m in zip(inputs, moved)) and moved[2:] == inputs[2:]
    models = gc.u_time_major(inputs)               # the models' layout: delta stays along L
    assert models[0].stride() == (KD, 1, b * KD) and models[1] is inputs[1]
    assert all(torch.equal(a, m) for a, m in zip(inputs, models)) and models[2:] == inputs[2:]
    # the same scan: another layout may reorder float32 sums of at most L*N products
    y = scan.selective_scan(*inputs, delta_softplus=True)
    err = (scan.selective_scan(*moved, delta_softplus=True) - y).norm() / y.norm()
    assert err <= 2 * L * N * torch.finfo(torch.float32).eps


def test_a_run_of_some_phases_gives_them_the_whole_budget():
    """A run of card and models at a 300 s budget ended its models phase at the default mark,
    0.78 of the budget (234 s on the H200's second run): a row that did not fit by then
    would have been skipped with 66 s unused."""
    ends = gc.make_plan(gc.parse_args(["--out", "x", "--phases", "card,models"])).phase_end
    assert ends["models"] == 1.0 and ends["card"] == pytest.approx(0.04 / 0.49)
    ends = gc.make_plan(gc.parse_args(["--out", "x", "--phases", "scan,tests"])).phase_end
    assert ends["scan"] == pytest.approx(0.33 / 0.42) and ends["tests"] == 1.0
    assert gc.make_plan(gc.parse_args(["--out", "x"])).phase_end == gc.PHASE_END


def test_scans_narrows_the_scan_cells_and_refuses_a_name_no_cell_has():
    args = gc.parse_args(["--out", "x", "--scans",
                          "v0 b32 assoc compiled, time-major; v2 b1 assoc; v0 b32 assoc compiled$"])
    cells = [gc.cell_name(c) for c in gc.make_plan(args).scan_cells]
    assert cells == ["v0 b32 assoc compiled", "v0 b32 assoc compiled, time-major",
                     "v2 b1 assoc compiled", "v2 b1 assoc eager"]
    for bad in ("v3", "v0 b32 assoc$"):
        with pytest.raises(SystemExit):
            gc.parse_args(["--out", "x", "--scans", bad])


def test_scan_estimates_are_per_generation(tmp_path):
    """Keyed by path alone, v2's measured 15 s stood for v0's 93 s compiles (and after v0, v2's
    batch-1 cell was skipped as needing ~100 s)."""
    run = dry_run(tmp_path)
    run.plan.est = {**gc.EST_S}                 # the real run's guesses: none per path
    assert (run.plan.est[("scan compiled", "v2")], run.plan.est[("scan compiled", "v0")]) == \
        (20, 100)
    run.learn("scan compiled", "v2 assoc compiled", 15.0)
    run.measured[("scan compiled", "v2")] = 15.0
    assert gc.scan_estimate(run, "scan compiled", "v2", "assoc compiled") == 15.0
    assert gc.scan_estimate(run, "scan compiled", "v2", "assoc compiled, coordesc") == 15.0
    assert gc.scan_estimate(run, "scan compiled", "v0", "assoc compiled") == 100


def test_profile_keeps_the_top_kernels_and_the_matrix_products_by_shape():
    """What the profile phase writes into gpu.json beside the totals by kind: the ops with the
    most self time (on a CPU: ops; on CUDA: kernels) and each matrix product's and
    convolution's time by input shapes, per call of the model."""
    from torch.profiler import ProfilerActivity, profile
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(4, 3, 8, 8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):
            model(x)
    top = gc.top_kernels(prof, "cpu", calls=2)
    assert [r["ms"] for r in top] == sorted((r["ms"] for r in top), reverse=True)
    assert {"aten::addmm", "aten::convolution"} <= {r["name"] for r in top}
    assert all(r["launches"] == 1 for r in top if r["name"] == "aten::addmm")   # per call
    kinds = {r["name"]: r["kind"] for r in top}
    assert kinds["aten::convolution"] == "conv"
    shapes = {r["op"]: r for r in gc.matmul_shapes(prof, "cpu", calls=2)}
    assert set(shapes) == {"aten::addmm", "aten::convolution"}
    assert shapes["aten::addmm"]["shapes"].startswith("[[5], [4, 288], [288, 5]")
    assert shapes["aten::addmm"]["calls"] == 1
    assert shapes["aten::convolution"]["shapes"].startswith("[[4, 3, 8, 8], [8, 3, 3, 3]")


def test_scan_kernels_are_found_by_their_own_code(tmp_path):
    """A wrapper module holds every kernel of its graph: only the kernel whose own body holds a
    tl.associative_scan is a scan, in a wrapper or in a kernel file of its own."""
    wrapper = ("import triton\n"
               "k0 = async_compile.triton('triton_poi_fused_add_0', '''\n"
               "def triton_poi_fused_add_0(in_ptr0, out_ptr0, xnumel, XBLOCK):\n"
               "    tmp0 = tl.load(in_ptr0)\n''')\n"
               "k1 = async_compile.triton('triton_red_fused_exp_flip_1', '''\n"
               "def triton_red_fused_exp_flip_1(in_ptr0, out_ptr1, xnumel, r0_numel):\n"
               "    tmp5 = tl.associative_scan((tmp3, tmp4), 1, _combine)\n''')\n"
               "def call(args):\n    k0.run()\n    k1.run()\n")
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "wrapper.py").write_text(wrapper)
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / "kernel.py").write_text(
        "def triton_per_fused_view_2(in_ptr0):\n    x = tl.associative_scan(a, 1, f)\n")
    (tmp_path / "cd" / "other.py").write_text("def triton_poi_fused_mul_3(in_ptr0):\n    pass\n")
    scans = gc.scan_kernel_names(str(tmp_path))
    assert scans == {"triton_red_fused_exp_flip_1", "triton_per_fused_view_2"}
    assert gc.kernel_kind("triton_per_fused_view_2", scans) == "scan"
    assert gc.kernel_kind("triton_poi_fused_add_0", scans) == "triton"
    assert gc.kernel_kind("sm90_xmma_gemm_f32f32_f32f32_f32_nn_n", scans) == "gemm"
    assert gc.scan_kernel_names("") == set() == gc.scan_kernel_names(str(tmp_path / "none"))


def test_a_kept_variant_call_reruns_its_graph_under_its_own_patch():
    """phase_profile calls a variant row's compiled model again under the row's patch object:
    entered anew, it installs the same guarded function objects, so Dynamo reuses the row's
    graph (a recompile would profile a compile), and its swaps run again; outside the patch the
    guards fail and the model compiles anew."""
    import vmamba_min
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch.manual_seed(0)
    model = vmamba_min.VSSM(vmamba_min.VSSMConfig(generation=2, dim=16, depths=(1, 1),
                                                  num_classes=3)).eval()
    x = torch.randn(2, 3, 32, 32)
    patch = gc.variant_patch("dt-fused+conv-taps")
    with torch.no_grad():
        with patch:
            compiled = torch.compile(model, backend=backend, dynamic=False)
            compiled(x)
        for part in patch.patches:
            part.marked.hit = False
        with patch:
            compiled(x)
        assert len(graphs) == 1 and patch.hit
        compiled(x)
    assert len(graphs) == 2


def test_the_profile_takes_the_first_compiled_row_of_each_item_as_it_is():
    def spec(model, mode, dtype="float32", train=False, variant=None):
        return dict(model=model, mode=mode, dtype=dtype, train=train, variant=variant)
    assert gc.profile_item(spec(gc.OURS, "compiled")) == "infer"
    assert gc.profile_item(spec(gc.OURS, "compiled", train=True)) == "train"
    assert gc.profile_item(spec(gc.VANILLA, "blocks")) == "vanilla infer"
    assert gc.profile_item(spec(gc.OURS, "compiled", "bfloat16")) == "bf16 infer"
    assert gc.profile_item(spec(gc.OURS, "eager")) is None
    assert gc.profile_item(spec(gc.OURS, "compiled", variant="tf32")) is None
    assert gc.profile_item(spec(gc.VANILLA, "blocks", variant="assoc-chunks")) is None
    assert gc.profile_item(spec(gc.SWIN, "compiled")) == "swin infer"
    assert gc.profile_item(spec(gc.SWIN, "compiled", variant="tf32")) is None
    assert gc.profile_item(spec(gc.SWIN, "compiled", train=True)) is None
    both = "dt-fused+conv-taps"
    assert gc.profile_item(spec(gc.OURS, "compiled", variant=both)) == both + " infer"
    assert gc.profile_item(spec(gc.OURS, "compiled", variant="dt-fused")) is None
    assert gc.profile_item(spec(gc.OURS, "eager", variant=both)) is None


def test_a_ratio_pair_runs_whole_or_not_at_all(tmp_path):
    """s1l8's row counts its Swin-T partner's estimate when that is the next row (same mode,
    dtype, kind and variant): a numerator is not measured without its denominator."""
    run = dry_run(tmp_path)

    def spec(model, mode="compiled", variant=None):
        return dict(model=model, mode=mode, dtype="float32", train=False, variant=variant)
    rows = (spec(gc.OURS), spec(gc.SWIN), spec(gc.OURS, variant="tf32"), spec(gc.VANILLA),
            spec(gc.OURS, variant="coordesc"), spec(gc.SWIN, variant="coordesc"))
    one = run.estimate("model compiled", gc.OURS)
    assert gc.pair_estimate(run, "model compiled", rows, 0, True) == \
        one + run.estimate("model compiled", gc.SWIN)
    assert gc.pair_estimate(run, "model compiled", rows, 0, False) == one     # no timm
    assert gc.pair_estimate(run, "model compiled", rows, 1, True) == \
        run.estimate("model compiled", gc.SWIN)                              # Swin-T alone
    assert gc.pair_estimate(run, "model compiled", rows, 2, True) == one     # next: vanilla
    kind = "model compiled coordesc"
    assert gc.pair_estimate(run, kind, rows, 4, True) == 2 * run.estimate(kind, gc.OURS)
    assert gc.pair_estimate(run, kind, rows, 5, True) == run.estimate(kind, gc.SWIN)


def test_kernel_kinds_tell_cudnn_convolutions_from_matrix_products():
    """cuDNN's convolutions are implicit GEMMs by name: they were counted as gemm."""
    for name, kind in (("sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc", "conv"),
                       ("cutlass_tensorop_s1688fprop_optimized_tf32_64x64_16x10_nhwc", "conv"),
                       ("sm80_xmma_wgrad_implicit_gemm_indexed_f32f32", "conv"),
                       ("sm90_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x8", "gemm"),
                       ("nvjet_tst_128x64_64x8_1x2_h_bz_NNT", "gemm"),
                       ("triton_poi_fused_convolution_gelu_0", "triton"),
                       ("Memcpy DtoD (Device -> Device)", "copy")):
        assert gc.kernel_kind(name) == kind, name


def test_both_generations_main_scan_cells_come_before_any_experiment():
    """Interleaved, v2's experiments (about 150 s on a card) left v0's compiled cells no time
    in the scan phase."""
    cells = gc.scan_cells([("v2", 128), ("v0", 32)], [("v2", 1), ("v0", 1)])
    first_experiment = min(i for i, c in enumerate(cells) if c[2] in gc.SCAN_EXPERIMENTS)
    mains = [i for i, c in enumerate(cells) if c[2] in ("assoc compiled", "chunked compiled")
             and c[1] > 1]
    assert len(mains) == 4 and max(mains) < first_experiment


def test_kill_group_reaps_an_ended_leader_without_waiting(monkeypatch):
    """An ended child is a zombie in its group until reaped: killpg(pid, 0) kept succeeding
    and the parent waited out both graces (6 s) on every run."""
    import os
    import subprocess
    proc = subprocess.Popen(["sleep", "0"], start_new_session=True)
    sleeps = []
    monkeypatch.setattr(gc.time, "sleep", lambda s: sleeps.append(s))
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)   # ended, not yet reaped: a zombie
    gc.kill_group(proc.pid, grace=3.0, reap=proc.poll)
    assert sleeps == [] and proc.returncode is not None
