"""The Triton code torch.compile would generate for a CUDA GPU, on a machine without one.

    python cuda_codegen.py scan  --gen v2 --batch 128 [--path assoc|chunked] [--backward]
                                 [--time-major]
    python cuda_codegen.py model --name vmamba_tiny_s1l8 --batch 128 [--dtype bfloat16] [--chunked]
    python cuda_codegen.py model --name vmamba_tiny_s1l8 --batch 128 --train   (fp32 only)
    python cuda_codegen.py model --name vanilla_vmamba_tiny --blocks   (compile_blocks' graphs)
    python cuda_codegen.py model --name vanilla_vmamba_tiny --inline   (no nested regions)
    python cuda_codegen.py model --name vmamba_tiny_s1l8 --variant time-major   (gpu_check's
                                            model variants "floor", "time-major", "per-route",
                                            "dt-fused", "conv-taps", "dt-fused+conv-taps")
    (--out DIR writes each graph's generated module; --top N lists the N kernels that move the
    most bytes; --dynamic compiles with symbolic sizes; --resources compiles each scan kernel
    for sm_90a at every launch config Inductor's autotuner would try, and prints registers,
    spilled bytes, shared memory and warp shuffles per config)

Nothing runs and nothing is timed. Inputs and weights are fake CUDA tensors (shapes only), the
CUDA device queries answer as an H100/H200 would (compute capability 9.0, 132 SMs), and Inductor
lowers, fuses and writes its Triton kernels as it does on the card; the step that would compile
and load them is replaced by one that keeps the source. For each graph it prints how many Triton
kernels the graph launches, the library calls (matmuls, convolutions) and host-side loops, and
the bytes its kernels read and write, the Triton kernels' and the library calls' together, by
Inductor's own per-kernel estimate (a nested
compile region's bytes and launches, vmamba_min.BLOCK_REGIONS, once per call of it; kernels
defined are counted once). For a scan it
also prints the memory floor: the bytes the call must move at all (inputs and y), so that
bytes / floor bounds what the generated code can reach on a memory-bound card.

A backward cannot be traced on fake CUDA tensors: the autograd engine asks the driver about the
device. `model --train` therefore traces the training step (forward, cross-entropy, backward) on
fake CPU tensors, with the code paths the model takes on CUDA (the associative scan in
pointwise mode, its atomic group sums, F.softplus), lets Inductor partition it into forward
and backward graphs as it would, moves each graph to the fake card (device arguments, and
every value's size, stride and dtype as traced), and generates its Triton code there.
Drop-path is off (its random masks lower per device) and the optimizer step is not counted;
bf16 autocast is refused (autocast casts other ops on a CPU than on CUDA). `scan --backward`
compiles the associative scan's backward function as a forward graph of its own.

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
import time
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
        nodes = _scheduled(self.scheduler.nodes, {})
        graphs.append(dict(code=code, kernel_bytes=sum(b for b, _ in nodes), nodes=nodes))

        class NotRun:
            def call(self, args):
                raise RuntimeError("cuda_codegen: generated code is never run")
        return NotRun()
    # Off, as they run real kernels while compiling: constant folding (precomputes constant
    # subgraphs) and shape padding (times padded against unpadded matmuls to choose). And the
    # caches: a graph cached by an earlier run is loaded without being generated (torch 2.14.1
    # then failed on the stand-in: "'CompiledFxGraph' object has no attribute 'source_code'").
    with mock.patch.object(GraphLowering, "compile_to_module", keep), \
            torch._inductor.config.patch(joint_graph_constant_folding=False, shape_padding=False,
                                         force_disable_caches=True):
        yield graphs


def _scheduled(nodes, subgraphs):
    """(bytes, description) of each scheduler node, a call of a nested compile region
    (vmamba_min.BLOCK_REGIONS: ir.InvokeSubgraph) replaced by its subgraph's nodes: every call
    runs them. subgraphs: name -> nodes, filled on the way (Inductor generates a subgraph's
    code, and schedules it, for its first call only)."""
    from torch._inductor.virtualized import V
    out = []
    for n in nodes:
        sub = getattr(getattr(n, "node", None), "subgraph", None)
        if type(getattr(n, "node", None)).__name__ != "InvokeSubgraph" or sub is None:
            out.append((n.get_read_write_buffers_sizes(), _describe(n)))
            continue
        if sub.name not in subgraphs and getattr(sub.graph, "scheduler", None) is not None:
            with V.set_graph_handler(sub.graph):          # sizes are looked up in V.graph
                subgraphs[sub.name] = _scheduled(sub.graph.scheduler.nodes, subgraphs)
        if sub.name not in subgraphs:
            raise RuntimeError(f"cuda_codegen: subgraph {sub.name} was not scheduled")
        out += subgraphs[sub.name]
    return out


def _describe(node):
    """A scheduler node in words: its kind and the ATen ops its kernel was fused from."""
    ops = sorted({str(o.target).split(".")[-2] if str(o.target).count(".") > 1 else str(o.target)
                  for n in node.get_nodes() if n.node is not None for o in n.node.origins})
    return f"{type(node).__name__.replace('SchedulerNode', '') or 'Kernel'}: {' '.join(ops)}"


def summarize(code):
    """Launches in a generated module: Triton kernels defined, library calls, host loops. A
    nested compile region's code is a function of the module (`def repeated_subgraph0(args)`):
    what it launches counts once per call."""
    call = code[code.find("def call("):]
    # each subgraph function's body: from its def to the next top-level statement
    bodies = dict(re.findall(r"^def (\w*subgraph\w*)\(args\):\n((?:[ \t]+.*\n|\n)*)", code,
                             flags=re.M))
    runs = [call] + [body for name, body in bodies.items()
                     for _ in re.findall(rf"= {name}\(", call)]

    def count(pattern):
        return collections.Counter(x for text in runs for x in re.findall(pattern, text))
    return dict(
        triton_kernels=len(re.findall(r"async_compile\.triton\(", code)),
        triton_launches=sum(len(re.findall(r"\.run\(", text)) for text in runs),
        extern_calls=sorted(count(r"extern_kernels\.(\w+)\(").items()),
        fallback_ops=sorted(count(r"torch\.ops\.aten\.(\w+)\.\w+\(").items()),
        host_loops=sum(len(re.findall(r"^\s+while ", text, flags=re.M)) for text in runs),
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


def scan_case(gen, batch, time_major=False):
    """The stage-1 scan of one generation: fake inputs and its memory floor (read the inputs,
    write y; a fused kernel keeps the state on chip). time_major: u and delta stored
    (L, b, K*D), channels fastest, as the scan's output is."""
    KD, L, N = SCAN_SHAPES[gen]
    shapes = [(batch, KD, L), (batch, KD, L), (KD, N), (batch, K, N, L), (batch, K, N, L),
              (KD,), (KD,)]
    args = [torch.empty(s, device="cuda") for s in shapes]
    if time_major:
        args[:2] = [torch.empty(L, batch, KD, device="cuda").permute(1, 2, 0) for _ in "ud"]
    floor = (sum(math.prod(s) for s in shapes) + batch * KD * L) * 4
    return args, floor


def grads_case(gen, batch):
    """The stage-1 scan's backward (scan_assoc._grads) as a graph of its own: fake saved inputs
    as a compiled training step's backward graph gets them (u, delta, delta_bias, A, B, C, D;
    for N > 1 delta' in place of delta, which the forward keeps then) and upstream dy, its
    memory floor (read those, write the gradients of u, delta, B and C; the vectors are
    negligible), and the function."""
    import scan_assoc
    KD, L, N = SCAN_SHAPES[gen]
    shapes = [(batch, KD, L), (batch, KD, L), (KD,), (KD, N), (batch, K, N, L), (batch, K, N, L),
              (KD,), (batch, KD, L)]
    args = [torch.empty(s, device="cuda") for s in shapes]
    floor = (sum(math.prod(s) for s in shapes) + 2 * batch * KD * L + 2 * batch * K * N * L) * 4

    def grads(u, delta, delta_bias, A, B, C, D, gy):       # delta: delta' for N > 1
        given = dict(dt=delta) if N > 1 else {}
        return scan_assoc._grads(u, None if N > 1 else delta, delta_bias, A, B, C, D, None, gy,
                                 None, True, "pointwise", **given)
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


PEERS = ("swin", "deit", "convnext")         # timm's models that `model --name` takes


def build_model(name, res=224, **overrides):
    """A model by name (ours, or timm's, built for res where its size is fixed at creation),
    built on the CPU: outside the fake mode, since building reads values (DropPath's rates)."""
    import benchkit
    import vmamba_min
    if name.startswith(PEERS):
        import timm
        if name.startswith(benchkit.TIMM_SIZED) and res != 224:
            overrides = dict(overrides, img_size=res)
        return timm.create_model(name, pretrained=False, **overrides)
    return vmamba_min.build(name, **overrides)


def model_case(model, batch, res, dtype):
    """Inside the fake mode: the model's weights as fake CUDA tensors, a fake input batch."""
    model = model.to("cuda").eval()
    x = torch.empty(batch, 3, res, res, device="cuda")
    cast = getattr(torch, dtype)

    def fn(x):
        with torch.no_grad(), torch.autocast("cuda", dtype=cast, enabled=cast != torch.float32):
            return model(x)
    return fn, [x]


def blocks_cases(model, batch, res, dtype):
    """Inside the fake mode: what compile_blocks compiles, one VSSBlock per stage (a stage's
    blocks share one compiled graph), each with its stage's input tokens: [(fn, inputs,
    blocks in the stage, label)]."""
    model = model.to("cuda").eval()
    cast = getattr(torch, dtype)
    H = W = -(-res // 4)                                     # the stem: 4x4 patches
    cases = []
    for i, stage in enumerate(model.layers):
        block = stage.blocks[0]
        x = torch.empty(batch, H * W, block.ln_1.weight.shape[0], device="cuda")

        def fn(x, block=block, H=H, W=W):
            with torch.no_grad(), torch.autocast("cuda", dtype=cast,
                                                 enabled=cast != torch.float32):
                return block(x, H, W)
        cases.append((fn, [x], len(stage.blocks), f"stage {i}, {H}x{W} tokens"))
        H, W = -(-H // 2), -(-W // 2)
    return cases


def _pointwise_scan(combine_fn, xs, dim, reverse=False, combine_mode=None):
    """torch's associative_scan in pointwise mode on any device: its front end refuses CPU
    tensors for that mode, but the operator it calls traces the same on any device. Stands in
    for scan_assoc.associative_scan while a CUDA graph is traced on the CPU."""
    import functools
    import torch.utils._pytree as pytree
    from torch._higher_order_ops.associative_scan import associative_scan_op, wrap_combine_fn_flat
    leaves, spec = pytree.tree_flatten(xs)
    leaves = [torch.movedim(t, dim, 0) for t in leaves]          # the operator scans dim 0
    leaves = [t.flip([0]) for t in leaves] if reverse else leaves
    flat = functools.partial(wrap_combine_fn_flat, combine_fn=combine_fn, spec=spec,
                             num_leaves=len(leaves))
    out = associative_scan_op(flat, leaves, additional_inputs=())
    out = [t.flip([0]) for t in out] if reverse else out
    return pytree.tree_unflatten([torch.movedim(t, 0, dim) for t in out], spec)


def _to_fake_cuda(gm, inputs):
    """Move a graph traced on fake CPU tensors to the fake card: device arguments, and every
    node's value as a fake CUDA tensor of the traced size, stride and dtype (not recomputed:
    some meta kernels choose other strides on CUDA, and the graph's views were decided on the
    traced ones). Returns the graph's inputs, moved."""
    from torch._guards import detect_fake_mode
    import torch.utils._pytree as pytree
    mode, cuda = detect_fake_mode(inputs), torch.device("cuda", 0)

    def move(a):
        if isinstance(a, torch.device) and a.type == "cpu":
            return cuda
        if isinstance(a, torch.Tensor):
            with mode:
                return torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device=cuda)
        return a
    for m in gm.modules():
        if isinstance(m, torch.fx.GraphModule):
            for node in m.graph.nodes:
                node.args = torch.fx.node.map_aggregate(node.args, move)
                node.kwargs = torch.fx.node.map_aggregate(node.kwargs, move)
                if "val" in node.meta:
                    node.meta["val"] = pytree.tree_map(move, node.meta["val"])
            m.recompile()
    return [move(t) for t in inputs]


def generate_training(model, batch, res, chunked=False):
    """The training step's forward and backward graphs for the fake card (module docstring):
    Dynamo, AOTAutograd and Inductor's partitioner run on fake CPU tensors, and the inner
    compile of each graph moves it to the card first. Returns the captured graphs."""
    import scan
    import scan_assoc
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    def inner(gm, example_inputs, **kwargs):
        return compile_fx_inner(gm, _to_fake_cuda(gm, example_inputs), **kwargs)

    def step(x, labels):
        return torch.nn.functional.cross_entropy(model(x), labels)
    on_cuda = [chunked_only()] if chunked else [
        mock.patch.object(scan, "_use_assoc", lambda u, A: True),
        mock.patch.object(scan_assoc, "associative_scan", _pointwise_scan),
        mock.patch.object(scan_assoc, "_adds_atomically",     # index_add_, as on CUDA
                          lambda t, N: scan_assoc.GROUP_SUM == "atomic" and N == 1),
        mock.patch.object(scan, "_softplus", torch.nn.functional.softplus)]   # as on CUDA
    torch._dynamo.reset()
    model.train()
    with contextlib.ExitStack() as stack:
        for p in on_cuda:
            stack.enter_context(p)
        graphs = stack.enter_context(capture_graphs())
        stack.enter_context(torch._functorch.config.patch(force_non_lazy_backward_lowering=True))
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        x = torch.empty(batch, 3, res, res)
        labels = torch.zeros(batch, dtype=torch.long)
        compiled = torch.compile(step, fullgraph=True, dynamic=False,
                                 backend=lambda gm, ins: compile_fx(gm, ins, inner_compile=inner))
        try:
            compiled(x, labels)
        except Exception as e:   # noqa: BLE001 -- after both graphs: the stand-in ran
            if len(graphs) < 2 or "never run" not in str(e):
                raise
    return graphs


def report(graphs, floor=None, top=0):
    lines = []
    for i, g in enumerate(graphs):
        s = summarize(g["code"])
        line = (f"graph {i}: {s['triton_kernels']} Triton kernels ({s['triton_launches']} "
                f"launches, {s['associative_scans']} with tl.associative_scan), library calls "
                f"{dict(s['extern_calls']) or '-'}, aten fallbacks {dict(s['fallback_ops']) or '-'}"
                f", host loops {s['host_loops']}, kernel bytes {g['kernel_bytes'] / 1e9:.3f} GB")
        if s["host_loops"]:
            line += " (a host loop's body counts once, not per step)"
        if g.get("label"):
            line += (f" [{g['label']}, {g['blocks']} block(s); generated in "
                     f"{g['seconds']:.1f} s]")
        lines.append(line)
        for size, what in sorted(g["nodes"], key=lambda n: -n[0])[:top]:
            lines.append(f"  {size / 1e9:7.3f} GB  {what}")
    if graphs and all(g.get("blocks") for g in graphs):
        lines.append(f"compile_blocks: {len(graphs)} graphs generated in "
                     f"{sum(g['seconds'] for g in graphs):.1f} s; the model's blocks move "
                     f"{sum(g['kernel_bytes'] * g['blocks'] for g in graphs) / 1e9:.3f} GB "
                     f"(each graph's bytes times its stage's blocks; stem, downsampling and "
                     f"head not counted)")
    if floor:
        total = sum(g["kernel_bytes"] for g in graphs)
        lines.append(f"memory floor {floor / 1e9:.3f} GB: the kernels move {total / floor:.2f}x "
                     f"the floor")
    return "\n".join(lines)


KERNEL_RE = re.compile(       # a generated kernel in its wrapper module: name, source
    r"(\w+) = async_compile\.triton\('\w+', '''(.*?)''', device_str='cuda'\)", re.S)
HEURISTICS = ("reduction", "persistent_reduction", "pointwise")


def kernel_configs(source, folder):
    """A generated kernel's Triton function and the launch configs its heuristics decorator
    offers the autotuner (which one runs is decided by timing them on the card). Triton reads
    a kernel's source from its file: it is written into folder."""
    import importlib.util
    from torch._inductor.runtime import triton_heuristics as th
    seen = {}

    def capture(kind):
        real = getattr(th, kind)

        def heuristic(*args, **kw):
            seen["configs"] = real(*args, **dict(kw, return_configs=True))
            seen["meta"] = kw.get("triton_meta")
            return lambda fn: fn
        return heuristic
    path = os.path.join(folder, f"kernel{len(os.listdir(folder))}.py")
    with open(path, "w") as f:       # without its first call, which asks for a live driver
        f.write(source.replace("triton_helpers.set_driver_to_gpu()", ""))
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    with contextlib.ExitStack() as stack:
        for kind in HEURISTICS:
            stack.enter_context(mock.patch.object(th, kind, capture(kind)))
        spec.loader.exec_module(mod)
    fn = [v for k, v in mod.__dict__.items() if k.startswith("triton_") and
          hasattr(v, "arg_names")][-1]
    return fn, seen["meta"], seen["configs"]


def kernel_resources(fn, meta, config, cc=90):
    """One launch config of a kernel, compiled by Triton for sm_<cc>a and assembled by ptxas
    (the copy Triton ships): registers per thread, bytes spilled per thread (ptxas' spill
    stores), shared memory, warp shuffles and barriers in the PTX. Nothing runs: no GPU is
    needed."""
    import subprocess
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    constexprs = {(fn.arg_names.index(k),): v for k, v in config.kwargs.items()}
    src = ASTSource(fn=fn, signature=meta["signature"], constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        info = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{cc}a", ptx, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                              check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    stores = re.search(r"(\d+) bytes spill stores", info)
    return dict(regs=int(regs.group(1)) if regs else None,
                spill_bytes=int(stores.group(1)) if stores else 0,    # spilled, per thread
                shared=k.metadata.shared, shuffles=k.asm["ptx"].count("shfl."),
                barriers=k.asm["ptx"].count("bar.sync"))


def resources_report(graphs):
    """Every scan kernel of the graphs at every config its autotuner would try."""
    import tempfile
    lines = []
    folder = tempfile.TemporaryDirectory()
    for i, g in enumerate(graphs):
        for name, source in KERNEL_RE.findall(g["code"]):
            if "tl.associative_scan(" not in source:
                continue
            fn, meta, configs = kernel_configs(source, folder.name)
            numel = ", ".join(f"{k} {v}" for k, v in re.findall(r"(\w+numel) = (\d+)", source))
            lines.append(f"graph {i} {name[:60]} ({numel}; "
                         f"{source.count('tl.associative_scan(')} scans)")
            for c in configs:
                r = kernel_resources(fn, meta, c)
                tile = " x ".join(f"{k} {v}" for k, v in c.kwargs.items())
                lines.append(f"  {tile}, {c.num_warps} warps: {r['regs']} registers, "
                             f"{r['spill_bytes']} B spilled, {r['shared']} B shared, "
                             f"{r['shuffles']} shuffles, {r['barriers']} barriers")
    folder.cleanup()
    return "\n".join(lines) or "no kernel with tl.associative_scan"


def generate_case(args, chunked):
    """The graphs of a scan, a scan's backward or a model's inference, compiled for the fake
    card; with the memory floor of a scan and a description."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = build_model(args.name, args.res) if args.what == "model" else None
    floor = None
    with fake_cuda(), FakeTensorMode(allow_non_fake_inputs=True):
        if args.what == "scan" and args.backward:
            fn, inputs, floor = grads_case(args.gen, args.batch)
            what = f"scan {args.gen} assoc backward, batch {args.batch}"
        elif args.what == "scan":
            fn = scan_fn(args.path)
            inputs, floor = scan_case(args.gen, args.batch, args.time_major)
            what = (f"scan {args.gen} {args.path}, batch {args.batch}"
                    f"{', u and delta time-major' if args.time_major else ''}")
        elif args.blocks:
            what = (f"{args.name} {args.dtype}, batch {args.batch}, {args.res} px, "
                    f"compile_blocks' graphs")
            graphs = []
            with chunked_only() if chunked else contextlib.nullcontext():
                for fn, inputs, n, label in blocks_cases(model, args.batch, args.res,
                                                         args.dtype):
                    t = time.time()
                    graphs += [dict(g, label=label, blocks=n) for g in generate(fn, inputs)]
                    graphs[-1]["seconds"] = time.time() - t
            return graphs, floor, what
        else:
            fn, inputs = model_case(model, args.batch, args.res, args.dtype)
            what = f"{args.name} {args.dtype}, batch {args.batch}, {args.res} px"
        with chunked_only() if chunked else contextlib.nullcontext():
            graphs = generate(fn, inputs, dynamic=args.dynamic)
    return graphs, floor, what


def main(argv=None):
    # allow_abbrev off: an abbreviation ("scan --nam x") slipped past the check below for the
    # other subcommand's options, and was ignored
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("what", choices=("scan", "model"))
    p.add_argument("--gen", choices=tuple(SCAN_SHAPES), default="v2")
    p.add_argument("--path", choices=("assoc", "chunked"), default="assoc")
    p.add_argument("--name", default="vmamba_tiny_s1l8")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--chunked", action="store_true",
                   help="model: the chunked scan (scan._use_assoc off)")
    p.add_argument("--time-major", action="store_true",
                   help="scan: u and delta stored (L, b, K*D), channels fastest")
    p.add_argument("--backward", action="store_true",
                   help="scan: the associative scan's backward (scan_assoc._grads) instead")
    p.add_argument("--train", action="store_true",
                   help="model: the training step's forward and backward graphs (fp32, "
                        "drop-path off; the optimizer not counted)")
    p.add_argument("--blocks", action="store_true",
                   help="model: the graphs compile_blocks compiles, one block per stage, each "
                        "with the seconds its code generation took")
    p.add_argument("--inline", action="store_true",
                   help="model: every block traced in line (vmamba_min.BLOCK_REGIONS off), not "
                        "one nested compile region per stage (inference's default)")
    import gpu_check                                 # no torch at import: a light module
    p.add_argument("--variant", choices=gpu_check.PATCHED_VARIANTS,
                   help="model: under gpu_check's patch of that model variant (floor: the "
                        "scan replaced by elementwise work; time-major: delta computed "
                        "channels-fastest; per-route: one scan per route, delta computed in "
                        "its kernel; dt-fused: delta computed in the one scan kernel; "
                        "conv-taps: the depthwise convolution as multiply-adds, fused with "
                        "its SiLU)")
    p.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")
    p.add_argument("--resources", action="store_true",
                   help="registers, spills, shared memory and shuffles of each scan kernel at "
                        "each launch config the autotuner would try (Triton and ptxas, sm_90a)")
    p.add_argument("--out", help="folder for each graph's generated module")
    p.add_argument("--top", type=int, default=0, metavar="N",
                   help="also list each graph's N kernels (scheduler nodes) that move the most "
                        "bytes, with the ATen ops fused into each")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    # Options of the other subcommand would be ignored: refuse them instead.
    only = {"scan": ("--gen", "--path", "--backward", "--time-major"),
            "model": ("--name", "--res", "--dtype", "--chunked", "--train", "--blocks",
                      "--inline", "--variant")}
    other = "model" if args.what == "scan" else "scan"
    given = [f for f in only[other] if any(a == f or a.startswith(f + "=") for a in argv)]
    if given:
        p.error(f"{', '.join(given)}: options of `{other}`, not of `{args.what}`")
    if args.batch < 1 or args.res < 4 or args.top < 0:
        p.error(f"--batch must be >= 1, --res >= 4 and --top >= 0, got {args.batch}, "
                f"{args.res} and {args.top}")
    if args.time_major and args.backward:
        p.error("--time-major is for the forward scan (the backward's inputs are its own)")
    if args.blocks and (args.train or args.dynamic):
        p.error("--blocks is for inference with static sizes (compile_blocks' default)")
    if args.what == "model":
        import vmamba_min
        if not args.name.startswith(PEERS) and args.name not in vmamba_min.CONFIGS:
            p.error(f"--name {args.name}: not one of ours ({', '.join(vmamba_min.CONFIGS)}) "
                    f"nor a timm model of {', '.join(p + '*' for p in PEERS)}")
        ours_only = [f for f, on in (("--blocks", args.blocks), ("--chunked", args.chunked),
                                     ("--inline", args.inline), ("--variant", args.variant))
                     if on]
        if ours_only and args.name.startswith(PEERS):
            p.error(f"{', '.join(ours_only)}: {args.name} has no VSS blocks (ours only)")
    if args.inline and (args.train or args.blocks):
        p.error("--inline: the nested regions it turns off serve inference by torch.compile "
                "(model) only, not --train or --blocks")
    if args.out:
        import benchkit
        benchkit.check_output_folder(p, "--out", args.out)
    if args.backward and (args.what != "scan" or args.path != "assoc"):
        p.error("--backward is for `scan` with --path assoc (a model's backward: model --train)")
    if args.train and (args.what != "model" or args.dtype != "float32" or args.dynamic):
        p.error("--train is for `model`, float32, static sizes (bf16 autocast casts other ops "
                "on the CPU, where the step is traced, than on CUDA)")
    why = usable()
    if why:
        sys.exit(f"cuda_codegen: {why}")
    floor = None
    chunked = args.path == "chunked" if args.what == "scan" else args.chunked
    if args.inline:
        import vmamba_min
        vmamba_min.BLOCK_REGIONS = False     # read when Dynamo traces Stage.forward
    variant = contextlib.nullcontext()
    if args.variant:
        import gpu_check
        variant = gpu_check.variant_patch(args.variant)
    with variant:
        if args.train:
            model = build_model(args.name, args.res, drop_path_rate=0.0)
            with fake_cuda():
                graphs = generate_training(model, args.batch, args.res, chunked=chunked)
            what = (f"{args.name} training step (forward, loss, backward), float32, batch "
                    f"{args.batch}, {args.res} px")
        else:
            graphs, floor, what = generate_case(args, chunked)
    print(f"{what}{', chunked scan' if chunked else ''}{', dynamic' if args.dynamic else ''}"
          f"{', blocks in line' if args.inline else ''}"
          f"{f', variant {args.variant}' if args.variant else ''} | "
          f"torch {torch.__version__}, Triton {__import__('triton').__version__}, "
          f"sm_{H100.major}{H100.minor}")
    print(report(graphs, floor, args.top))
    if args.resources:
        print(resources_report(graphs))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for i, g in enumerate(graphs):
            with open(os.path.join(args.out, f"graph{i}.py"), "w") as f:
                f.write(g["code"])
    return graphs


if __name__ == "__main__":
    main()
