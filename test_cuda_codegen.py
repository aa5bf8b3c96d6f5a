"""What Inductor generates for a CUDA card, checked without one (cuda_codegen.py): the
associative scan is one Triton kernel that moves no more than the call's inputs and output, and
the compiled model keeps no host-side loop. Needs a CUDA build of torch with Triton (skipped on
the CPU wheel CI installs; run it with pip's default torch, e.g. 2.11.0 as on the GPU machines).
"""
import math
import re

import pytest
import torch

import cuda_codegen as cg

pytestmark = pytest.mark.skipif(cg.usable() is not None, reason=str(cg.usable()))


def graphs_of(make_inputs):
    """Generate the code of the (function, inputs) that make_inputs builds in the fake mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with cg.fake_cuda(), FakeTensorMode(allow_non_fake_inputs=True):
        fn, inputs = make_inputs()
        return cg.generate(fn, inputs)


def test_assoc_scan_is_one_kernel_at_the_memory_floor():
    """v2 (N = 1) and v0 (N = 16) at a small stage-1-like shape: one kernel (N = 16: the N
    per-state scans fused into it), its bytes the floor exactly: inputs read once, y written
    once, the state never leaves the chip."""
    shapes = dict(cg.SCAN_SHAPES)
    try:
        cg.SCAN_SHAPES.update(v2=(8, 64, 1), v0=(8, 64, 16))
        for gen, scans in (("v2", 1), ("v0", 16)):
            floor = []

            def make():
                inputs, f = cg.scan_case(gen, 2)
                floor.append(f)
                return cg.scan_fn("assoc"), inputs
            (graph,) = graphs_of(make)
            s = cg.summarize(graph["code"])
            assert (s["triton_kernels"], s["associative_scans"], s["host_loops"]) == \
                (1, scans, 0), (gen, s)
            assert graph["kernel_bytes"] == floor[0], gen
    finally:
        cg.SCAN_SHAPES.clear()
        cg.SCAN_SHAPES.update(shapes)


def test_chunked_assoc_scan_is_three_kernels():
    """The chunked experiment (selective_scan_assoc_chunked) at v0's small shape, 4 chunks of
    16: three kernels (the N end-state scans with their masked sums, the N chains over chunks,
    the N rescans with y), no host loop, and under 2x the floor: the inputs read twice, y
    written once, the chunk sums and delta' (written by the first pass, read by the third)
    in between (1.75x here). Taking each chunk's last step by indexing the scan instead of by
    the masked sum made Inductor write the N whole scans: 3.3x."""
    from scan_assoc import selective_scan_assoc_chunked
    shapes = dict(cg.SCAN_SHAPES)
    try:
        cg.SCAN_SHAPES.update(v0=(8, 64, 16))
        floor = []

        def make():
            inputs, f = cg.scan_case("v0", 2)
            floor.append(f)
            return (lambda *a: selective_scan_assoc_chunked(*a, delta_softplus=True,
                                                            chunk_size=16)), inputs
        (graph,) = graphs_of(make)
        s = cg.summarize(graph["code"])
        assert (s["triton_kernels"], s["associative_scans"], s["host_loops"]) == \
            (3, 48, 0), s
        assert graph["kernel_bytes"] < 2 * floor[0], graph["kernel_bytes"] / floor[0]
    finally:
        cg.SCAN_SHAPES.clear()
        cg.SCAN_SHAPES.update(shapes)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("generation", [0, 2])
def test_compiled_model_takes_the_associative_scan(generation, dtype):
    """A small model of each generation under torch.compile(dynamic=False): every SS2D scan is an
    associative-scan kernel (one per block's shape), no host-side loop is left (the chunked
    scan's `scan` operator would leave one per block for N > 1). Under bf16 autocast the code
    computes in bf16 (autocast("cuda") turns itself off where no driver is found unless
    cuda_codegen says otherwise)."""
    import vmamba_min as vm
    torch.manual_seed(0)
    cfg = vm.VSSMConfig(generation=generation, dim=16, depths=(1, 1), num_classes=10,
                        drop_path_rate=0.0)
    model = vm.VSSM(cfg)

    def make():
        return cg.model_case(model, 2, 32, dtype)
    (graph,) = graphs_of(make)
    s = cg.summarize(graph["code"])
    assert s["associative_scans"] >= 2 and s["host_loops"] == 0, s
    assert ("torch.bfloat16" in graph["code"]) == (dtype == "bfloat16")
    # --top: the graph's heaviest kernels, largest first, their bytes part of the total; the
    # associative scans among them
    sizes = [size for size, _ in graph["nodes"]]
    assert sum(sizes) == graph["kernel_bytes"]
    listed = cg.report([graph], top=3).splitlines()[1:]
    assert len(listed) == 3
    assert [float(line.split()[0]) for line in listed] == \
        [round(b / 1e9, 3) for b in sorted(sizes, reverse=True)[:3]]
    assert any("associative_scan" in what for _, what in graph["nodes"])


def test_compile_blocks_graphs_are_one_block_per_stage():
    """model --blocks: one graph per stage, each a block at its stage's width and tokens (the
    second stage's maps are half the first's, rounded up), with its stage's block count; the
    report weighs each graph's bytes by its blocks."""
    import vmamba_min as vm
    cfg = vm.VSSMConfig(generation=2, dim=16, depths=(2, 1), num_classes=10,
                        drop_path_rate=0.0)
    model = vm.VSSM(cfg)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with cg.fake_cuda(), FakeTensorMode(allow_non_fake_inputs=True):
        cases = cg.blocks_cases(model, 2, 36, "float32")
        assert [(inputs[0].shape, n) for _, inputs, n, _ in cases] == \
            [((2, 81, 16), 2), ((2, 25, 32), 1)]                     # 9x9, then 5x5 tokens
        graphs = []
        for fn, inputs, n, label in cases:
            graphs += [dict(g, blocks=n, label=label, seconds=0.0) for g in cg.generate(fn, inputs)]
    assert len(graphs) == 2
    assert all(cg.summarize(g["code"])["associative_scans"] == 1 for g in graphs)
    weighed = [dict(graphs[0], kernel_bytes=2e9), dict(graphs[1], kernel_bytes=1e9)]
    assert "the model's blocks move 5.000 GB" in cg.report(weighed).splitlines()[-1]


def test_a_nested_region_counts_once_per_call(monkeypatch):
    """torch.compile(model) in inference calls a stage's blocks as one nested compile region
    (vmamba_min.BLOCK_REGIONS): its kernels are generated once, in a function of the module,
    and count once per call, so a stage of two blocks shows two scan kernels, as with every
    block in line; the launches count the region's per call too."""
    import vmamba_min as vm
    cfg = vm.VSSMConfig(generation=2, dim=16, depths=(2, 1), num_classes=10,
                        drop_path_rate=0.0)
    found = {}
    for regions in (True, False):
        monkeypatch.setattr(vm, "BLOCK_REGIONS", regions)
        torch.manual_seed(0)
        model = vm.VSSM(cfg)                            # model_case moves it to the fake card
        (graph,) = graphs_of(lambda: cg.model_case(model, 2, 32, "float32"))
        scans = [b for b, what in graph["nodes"] if "associative_scan" in what]
        found[regions] = (graph, cg.summarize(graph["code"]), scans)
    (g_r, s_r, scans_r), (g_l, s_l, scans_l) = found[True], found[False]
    assert "def repeated_subgraph" in g_r["code"] and "def repeated_subgraph" not in g_l["code"]
    assert len(scans_r) == len(scans_l) == 3
    assert sorted(scans_r) == sorted(scans_l)          # the same scan kernels, per block
    # the module's text holds each region's launches once; per call, the twice-called one adds
    assert s_r["triton_launches"] > len(re.findall(r"\.run\(", g_r["code"]))


def launches(code):
    """(kernel name, elements it iterates over) per Triton launch of a generated module: the
    launch's trailing integer arguments are its sizes (xnumel[, r0_numel])."""
    call = code[code.find("def call("):]
    out = []
    for name, args in re.findall(r"(triton_\w+)\.run\((.*?)stream=", call):
        sizes = re.findall(r"(?<![\w.])(\d+)(?=, )", args)
        out.append((name, math.prod(int(n) for n in sizes[-2:] if n)))
    return out


@pytest.mark.parametrize("N", [1, 16])
def test_assoc_backward_is_two_passes(N):
    """The scan's backward (scan_assoc._grads, compiled as a graph of its own) at a small shape:
    no host loop, 2N scans (the adjoints g right to left, the states h_{t-1} left to right).
    N = 1 (GROUP_SUM = "atomic"): dB and dC as atomic adds, and only the two scan kernels run
    over (b, K*D, L): everything else in the backward fused into them (the other launches zero
    dB and dC and sum the per-row partial sums of dA, dD, dbias over the batch). N > 1: dB and
    dC by reduction, no atomics."""
    shapes = dict(cg.SCAN_SHAPES)
    try:
        cg.SCAN_SHAPES.update(v2=(8, 64, 1), v0=(8, 64, 16))
        gen = "v2" if N == 1 else "v0"
        (graph,) = graphs_of(lambda: cg.grads_case(gen, 2)[:2])
        s = cg.summarize(graph["code"])
        assert (s["associative_scans"], s["host_loops"]) == (2 * N, 0), s
        assert ("tl.atomic_add" in graph["code"]) == (N == 1)
        if N == 1:
            KD, L, _ = cg.SCAN_SHAPES[gen]
            big = [name for name, n in launches(graph["code"]) if n >= 2 * KD * L]
            assert len(big) == 2, launches(graph["code"])
            for name in big:
                kernel = graph["code"][graph["code"].find(f"def {name}("):]
                assert "tl.associative_scan(" in kernel[:kernel.find("'''")], name
    finally:
        cg.SCAN_SHAPES.clear()
        cg.SCAN_SHAPES.update(shapes)


@pytest.mark.parametrize("generation", [0, 2])
def test_training_step_graphs(generation):
    """`model --train` on a small model of each generation: the training step comes out as a
    forward and a backward graph for the card, neither with a host-side loop; the forward holds
    the associative scans, the backward its own (for N = 1 two per forward scan: the adjoints
    and the recomputed states), with dB and dC as atomic adds for N = 1 only (GROUP_SUM =
    "atomic", as on CUDA; the CPU trace alone would take the reduction), and delta' by
    F.softplus (log1p), as on CUDA, in the forward and, for N = 1 (which recomputes it), the
    backward (the CPU trace alone would take scan._softplus's form for compiled CPU code,
    without log1p, whose longer expression Inductor fuses differently: docs/design.md)."""
    import vmamba_min as vm
    torch.manual_seed(0)
    cfg = vm.VSSMConfig(generation=generation, dim=16, depths=(1, 1), num_classes=10,
                        drop_path_rate=0.0)
    with cg.fake_cuda():
        forward, backward = cg.generate_training(vm.VSSM(cfg), 2, 32)
    fw, bw = cg.summarize(forward["code"]), cg.summarize(backward["code"])
    assert fw["associative_scans"] >= 2 and fw["host_loops"] == 0, fw
    assert bw["associative_scans"] >= 2 and bw["host_loops"] == 0, bw
    if generation == 2:     # (N = 16: kernels of identical source are defined once, not counted)
        assert bw["associative_scans"] == 2 * fw["associative_scans"], (fw, bw)
    assert ("tl.atomic_add" in backward["code"]) == (generation == 2)
    for graph in (forward, backward) if generation == 2 else (forward,):
        kernels = "".join(source for _, source in cg.KERNEL_RE.findall(graph["code"]))
        assert "log1p(" in kernels


def test_resources_of_a_scan_kernel_at_each_config_its_autotuner_would_try():
    """--resources: the v0 scan kernel (16 scans) compiled by Triton for sm_90a at each launch
    config Inductor's heuristics offer, and assembled by ptxas: registers within the hardware's
    255, spills and shuffles counted, one line per config."""
    shapes = dict(cg.SCAN_SHAPES)
    try:
        cg.SCAN_SHAPES.update(v0=(8, 64, 16))
        (graph,) = graphs_of(lambda: (cg.scan_fn("assoc"), cg.scan_case("v0", 2)[0]))
    finally:
        cg.SCAN_SHAPES.clear()
        cg.SCAN_SHAPES.update(shapes)
    ((name, source),) = cg.KERNEL_RE.findall(graph["code"])
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        fn, meta, configs = cg.kernel_configs(source, folder)
        r = cg.kernel_resources(fn, meta, configs[0])
    assert 0 < r["regs"] <= 255 and r["spill_bytes"] >= 0 and r["shuffles"] >= 0
    report = cg.resources_report([graph])
    assert report.count(" warps: ") == len(configs) and "16 scans" in report


@pytest.mark.parametrize("time_major", [False, True])
def test_the_inputs_layout_decides_which_tiles_are_offered(time_major):
    """docs/design.md's reading (torch 2.11): at the stage-1 v0 shape, inputs contiguous along
    L make the scan an inner reduction to Inductor's heuristics, which offer one config, one row
    per block; stored time-major (--time-major), several. Only the offered configs are read
    here, nothing is compiled."""
    (graph,) = graphs_of(lambda: (cg.scan_fn("assoc"), cg.scan_case("v0", 32, time_major)[0]))
    ((name, source),) = cg.KERNEL_RE.findall(graph["code"])
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        _, _, configs = cg.kernel_configs(source, folder)
    if time_major:
        assert len(configs) > 1 and "ReductionHint.INNER" not in source
    else:
        assert [c.kwargs["XBLOCK"] for c in configs] == [1] and "ReductionHint.INNER" in source


def test_a_model_variant_is_gpu_checks_patch_for_models_only(monkeypatch):
    """model --variant runs the code generation under gpu_check.variant_patch (the patch the
    GPU row of that variant runs under), and only for `model`."""
    import vmamba_min as vm
    for wrong in (["scan", "--variant", "floor"], ["scan", "--nam", "vanilla_vmamba_tiny"],
                  ["model", "--top", "-1"]):          # an abbreviation passed the check before
        with pytest.raises(SystemExit):
            cg.main(wrong)
    import gpu_check as gc
    seen, selection, route_each = [], vm.SS2D.selection, vm.route_each

    def generate_case(args, chunked):
        seen.append((getattr(vm.SS2D.selection, "__wrapped__", None),
                     vm.route_each is not route_each))
        return [], None, "case"
    monkeypatch.setattr(cg, "generate_case", generate_case)
    monkeypatch.setattr(cg, "report", lambda *a: "")
    for variant in ("time-major", "dt-fused"):
        cg.main(["model", "--name", "vmamba_tiny_s1l8", "--variant", variant])
    assert seen == [(gc.selection_time_major, True),     # gpu_check's selection_patch
                    (gc.selection_dt_fused, True)]
    assert vm.SS2D.selection is selection and vm.route_each is route_each      # undone after
    ssm, seen[:] = vm.SS2D.ssm, []
    monkeypatch.setattr(cg, "generate_case", lambda args, chunked: seen.append(
        vm.SS2D.ssm is not ssm) or ([], None, "case"))
    cg.main(["model", "--name", "vmamba_tiny_s1l8", "--variant", "per-route"])
    assert seen == [True] and vm.SS2D.ssm is ssm          # gpu_check's per_route_patch
    conv, grid, seen[:] = vm.SS2D.conv, vm.grid, []
    monkeypatch.setattr(cg, "generate_case", lambda args, chunked: seen.append(
        (getattr(vm.SS2D.conv, "__wrapped__", None), vm.grid is not grid)) or ([], None, "case"))
    cg.main(["model", "--name", "vmamba_tiny_s1l8", "--variant", "conv-taps"])
    assert seen == [(gc.conv_taps, True)]                 # gpu_check's conv_patch
    assert vm.SS2D.conv is conv and vm.grid is grid


def test_options_that_cannot_apply_are_usage_errors_before_any_generation(tmp_path, capsys,
                                                                          monkeypatch):
    """An unknown name or an --out that is a file ended in a traceback (the latter after the
    whole generation); our models' options given with timm's, and --inline with --train or
    --blocks, were accepted and did nothing."""
    monkeypatch.setattr(cg, "generate_case", lambda *a: pytest.fail("generated"))
    (tmp_path / "a_file").write_text("")
    for argv, words in (
            (["model", "--name", "nope"], "--name nope"),
            (["scan", "--out", str(tmp_path / "a_file")], "not a folder"),
            (["model", "--name", "swin_tiny_patch4_window7_224", "--variant", "floor"],
             "ours only"),
            (["model", "--name", "deit_small_patch16_224", "--chunked"], "ours only"),
            (["model", "--inline", "--train"], "--inline"),
            (["model", "--inline", "--blocks"], "--inline")):
        with pytest.raises(SystemExit) as e:
            cg.main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err, argv


def test_a_timm_model_of_a_fixed_size_is_built_for_res():
    """DeiT's and Swin's image size is fixed at creation: at --res 64 the trace failed."""
    model = cg.build_model("deit_small_patch16_224", 64)
    assert tuple(model.patch_embed.img_size) == (64, 64)


def test_gpu_checks_sequential_tiles_reach_the_scan_kernels_autotuner(tmp_path):
    """gpu_check's "seq-tiles" variant: under SequentialTiles the candidates of a looped scan
    kernel (v0, 16 scans at a stage-1-like length) gain one-step tiles (R0_BLOCK 1, each
    SEQ_TILES width), read where Inductor loads the kernel; without it, and after it, none."""
    import gpu_check as gc
    (graph,) = graphs_of(lambda: (cg.scan_fn("assoc"), cg.scan_case("v0", 2, True)[0]))
    (source,) = [src for _, src in cg.KERNEL_RE.findall(graph["code"])
                 if "tl.associative_scan(" in src]

    def r0_one():
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        configs = cg.kernel_configs(source, str(folder))[2]
        return sorted((c.kwargs["XBLOCK"], c.num_warps) for c in configs
                      if c.kwargs.get("R0_BLOCK") == 1)
    assert r0_one() == []
    with gc.SequentialTiles() as tiles:
        assert r0_one() == sorted(gc.SEQ_TILES)
    assert tiles.hits == 1 and r0_one() == []
