"""What Inductor generates for a CUDA card, checked without one (cuda_codegen.py): the
associative scan is one Triton kernel that moves no more than the call's inputs and output, and
the compiled model keeps no host-side loop. Needs a CUDA build of torch with Triton (skipped on
the CPU wheel CI installs; run it with pip's default torch, e.g. 2.11.0 as on the GPU machines).
"""
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


@pytest.mark.parametrize("generation", [0, 2])
def test_compiled_model_takes_the_associative_scan(generation):
    """A small model of each generation under torch.compile(dynamic=False): every SS2D scan is an
    associative-scan kernel (one per block's shape), no host-side loop is left (the chunked
    scan's `scan` operator would leave one per block for N > 1)."""
    import vmamba_min as vm
    torch.manual_seed(0)
    cfg = vm.VSSMConfig(generation=generation, dim=16, depths=(1, 1), num_classes=10,
                        drop_path_rate=0.0)
    model = vm.VSSM(cfg)

    def make():
        return cg.model_case(model, 2, 32, "float32")
    (graph,) = graphs_of(make)
    s = cg.summarize(graph["code"])
    assert s["associative_scans"] >= 2 and s["host_loops"] == 0, s
