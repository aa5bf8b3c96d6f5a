"""Tests of scan_assoc.py: the selective scan as an associative scan, against the float64
reference loop (values and every gradient), its errors, what it keeps for backward, the dispatch
in scan.selective_scan, the model's scan="assoc", and (on CUDA) the compiled Triton path.

Letters as in scan.py: b batch (Bb in code), K groups, D channels per group, N state size,
L sequence length.

On a CPU the scan runs combine_mode="generic" (the operator's log-depth recursion, eager); with
VMAMBA_TEST_DEVICE=cuda the default "pointwise" (eager: the same recursion behind a Dynamo trace)
and the compiled path (torch.compile: one Triton kernel per scan) are tested as well.

Tolerances: test_scan.py's table, rtol(L) * S with S the same scan of |.|. Why it applies: the
associative scan sums the same terms (products of decays a_t in [0, 1] times an input), only in
another order. The generic recursion gives each term at most one multiply and one add per level, 2 *
ceil(log2 L) levels, and each decay product at most that many multiplies; Triton's
tl.associative_scan is a tree inside a block and a sequential carry across blocks: at most O(L)
roundings of factors <= 1, as the loop. No division anywhere. So the bound that the float32
reference loop meets (test_scan.py checks that) holds here too, including its term for the rounding
of the exponents (`with_exponents`), which the float32 reference loop shows as much as this scan.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import scan
import scan_assoc
import vmamba_min as vm
from conftest import DEVICE
from scan import selective_scan, selective_scan_ref
from scan_assoc import selective_scan_assoc, selective_scan_assoc_chunked
from test_scan import (N_EXAMPLES, PATHS, call, check_against_exact, compile_problem,
                       edge_problem, good_args, keep_problem, magnitudes, run, scan_problems,
                       with_exponents)


def check(fn, inputs, softplus, L, gy, gh, label, dtypes=(torch.float32, torch.float64)):
    """fn's values and gradients under each dtype against the float64 reference."""
    exact = run(selective_scan_ref, inputs, softplus, torch.float64, gy, gh)
    S = magnitudes(inputs, softplus, gy, gh, exact)
    for dtype in dtypes:
        res = run(fn, inputs, softplus, dtype, gy, gh)
        for k, v in res.items():
            assert torch.isfinite(v).all(), f"{label}: non-finite {k}"
        check_against_exact(res, exact, with_exponents(inputs, softplus, gy, gh, exact, S,
                                                       dtype, L), L, dtype, f"{label} {dtype}")


# ---------------------------------------------------------------------------------------------
# 1. Values and gradients against the reference, N = 1 and N > 1, odd lengths, h0, last state.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
@settings(max_examples=2 * N_EXAMPLES)
@given(data=st.data())
def test_assoc_matches_reference_float32_and_float64(path, data):
    p = data.draw(scan_problems(**PATHS[path]), label="problem")
    check(selective_scan_assoc, p["inputs"], p["softplus"], p["L"], p["gy"], p["gh"], "assoc")


# Lengths around powers of two (the recursion halves L: odd counts take the other branch at
# each level) and the domain's corners (delta' in {0, 1e-4, .., 20}, A in {0, .., -100}).
@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("L", [1, 2, 3, 63, 64, 65, 129])
def test_domain_edges_and_odd_lengths(N, L):
    g = torch.Generator().manual_seed(L * 10 + N)
    Bb, K, Dk = 1, 2, 2
    inputs = edge_problem(g, Bb, K, Dk, N, L)
    gy, gh = torch.randn(Bb, K * Dk, L, generator=g), torch.randn(Bb, K * Dk, N, generator=g)
    check(selective_scan_assoc, inputs, False, L, gy, gh, f"edges L={L} N={N}",
          dtypes=(torch.float32,))


@pytest.mark.parametrize("N, group_sum", [(1, "atomic"), (1, "reduce"), (3, "atomic")])
def test_gradcheck(N, group_sum, monkeypatch):
    """Finite differences in float64, every input with a gradient (h0, the last state too), with
    dB and dC summed over channels either way for N = 1 (scan_assoc.GROUP_SUM; N > 1 always
    reduces); second derivatives too (README: every scan's backward is differentiable)."""
    monkeypatch.setattr(scan_assoc, "GROUP_SUM", group_sum)
    g = torch.Generator().manual_seed(N)
    Bb, K, Dk, L = 1, 2, 2, 7
    KD = K * Dk
    f64 = dict(generator=g, dtype=torch.float64)
    args = [torch.randn(Bb, KD, L, **f64), torch.randn(Bb, KD, L, **f64),       # u, raw delta
            -torch.rand(KD, N, **f64) * 2, torch.randn(Bb, K, N, L, **f64),      # A, B
            torch.randn(Bb, K, N, L, **f64), torch.randn(KD, **f64),             # C, D
            torch.randn(KD, **f64), torch.randn(Bb, KD, N, **f64)]               # bias, h0
    args = [a.to(DEVICE).requires_grad_() for a in args]

    def f(*a):
        return selective_scan_assoc(*a[:7], True, h0=a[7], return_last_state=True)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("stored", ["channel tensors time-major", "B and C time-major"])
@pytest.mark.parametrize("N", [1, 4])
def test_permuted_memory_layouts(N, stored):
    """Some inputs and upstream gradients stored time-major, the others contiguous: strides the
    scan must not assume (an elementwise result of two layouts takes one of them), against the
    reference as above."""
    g = torch.Generator().manual_seed(N)
    Bb, K, Dk, L = 2, 2, 3, 9
    KD = K * Dk
    channels = stored.startswith("channel")

    def draw(shape, time_major):     # randn(shape), stored with the last dim outermost or not
        if not time_major:
            return torch.randn(shape, generator=g)
        return torch.randn((shape[-1],) + shape[:-1], generator=g).movedim(0, -1)

    inputs = dict(u=draw((Bb, KD, L), channels), delta=draw((Bb, KD, L), channels),
                  A=-torch.rand(KD, N, generator=g), B=draw((Bb, K, N, L), not channels),
                  C=draw((Bb, K, N, L), not channels), D=torch.randn(KD, generator=g),
                  delta_bias=torch.randn(KD, generator=g), h0=draw((Bb, KD, N), channels))
    check(selective_scan_assoc, inputs, True, L, draw((Bb, KD, L), channels),
          draw((Bb, KD, N), channels), f"{stored} N={N}")


def test_dtypes_shapes_and_empty_sequence():
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 6, 5, generator=g), torch.rand(2, 6, 5, generator=g)
    A, Bm, Cm = (-torch.rand(6, 3, generator=g), torch.randn(2, 3, 3, 5, generator=g),
                 torch.randn(2, 3, 3, 5, generator=g))
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                        (torch.float64, torch.float64)):
        y, h = selective_scan_assoc(u.to(dtype), delta, A, Bm, Cm, return_last_state=True)
        assert y.shape == (2, 6, 5) and y.dtype == want
        assert h.shape == (2, 6, 3) and h.dtype == want
        assert selective_scan_assoc(u.to(dtype), delta, A, Bm, Cm).shape == (2, 6, 5)
    # L = 0 (the operator rejects an empty scan dim): as the reference, y empty and h = h0.
    h0 = torch.randn(2, 6, 3, generator=g)
    empty = (u[..., :0], delta[..., :0], A, Bm[..., :0], Cm[..., :0])
    for fn in (selective_scan_ref, selective_scan, selective_scan_assoc):
        y, h = fn(*empty, h0=h0, return_last_state=True)
        assert y.shape == (2, 6, 0) and torch.equal(h, h0), fn.__name__
    # An empty batch, or no channels: empty outputs of the right shapes, as the reference.
    for sl in ((slice(0, 0), slice(None)), (slice(None), slice(0, 0))):
        args = (u[sl], delta[sl], A[sl[1]], Bm[sl[0]], Cm[sl[0]])
        for fn in (selective_scan_ref, selective_scan, selective_scan_assoc):
            y, h = fn(*args, h0=h0[sl], return_last_state=True)
            assert y.shape == u[sl].shape and h.shape == h0[sl].shape, fn.__name__


# The chunked experiment (selective_scan_assoc_chunked): the same checks with chunks of any
# length, L a multiple of T or padded. Its tolerance is the same table's: its chunk decays
# exp(A * S) take sums S of up to T delta' values where the loop multiplies their exps,
# exactly the exponent rounding `with_exponents` bounds (as for scan.selective_scan, whose
# chunks take the same exps; test_scan.py).
@pytest.mark.parametrize("path", list(PATHS))
@settings(max_examples=2 * N_EXAMPLES)
@given(data=st.data())
def test_chunked_assoc_matches_reference_float32_and_float64(path, data):
    p = data.draw(scan_problems(**PATHS[path]), label="problem")
    T = data.draw(st.integers(1, 40), label="chunk_size")
    check(lambda *a, **k: selective_scan_assoc_chunked(*a, chunk_size=T, **k), p["inputs"],
          p["softplus"], p["L"], p["gy"], p["gh"], f"assoc chunked T={T}")


@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("L, T", [(1, 8), (7, 8), (8, 8), (9, 8), (65, 8), (64, 64), (3, 1)])
def test_chunked_assoc_domain_edges_and_chunk_boundaries(N, L, T):
    g = torch.Generator().manual_seed(L * 10 + N)
    Bb, K, Dk = 1, 2, 2
    inputs = edge_problem(g, Bb, K, Dk, N, L)
    gy, gh = torch.randn(Bb, K * Dk, L, generator=g), torch.randn(Bb, K * Dk, N, generator=g)
    check(lambda *a, **k: selective_scan_assoc_chunked(*a, chunk_size=T, **k), inputs, False,
          L, gy, gh, f"chunked edges L={L} T={T} N={N}", dtypes=(torch.float32,))


def test_chunked_assoc_gradcheck_dtypes_and_empty_sequence():
    """Finite differences through the chunked forward's autograd node (its backward is
    _AssocScan's, one more argument), second derivatives too, dtypes as selective_scan_assoc's,
    and L = 0."""
    g = torch.Generator().manual_seed(5)
    Bb, K, Dk, N, L = 1, 2, 2, 3, 7
    KD = K * Dk
    f64 = dict(generator=g, dtype=torch.float64)
    args = [torch.randn(Bb, KD, L, **f64), torch.randn(Bb, KD, L, **f64),
            -torch.rand(KD, N, **f64) * 2, torch.randn(Bb, K, N, L, **f64),
            torch.randn(Bb, K, N, L, **f64), torch.randn(KD, **f64),
            torch.randn(KD, **f64), torch.randn(Bb, KD, N, **f64)]
    args = [a.to(DEVICE).requires_grad_() for a in args]

    def f(*a):
        return selective_scan_assoc_chunked(*a[:7], True, h0=a[7], return_last_state=True,
                                            chunk_size=3)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)       # README: every scan's, in eager mode
    u, delta = torch.randn(2, 6, 5, generator=g), torch.rand(2, 6, 5, generator=g)
    A, Bm, Cm = (-torch.rand(6, 3, generator=g), torch.randn(2, 3, 3, 5, generator=g),
                 torch.randn(2, 3, 3, 5, generator=g))
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        y, h = selective_scan_assoc_chunked(u.to(dtype), delta, A, Bm, Cm,
                                            return_last_state=True, chunk_size=2)
        assert y.shape == (2, 6, 5) and y.dtype == want and h.shape == (2, 6, 3)
    h0 = torch.randn(2, 6, 3, generator=g)
    y, h = selective_scan_assoc_chunked(u[..., :0], delta[..., :0], A, Bm[..., :0],
                                        Cm[..., :0], h0=h0, return_last_state=True)
    assert y.shape == (2, 6, 0) and torch.equal(h, h0)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "64"])
def test_chunked_assoc_bad_chunk_size_raises(bad):
    with pytest.raises(ValueError, match=r"^selective_scan_assoc_chunked: chunk_size must be None "
                                         r"or a positive int, got "):
        call(selective_scan_assoc_chunked, good_args(), chunk_size=bad)
    # None is the default, 64 steps
    torch.testing.assert_close(call(selective_scan_assoc_chunked, good_args(), chunk_size=None),
                               call(selective_scan_assoc_chunked, good_args(), chunk_size=64),
                               rtol=0, atol=0)


def test_chunked_assoc_backward_keeps_no_state():
    inputs = keep_problem(1, 2, 4, 8, 50, DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        selective_scan_assoc_chunked(**inputs, delta_softplus=True, chunk_size=16)

    def key(t):
        return t.data_ptr(), tuple(t.shape)
    assert sorted(map(key, saved)) == sorted(map(key, inputs.values()))


# ---------------------------------------------------------------------------------------------
# 2. Errors: bad arguments give the other scans' messages (test_scan.py's
#    test_bad_input_raises_naming_the_argument runs this scan too); its own options.
# ---------------------------------------------------------------------------------------------
def test_bad_combine_mode_and_groups_raise():
    with pytest.raises(ValueError, match=r"combine_mode must be None, 'pointwise' or 'generic', "
                                         r"got 'tree'"):
        call(selective_scan_assoc, good_args(), combine_mode="tree")
    a = good_args()                       # K*D = 6 channels; B, C with K = 4 groups
    a["B"], a["C"] = torch.zeros(2, 4, 4, 5), torch.zeros(2, 4, 4, 5)
    with pytest.raises(ValueError, match=r"K\*D = 6 \(u\.shape\[1\]\) is not divisible by "
                                         r"K = 4 \(B\.shape\[1\]\)"):
        call(selective_scan_assoc, a)


def test_pointwise_mode_on_a_cpu_raises_naming_the_function():
    """torch's own error comes from deep inside the operator and names no function of ours."""
    for fn in (selective_scan_assoc, selective_scan_assoc_chunked):
        with pytest.raises(ValueError, match=fn.__name__ + r": combine_mode='pointwise' needs "
                                             r"CUDA or XPU tensors"):
            call(fn, good_args(), combine_mode="pointwise")


def test_chunked_assoc_chunk_longer_than_the_sequence_is_the_sequence():
    """A chunk size beyond L scans L steps (it padded to the chunk size: 2**62 overflowed)."""
    a = good_args()
    want = call(selective_scan_assoc_chunked, a, chunk_size=a["u"].shape[-1])
    for T in (64, 2 ** 62):
        assert torch.equal(call(selective_scan_assoc_chunked, a, chunk_size=T), want)


def test_bad_group_sum_raises(monkeypatch):
    monkeypatch.setattr(scan_assoc, "GROUP_SUM", "atomics")
    with pytest.raises(ValueError, match=r"GROUP_SUM must be 'atomic' or 'reduce', got 'atomics'"):
        call(selective_scan_assoc, good_args())


# ---------------------------------------------------------------------------------------------
# 3. What backward keeps: its inputs only (the states and delta' are recomputed).
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [1, 8])
def test_backward_keeps_no_state(N):
    inputs = keep_problem(1, 2, 4, N, 50, DEVICE)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        selective_scan_assoc(**inputs, delta_softplus=True)
    # The inputs themselves, each once: a state (the size of u for N = 1, N times it above), or
    # delta', would be a tensor of its own; a slice of an input another shape.
    def key(t):
        return t.data_ptr(), tuple(t.shape)
    assert sorted(map(key, saved)) == sorted(map(key, inputs.values()))


@pytest.mark.parametrize("N", [1, 3])
def test_compiled_training_keeps_no_state(monkeypatch, N):
    """Compiled for training, what the forward keeps is chosen by AOTAutograd's min-cut
    partitioner (the one Inductor uses), not by save_for_backward: it must still be the inputs,
    for N > 1 possibly with delta' in place of delta (scan_assoc._grads says why), nothing
    else. Computed between the
    scans, the decays and inputs of every state index after the first were kept too, 2 (N - 1)
    more tensors of u's size; and for N = 1 delta', while the backward sliced it for its
    shifted decays (docs/design.md). The operator goes into the graph as the one node that
    CUDA's pointwise mode puts there (cuda_codegen's stand-in): in generic mode Dynamo would
    trace its recursion op by op instead."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    import cuda_codegen
    monkeypatch.setattr(scan_assoc, "associative_scan", cuda_codegen._pointwise_scan)
    inputs = keep_problem(1, 2, 4, N, 9)
    kept, ops = [], []

    def forward_compiler(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        kept.extend((n.op, n.meta["val"].numel()) for n in outputs[1:]   # outputs[0] is y
                    if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor))
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler,
                           bw_compiler=lambda gm, example_inputs: make_boxed_func(gm.forward),
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda **kw: selective_scan_assoc(**kw, delta_softplus=True),
                           backend=backend, fullgraph=True, dynamic=False)
        fn(**inputs).sum().backward()
    finally:
        torch._dynamo.reset()
    assert ops.count("associative_scan") == N, ops
    # the inputs ("placeholder": an input of the graph) and nothing the forward computed; for
    # N > 1 delta' may take the place of delta and delta_bias (the partitioner's choice: torch
    # 2.11 and 2.13 keep delta', 2.14.1 keeps delta and delta_bias and recomputes it)
    inputs_only = [("placeholder", inputs[k].numel()) for k in
                   ("u", "A", "B", "C", "D", "delta", "delta_bias")]
    allowed = [sorted(inputs_only)]
    if N > 1:
        allowed.append(sorted([("placeholder", inputs[k].numel()) for k in
                               ("u", "A", "B", "C", "D")] +
                              [("call_function", inputs["u"].numel())]))
    assert sorted(kept) in allowed, (sorted(kept), allowed)


# ---------------------------------------------------------------------------------------------
# 4. The dispatch in scan.selective_scan, and the model's scan="assoc".
# ---------------------------------------------------------------------------------------------
def picked(u, A, dynamic):
    """What scan._use_assoc answers in code torch.compile traces (two calls: the second shape
    makes a dynamic=None compile symbolic)."""
    torch._dynamo.reset()
    f = torch.compile(lambda t, a: t + 1 if scan._use_assoc(t, a) else t - 1,
                      backend="eager", fullgraph=True, dynamic=dynamic)
    first = bool((f(u, A) == u + 1).all())
    u2 = u.new_zeros(u.shape[0] + 1, *u.shape[1:])
    return first, bool((f(u2, A) == u2 + 1).all())


@pytest.mark.parametrize("lowers_symbolic", [False, True])
def test_dispatch_predicate(monkeypatch, lowers_symbolic):
    """Eager never takes the associative scan (its operator runs a generic recursion there); a
    compiled call takes it exactly on CUDA: on torch >= 2.13 at any sizes, before it only under
    dynamic=False (2.11's Inductor rejects symbolic sizes in the operator)."""
    monkeypatch.setattr(scan, "_LOWERS_SYMBOLIC_SIZES", lowers_symbolic)
    u, A = torch.zeros(2, 4, 5, device=DEVICE), torch.zeros(4, 3, device=DEVICE)
    assert not scan._use_assoc(u, A)
    cuda = DEVICE == "cuda"
    assert picked(u, A, dynamic=False) == (cuda, cuda)
    for dynamic in (True, None):
        assert picked(u, A, dynamic) == (cuda and lowers_symbolic,) * 2, dynamic


def test_sizes_static_by_config_is_true_only_under_dynamic_false():
    """The device-free half of the predicate, read in traced code: True for dynamic=False, False
    for dynamic=True and for the default (whose second shape compiles with symbolic sizes)."""
    x = torch.zeros(2, 4, 5)
    for dynamic, want in ((False, True), (True, False), (None, False)):
        torch._dynamo.reset()
        f = torch.compile(lambda t: t + 1 if scan._sizes_static_by_config() else t - 1,
                          backend="eager", fullgraph=True, dynamic=dynamic)
        assert torch.equal(f(x), x + 1 if want else x - 1), f"dynamic={dynamic}"


def test_selective_scan_hands_over_when_the_predicate_says_so(monkeypatch):
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return selective_scan_assoc(*args, **kwargs)

    monkeypatch.setattr(scan.scan_assoc, "selective_scan_assoc", recording)
    monkeypatch.setattr(scan, "_use_assoc", lambda u, A: True)
    a = {k: v.to(DEVICE) for k, v in good_args().items()}
    y, h = call(selective_scan, a, chunk_size=2, return_last_state=True)
    assert len(calls) == 1 and calls[0]["return_last_state"], calls
    want = call(selective_scan_assoc, a, return_last_state=True)
    assert torch.equal(y, want[0]) and torch.equal(h, want[1])


@pytest.mark.parametrize("generation", [0, 2])          # N = 16 and N = 1
def test_model_with_assoc_scan_matches_chunked(generation):
    x = torch.randn(2, 3, 28, 36, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    outs, grads = [], []
    for which, chunk in (("chunked", None), ("assoc", None), ("assoc_chunked", 16)):
        torch.manual_seed(1)                             # same weights each time
        cfg = vm.VSSMConfig(generation=generation, dim=24, depths=(1, 1), num_classes=10,
                            drop_path_rate=0.0, scan=which, chunk_size=chunk)
        model = vm.VSSM(cfg).to(DEVICE)
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(model.layers[0].blocks[0].self_attention.A_logs.grad)
    for i in (1, 2):             # assoc, then assoc_chunked (L = 63: three chunks and padding)
        # As test_model.py: two float32 summation orders of one recurrence move logits of size
        # ~1 by ~1e-6; 1e-5 keeps 10x margin, a real bug moves them by 0.05 or more.
        torch.testing.assert_close(outs[i], outs[0], rtol=0, atol=1e-5)
        # dL/dA of the first block sums b * K*D * N * L terms through the whole network:
        # norm-wise, both within a few eps * sqrt(L) of the truth as the scan is; 1e-5
        # relative is rtol(L) at the first stage's L = 63 (8.5e-6) rounded up, far below any
        # real bug (O(1)).
        err = (grads[i] - grads[0]).norm() / grads[0].norm()
        assert err <= 1e-5, f"path {i}: relative error of dL/dA_logs {float(err):.3g}"


# ---------------------------------------------------------------------------------------------
# 5. torch.compile. On CUDA: combine_mode="pointwise", one Triton kernel per scan, the path that
# selective_scan takes there. On a CPU, Inductor has no scan codegen: "generic" is traced into
# its slices (2 fused C++ kernels for the forward at L = 11) and a compile takes 15-35 s on
# 2 cores (torch 2.13), so the CPU runs these only with -m slow.
# ---------------------------------------------------------------------------------------------
COMPILE = [] if DEVICE == "cuda" else [pytest.mark.slow]
#                (B, K, D, N, L, T (unused), softplus+D+delta_bias, h0)
COMPILE_SHAPES = [(1, 2, 2, 3, 11, 0, True, True), (2, 2, 2, 1, 11, 0, True, False),
                  (2, 1, 3, 2, 9, 0, False, False)]


def _chunked_by_4(*args, **kwargs):
    return selective_scan_assoc_chunked(*args, chunk_size=4, **kwargs)


@pytest.fixture(scope="module", params=["assoc", "assoc chunked"])
def compiled_assoc(request):
    """Each associative path compiled (the chunked one in chunks of 4: L = 9 and 11 pad)."""
    fn = selective_scan_assoc if request.param == "assoc" else _chunked_by_4
    yield torch.compile(fn, fullgraph=True, dynamic=False)
    torch._dynamo.reset()


@pytest.mark.parametrize("shape", [pytest.param(s, marks=COMPILE) for s in COMPILE_SHAPES],
                         ids=lambda s: "B{}K{}D{}N{}L{}".format(*s))
@settings(max_examples=max(2, N_EXAMPLES // 5))
@given(data=st.data())
def test_compiled_matches_reference(compiled_assoc, shape, data):
    inputs, sp, L, _, gy, gh = compile_problem(data, shape)
    check(compiled_assoc, inputs, sp, L, gy, gh, "compiled assoc fwd+bwd", (torch.float32,))
    with torch.no_grad():
        check(compiled_assoc, inputs, sp, L, None, None, "compiled assoc fwd", (torch.float32,))


@pytest.mark.parametrize("scan_path, chunk", [("assoc", None), ("assoc_chunked", 16)])
@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("generation", [pytest.param(g, marks=COMPILE) for g in (0, 2)])
def test_compiled_model_with_assoc_scan_matches_eager(generation, fullgraph, scan_path, chunk):
    """torch.compile(model) with scan="assoc" (and the chunked experiment, 4 chunks of 16 with
    padding at L = 63), batch 2, with and without fullgraph: logits and dL/dA_logs of the first
    block against the same model in eager mode (tolerances as in
    test_model_with_assoc_scan_matches_chunked: two float32 summation orders)."""
    x = torch.randn(2, 3, 28, 36, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.manual_seed(1)
    cfg = vm.VSSMConfig(generation=generation, dim=24, depths=(1, 1), num_classes=10,
                        drop_path_rate=0.0, scan=scan_path, chunk_size=chunk)
    model = vm.VSSM(cfg).to(DEVICE)
    outs, grads = [], []
    torch._dynamo.reset()
    for run in (model, torch.compile(model, fullgraph=fullgraph, dynamic=False)):
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(model.layers[0].blocks[0].self_attention.A_logs.grad.clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    err = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert err <= 1e-5, f"relative error of dL/dA_logs {float(err):.3g}"


@pytest.mark.skipif(DEVICE != "cuda", reason="selective_scan takes the associative scan only on "
                                             "CUDA under torch.compile")
def test_compiled_selective_scan_takes_assoc_on_cuda(monkeypatch):
    """torch.compile(selective_scan) on CUDA traces selective_scan_assoc (and no `scan` loop),
    and its values and gradients meet the reference's bound."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(1)
        return selective_scan_assoc(*args, **kwargs)

    monkeypatch.setattr(scan.scan_assoc, "selective_scan_assoc", recording)
    g = torch.Generator().manual_seed(3)
    Bb, K, Dk, N, L = 2, 2, 2, 4, 37
    KD = K * Dk
    inputs = dict(u=torch.randn(Bb, KD, L, generator=g), delta=torch.randn(Bb, KD, L, generator=g),
                  A=-torch.rand(KD, N, generator=g), B=torch.randn(Bb, K, N, L, generator=g),
                  C=torch.randn(Bb, K, N, L, generator=g), D=torch.randn(KD, generator=g),
                  delta_bias=torch.randn(KD, generator=g), h0=torch.randn(Bb, KD, N, generator=g))
    gy, gh = torch.randn(Bb, KD, L, generator=g), torch.randn(Bb, KD, N, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(selective_scan, fullgraph=True, dynamic=False)
    check(compiled, inputs, True, L, gy, gh, "compiled selective_scan on CUDA", (torch.float32,))
    assert calls, "the compiled selective_scan did not trace selective_scan_assoc"


def test_cpu_compiled_group_sum_never_adds_atomically():
    """Traced for a CPU (backend "eager": Dynamo only, under a second), the N = 1 group sum
    must not take index_add_: Inductor's C++ backend miscompiled it (GROUP_SUM's note). Only
    the slow compiled tests would see it otherwise, by a crashed worker. Eager on a CPU it
    adds atomically (index_add_ is correct there)."""
    t = torch.zeros(2, 4, 5)
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + 1 if scan_assoc._adds_atomically(x, 1) else x - 1,
                      backend="eager", fullgraph=True, dynamic=False)
    try:
        assert torch.equal(f(t), t - 1)
    finally:
        torch._dynamo.reset()
    assert scan_assoc._adds_atomically(t, 1) == (scan_assoc.GROUP_SUM == "atomic")
