"""The selective scan (S6) and the cross-scan of VMamba, in plain PyTorch.

VMamba (Liu et al., arXiv 2401.10166) unfolds a feature map along four routes, runs Mamba's
selective scan along each, and folds the four results back. This file holds that math as pure
functions of tensors; `vmamba_min.py` owns the parameters and calls them.

Letters: B batch, H, W feature map, L = H*W sequence length, K scan routes (groups), D channels
per route, N state size, T chunk length, M = number of chunks (ceil(L / T)).

Two implementations of one signature:
  selective_scan_ref  the obvious loop over time, the readable reference;
  selective_scan      a chunked scan, exact at any chunk size, that torch.compile fuses.
"""
import torch
import torch.nn.functional as F
from torch._higher_order_ops import scan as _hop_scan

__all__ = ["selective_scan_ref", "selective_scan", "cross_scan", "cross_merge"]


# ---------------------------------------------------------------------------------------------
# Input checks shared by both scans: bad shapes fail loudly, never broadcast into nonsense.
# ---------------------------------------------------------------------------------------------
def _check_inputs(u, delta, A, B, C, D, delta_bias, h0):
    def fail(msg):
        shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in
                           (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C))
                           if isinstance(t, torch.Tensor))
        raise ValueError(f"selective_scan: {msg} (got {shapes})")

    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias,
             "h0": h0}
    for name, t in named.items():
        if t is None and name in ("D", "delta_bias", "h0"):
            continue
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            fail(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t, rank in (("u", u, 3), ("delta", delta, 3), ("A", A, 2), ("B", B, 4),
                          ("C", C, 4)):
        if t.dim() != rank:
            fail(f"{name} must have rank {rank}, got rank {t.dim()}")
    batch, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    if delta.shape != u.shape:
        fail(f"delta must have the shape of u (B, K*D, L) = {tuple(u.shape)}")
    if A.shape[0] != KD:
        fail(f"A must be (K*D, N) with K*D = {KD}")
    if K < 1 or KD % K != 0:
        fail(f"K*D = {KD} (u.shape[1]) is not divisible by K = {K} (B.shape[1])")
    if B.shape != (batch, K, N, L):
        fail(f"B must be (B, K, N, L) = {(batch, K, N, L)}")
    if C.shape != B.shape:
        fail(f"C must have the shape of B {tuple(B.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (KD,):
            fail(f"{name} must be (K*D,) = ({KD},), got {tuple(t.shape)}")
    if h0 is not None and h0.shape != (batch, KD, N):
        fail(f"h0 must be (B, K*D, N) = {(batch, KD, N)}, got {tuple(h0.shape)}")


def _compute_dtype(u):
    # The official kernels scan in float32 whatever the input dtype (bf16/fp16 states lose the
    # recurrence within a few hundred steps); float64 is kept so tests have an exact reference.
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus, h0):
    """Checks, casts to the compute dtype, and applies delta' = softplus(delta + delta_bias)."""
    _check_inputs(u, delta, A, B, C, D, delta_bias, h0)
    dt = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    D = None if D is None else D.to(dt)
    h0 = None if h0 is None else h0.to(dt)
    return u, delta, A, B, C, D, h0


# ---------------------------------------------------------------------------------------------
# 1. The reference: one step per position.
# ---------------------------------------------------------------------------------------------
def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
                       h0=None, return_last_state=False):
    """The S6 selective scan as an obvious loop over time (the official kernel's layout).

    u, delta: (B, K*D, L)   A: (K*D, N)   B, C: (B, K, N, L), shared by the D channels of a group
    D, delta_bias: (K*D,) or None         h0: initial state (B, K*D, N) or None (zeros)

    For every channel c (in group k = c // D) and time t:
        delta'_t = softplus(delta_t + delta_bias[c])     (only if delta_softplus)
        h_t      = exp(delta'_t * A[c]) * h_{t-1} + delta'_t * B[k, :, t] * u_t     # (N,)
        y_t      = sum_n C[k, n, t] * h_t[n] + D[c] * u_t
    Computed in float32 (float64 for float64 u); returns y (B, K*D, L) in that dtype, and the
    last state h_L (B, K*D, N) as well if return_last_state.
    """
    u, delta, A, B, C, D, h0 = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus, h0)
    batch, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    B = B.repeat_interleave(KD // K, dim=1)                  # (B, K*D, N, L)
    C = C.repeat_interleave(KD // K, dim=1)                  # (B, K*D, N, L)
    h = u.new_zeros(batch, KD, N) if h0 is None else h0      # (B, K*D, N)
    ys = []
    for t in range(L):
        dt_t = delta[:, :, t, None]                          # (B, K*D, 1)
        h = torch.exp(dt_t * A) * h + dt_t * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))                   # (B, K*D)
    y = torch.stack(ys, dim=-1) if L else u.new_zeros(batch, KD, 0)  # (B, K*D, L)
    if D is not None:
        y = y + D[:, None] * u
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------
# 2. The chunked scan.
# ---------------------------------------------------------------------------------------------
def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
                   chunk_size=32, h0=None, return_last_state=False):
    """The selective scan of `selective_scan_ref`, computed chunk by chunk.

    Same arguments and result; chunk_size T only changes the speed (and float rounding).

    1. Cut the sequence into M chunks of T steps, padding with delta' = 0 (decay 1, input 0:
       padded steps leave the state alone), and lay everything out time-major (T, ...).
    2. Intra-chunk: run the recurrence inside all M chunks at once, each from a zero state, for
       T steps. This gives y_intra and each chunk's own end state H_m.
    3. Inter-chunk: chain the chunks, E_m = exp(A * S_m) * E_{m-1} + H_m (S_m: the chunk's sum of
       delta'), with a log-step (Hillis-Steele) scan over m. The state entering chunk m is
       E_{m-1} (h0 for the first).
    4. Fix-up: y_t += sum_n C_t[n] * exp(A[n] * s_t) * E_{m-1}[n], s_t the sum of delta' in the
       chunk up to and including t.
    Stability: every exponent is A (<= 0) times a sum of delta' (>= 0), so every factor is a
    decay <= 1. Nothing is divided by a decay (dividing by exp(cumsum) overflows to NaN).
    Cost: each exp(A * delta') is computed twice (steps 2 and 4); recomputing is cheaper than
    storing a (B, K*D, L, N) tensor, which this function never materialises.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be an int >= 1, got {chunk_size!r}")
    u, delta, A, B, C, D, h0 = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus, h0)
    batch, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    Dk = KD // K
    if L == 0:
        y, h = u.new_zeros(batch, KD, 0), (u.new_zeros(batch, KD, N) if h0 is None else h0)
        return (y, h) if return_last_state else y

    # 1. chunks, time-major
    T = min(chunk_size, L)
    M = -(-L // T)

    def time_major(t):                                       # (B, c, L) -> (T, B, c, M)
        c = t.shape[1]
        t = F.pad(t, (0, M * T - L)).view(batch, c, M, T)    # (B, c, M, T)
        return t.permute(3, 0, 1, 2).contiguous()            # (T, B, c, M)

    dt = time_major(delta).view(T, batch, K, Dk, M)          # (T, B, K, D, M)
    x = time_major(delta * u).view(T, batch, K, Dk, M)       # (T, B, K, D, M)  input * delta'
    Bt = time_major(B.flatten(1, 2)).view(T, batch, K, N, M)
    Bt = Bt.transpose(3, 4).unsqueeze(3).contiguous()        # (T, B, K, 1, M, N)
    Ct = time_major(C.flatten(1, 2)).view(T, batch, K, N, M)
    Ct = Ct.transpose(3, 4).unsqueeze(3).contiguous()        # (T, B, K, 1, M, N)
    Ak = A.view(1, K, Dk, 1, N)                              # (1, K, D, 1, N)

    # 2. intra-chunk recurrence from zero, all chunks at once
    H, y = _scan_chunks(dt, x, Bt, Ct, Ak)                   # (B, K, D, M, N), (T, B, K, D, M)

    # 3. inter-chunk: inclusive log-step scan of (decay, state) pairs over the M chunks
    s = dt.cumsum(0)                                         # (T, B, K, D, M)
    E = _chain_chunks(H, s[-1], Ak, h0)                      # (B, K, D, M, N) state after m
    start = E.new_zeros(batch, K, Dk, 1, N) if h0 is None else h0.view(batch, K, Dk, 1, N)
    h_in = torch.cat([start, E[..., :-1, :]], dim=-2)        # (B, K, D, M, N) state entering m

    # 4. fix-up: add what the entering state contributes at every step
    y = y + (Ct * torch.exp(s[..., None] * Ak) * h_in).sum(-1)        # (T, B, K, D, M)

    y = y.permute(1, 2, 3, 4, 0).reshape(batch, KD, M * T)[..., :L]   # (B, K*D, L)
    if D is not None:
        y = y + D[:, None] * u
    if return_last_state:
        return y, E[..., -1, :].reshape(batch, KD, N)
    return y


def _scan_chunks(dt, x, Bt, Ct, Ak):
    """Step 2: T steps of h = exp(delta' A) h + x B, y = C . h, over all chunks at once.

    dt, x (T, B, K, D, M); Bt, Ct (T, B, K, 1, M, N); Ak (1, K, D, 1, N).
    Uses torch's `scan` operator, which torch.compile turns into one fused C++/Triton kernel per
    step instead of unrolling T steps into a huge graph (slow to compile, and seen miscompiled).
    """
    def step(h, inputs):                                     # h (B, K, D, M, N)
        dt_t, x_t, B_t, C_t, A_t = inputs
        h = torch.exp(dt_t[..., None] * A_t) * h + x_t[..., None] * B_t
        # clone: scan's carry must not alias its output (torch.compile rejects the graph)
        return h.clone(), (h * C_t).sum(-1)                  # (B, K, D, M)

    h = x.new_zeros(x.shape[1:] + (Ak.shape[-1],))           # (B, K, D, M, N)
    if not torch.compiler.is_compiling():
        # Eager: a plain loop. The operator re-traces `step` on every eager call (slow for small
        # inputs) and fails under torch.utils.checkpoint's recomputation.
        ys = []
        for inputs in zip(dt, x, Bt, Ct):
            h, y_t = step(h, inputs + (Ak,))
            ys.append(y_t)
        return h, torch.stack(ys)                            # (B,K,D,M,N), (T, B, K, D, M)
    # A enters as a (broadcast) per-step input, not through the closure: with A captured by the
    # closure, torch 2.13's compiled backward returned a wrong dL/dA (relative error 0.57).
    A_steps = Ak.expand((dt.shape[0],) + Ak.shape)           # (T, 1, K, D, 1, N), no copy
    return _hop_scan(step, h, (dt, x, Bt, Ct, A_steps))


def _chain_chunks(H, S, Ak, h0):
    """Step 3: E_m = exp(A S_m) E_{m-1} + H_m for all m, in ceil(log2 M) doubling rounds.

    H (B, K, D, M, N) chunk end states from zero; S (B, K, D, M) chunk sums of delta'.
    After the round with offset o, E_m covers chunks m-2o+1..m and S_m their summed delta'.
    """
    M = H.shape[-2]
    if h0 is not None:                                       # fold h0 into the first chunk
        h0 = h0.view(H.shape[:3] + (1, -1))                  # (B, K, D, 1, N)
        first = H[..., :1, :] + torch.exp(Ak * S[..., :1, None]) * h0
        H = torch.cat([first, H[..., 1:, :]], dim=-2)
    E, o = H, 1
    while o < M:
        carried = torch.exp(Ak * S[..., o:, None]) * E[..., :-o, :]          # (B, K, D, M-o, N)
        E = torch.cat([E[..., :o, :], E[..., o:, :] + carried], dim=-2)      # (B, K, D, M, N)
        S = torch.cat([S[..., :o], S[..., o:] + S[..., :-o]], dim=-1)        # (B, K, D, M)
        o *= 2
    return E


# ---------------------------------------------------------------------------------------------
# 3. Cross-scan and cross-merge: the four routes over an (H, W) map.
# ---------------------------------------------------------------------------------------------
def cross_scan(x):
    """(B, D, H, W) -> (B, 4, D, L): the four routes of VMamba's Cross-Scan Module.

    Route 0 row-major (l = h*W + w), route 1 column-major (l = w*H + h), routes 2 and 3 the
    same two reversed.
    """
    if x.dim() != 4:
        raise ValueError(f"cross_scan: x must be (B, D, H, W), got shape {tuple(x.shape)}")
    rows = x.flatten(2)                                      # (B, D, L)  row-major
    cols = x.transpose(2, 3).flatten(2)                      # (B, D, L)  column-major
    fwd = torch.stack([rows, cols], dim=1)                   # (B, 2, D, L)
    return torch.cat([fwd, fwd.flip(-1)], dim=1)             # (B, 4, D, L)


def cross_merge(ys):
    """(B, 4, D, H, W) -> (B, D, L): undo each route's order and sum (the adjoint of cross_scan).

    ys[:, k] holds route k's outputs in route k's own order, viewed as an (H, W) grid only for
    its shape: route 1/3 sequences are column-major, so they are read as (W, H) and transposed.
    """
    if ys.dim() != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge: ys must be (B, 4, D, H, W), got shape {tuple(ys.shape)}")
    batch, _, D, H, W = ys.shape
    ys = ys.flatten(3)                                       # (B, 4, D, L)
    ys = ys[:, :2] + ys[:, 2:].flip(-1)                      # (B, 2, D, L)  un-reverse 2 and 3
    rows = ys[:, 0]                                          # (B, D, L)
    cols = ys[:, 1].view(batch, D, W, H).transpose(2, 3)     # (B, D, H, W)
    return rows + cols.reshape(batch, D, H * W)              # (B, D, L)
