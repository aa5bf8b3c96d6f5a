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

One state index at a time: for each n the decays a_t[n] and inputs x_t[n] are (b, K*D, L)
tensors, scanned on their own, and C_t[n] h_t[n] is added into y. Under torch.compile on CUDA
Inductor fuses the N scans, the softplus and exp before them and the sum into y into one Triton
kernel that reads u, delta, B, C once and writes y (and, when asked for, the last state) once:
the state never reaches memory (`python cuda_codegen.py scan --gen v0` shows the kernel and
its bytes).
h0 is folded into the first input, x_0 += a_0 h0, so every scan starts from zero.

Backward (`_grads`, per state index n, upstream dy_t and dh_L):
1. The adjoint g_t = dL/dh_t obeys g_t = C_t dy_t + a_{t+1} g_{t+1}, g_{L-1} = C_{L-1} dy_{L-1}
   + dh_L: the same combine scanned right to left, with the decays shifted by one (a_{t+1};
   the last one is never read and is set to 1).
2. dL/dx_t = g_t and dL/da_t = g_t h_{t-1} (h_{-1} = h0 or 0), so dh0 = a_0 g_0.
3. Through x_t = delta'_t B_t u_t: du_t = delta'_t sum_n B_t g_t + D dy_t, dB_t = delta'_t u_t
   g_t (summed over the group's channels); through a_t = exp(delta'_t A):
   ddelta'_t = u_t sum_n B_t g_t + sum_n A a_t h_{t-1} g_t,  dA = sum_t delta'_t a_t h_{t-1} g_t.
4. dC_t = dy_t h_t (summed over the group), dD = sum_t dy_t u_t.
5. Through the softplus: d(delta + bias) = ddelta' sigmoid(delta + bias), sigmoid(z) =
   1 - exp(-softplus(z)): delta' alone is enough.
Saved: the inputs only, never a state, nor delta' (recomputed from delta, which a float32 model
has in memory anyway as the dt projection's output; compiled, N > 1 may keep delta', see _grads).
Backward recomputes h_{t-1} by scanning the inputs shifted right by one step (so h_{t-1} and g_t
are produced at the same index t, and Inductor fuses everything that uses them into that scan's
kernel), and h_t = a_t h_{t-1} + x_t from it.
Sums over b and L are taken over L first, the part that fuses. Stability: only products of
decays in [0, 1]; nothing is divided by one, and a_t h_{t-1} is never recovered as h_t - x_t
(that difference loses the digits of a small a_t h_{t-1}).
"""
import torch
import torch.nn.functional as F
from torch._higher_order_ops.associative_scan import associative_scan

from scan import _cast, _check_inputs, _delta_prime, _empty_result, _is_empty

__all__ = ["selective_scan_assoc", "selective_scan_assoc_chunked"]


def selective_scan_assoc(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
                         h0=None, return_last_state=False, combine_mode=None):
    """The selective scan of `scan.selective_scan_ref` (same arguments, result and dtype),
    computed with torch's associative_scan operator.

    combine_mode: "pointwise" (one Triton kernel under torch.compile; CUDA/XPU tensors only),
    "generic" (any device, slow: for tests), or None: "pointwise" on CUDA, "generic" elsewhere.
    """
    return _apply("selective_scan_assoc", _AssocScan, (), u, delta, A, B, C, D, delta_bias,
                  delta_softplus, h0, return_last_state, combine_mode)


def selective_scan_assoc_chunked(u, delta, A, B, C, D=None, delta_bias=None,
                                 delta_softplus=False, *, h0=None, return_last_state=False,
                                 combine_mode=None, chunk_size=None):
    """The same scan (arguments, result, dtype and backward as selective_scan_assoc) in chunks
    of chunk_size steps, for a state of N > 1 on a GPU: an experiment beside
    selective_scan_assoc, which no dispatch chooses (`VSSMConfig(scan="assoc_chunked")` or a
    direct call does).

    Why: compiled, selective_scan_assoc scans each row of L steps in one Triton program that
    walks L in blocks with a carry between them, N scans at a time; at N = 16 that loop is
    long and each step heavy. Here every scan is along a chunk's T = chunk_size steps, which a
    program holds whole (Inductor's persistent kernels), and the chunks of a row are chained by
    a scan along the M = ceil(L / T) chunks. Three passes (L padded to M*T with delta' = 0: a
    decay of 1 and no input, so the states pass through unchanged):
    1. where each chunk ends from a zero state, H_m (N scans along T, each chunk's last step),
       and its total decay P_m = exp(A * sum_t delta'_t);
    2. the chunk chain E_m = P_m E_{m-1} + H_m from E_{-1} = h0 (or 0): N scans over M;
    3. every chunk scanned again from its start state E_{m-1} (folded into its first input),
       y = sum_n C h[n] + D u, as in selective_scan_assoc.
    Bytes: the inputs are read twice (passes 1 and 3), y written once, the (b, K*D, M) chunk
    sums in between; compiled, Inductor also writes delta' in pass 1 for pass 3 (docs/design.md
    has the figures). chunk_size: a positive int (a power of two suits Triton's blocks), or
    None: 64."""
    if chunk_size is None:
        chunk_size = 64
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan_assoc_chunked: chunk_size must be None or a positive "
                         f"int, got {chunk_size!r}")
    return _apply("selective_scan_assoc_chunked", _ChunkedAssocScan, (chunk_size,), u, delta,
                  A, B, C, D, delta_bias, delta_softplus, h0, return_last_state, combine_mode)


def _apply(who, function, extra, u, delta, A, B, C, D, delta_bias, delta_softplus, h0,
           return_last_state, combine_mode):
    """Checks and casts shared by both scans (errors name `who`, the function called), the
    empty cases, then function.apply."""
    if combine_mode not in (None, "pointwise", "generic"):
        raise ValueError(f"{who}: combine_mode must be None, 'pointwise' or 'generic', "
                         f"got {combine_mode!r}")
    _check_inputs(u, delta, A, B, C, D, delta_bias, h0, delta_softplus, who, return_last_state)
    if GROUP_SUM not in ("atomic", "reduce"):
        raise ValueError(f"scan_assoc.GROUP_SUM must be 'atomic' or 'reduce', got {GROUP_SUM!r}")
    if combine_mode is None:
        combine_mode = "pointwise" if u.is_cuda else "generic"
    if combine_mode == "pointwise" and u.device.type not in ("cuda", "xpu"):
        raise ValueError(f"{who}: combine_mode='pointwise' needs CUDA or XPU tensors (torch's "
                         f"associative_scan), got {u.device.type}; 'generic' runs anywhere")
    u, delta, A, B, C, D, delta_bias, h0 = _cast(u, delta, A, B, C, D, delta_bias, h0)
    if _is_empty(u):
        return _empty_result(u, A, h0, return_last_state, (delta, A, B, C, D, delta_bias))
    return function.apply(u, delta, A, B, C, D, delta_bias, h0, delta_softplus, combine_mode,
                          return_last_state, *extra)


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


def _decay(dt, A, n):
    """a_t[n] = exp(delta'_t A[:, n]): (b, K*D, L)."""
    return torch.exp(dt * A[:, n, None])


def _per_group(t, K):
    """(b, K*D, L) -> (b, K, D, L): a channel's route group as its own dim (a view)."""
    return t.view(t.shape[0], K, t.shape[1] // K, t.shape[2])


def _merged(t):
    """(b, K, D, L) -> (b, K*D, L); a reshape: elementwise results follow their inputs'
    strides, and u or dy may come permuted."""
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2], t.shape[3])


def _input(dtu, B, n):
    """x_t[n] = delta'_t u_t B_t[n]: (b, K*D, L), from dtu = delta' u (b, K*D, L)."""
    return _merged(_per_group(dtu, B.shape[1]) * B[:, :, None, n])


def _state(x, a, h0, n, mode):
    """h[n] (b, K*D, L): the recurrence of x[n] and a[n], h0[n] folded into x_0."""
    if h0 is not None:
        x = torch.cat([x[..., :1] + a[..., :1] * h0[:, :, n, None], x[..., 1:]], dim=-1)
    return _recurrence(a, x, mode)


# dB and dC sum a product over each route's D channels, (b, K*D, L) -> (b, K, L). For N = 1:
#   "atomic"  index_add_: under torch.compile on CUDA, Inductor turns it into atomic adds inside
#             the kernel of the second scan (h_{t-1}), so h never goes to memory and g (written
#             by the first scan, right to left) is read back once, by that kernel. Float atomics
#             add in any order: torch.use_deterministic_algorithms(True) makes Inductor use
#             aten's deterministic index_put instead.
#   "reduce"  a sum over the channel dim: a kernel of its own that reads g and h back.
# Which is faster on a card is for a GPU run to say (gpu_check.py times both). N > 1 always
# reduces: there the N scans and 2N atomic index_adds exceed Inductor's fusion-size limit, the
# adds land in a kernel of their own, and it moves more than the reduction. So does code that
# torch.compile compiles for a CPU: Inductor's C++ backend (torch 2.13.0) vectorised this
# index_add with a wrong index and wrote past the end of dB (heap corruption, "free(): invalid
# next size"; test_compiled_matches_reference at B2K2D2N1L11). Eager CPU code adds correctly.
GROUP_SUM = "atomic"


def _group_sum(t, K, N):
    """sum over each group's channels: (b, K*D, L) -> (b, K, L), as GROUP_SUM says."""
    if GROUP_SUM not in ("atomic", "reduce"):
        raise ValueError(f"scan_assoc.GROUP_SUM must be 'atomic' or 'reduce', got {GROUP_SUM!r}")
    if not _adds_atomically(t, N):
        return _per_group(t, K).sum(2)
    group = torch.arange(t.shape[1], device=t.device) // (t.shape[1] // K)
    return t.new_zeros(t.shape[0], K, t.shape[2]).index_add_(1, group, t)


def _adds_atomically(t, N):
    """Whether _group_sum uses index_add_ (the comment above GROUP_SUM says when)."""
    return GROUP_SUM == "atomic" and N == 1 and (t.is_cuda or not torch.compiler.is_compiling())


def _state_before(x, dt_prev, A, h0, n, mode):
    """h[n] one step back, h_{t-1} (h_{-1} = h0[n] or 0): the recurrence of the inputs shifted
    right by one. Scanned directly, so that h_{t-1} and g_t meet at the same index t (a
    shifted read of a scan's own result would keep Inductor from fusing its users). The shift
    is an index, not a cat after zeros: compiled by torch 2.14.1, zeros shared by a stage's
    blocks made Inductor write the cat in a kernel of its own; nor a pad, which the partitioner
    does not recompute, so the forward would save x (docs/design.md)."""
    t = torch.arange(x.shape[-1], device=x.device)
    start = 0.0 if h0 is None else h0[:, :, n, None]
    x_prev = torch.where(t == 0, start, x[..., (t - 1).clamp(min=0)])     # x_{t-1}, h0 at 0
    a_prev = _decay(dt_prev, A, n)                    # a_{t-1}; the first (1) is not read
    return _recurrence(a_prev, x_prev, mode)


def _grads(u, delta, delta_bias, A, B, C, D, h0, gy, gh, softplus, mode, dt=None):
    """Gradients of the scan (steps 1-5 of the module docstring) with respect to u, delta (+
    bias), A, B, C, D, delta_bias and h0, from the inputs alone (delta' and the states are
    recomputed). gy, gh: upstream gradients of y and the last state (either may be None). The
    shifted decays a_{t-1}, a_{t+1} are exps of delta' shifted, not shifted copies of a_t:
    compiled, those would make the forward save a_t (docs/design.md). dt: delta', given only by
    cuda_codegen's stand-in for the backward graph of a compiled step with N > 1, which receives
    delta' from the forward (delta may then be None)."""
    K, N = B.shape[1], A.shape[1]
    if gy is None:
        gy = torch.zeros_like(u)
    if dt is None:
        dt = _delta_prime(delta, delta_bias, softplus)
    # delta' one step back and one step on (0 where the step is off the end: a decay of 1, never
    # read). N = 1: from delta shifted: compiled, slices of delta' (padded) would make the
    # forward keep delta'. N > 1: delta' shifted, which a compiled forward then keeps: from
    # delta, each of the 2N shifted decays carried the softplus, and Inductor grouped the N = 16
    # backward into kernels that moved 1.5 times the bytes (docs/design.md).
    if N == 1:
        dt_prev = F.pad(_delta_prime(delta[..., :-1], delta_bias, softplus), (1, 0))
        dt_next = F.pad(_delta_prime(delta[..., 1:], delta_bias, softplus), (0, 1))
    else:
        dt_prev, dt_next = F.pad(dt[..., :-1], (1, 0)), F.pad(dt[..., 1:], (0, 1))
    dtu = dt * u
    gBsum = torch.zeros_like(u)                               # sum_n B_t[n] g_t[n]
    gAsum = torch.zeros_like(u)                               # sum_n A[n] a_t h_{t-1} g_t
    dA, dB, dC, dh0 = [], [], [], []
    for n in range(N):
        a, x = _decay(dt, A, n), _input(dtu, B, n)
        h_prev = _state_before(x, dt_prev, A, h0, n, mode)   # recomputed: the states one
        h = a * h_prev + x                                   # step back, and the states
        g_in = _merged(C[:, :, None, n] * _per_group(gy, K))              # C_t dy_t
        if gh is not None:                 # + dh_L at the end; a pad, as a cat costs a copy
            g_in = g_in + F.pad(gh[:, :, n, None], (g_in.shape[-1] - 1, 0))    # (design.md)
        a_next = _decay(dt_next, A, n)                       # a_{t+1}; the last (1) is not read
        g = _recurrence(a_next, g_in, mode, reverse=True)                        # step 1
        dah = g * a * h_prev                                  # a_t h_{t-1} g_t    step 2
        gBsum = gBsum + _merged(_per_group(g, K) * B[:, :, None, n])
        gAsum = gAsum + A[:, n, None] * dah
        dA.append((dah * dt).sum(-1))                         # (b, K*D)           step 3
        dB.append(_group_sum(g * dtu, K, N))
        dC.append(_group_sum(h * gy, K, N))                                          # step 4
        if h0 is not None:
            dh0.append(a[..., 0] * g[..., 0])
    du = dt * gBsum if D is None else dt * gBsum + D[:, None] * gy
    ddt = u * gBsum + gAsum
    dz = ddt * -torch.expm1(-dt) if softplus else ddt                             # step 5
    return (du, dz, torch.stack(dA, -1).sum(0), torch.stack(dB, 2), torch.stack(dC, 2),
            None if D is None else (gy * u).sum(-1).sum(0),
            dz.sum(-1).sum(0) if delta_bias is not None else None,
            torch.stack(dh0, 2) if h0 is not None else None)


class _AssocScan(torch.autograd.Function):
    """The scan as one autograd node: the operator's own autograd would materialise an L x L
    tensor per row. Forward: one scan per state index, each added into y (module docstring).
    The last state is an output only when asked for: compiled, an unused output's gradient
    arrives as zeros, and adding them into the adjoint scan's input kept Inductor from
    computing that input inside the scan kernel (docs/design.md)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, h0, softplus, mode, with_last):
        K, N = B.shape[1], A.shape[1]
        dt = _delta_prime(delta, delta_bias, softplus)        # delta' (b, K*D, L)
        dtu = dt * u
        y = u.new_zeros(u.shape) if D is None else D[:, None] * u
        # every scan's decays and inputs before the first scan: compiled, values computed
        # after a scan from what the scan's inputs came from are saved, not recomputed (design.md)
        a = [_decay(dt, A, n) for n in range(N)]
        x = [_input(dtu, B, n) for n in range(N)]
        last = []
        for n in range(N):
            h = _state(x[n], a[n], h0, n, mode)                                  # (b, K*D, L)
            y = y + _merged(_per_group(h, K) * C[:, :, None, n])
            last.append(h[..., -1])
        ctx.save_for_backward(u, delta, delta_bias, A, B, C, D, h0)   # no state, nor delta'
        ctx.softplus, ctx.mode = softplus, mode
        ctx.set_materialize_grads(False)
        if not with_last:
            return y                                          # (b, K*D, L)
        return y, torch.stack(last, dim=-1)                   # (b, K*D, L), (b, K*D, N)

    @staticmethod
    def backward(ctx, gy, gh=None):
        u, delta, delta_bias, A, B, C, D, h0 = ctx.saved_tensors
        return _grads(u, delta, delta_bias, A, B, C, D, h0, gy, gh, ctx.softplus,
                      ctx.mode) + (None, None, None)


def _chunked(u, delta, A, B, C, D, delta_bias, h0, softplus, mode, T):
    """y and the last state by the three passes of selective_scan_assoc_chunked."""
    K, N = B.shape[1], A.shape[1]
    batch, KD, L = u.shape
    T = min(T, L)                  # a chunk longer than the sequence would only pad (L >= 1)
    Dg, M = KD // K, -(-L // T)
    dt = _delta_prime(delta, delta_bias, softplus)            # delta' (b, K*D, L)
    dtu, up = dt * u, u
    if M * T > L:                                             # delta' = 0 on the padding
        dt, dtu, up, B, C = (F.pad(t, (0, M * T - L)) for t in (dt, dtu, up, B, C))
    # Every tensor with its chunks as dims (M, T), channels by group (K, D): the products
    # with B and C broadcast over D, and y keeps the scans' shape until the end (a reshape
    # between a scan and its users kept Inductor from fusing them).
    dt, dtu, up = (t.view(batch, K, Dg, M, T) for t in (dt, dtu, up))
    B, C = B.view(batch, K, N, 1, M, T), C.view(batch, K, N, 1, M, T)
    A = A.view(K, Dg, N, 1, 1)
    start = None if h0 is None else h0.view(batch, K, Dg, N, 1)
    # 1. chunk end states from zero and total decays. The end state is the scan's last step,
    # taken as a sum over the chunk with every other step masked out: Inductor writes a
    # scan's whole output when a user indexes one element of it, but fuses a reduction of it.
    last_step = (torch.arange(T, device=dt.device) == T - 1).to(dt.dtype)
    ends = [(_recurrence(torch.exp(dt * A[:, :, n]), dtu * B[:, :, n], mode) * last_step).sum(-1)
            for n in range(N)]                                        # (b, K, D, M)
    total = dt.sum(-1, keepdim=True)                                  # (b, K, D, M, 1)
    decays = [torch.exp(total * A[:, :, n])[..., 0] for n in range(N)]
    # 2. the chain over chunks, h0 folded into the first chunk's end
    starts, last = [], []
    for n in range(N):
        H = ends[n]
        if start is not None:
            H = H + F.pad(decays[n][..., :1] * start[:, :, :, n], (0, M - 1))
        E = _recurrence(decays[n], H, mode)                    # state after chunk m
        first = torch.zeros_like(E[..., :1]) if start is None else start[:, :, :, n]
        starts.append(torch.cat([first, E[..., :-1]], dim=-1))        # state before chunk m
        last.append(E[..., -1])
    # 3. each chunk from its start state: x_0 += a_0 E_{m-1}
    y = torch.zeros_like(dtu) if D is None else D.view(K, Dg, 1, 1) * up
    for n in range(N):
        a = torch.exp(dt * A[:, :, n])
        x = dtu * B[:, :, n] + F.pad(a[..., :1] * starts[n][..., None], (0, T - 1))
        y = y + _recurrence(a, x, mode) * C[:, :, n]
    y = y.reshape(batch, KD, M * T)[..., :L]                 # a view of the padded chunks
    # Eager: an output of its own (autograd refuses in-place ops on a Function's view outputs).
    # Compiled (the path's use, on a card), no copy: where T does not divide L it was a kernel
    # more (31% more bytes at v0's stage 2); computing the last sum on the views instead made
    # torch 2.11's Inductor fail (CantSplit).
    if not torch.compiler.is_compiling():
        y = y.clone(memory_format=torch.contiguous_format)
    return y, torch.stack([h.reshape(batch, KD) for h in last], dim=-1)


class _ChunkedAssocScan(torch.autograd.Function):
    """selective_scan_assoc_chunked as one autograd node. Its gradients are _AssocScan's:
    `_grads` depends on the inputs alone, however the forward computed y."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, h0, softplus, mode, with_last, T):
        y, last = _chunked(u, delta, A, B, C, D, delta_bias, h0, softplus, mode, T)
        ctx.save_for_backward(u, delta, delta_bias, A, B, C, D, h0)   # no state, nor delta'
        ctx.softplus, ctx.mode = softplus, mode
        ctx.set_materialize_grads(False)
        return (y, last) if with_last else y

    @staticmethod
    def backward(ctx, gy, gh=None):
        u, delta, delta_bias, A, B, C, D, h0 = ctx.saved_tensors
        return _grads(u, delta, delta_bias, A, B, C, D, h0, gy, gh, ctx.softplus,
                      ctx.mode) + (None, None, None, None)
