"""flops.py: parameters and FLOPs of a VMamba model, counted the way the paper counts them.

    python flops.py                                      # the nine released configs vs the paper
    from flops import count_flops
    count_flops("vanilla_vmamba_tiny")["gflops"]         # a name, a VSSMConfig or a model

The paper (Liu et al., arXiv 2401.10166) reports fvcore's numbers plus the official handle for
its scan op. torch's FlopCounterMode does the op and module tracking; this file supplies only
that convention's formulas (below) and turns the scan into one countable op.
Letters as in vmamba_min.py: B batch, H, W, L = H*W, C width, D inner width, N d_state, K = 4.
"""
import argparse
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

import vmamba_min
from vmamba_min import CONFIGS, SS2D, VSSM, VSSMConfig, build_config

__all__ = ["count_flops", "scan_flops", "flops_rows",
           "PAPER_GFLOPS", "OFFICIAL_PARAMS"]

aten = torch.ops.aten

# The nine released configurations (224x224, 1000 classes): the paper's GFLOPs (its tables
# and the official README), and the exact parameter counts of the official models.
PAPER_GFLOPS = {
    "vanilla_vmamba_tiny": 5.6, "vanilla_vmamba_small": 11.2, "vanilla_vmamba_base": 18.0,
    "vmamba_tiny_s2l5": 4.9, "vmamba_small_s2l15": 8.7, "vmamba_base_s2l15": 15.4,
    "vmamba_tiny_s1l8": 4.9, "vmamba_small_s1l20": 8.6, "vmamba_base_s1l20": 15.2,
}
OFFICIAL_PARAMS = {
    "vanilla_vmamba_tiny": 22_893_448, "vanilla_vmamba_small": 44_417_416,
    "vanilla_vmamba_base": 76_254_056, "vmamba_tiny_s2l5": 30_705_832,
    "vmamba_small_s2l15": 50_147_752, "vmamba_base_s2l15": 88_557_800,
    "vmamba_tiny_s1l8": 30_249_064, "vmamba_small_s1l20": 49_012_840,
    "vmamba_base_s1l20": 86_614_504,
}


def scan_flops(batch, KD, L, N, with_D=True):
    """The official count for one selective-scan call (flops_selective_scan_fn): 9 FLOPs per
    (position, channel, state) plus one per output for the D skip."""
    return 9 * batch * L * KD * N + (batch * L * KD if with_D else 0)


# ---------------------------------------------------------------------------------------------
# The fvcore convention as FlopCounterMode formulas (argument shapes in, FLOPs out). FlopCounterMode
# counts 2 FLOPs per multiply-add; fvcore counts 1, and the bias add is free.
# ---------------------------------------------------------------------------------------------
def _mm(a, b, out_shape=None, **kw):                # (m, k) @ (k, n)
    return a[0] * a[1] * b[1]


def _addmm(bias, a, b, out_shape=None, **kw):
    return _mm(a, b)


def _bmm(a, b, out_shape=None, **kw):               # (b, m, k) @ (b, k, n)
    return a[0] * a[1] * a[2] * b[2]


def _baddbmm(bias, a, b, out_shape=None, **kw):
    return _bmm(a, b)


def _conv(x, w, bias, stride, padding, dilation, transposed, *args, out_shape=None, **kw):
    """Cout * Cin/groups * kh * kw per output pixel, i.e. per output element Cin/groups*kh*kw."""
    if transposed:
        raise NotImplementedError("flops: transposed convolutions are not counted")
    return math.prod(out_shape) * math.prod(w[1:])


def _layer_norm(x, normalized_shape, weight=None, bias=None, *args, out_shape=None, **kw):
    """fvcore's rough estimate: 5 per element with weight and bias, 4 without."""
    return math.prod(x) * (5 if weight is not None else 4)


def _mean(x, *args, out_shape=None, **kw):         # the model's only mean: global average pool
    return math.prod(x)


def _scan(u, A, out_shape=None, **kw):             # u (B, K*D, L), A (K*D, N)
    return scan_flops(u[0], u[1], u[2], A[1])


def _unhandled(*args, **kw):
    # Arithmetic that the paper's convention would count but this file has no formula for:
    # fail rather than count 0 (FlopCounterMode counts unknown ops as 0; CPU attention is one).
    raise NotImplementedError("flops: no formula for this op in the paper's convention")


# The scan is a Python function (a loop or torch's scan operator), not one aten op, and its own
# elementwise ops are not what the paper counts. While counting, vmamba_min's two scans are
# replaced by this op, which only has a shape (fake) implementation: FlopCounterMode then counts
# the official formula from its argument shapes, as the official fvcore handle does.
@torch.library.custom_op("vmamba_flops::selective_scan", mutates_args=())
def _scan_op(u: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("flops: the counting stub of the scan has no values (meta device only)")


@_scan_op.register_fake
def _(u, A):
    return torch.empty(u.shape, dtype=torch.float64 if u.dtype == torch.float64 else torch.float32,
                       device=u.device)                  # (B, K*D, L), as scan.py returns


# op -> (column of by_op, formula)
FORMULAS = {
    aten.mm: ("matmul", _mm), aten.addmm: ("matmul", _addmm),
    aten.bmm: ("matmul", _bmm), aten.baddbmm: ("matmul", _baddbmm),
    aten.convolution: ("conv", _conv), aten._convolution: ("conv", _conv),
    aten.native_layer_norm: ("norm", _layer_norm),
    aten.mean: ("pool", _mean),
    torch.ops.vmamba_flops.selective_scan: ("scan", _scan),
}
UNHANDLED = (aten._scaled_dot_product_flash_attention_for_cpu, aten.native_group_norm,
             aten.native_batch_norm, aten._native_batch_norm_legit_no_training)


@contextmanager
def _counting_scan(calls):
    """Swap the scans that vmamba_min calls for the counting op; `calls` collects one entry
    per call, so that a scan which escaped the swap is noticed."""
    def stub(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, **kw):
        # The formula is the official one with the D skip, which SS2D.ssm adds after the merge
        # (the scan gets D = None there): counted here, with the scan, as officially.
        calls.append(u.shape)
        return _scan_op(u, A)

    names = ("selective_scan", "selective_scan_ref", "selective_scan_assoc",
             "selective_scan_assoc_chunked")          # every VSSMConfig.scan's (SS2D.run_scan)
    saved = {n: getattr(vmamba_min, n) for n in names}
    for n in names:
        setattr(vmamba_min, n, stub)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(vmamba_min, n, f)


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

    The forward runs on the meta device (shapes only): a given model's weights are swapped for
    meta copies through functional_call, so the model itself is neither changed nor run.
    Returns {"params", "flops", "gflops", "by_op": {matmul, conv, norm, pool, scan},
    "by_module": {FlopCounterMode's module name: FLOPs}, "image_size"}.
    """
    model = _as_model(model_or_config)
    H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    meta = {n: torch.empty_like(t, device="meta") for n, t in
            [*model.named_parameters(), *model.named_buffers()]}
    dtype = next(iter(meta.values())).dtype if meta else torch.float32   # a .half() model's
    x = torch.empty(1, in_chans, H, W, device="meta", dtype=dtype)

    mapping = {op: f for op, (_, f) in FORMULAS.items()}
    mapping.update({op: _unhandled for op in UNHANDLED})
    counter, calls = FlopCounterMode(display=False, custom_mapping=mapping), []
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _counting_scan(calls), counter:
            functional_call(model, meta, (x,))
    finally:
        model.train(was_training)
    n_ss2d = sum(isinstance(m, SS2D) for m in model.modules())
    if len(calls) != n_ss2d:   # e.g. vmamba_min stopped calling the scans by these names
        raise RuntimeError(f"flops: {n_ss2d} SS2D modules but {len(calls)} scan calls counted")

    counts = counter.get_flop_counts()
    by_op = {}
    for op, f in counts.get("Global", {}).items():
        if op not in FORMULAS:   # FlopCounterMode's own formula: another convention
            raise NotImplementedError(f"flops: {op} has no formula in the paper's convention")
        kind = FORMULAS[op][0]
        by_op[kind] = by_op.get(kind, 0) + f
    total = sum(by_op.values())
    return {"params": sum(p.numel() for p in model.parameters()), "flops": total,
            "gflops": total / 1e9, "by_op": by_op,
            "by_module": {name: sum(c.values()) for name, c in counts.items() if name != "Global"},
            "image_size": (H, W)}


def flops_rows(names=tuple(CONFIGS), image_size=(224, 224)):
    """One row per released configuration: ours vs the paper's GFLOPs."""
    rows = []
    for name in names:
        r = count_flops(name, image_size)
        g = {k: v / 1e9 for k, v in r["by_op"].items()}
        paper = PAPER_GFLOPS.get(name) if tuple(r["image_size"]) == (224, 224) else None
        rows.append({"model": name, "params": r["params"],
                     "params_ok": ("yes" if r["params"] == OFFICIAL_PARAMS[name] else "NO")
                     if name in OFFICIAL_PARAMS else None,
                     "gflops": r["gflops"], "paper_gflops": paper,
                     "diff_pct": 100 * (r["gflops"] / paper - 1) if paper else None,
                     "mm_conv_g": g.get("matmul", 0) + g.get("conv", 0),
                     "norm_g": g.get("norm", 0), "scan_g": g.get("scan", 0)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="params and GFLOPs of the released configurations "
                                            "(paper/fvcore convention, meta device)")
    p.add_argument("--res", type=int, default=224, help="square input side")
    args = p.parse_args(argv)
    if args.res < 4:
        p.error(f"--res must be >= 4 (VMamba's stem), got {args.res}")
    print(f"batch 1, {args.res}x{args.res}, torch {torch.__version__}")
    cols = ("model", "params", "= official", "GFLOPs", "paper", "mm+conv", "norm", "scan")
    print(f"{cols[0]:<22}{cols[1]:>12}{cols[2]:>11}" + "".join(f"{c:>9}" for c in cols[3:]))
    for r in flops_rows(image_size=(args.res, args.res)):
        paper = f"{r['paper_gflops']:.1f}" if r["paper_gflops"] else "-"
        print(f"{r['model']:<22}{r['params']:>12,}{r['params_ok'] or '-':>11}{r['gflops']:>9.3f}"
              f"{paper:>9}" + "".join(f"{r[k]:>9.3f}" for k in ("mm_conv_g", "norm_g", "scan_g")))


if __name__ == "__main__":
    main()
