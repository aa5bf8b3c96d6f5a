"""The selective scan (S6) as an associative scan: the path for CUDA under torch.compile.

Letters as in scan.py: b batch (B is the scan's input matrix), K routes (groups), D channels per
route, N state size, L sequence length.

For every channel and state index the scan is a first-order linear recurrence,
    h_t = a_t h_{t-1} + x_t,    a_t = exp(delta'_t A) in [0, 1],   x_t = delta'_t B_t u_t,
    y_t = sum_n C_t[n] h_t[n] + D u_t                              (h_{-1} = h0, or 0),
and pairs (a, x) compose associatively:  (a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2)  (apply
step 1, then step 2). torch's `associative_scan` operator takes such a combine function; with
combine_mode="pointwise" under torch.compile on CUDA, Inductor lowers it to ONE Triton kernel
(`tl.associative_scan`, producers such as the exp fused into its loads), where the chunked
scan of scan.py lowers its `scan` loops to a host-side while loop that replays kernels per step.
Outside torch.compile, pointwise mode compiles the operator with Dynamo's "eager" backend, which
runs the operator's generic implementation: the log-depth recursion over slices below, a few
kernels per level, plus a Dynamo trace per new shape. So scan.selective_scan sends a call here
only on CUDA under torch.compile (`scan._use_assoc`). combine_mode="generic" runs that same
recursion anywhere (a CPU included): it is how CI tests the math.

Layout: a and x as (b, K*D, N, L), the scan dim last and contiguous, all rows scanned at once
(N = 1, the v2 models: (b, K*D, 1, L), the size of u). h0 is folded into the first input,
x_0 += a_0 h0, so the scan itself always starts from zero.

Backward (`_AssocScan.backward`), per channel and state index, upstream dy_t and dh_L:
1. The adjoint g_t = dL/dh_t obeys g_t = C_t dy_t + a_{t+1} g_{t+1}, g_{L-1} = C_{L-1} dy_{L-1}
   + dh_L: the same combine scanned right to left, with the decays shifted by one (a_{t+1};
   the last one is never read and is set to 1).
2. dL/dx_t = g_t and dL/da_t = g_t h_{t-1} (h_{-1} = h0 or 0), so dh0 = a_0 g_0.
3. Through x_t = delta'_t B_t u_t: du_t = delta'_t <B_t, g_t> + D dy_t, dB_t = delta'_t u_t g_t
   (summed over the group's channels); through a_t = exp(delta'_t A):
   ddelta'_t = u_t <B_t, g_t> + <A, a_t h_{t-1} g_t>,  dA = sum_t delta'_t a_t h_{t-1} g_t.
4. dC_t = dy_t h_t (summed over the group), dD = sum_t dy_t u_t.
5. Through the softplus: d(delta + bias) = ddelta' sigmoid(delta + bias), sigmoid(z) =
   1 - exp(-softplus(z)): delta' alone is enough.
Saved: the inputs and delta'; for N = 1 also the states h (the size of u). For N > 1 the state
(b, K*D, N, L) is NOT saved: backward recomputes it with the forward scan (N times the size of
u, for one more scan). Stability: only products of decays in [0, 1]; nothing is divided by one.
"""
import torch
import torch.nn.functional as F
from torch._higher_order_ops.associative_scan import associative_scan

from scan import _check_inputs, _compute_dtype, _softplus

__all__ = ["selective_scan_assoc"]


def selective_scan_assoc(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
                         h0=None, return_last_state=False, combine_mode=None):
    """The selective scan of `scan.selective_scan_ref` (same arguments, result and dtype),
    computed with torch's associative_scan operator.

    combine_mode: "pointwise" (one Triton kernel under torch.compile; CUDA/XPU tensors only),
    "generic" (any device, slow: for tests), or None: "pointwise" on CUDA, "generic" elsewhere.
    """
    if combine_mode not in (None, "pointwise", "generic"):
        raise ValueError(f"selective_scan: combine_mode must be None, 'pointwise' or 'generic', "
                         f"got {combine_mode!r}")
    _check_inputs(u, delta, A, B, C, D, delta_bias, h0)
    if combine_mode is None:
        combine_mode = "pointwise" if u.is_cuda else "generic"
    dt = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dt) for t in (u, delta, A, B, C))
    D, delta_bias, h0 = (None if t is None else t.to(dt) for t in (D, delta_bias, h0))
    batch, KD, L = u.shape
    if L == 0:                                 # the operator rejects an empty scan dim
        y = u.new_zeros(batch, KD, 0)
        h = u.new_zeros(batch, KD, A.shape[1]) if h0 is None else h0
        return (y, h) if return_last_state else y
    y, h_last = _AssocScan.apply(u, delta, A, B, C, D, delta_bias, h0, delta_softplus,
                                 combine_mode)
    return (y, h_last) if return_last_state else y


def _combine(left, right):
    """(a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2): step 1 then step 2. A module-level function
    of its arguments only: the operator's pointwise lowering rejects closed-over tensors."""
    a1, x1 = left
    a2, x2 = right
    return a1 * a2, a2 * x1 + x2


def _recurrence(a, x, mode, reverse=False):
    """h_t = a_t h_{t-1} + x_t along the last dim from h_{-1} = 0 (reverse: h_t = a_t h_{t+1}
    + x_t from the right)."""
    return associative_scan(_combine, (a, x), dim=-1, reverse=reverse, combine_mode=mode)[1]


def _decays(dt, A):
    """a_t = exp(delta'_t A): (b, K*D, L) and (K*D, N) -> (b, K*D, N, L)."""
    return torch.exp(dt[:, :, None, :] * A[:, :, None])


def _inputs(u, dt, B, a, h0):
    """x_t = delta'_t B_t u_t (b, K*D, N, L), with h0 folded into x_0 (+= a_0 h0)."""
    batch, KD, L = u.shape
    K, N = B.shape[1], B.shape[2]
    x = ((dt * u).view(batch, K, KD // K, 1, L) * B[:, :, None])             # (b, K, D, N, L)
    x = x.reshape(batch, KD, N, L)                                           # (b, K*D, N, L)
    if h0 is not None:
        x = torch.cat([x[..., :1] + a[..., :1] * h0[..., None], x[..., 1:]], dim=-1)
    return x


class _AssocScan(torch.autograd.Function):
    """The scan as one autograd node: the operator's own autograd would materialise an L x L
    tensor per row. Backward: steps 1-5 of the module docstring. (Splitting K*D into (K, D) is
    a view of any tensor; merging it back is a reshape: elementwise results follow their
    inputs' strides, and u or dy may come permuted.)"""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, h0, softplus, mode):
        batch, KD, L = u.shape
        K, N = B.shape[1], A.shape[1]
        if delta_bias is not None:
            delta = delta + delta_bias[:, None]
        dt = _softplus(delta) if softplus else delta         # delta' (b, K*D, L)
        a = _decays(dt, A)                                    # (b, K*D, N, L)
        h = _recurrence(a, _inputs(u, dt, B, a, h0), mode)    # (b, K*D, N, L)
        y = (h.view(batch, K, KD // K, N, L) * C[:, :, None]).sum(3).reshape(batch, KD, L)
        if D is not None:
            y = y + D[:, None] * u
        keep = h if N == 1 else None          # N > 1: recomputed in backward, never stored
        ctx.save_for_backward(u, dt, A, B, C, D, h0, keep)
        ctx.softplus, ctx.has_bias, ctx.mode = softplus, delta_bias is not None, mode
        ctx.set_materialize_grads(False)
        return y, h[..., -1]                                  # (b, K*D, L), (b, K*D, N)

    @staticmethod
    def backward(ctx, gy, gh):
        u, dt, A, B, C, D, h0, h = ctx.saved_tensors
        batch, KD, L = u.shape
        K, N = B.shape[1], A.shape[1]
        group = (batch, K, KD // K, N, L)
        a = _decays(dt, A)                                    # recomputed: one exp
        if h is None:                                         # the forward scan, again
            h = _recurrence(a, _inputs(u, dt, B, a, h0), ctx.mode)
        if gy is None:
            gy = torch.zeros_like(u)
        g_in = (C[:, :, None] * gy.view(batch, K, KD // K, 1, L)).reshape(batch, KD, N, L)
        if gh is not None:                                    # C_t dy_t, + dh_L at the end
            g_in = torch.cat([g_in[..., :-1], g_in[..., -1:] + gh[..., None]], dim=-1)
        a_next = F.pad(a[..., 1:], (0, 1), value=1.0)        # a_{t+1}; the last is never read
        g = _recurrence(a_next, g_in, ctx.mode, reverse=True)                    # step 1
        start = h.new_zeros(batch, KD, N, 1) if h0 is None else h0[..., None]
        dah = g * a * torch.cat([start, h[..., :-1]], dim=-1)   # a_t h_{t-1} g_t   step 2
        gB = (g.view(group) * B[:, :, None]).sum(3).reshape(batch, KD, L)   # <B_t, g_t>
        du = dt * gB if D is None else dt * gB + D[:, None] * gy          # step 3
        ddt = u * gB + (A[:, :, None] * dah).sum(2)
        dB = (g * (dt * u)[:, :, None]).view(group).sum(2)                # (b, K, N, L)
        dA = (dah * dt[:, :, None]).sum((0, 3))                           # (K*D, N)
        dC = (h * gy[:, :, None]).view(group).sum(2)                      # step 4
        dD = None if D is None else (gy * u).sum((0, 2))
        dz = ddt * -torch.expm1(-dt) if ctx.softplus else ddt             # step 5
        dbias = dz.sum((0, 2)) if ctx.has_bias else None
        dh0 = None if h0 is None else a[..., 0] * g[..., 0]
        return du, dz, dA, dB, dC, dD, dbias, dh0, None, None
