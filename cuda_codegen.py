"""The Triton code torch.compile would generate for a CUDA GPU, on a machine without one.

    python cuda_codegen.py scan  --gen v2 --batch 128 [--path assoc|chunked] [--backward]
    python cuda_codegen.py model --name vmamba_tiny_s1l8 --batch 128 [--dtype bfloat16] [--chunked]
    (--out DIR writes each graph's generated module; --dynamic compiles with symbolic sizes)

Nothing runs and nothing is timed. Inputs and weights are fake CUDA tensors (shapes only), the
CUDA device queries answer as an H100/H200 would (compute capability 9.0, 132 SMs), and Inductor
lowers, fuses and writes its Triton kernels as it does on the card; the step that would compile
and load them is replaced by one that keeps the source. For each graph it prints how many Triton
kernels the graph launches, the library calls (matmuls, convolutions) and host-side loops, and
the bytes the fused kernels read and write by Inductor's own per-kernel estimate. For a scan it also prints the memory
floor: the bytes the call must move at all (inputs and y), so that bytes / floor bounds what the
generated code can reach on a memory-bound card. Forward (inference) graphs only: tracing a
backward runs the autograd engine, which opens a real CUDA context; `scan --backward` compiles
the associative scan's backward function as a forward graph of its own instead.

Why: the GPU is lent rarely and briefly. This shows on the CPU whether a change fuses as meant
(one kernel for the associative scan? a while loop left?) before a GPU run measures it.

Needs a CUDA build of torch with its Triton (pip's default torch on Linux, e.g. torch 2.11.0
with Triton 3.6, the GPU machines' versions), no driver. It patches private parts of torch
(the CUDA device interface, Triton's active-driver lookup, Inductor's compile-to-module step):
written against torch 2.11 and 2.14.1; another release may need the patches adjusted.
"""
import argparse
import collections
import contextlib
import math
import os
import re
import sys
from unittest import mock

import torch

# What torch.cuda.get_device_properties says on an H100 SXM (an H200 differs in memory only);
# Inductor reads the SM count, the compute capability, warp size and thread limits.
_Props = collections.namedtuple(
    "_Props", "name major minor multi_processor_count total_memory regs_per_multiprocessor "
              "max_threads_per_multi_processor max_threads_per_block warp_size "
              "shared_memory_per_block_optin L2_cache_size gcnArchName")
H100 = _Props("NVIDIA H100 (no device: cuda_codegen)", 9, 0, 132, 80 << 30, 65536, 2048, 1024,
              32, 232448, 50 << 20, "")
K = 4
SCAN_SHAPES = {"v2": (384, 3136, 1), "v0": (768, 3136, 16)}      # stage 1 at 224 px: K*D, L, N


def usable():
    """None if this torch can generate CUDA code here, else why not."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (no CUDA code generation)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


@contextlib.contextmanager
def fake_cuda(props=H100):
    """Make Dynamo and Inductor believe a CUDA device with `props` is present. Real CUDA calls
    still fail: only fake tensors may be used inside."""
    from torch._dynamo.device_interface import CudaInterface
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    def backend():
        return make_backend(GPUTarget("cuda", props.major * 10 + props.minor, props.warp_size))
    cc = props.major * 10 + props.minor
    patches = [
        mock.patch.object(CudaInterface, "is_available", staticmethod(lambda: True)),
        mock.patch.object(CudaInterface, "get_device_properties",
                          staticmethod(lambda *a, **k: props)),
        mock.patch.object(CudaInterface, "get_compute_capability", staticmethod(lambda *a: cc)),
        mock.patch.object(CudaInterface, "current_device", staticmethod(lambda: 0)),
        mock.patch.object(CudaInterface, "device_count", staticmethod(lambda: 1)),
        mock.patch.object(CudaInterface, "is_bf16_supported", staticmethod(lambda *a, **k: True)),
        mock.patch("torch.cuda.device_count", lambda: 1),
        # autocast("cuda") turns itself off without a driver, and asks about bf16
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),
        mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.get_device_properties", lambda *a, **k: props),
        mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (props.major, props.minor)),
        mock.patch("torch.cuda.get_device_name", lambda *a, **k: props.name),
        mock.patch("torch.cuda.get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
        mock.patch("torch.cuda.set_rng_state", lambda *a, **k: None),
        mock.patch("torch._subclasses.fake_tensor.init_gpu_context", lambda device: None),
        mock.patch("torch.utils._triton.triton_backend", backend),
    ]
    import torch.utils._triton as tu
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        # has_triton() is cached per process: a call made before (no CUDA) would answer False
        tu.has_triton.cache_clear()
        stack.callback(tu.has_triton.cache_clear)
        yield


@contextlib.contextmanager
def capture_graphs():
    """Replace Inductor's compile-and-load step by one that generates the code and keeps it with
    the graph's kernel-level figures. Yields the list it fills (one dict per graph)."""
    import torch._inductor.config
    from torch._inductor.graph import GraphLowering
    graphs = []

    def keep(self):
        wrapper, kernels = self.codegen()
        code = wrapper.value + (kernels.value if kernels else "")
        nodes = self.scheduler.nodes
        graphs.append(dict(code=code, kernel_bytes=sum(n.get_read_write_buffers_sizes()
                                                       for n in nodes)))

        class NotRun:
            def call(self, args):
                raise RuntimeError("cuda_codegen: generated code is never run")
        return NotRun()
    # Off, as they run real kernels while compiling: constant folding (precomputes constant
    # subgraphs) and shape padding (times padded against unpadded matmuls to choose).
    with mock.patch.object(GraphLowering, "compile_to_module", keep), \
            torch._inductor.config.patch(joint_graph_constant_folding=False, shape_padding=False):
        yield graphs


def summarize(code):
    """Launches in a generated module: Triton kernels defined, library calls, host loops."""
    call = code[code.find("def call("):]
    return dict(
        triton_kernels=len(re.findall(r"async_compile\.triton\(", code)),
        triton_launches=len(re.findall(r"\.run\(", call)),
        extern_calls=sorted(collections.Counter(
            re.findall(r"extern_kernels\.(\w+)\(", call)).items()),
        fallback_ops=sorted(collections.Counter(
            re.findall(r"torch\.ops\.aten\.(\w+)\.\w+\(", call)).items()),
        host_loops=len(re.findall(r"^\s+while ", call, flags=re.M)),
        associative_scans=len(re.findall(r"tl\.associative_scan\(", code)))


def generate(fn, args, dynamic=False):
    """Compile fn for the fake card and call it once; returns the captured graphs."""
    torch._dynamo.reset()
    with capture_graphs() as graphs:
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        try:
            compiled(*args)
        except Exception as e:   # noqa: BLE001 -- after the last graph: the stand-in ran
            # (torch 2.14's runtime wrapper fails first on the stand-in's missing outputs)
            if not graphs or ("never run" not in str(e) and "NoneType" not in str(e)):
                raise
    return graphs


def scan_case(gen, batch):
    """The stage-1 scan of one generation: fake inputs and its memory floor (read the inputs,
    write y; a fused kernel keeps the state on chip)."""
    KD, L, N = SCAN_SHAPES[gen]
    shapes = [(batch, KD, L), (batch, KD, L), (KD, N), (batch, K, N, L), (batch, K, N, L),
              (KD,), (KD,)]
    args = [torch.empty(s, device="cuda") for s in shapes]
    floor = (sum(math.prod(s) for s in shapes) + batch * KD * L) * 4
    return args, floor


def grads_case(gen, batch):
    """The stage-1 scan's backward (scan_assoc._grads) as a graph of its own: fake saved inputs
    (u, delta', A, B, C, D) and upstream dy, its memory floor (read those, write the gradients of
    u, delta, B and C; the vectors are negligible), and the function. torch.compile of a
    training step puts the same operations in its backward graph."""
    import scan_assoc
    KD, L, N = SCAN_SHAPES[gen]
    shapes = [(batch, KD, L), (batch, KD, L), (KD, N), (batch, K, N, L), (batch, K, N, L), (KD,),
              (batch, KD, L)]
    args = [torch.empty(s, device="cuda") for s in shapes]
    floor = (sum(math.prod(s) for s in shapes) + 2 * batch * KD * L + 2 * batch * K * N * L) * 4

    def grads(u, dt, A, B, C, D, gy):
        return scan_assoc._grads(u, dt, A, B, C, D, None, gy, None, True, True, "pointwise")
    return grads, args, floor


def scan_fn(path):
    """The scan function of a path: scan_assoc's, or scan.selective_scan (the chunked scan
    while chunked_only() is in force)."""
    import scan
    import scan_assoc
    f = scan_assoc.selective_scan_assoc if path == "assoc" else scan.selective_scan
    return lambda *a: f(*a, delta_softplus=True)


def chunked_only():
    """scan.selective_scan without its hand-over to the associative scan (scan._use_assoc),
    for the whole compile: Dynamo reads the function when it traces."""
    import scan
    return mock.patch.object(scan, "_use_assoc", lambda u, A: False)


def build_model(name):
    """A model by name (ours, or timm's), built on the CPU: outside the fake mode, since
    building reads values (DropPath's rates)."""
    import vmamba_min
    if name.startswith(("swin", "deit", "convnext")):
        import timm
        return timm.create_model(name, pretrained=False)
    return vmamba_min.build(name)


def model_case(model, batch, res, dtype):
    """Inside the fake mode: the model's weights as fake CUDA tensors, a fake input batch."""
    model = model.to("cuda").eval()
    x = torch.empty(batch, 3, res, res, device="cuda")
    cast = getattr(torch, dtype)

    def fn(x):
        with torch.no_grad(), torch.autocast("cuda", dtype=cast, enabled=cast != torch.float32):
            return model(x)
    return fn, [x]


def report(graphs, floor=None):
    lines = []
    for i, g in enumerate(graphs):
        s = summarize(g["code"])
        line = (f"graph {i}: {s['triton_kernels']} Triton kernels ({s['triton_launches']} "
                f"launches, {s['associative_scans']} with tl.associative_scan), library calls "
                f"{dict(s['extern_calls']) or '-'}, aten fallbacks {dict(s['fallback_ops']) or '-'}"
                f", host loops {s['host_loops']}, kernel bytes {g['kernel_bytes'] / 1e9:.3f} GB")
        if s["host_loops"]:
            line += " (a host loop's body counts once, not per step)"
        lines.append(line)
    if floor:
        total = sum(g["kernel_bytes"] for g in graphs)
        lines.append(f"memory floor {floor / 1e9:.3f} GB: the kernels move {total / floor:.2f}x "
                     f"the floor")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("scan", "model"))
    p.add_argument("--gen", choices=tuple(SCAN_SHAPES), default="v2")
    p.add_argument("--path", choices=("assoc", "chunked"), default="assoc")
    p.add_argument("--name", default="vmamba_tiny_s1l8")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--chunked", action="store_true",
                   help="model: the chunked scan (scan._use_assoc off)")
    p.add_argument("--backward", action="store_true",
                   help="scan: the associative scan's backward (scan_assoc._grads) instead")
    p.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")
    p.add_argument("--out", help="folder for each graph's generated module")
    args = p.parse_args(argv)
    if args.backward and (args.what != "scan" or args.path != "assoc"):
        p.error("--backward is for `scan` with --path assoc (the chunked scan's backward and a "
                "model's need a real CUDA context to trace)")
    why = usable()
    if why:
        sys.exit(f"cuda_codegen: {why}")
    from torch._subclasses.fake_tensor import FakeTensorMode
    floor = None
    model = build_model(args.name) if args.what == "model" else None
    with fake_cuda(), FakeTensorMode(allow_non_fake_inputs=True):
        if args.what == "scan" and args.backward:
            fn, inputs, floor = grads_case(args.gen, args.batch)
            what = f"scan {args.gen} assoc backward, batch {args.batch}"
        elif args.what == "scan":
            fn = scan_fn(args.path)
            inputs, floor = scan_case(args.gen, args.batch)
            what = f"scan {args.gen} {args.path}, batch {args.batch}"
        else:
            fn, inputs = model_case(model, args.batch, args.res, args.dtype)
            what = f"{args.name} {args.dtype}, batch {args.batch}, {args.res} px"
        chunked = args.path == "chunked" if args.what == "scan" else args.chunked
        with chunked_only() if chunked else contextlib.nullcontext():
            graphs = generate(fn, inputs, dynamic=args.dynamic)
    print(f"{what}{', chunked scan' if chunked else ''}{', dynamic' if args.dynamic else ''} | "
          f"torch {torch.__version__}, Triton {__import__('triton').__version__}, "
          f"sm_{H100.major}{H100.minor}")
    print(report(graphs, floor))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for i, g in enumerate(graphs):
            with open(os.path.join(args.out, f"graph{i}.py"), "w") as f:
                f.write(g["code"])
    return graphs


if __name__ == "__main__":
    main()
