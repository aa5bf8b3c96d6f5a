"""flops.py: parameters and FLOPs of a VMamba model, counted the way the paper counts them.

    from flops import count_flops
    count_flops("vanilla_vmamba_tiny")["gflops"]         # a name, a VSSMConfig or a model
    count_flops(model, image_size=(512, 512))["parts"]   # FLOPs per part of the network

The paper (Liu et al., arXiv 2401.10166) reports fvcore's numbers with one extra handle that the
official code registers for its scan op. That convention, which this file reproduces without
fvcore:
  - a multiply-add is ONE FLOP;
  - Linear / matmul / einsum (aten mm, addmm, bmm): m*n*k per product, bias not counted;
  - convolution: Cout * Cin/groups * kh * kw per output pixel, bias not counted;
  - LayerNorm: 5 per input element (fvcore's "rough estimate" for an affine norm; 4 without
    weight and bias);
  - global average pool: 1 per input element (fvcore's adaptive_avg_pool2d handle);
  - the selective scan, per call: 9*B*L*(K*D)*N + B*L*(K*D) (the official
    flops_selective_scan_fn with with_D=True: the D-skip adds one FLOP per output element);
  - everything else is free: activations (SiLU, GELU, softplus), residual adds, the gate
    multiply, exp, the cross-scan copies and flips, the cross-merge sums.

How: the model runs once on the meta device (shapes only, no memory, no arithmetic) under a
TorchDispatchMode that sees every aten op and counts the ones above from their shapes. The scan
is counted by the formula, not by its own elementwise ops: while counting, the two scan
functions that vmamba_min calls are replaced by a stub that records the formula from the
arguments it is given (u (B, K*D, L), A (K*D, N)), as the official fvcore handle reads the
shapes of its scan op's inputs, and returns an empty output of the right shape.

Letters as in vmamba_min.py: B batch, H, W, L = H*W, C width, D inner width, N d_state, K = 4.
"""
import math
import re
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import vmamba_min
from vmamba_min import CONFIGS, SS2D, VSSM, VSSMConfig, build_config

__all__ = ["count_flops", "scan_flops", "PAPER_GFLOPS", "SPEC_PARAMS"]

aten = torch.ops.aten

# SPEC.md's table of the nine released configurations (224x224, 1000 classes): the paper's
# GFLOPs, and the exact parameter counts of the official models.
PAPER_GFLOPS = {
    "vanilla_vmamba_tiny": 5.6, "vanilla_vmamba_small": 11.2, "vanilla_vmamba_base": 18.0,
    "vmamba_tiny_s2l5": 4.9, "vmamba_small_s2l15": 8.7, "vmamba_base_s2l15": 15.4,
    "vmamba_tiny_s1l8": 4.9, "vmamba_small_s1l20": 8.6, "vmamba_base_s1l20": 15.2,
}
SPEC_PARAMS = {
    "vanilla_vmamba_tiny": 22_893_448, "vanilla_vmamba_small": 44_417_416,
    "vanilla_vmamba_base": 76_254_056, "vmamba_tiny_s2l5": 30_705_832,
    "vmamba_small_s2l15": 50_147_752, "vmamba_base_s2l15": 88_557_800,
    "vmamba_tiny_s1l8": 30_249_064, "vmamba_small_s1l20": 49_012_840,
    "vmamba_base_s1l20": 86_614_504,
}


def scan_flops(batch, KD, L, N, with_D=True):
    """The official count for one selective-scan call: 9 FLOPs per (position, channel, state)
    (discretise A and B, update h, read out with C) plus one per output for the D skip."""
    return 9 * batch * L * KD * N + (batch * L * KD if with_D else 0)


# ---------------------------------------------------------------------------------------------
# Per-op handles: FLOPs of one aten call from its argument and output shapes
# ---------------------------------------------------------------------------------------------
def _mm(args, out):                 # (m, k) @ (k, n)
    (m, k), n = args[0].shape, args[1].shape[1]
    return m * k * n


def _addmm(args, out):              # bias + (m, k) @ (k, n): the bias add is free
    return _mm(args[1:], out)


def _bmm(args, out):                # (b, m, k) @ (b, k, n)
    b, m, k = args[0].shape
    return b * m * k * args[1].shape[2]


def _baddbmm(args, out):
    return _bmm(args[1:], out)


def _convolution(args, out):        # input, weight, bias, stride, padding, dilation, transposed
    if args[6]:
        raise NotImplementedError("flops: transposed convolutions are not counted")
    weight = args[1]                 # (Cout, Cin/groups, kh, kw)
    return out.numel() * weight[0].numel()   # per output element: Cin/groups * kh * kw


def _layer_norm(args, out):         # input, normalized_shape, weight, bias, eps
    affine = len(args) > 2 and args[2] is not None
    return args[0].numel() * (5 if affine else 4)


def _mean(args, out):               # the model's only mean is the global average pool
    return args[0].numel()


# op -> (kind, handle). Kinds are the columns of the breakdown `by_op`.
HANDLES = {
    aten.mm.default: ("matmul", _mm),
    aten.addmm.default: ("matmul", _addmm),
    aten.bmm.default: ("matmul", _bmm),
    aten.baddbmm.default: ("matmul", _baddbmm),
    aten.convolution.default: ("conv", _convolution),
    aten.native_layer_norm.default: ("norm", _layer_norm),
    aten.mean.dim: ("pool", _mean),
}
# Ops with arithmetic that a handle above would have to cover: fail instead of counting 0.
UNHANDLED = {aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten.native_group_norm.default, aten.native_batch_norm.default,
             aten._native_batch_norm_legit_no_training.default}


class _Counter(TorchDispatchMode):
    """Counts the ops in HANDLES, filed under the module that runs them (`stack[-1]`)."""

    def __init__(self):
        super().__init__()
        self.stack = [""]                     # qualified names of the running modules
        self.parts = defaultdict(int)         # "module path:kind" -> FLOPs
        self.scanned = []                     # module paths that called the scan

    def add(self, kind, flops):
        self.parts[f"{_part_name(self.stack[-1])}:{kind}"] += int(flops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in UNHANDLED:
            raise NotImplementedError(f"flops: no FLOP handle for {func}")
        if func in HANDLES:
            kind, handle = HANDLES[func]
            self.add(kind, handle(args, out[0] if isinstance(out, tuple) else out))
        return out


def _part_name(path):
    """'layers.2.blocks.5.self_attention.in_proj' -> 'layers.blocks.self_attention.in_proj':
    the same part of every block and stage adds up under one name."""
    return re.sub(r"\.\d+(?=\.|$)", "", path) or "model"


@contextmanager
def _counting_scan(counter):
    """Swap the scans that vmamba_min calls for a stub that counts the formula."""
    def stub(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, **kw):
        batch, KD, L = u.shape
        counter.add("scan", scan_flops(batch, KD, L, A.shape[1], with_D=D is not None))
        counter.scanned.append(counter.stack[-1])
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32   # as scan.py
        return torch.empty(u.shape, dtype=dtype, device=u.device)              # (B, K*D, L)

    saved = vmamba_min.selective_scan, vmamba_min.selective_scan_ref
    vmamba_min.selective_scan = vmamba_min.selective_scan_ref = stub
    try:
        yield
    finally:
        vmamba_min.selective_scan, vmamba_min.selective_scan_ref = saved


def _as_model(model_or_config):
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    cfg = build_config(model_or_config) if isinstance(model_or_config, str) else model_or_config
    if not isinstance(cfg, VSSMConfig):
        raise TypeError("count_flops takes a model, a VSSMConfig or a name in CONFIGS "
                        f"({', '.join(CONFIGS)}), got {type(model_or_config).__name__}")
    with torch.device("meta"):               # no memory, no init arithmetic
        return VSSM(cfg)


def count_flops(model_or_config, image_size=(224, 224)) -> dict:
    """Parameters and FLOPs of one image (batch 1) at image_size (an int or (H, W)).

    model_or_config: a VSSM (or any nn.Module built from vmamba_min), a VSSMConfig, or a name
    in vmamba_min.CONFIGS. A given model is not changed or run on its own weights: its forward
    runs on meta copies of them.
    Returns {"params", "flops", "gflops", "by_op": {matmul, conv, norm, pool, scan},
    "parts": {"module path:kind": FLOPs} (block and stage indices dropped), "image_size"}.
    """
    model = _as_model(model_or_config)
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    meta = {n: torch.empty_like(t, device="meta") for n, t in
            [*model.named_parameters(), *model.named_buffers()]}
    x = torch.empty(1, in_chans, H, W, device="meta")

    counter, ran, hooks = _Counter(), [], []
    for name, m in model.named_modules():
        def enter(mod, args, name=name):
            counter.stack.append(name)
            if isinstance(mod, SS2D):
                ran.append(name)

        def leave(mod, args, out):
            counter.stack.pop()
        hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _counting_scan(counter), counter:
            functional_call(model, meta, (x,))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    # Every SS2D that ran must have called the (stubbed) scan exactly once, or its scan FLOPs
    # would be silently missing (e.g. if vmamba_min stopped calling the scan by these names).
    if sorted(ran) != sorted(counter.scanned):
        raise RuntimeError(f"flops: scan not intercepted: SS2D modules {ran}, "
                           f"scan calls from {counter.scanned}")

    by_op = defaultdict(int)
    for part, f in counter.parts.items():
        by_op[part.rsplit(":", 1)[1]] += f
    total = sum(counter.parts.values())
    return {"params": sum(p.numel() for p in model.parameters()), "flops": total,
            "gflops": total / 1e9, "by_op": dict(by_op), "parts": dict(counter.parts),
            "image_size": (H, W)}


def flops_rows(names=tuple(CONFIGS), image_size=(224, 224)):
    """One row per released configuration: ours vs the paper's GFLOPs (for bench.py --flops)."""
    rows = []
    for name in names:
        r = count_flops(name, image_size)
        g = {k: v / 1e9 for k, v in r["by_op"].items()}
        paper = PAPER_GFLOPS.get(name) if tuple(r["image_size"]) == (224, 224) else None
        rows.append({"model": name, "params": r["params"],
                     "params_ok": ("yes" if r["params"] == SPEC_PARAMS[name] else "NO")
                     if name in SPEC_PARAMS else None,
                     "gflops": r["gflops"], "paper_gflops": paper,
                     "diff_pct": 100 * (r["gflops"] / paper - 1) if paper else None,
                     "mm_conv_g": g.get("matmul", 0) + g.get("conv", 0),
                     "norm_g": g.get("norm", 0), "scan_g": g.get("scan", 0)})
    return rows
