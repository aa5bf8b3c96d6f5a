"""The selective scan (S6) and the cross-scan of VMamba, in plain PyTorch.

VMamba (Liu et al., arXiv 2401.10166) unfolds a feature map along four routes, runs Mamba's
selective scan along each, and folds the four results back. This file holds that math as pure
functions of tensors; `vmamba_min.py` owns the parameters and calls them.

Letters: b batch (B is the scan's input matrix), H, W feature map, L = H*W sequence length,
K scan routes (groups), D channels per route, N state size, T chunk length, M = number of chunks
(ceil(L / T)).

Two implementations of one signature (scan_assoc.py holds two more):
  selective_scan_ref  the obvious loop over time, the readable reference;
  selective_scan      a chunked scan, exact at any chunk size, that torch.compile fuses, with
                      a path of its own for N = 1 (`_ScanState1`); on CUDA under
                      torch.compile it hands the call to scan_assoc.selective_scan_assoc
                      (`_use_assoc`).
"""
import torch
import torch._functorch.config
import torch.nn.functional as F
from torch._higher_order_ops import scan as _hop_scan

__all__ = ["selective_scan_ref", "selective_scan", "cross_scan", "route", "route_each",
           "cross_merge", "allow_compile"]

# Compiled training, torch 2.13 and 2.14.1: Inductor gives the backward graph's "donated
# buffers" (saved tensors it may overwrite once read) by their position among the graph's
# inputs, and applied the same positions to the inputs of the loops lowered from the `scan`
# operator (pytorch#193960, fixed upstream after 2.14.1). A loop body then updated a carry in
# place in its initial buffer, which Inductor recycled after the loop while the result still
# lived there: chained compiled scans got wrong gradients (dL/dA off by up to 640%; test_scan.py:
# test_chained_compiled_scans_match_eager). Which inputs were hit depended on the graph, so no
# rewrite of the loops can rule it out. Off for the whole process: compiled backward graphs then
# keep their saved tensors instead of reusing that memory.
torch._functorch.config.donated_buffer = False


def allow_compile():
    """Let a plain torch.compile (fullgraph=False) compile the chunked scan. Called by
    vmamba_min.VSSM; call it yourself before compiling `selective_scan` on its own.

    torch 2.13's Inductor lowers the `scan` operator to a while-loop whose body calls .item() on
    the loop counter (torch/_inductor/fx_passes/post_grad.py, decompose_scan_to_while_loop).
    Dynamo allows such scalar outputs only with fullgraph=True or with capture_scalar_outputs
    (torch/_dynamo/output_graph.py); without it torch.compile(model) failed with
    DataDependentOutputException. Side effect for the whole process: .item() calls inside other
    compiled code are captured in the graph instead of breaking it. Importing torch._dynamo
    takes about a second, so this runs on first use, not on import.
    """
    import torch._dynamo
    torch._dynamo.config.capture_scalar_outputs = True


# ---------------------------------------------------------------------------------------------
# Input checks shared by both scans: bad shapes fail loudly, never broadcast into nonsense.
# ---------------------------------------------------------------------------------------------
def _check_inputs(u, delta, A, B, C, D, delta_bias, h0, delta_softplus, who="selective_scan",
                  return_last_state=False):
    """Raise a ValueError naming `who` (the function the user called) and every shape."""
    def fail(msg):
        shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in
                           (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C))
                           if isinstance(t, torch.Tensor))
        raise ValueError(f"{who}: {msg} (got {shapes})")

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
    given = {n: t for n, t in named.items() if t is not None}
    if len({t.device for t in given.values()}) > 1:
        fail("all tensors must be on one device, got " +
             ", ".join(f"{n} on {t.device}" for n, t in given.items()))
    if not isinstance(delta_softplus, bool):
        fail(f"delta_softplus must be True or False, got {delta_softplus!r}")
    if not isinstance(return_last_state, bool):
        fail(f"return_last_state must be True or False, got {return_last_state!r}")
    batch, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    if N < 1:
        fail("A must be (K*D, N) with a state size N >= 1")
    if delta.shape != u.shape:
        fail(f"delta must have the shape of u (b, K*D, L) = {tuple(u.shape)}")
    if A.shape[0] != KD:
        fail(f"A must be (K*D, N) with K*D = {KD}")
    if K < 1 or KD % K != 0:
        fail(f"K*D = {KD} (u.shape[1]) is not divisible by K = {K} (B.shape[1])")
    if B.shape != (batch, K, N, L):
        fail(f"B must be (b, K, N, L) = {(batch, K, N, L)}")
    if C.shape != B.shape:
        fail(f"C must have the shape of B {tuple(B.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (KD,):
            fail(f"{name} must be (K*D,) = ({KD},), got {tuple(t.shape)}")
    if h0 is not None and h0.shape != (batch, KD, N):
        fail(f"h0 must be (b, K*D, N) = {(batch, KD, N)}, got {tuple(h0.shape)}")


def _compute_dtype(u):
    # The official kernels scan in float32 whatever the input dtype (bf16/fp16 states lose the
    # recurrence within a few hundred steps); float64 is kept so tests have an exact reference.
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _cast(u, delta, A, B, C, D, delta_bias, h0):
    """Every tensor argument in the compute dtype (the optional ones may be None)."""
    dt = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dt) for t in (u, delta, A, B, C))
    D, delta_bias, h0 = (None if t is None else t.to(dt) for t in (D, delta_bias, h0))
    return u, delta, A, B, C, D, delta_bias, h0


def _is_empty(u):
    """Nothing to scan: the loop operators reject an empty scan dim, and reshapes of an empty
    batch are ambiguous, so the scans answer such calls with `_empty_result`."""
    return u.numel() == 0


def _empty_result(u, A, h0, return_last_state, others=()):
    """A scan's result for an empty u: y of u's shape, and the last state, h0 (or zeros). y is
    computed from u and the other inputs given (times zero, an empty tensor: no value changes),
    so that a backward through it runs, as through the reference, and gives empty or zero
    gradients."""
    batch, KD, L = u.shape
    y = u * 0
    for t in others:
        if t is not None:
            y = y + t.sum() * 0
    h = u.new_zeros(batch, KD, A.shape[1]) if h0 is None else h0.clone()
    return (y, h) if return_last_state else y


def _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus, h0, return_last_state):
    """Checks, casts to the compute dtype, and applies delta' = softplus(delta + delta_bias)."""
    _check_inputs(u, delta, A, B, C, D, delta_bias, h0, delta_softplus, "selective_scan_ref",
                  return_last_state)
    dt = _compute_dtype(u)
    u, delta, A, B, C = (t.to(dt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dt)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    D = None if D is None else D.to(dt)
    h0 = None if h0 is None else h0.to(dt)
    return u, delta, A, B, C, D, h0


def _softplus(z):
    """delta' = softplus(z) = log(1 + e^z) (z itself above 20, as torch and the official kernels).

    F.softplus, except in compiled code for devices other than CUDA (the CPU): there the same
    function with log in place of log1p, log1p(w) = log(u) - (u - 1 - w) / u with u = 1 + w (the
    second term restores what rounding 1 + w lost; about 1 ulp). Why: some torch builds
    (2.14.1+cu130 on a CPU) have a log1p several times slower than log, inside Inductor's
    kernels too; in eager mode F.softplus is the faster of the two. On CUDA (the slow log1p was
    a CPU build's) the longer form pushed the associative scan's shifted decays past Inductor's
    limit on ops it recomputes in a consumer (torch 2.14.1): they got a kernel of their own
    (docs/design.md).
    """
    if not torch.compiler.is_compiling() or z.is_cuda:
        return F.softplus(z)
    w = torch.exp(torch.clamp(z, max=20.0))
    u = 1 + w
    return torch.where(z > 20, z, torch.log(u) - (u - 1 - w) / u)


def _delta_prime(delta, delta_bias, softplus):
    """delta' = softplus(delta + delta_bias), each part only if given (delta_bias None, softplus
    False): the scans' step sizes, (b, K*D, L)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return _softplus(delta) if softplus else delta


# ---------------------------------------------------------------------------------------------
# 1. The reference: one step per position.
# ---------------------------------------------------------------------------------------------
def selective_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
                       h0=None, return_last_state=False):
    """The S6 selective scan as an obvious loop over time (the official kernel's layout).
    Official: mamba_ssm's selective_scan_ref (VMamba's csms6s.selective_scan_torch).

    u, delta: (b, K*D, L)   A: (K*D, N)   B, C: (b, K, N, L), shared by the D channels of a group
    D, delta_bias: (K*D,) or None         h0: initial state (b, K*D, N) or None (zeros)

    For every channel c (in group k = c // D) and time t:
        delta'_t = softplus(delta_t + delta_bias[c])     (only if delta_softplus)
        h_t      = exp(delta'_t * A[c]) * h_{t-1} + delta'_t * B[k, :, t] * u_t     # (N,)
        y_t      = sum_n C[k, n, t] * h_t[n] + D[c] * u_t
    Computed in float32 (float64 for float64 u); returns y (b, K*D, L) in that dtype, and the
    last state h_L (b, K*D, N) as well if return_last_state.
    """
    u, delta, A, B, C, D, h0 = _prepare(u, delta, A, B, C, D, delta_bias, delta_softplus, h0,
                                        return_last_state)
    batch, KD, L = u.shape
    K, N = B.shape[1], A.shape[1]
    B = B.repeat_interleave(KD // K, dim=1)                  # (b, K*D, N, L)
    C = C.repeat_interleave(KD // K, dim=1)                  # (b, K*D, N, L)
    h = u.new_zeros(batch, KD, N) if h0 is None else h0      # (b, K*D, N)
    ys = []
    for t in range(L):
        dt_t = delta[:, :, t, None]                          # (b, K*D, 1)
        h = torch.exp(dt_t * A) * h + dt_t * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))                   # (b, K*D)
    y = torch.stack(ys, dim=-1) if L else u.new_zeros(batch, KD, 0)  # (b, K*D, L)
    if D is not None:
        y = y + D[:, None] * u
    return (y, h) if return_last_state else y


# ---------------------------------------------------------------------------------------------
# 2. The chunked scan, with a backward that recomputes instead of storing.
# ---------------------------------------------------------------------------------------------
def selective_scan(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False, *,
                   chunk_size=None, h0=None, return_last_state=False):
    """The selective scan of `selective_scan_ref`, computed chunk by chunk.

    Same arguments and result; chunk_size T only changes the speed (and float rounding). None
    picks it by state size: 64 for N >= 8 (fewer chunks: less chain, fix-up and saved state
    per step of the (.., N) state), 32 for N = 2..7, 8 for N = 1 (the path below unrolls T).

    N = 1 (the v2 models) takes its own path, `_ScanState1`: the state of a channel is one
    number, so the per-step states are no bigger than u and may be kept; the scan becomes the
    plain recurrence h_t = a_t h_{t-1} + x_t, in chunks, with T unrolled steps instead of a loop
    operator (why: `_ScanState1`). Everything else in this docstring is the N > 1 path.

    Forward:
    1. Cut the sequence into M chunks of T steps, padding with delta' = 0 (decay 1, input 0:
       padded steps leave the state alone), and lay everything out time-major (T, ...).
    2. Intra-chunk: run the recurrence inside all M chunks at once, each from a zero state, for
       T steps. This gives y_intra and each chunk's own end state H_m.
    3. Inter-chunk: chain the chunks, E_m = exp(A * S_m) * E_{m-1} + H_m (S_m: the chunk's sum of
       delta'), with a log-step (Hillis-Steele) scan over m. The state entering chunk m is
       E_{m-1} (h0 for the first).
    4. Fix-up: y_t += sum_n C_t[n] * exp(A[n] * s_t) * E_{m-1}[n], s_t the sum of delta' in the
       chunk up to and including t.
    Backward (`_ChunkedScan.backward`, derived there): saves only the inputs and the M
    chunk-entry states (b, K*D, M, N), and recomputes the rest chunk by chunk.
    Stability: every exponent is A (<= 0) times a sum of delta' (>= 0), so every factor is a
    decay <= 1. Nothing is divided by a decay (dividing by exp(cumsum) overflows to NaN). A > 0
    (growth, outside the models' domain, where A = -exp(A_log)) is not supported: a factor
    exp(A s) of the chunk arithmetic can overflow to inf where the reference stays finite, and
    inf times a zero state is NaN.
    Under torch.compile without fullgraph=True, call allow_compile() first (a model does it
    when built): Inductor's loop for this scan needs Dynamo's capture_scalar_outputs.
    Cost: each exp(A * delta') is computed twice (steps 2 and 4); recomputing is cheaper than
    storing a (b, K*D, L, N) tensor, which the forward never materialises.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or
                                   not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"selective_scan: chunk_size must be None or an int >= 1, got "
                         f"{chunk_size!r}")
    _check_inputs(u, delta, A, B, C, D, delta_bias, h0, delta_softplus,
                  return_last_state=return_last_state)
    if _use_assoc(u, A):                # the one place that picks the associative scan
        return scan_assoc.selective_scan_assoc(u, delta, A, B, C, D, delta_bias, delta_softplus,
                                               h0=h0, return_last_state=return_last_state)
    N = A.shape[1]
    if chunk_size is None:
        chunk_size = 64 if N >= 8 else 32 if N > 1 else 8
    u, delta, A, B, C, D, delta_bias, h0 = _cast(u, delta, A, B, C, D, delta_bias, h0)
    if _is_empty(u):
        return _empty_result(u, A, h0, return_last_state, (delta, A, B, C, D, delta_bias))
    L = u.shape[-1]
    if torch.jit.is_tracing():     # a size is a traced tensor there, which apply cannot take
        L = int(L)                 # (the trace fails with "unordered_map::at")
    y, h_last, _ = _scan_function(N).apply(u, delta, A, B, C, D, delta_bias, h0,
                                           delta_softplus, min(chunk_size, L))
    return (y, h_last) if return_last_state else y


def _use_assoc(u, A):
    """Whether selective_scan hands the call to scan_assoc.selective_scan_assoc: on CUDA under
    torch.compile, where Inductor makes the associative scan one Triton kernel but lowers the
    `scan` loops below to a host-side loop of per-step kernels. Not in eager mode: there torch's
    associative_scan runs a generic log-depth recursion (a few kernels per level) behind a Dynamo
    trace per new shape; and not on a CPU, where Inductor has no scan codegen at all.
    Symbolic sizes (dynamic=True, or Dynamo's automatic dynamic after a new shape): Dynamo lifts
    them into the combine function; Inductor before torch 2.13 rejects that ("Unable to generate
    code for associative_scan op, because there are lifted arguments", pytorch#181584), 2.13
    accepts unused ones. Traced code cannot tell a symbolic size from an int the same way on
    every release (Dynamo's answer to n.__class__ changed between 2.11, 2.13 and 2.14), so on
    torch < 2.13 the associative scan is taken only where no size can be symbolic:
    torch.compile(..., dynamic=False) (`_sizes_static_by_config`).
    (To force it anywhere: call selective_scan_assoc, or VSSMConfig(scan="assoc").)"""
    return (u.is_cuda and torch.compiler.is_compiling()
            and (_LOWERS_SYMBOLIC_SIZES or _sizes_static_by_config()))


# Inductor lowers an associative_scan whose combine function was given unused size symbols
# (torch >= 2.13; 2.11 raises, see _use_assoc).
_LOWERS_SYMBOLIC_SIZES = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


def _sizes_static_by_config():
    """Whether Dynamo keeps every size an int: torch.compile(dynamic=False) sets these two
    options while it traces (read from traced code, they are constants of the trace)."""
    config = torch._dynamo.config
    return config.assume_static_by_default and not config.automatic_dynamic_shapes


def _differentiated():
    """Whether a backward below runs to be differentiated again: grad mode on inside a backward
    means create_graph=True (double backward: a gradient penalty, a Hessian-vector product;
    torch.autograd.functional's jvp, hvp and hessian) or a torch.func transform (grad, jacrev:
    they always build the graph). Then the backward recomputes the forward's states from the
    saved inputs with autograd recording, so its result is differentiable like any other
    function of the inputs; the states the forward saved were computed outside autograd and
    would enter the second derivative as constants (that gave second derivatives off by
    20-136% for a model's parameters under an input-gradient penalty). Not while compiling:
    AOTAutograd traces the backward with grad mode on but refuses a compiled function's double
    backward itself ("does not currently support double backward")."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _forward_mode(forward, ctx, tangents):
    """Forward-mode derivatives under torch.func (jvp, jacfwd; jvp over grad, and hessian, which
    is jacfwd over jacrev) of a scan Function: its forward is plain tensor code, so
    torch.func.jvp of it, run again on the saved inputs, gives the tangents of y and the last
    state (the saved states get none). Forward mode nested in forward mode (jvp of jvp, jacfwd
    of jacfwd) is refused: the saved inputs carry no outer tangent, so it came out wrong. So is
    forward mode outside torch.func's jvp transform (torch.autograd.forward_ad's dual tensors,
    torch.func.linearize, gradcheck's check_forward_ad), where torch.func.jvp would nest in it
    and torch's own error ("Nested forward mode AD is not supported") names none of them."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    levels = sum(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    if levels == 0:          # forward AD outside torch.func.jvp: the jvp below would nest in it
        raise RuntimeError(
            "selective_scan: forward mode outside torch.func.jvp/jacfwd (torch.autograd."
            "forward_ad's dual tensors, torch.func.linearize, gradcheck's check_forward_ad) "
            "is not supported by the chunked scan; use torch.func.jvp or jacfwd, or "
            "scan=\"reference\" (selective_scan_ref)")
    if levels > 1:
        raise RuntimeError(
            "selective_scan: forward mode nested in forward mode (jvp of jvp, jacfwd of "
            "jacfwd) is not supported by the chunked scan; use reverse mode for the outer "
            "derivative (jacrev, hessian) or scan=\"reference\" (selective_scan_ref)")
    inputs = list(ctx.saved_tensors[:8])                      # u ... h0, None where not given
    given = [i for i, t in enumerate(inputs) if t is not None]

    def outputs(*values):
        for i, v in zip(given, values):
            inputs[i] = v
        return forward(*inputs, ctx.softplus, ctx.T)[:2]
    tangents = tuple(torch.zeros_like(inputs[i]) if tangents[i] is None else tangents[i]
                     for i in given)
    _, (ty, th) = torch.func.jvp(outputs, tuple(inputs[i] for i in given), tangents)
    return ty, th, None


def _keep(ctx, inputs, output):
    """setup_context of both scan Functions: the inputs (for the backward, and for forward mode)
    and the forward's third output, the states the backward reads (not differentiable). The
    same tensors for both: under torch.func.vmap, torch's generated batching rule records one
    list of batch dims per ctx, and a second, shorter list (save_for_forward's 8) replaced the
    first, so the backward of a vmapped scan failed ("flat_bdims must not be None")."""
    u, delta, A, B, C, D, delta_bias, h0, softplus, T = inputs
    ctx.mark_non_differentiable(output[2])
    saved = (u, delta, A, B, C, D, delta_bias, h0, output[2])
    ctx.save_for_backward(*saved)
    ctx.save_for_forward(*saved)
    ctx.softplus, ctx.T = softplus, T
    ctx.set_materialize_grads(False)


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan as one autograd node: autograd through the step loop would keep every
    step's state (the (batch, K*D, L, N) tensor, about 29x the call's inputs and output).

    Backward, for one channel (scalars delta'_t, u_t; vectors over n: A, B_t, C_t, h_t), with
    a_t = exp(delta'_t A), x_t = delta'_t u_t, upstream gradients dy_t and dh_L (last state):
    1. The adjoint state g_t = dL/dh_t obeys the reverse recurrence
           g_t = C_t dy_t + a_{t+1} g_{t+1},    g_{L-1} = C_{L-1} dy_{L-1} + dh_L,
       the forward recurrence run backwards with the same decays: it is chunked the same way.
    2. Each chunk's adjoint from zero, as it leaves the chunk's first step:
           G_m = sum_{t in m} exp(A s_t) C_t dy_t        (s_t: delta' summed up to t in m)
       where exp(A s_t) is the product of the chunk's decays a up to step t.
    3. Chain the chunks right to left, g_out_m = G_{m+1} + exp(A S_{m+1}) g_out_{m+1},
       g_out_{M-1} = dh_L: the adjoint arriving at chunk m's last step from the chunks after it.
    4. Recompute inside every chunk, from the saved entry state, the state before each step,
       h_{t-1} (kept as a_t h_{t-1}, the form step 5 reads), and with it dC_t = dy_t h_t
       (summed over the group). This pass also gives G
       (step 2 needs only the decays, which it computes anyway), so it runs before step 3.
    5. Run step 1 backwards through every chunk from g_out_m and read the gradients off it:
           du_t  = delta'_t <B_t, g_t> + D dy_t      dB_t = x_t g_t   (summed over the group)
           ddelta'_t = u_t <B_t, g_t> + <A, a_t h_{t-1} g_t>
           dA   = sum_t delta'_t a_t h_{t-1} g_t     dD = sum_t dy_t u_t     dh0 = a_0 g_0
    6. Through the softplus: d(delta + bias) = ddelta' * sigmoid(delta + bias), and
       sigmoid(z) = 1 - exp(-softplus(z)), so delta' is enough.
    Same stability rule as the forward: only decays, no division. Saved: the inputs and the
    chunk-entry states (batch, K*D, M, N), N/T times the size of u (1/4 at N = 16, T = 64); the
    backward recomputes delta' and the time-major copies. Backward alone holds a_t h_{t-1} for
    every step (step 4), one (batch, K*D, L, N) tensor, while it runs.
    The backward is differentiable: where it will be differentiated again (`_differentiated`) it
    recomputes the chunk-entry states under autograd, and autograd records steps 2-6.
    """

    generate_vmap_rule = True         # torch.func.vmap runs the methods below batched

    @staticmethod
    def forward(u, delta, A, B, C, D, delta_bias, h0, softplus, T):
        lay = _Layout(u, B, T)
        dt, ut, Bt, Ct, Ak, h0k = _chunked_inputs(lay, u, delta, A, B, C, delta_bias, h0,
                                                  softplus)
        y, h_in, h_last = _chunked_forward(dt, dt * ut, Bt, Ct, Ak, h0k)
        y = lay.unchan(y)                                     # (b, K*D, L), a view
        # Outputs of their own, not views (autograd refuses in-place ops on a Function's view
        # outputs, and this one is not contiguous when T does not divide L): the sum with D u
        # makes one; without D, a copy.
        y = y.clone(memory_format=torch.contiguous_format) if D is None else y + D[:, None] * u
        # (b, K*D, L), (b, K*D, N); and the chunk-entry states for the backward
        return y, h_last.reshape(lay.batch, lay.KD, -1).clone(), h_in

    setup_context = staticmethod(_keep)

    @staticmethod
    def backward(ctx, gy, gh, _):
        u, delta, A, B, C, D, delta_bias, h0, h_in = ctx.saved_tensors
        lay = _Layout(u, B, ctx.T)
        dt, ut, Bt, Ct, Ak, h0k = _chunked_inputs(lay, u, delta, A, B, C, delta_bias, h0,
                                                  ctx.softplus)
        x = dt * ut
        if _differentiated():
            h_in = _chunked_forward(dt, x, Bt, Ct, Ak, h0k)[1]
        gyt = torch.zeros_like(dt) if gy is None else lay.chan(gy)     # (T, b, K, D, M)
        ghk = None if gh is None else lay.state_view(gh)
        gBg, dd, dB, dC, dA, dh0 = _chunked_backward(dt, x, Bt, Ct, Ak, h_in, gyt, ghk)
        du = dt * gBg                                         # (T, b, K, D, M)
        ddp = ut * gBg + dd                                   # dL/ddelta'
        dD = None
        if D is not None:
            du = du + D.reshape(lay.K, lay.Dk, 1) * gyt
            dD = (gyt * ut).sum((0, 1, 4)).reshape(-1)
        dz = ddp * -torch.expm1(-dt) if ctx.softplus else ddp     # step 6
        dz = lay.unchan(dz)                                   # (b, K*D, L)
        dbias = dz.sum((0, 2)) if delta_bias is not None else None
        return (lay.unchan(du), dz, dA.reshape(A.shape), lay.ungroup(dB), lay.ungroup(dC), dD,
                dbias, dh0.reshape(lay.batch, lay.KD, -1) if h0 is not None else None, None,
                None)


def _chunked_inputs(lay, u, delta, A, B, C, delta_bias, h0, softplus):
    """The chunked scan's operands in its time-major layout: delta' and u (T, b, K, D, M), B and
    C (T, b, K, 1, M, N), A (1, K, D, 1, N) and h0 (b, K, D, 1, N) or None. The forward computes
    them, and the backward again from the saved inputs (copies it makes while it runs, rather
    than tensors kept from the forward to the backward)."""
    dt = lay.chan(_delta_prime(delta, delta_bias, softplus))   # delta' (T, b, K, D, M)
    h0k = None if h0 is None else lay.state_view(h0)
    return dt, lay.chan(u), lay.group(B), lay.group(C), lay.state_view(A), h0k


class _Layout:
    """Time-major chunk layout: (batch, c, L) <-> (T, batch, c, M), zero-padded to M*T."""

    def __init__(self, u, B, T):
        self.batch, self.KD, self.L = u.shape
        self.K, self.N = B.shape[1], B.shape[2]
        self.Dk, self.T = self.KD // self.K, T
        self.M = -(-self.L // T)

    def _tm(self, t):                                         # (batch, c, L) -> (T, batch, c, M)
        c = t.shape[1]
        t = F.pad(t, (0, self.M * self.T - self.L)).view(self.batch, c, self.M, self.T)
        return t.permute(3, 0, 1, 2).contiguous()

    def chan(self, t):                                        # (batch, K*D, L) -> (T, b, K, D, M)
        return self._tm(t).view(self.T, self.batch, self.K, self.Dk, self.M)

    def unchan(self, t):                                      # (T, b, K, D, M) -> (batch, K*D, L)
        # Copied to (b, K*D, M*T) order: with M = 1 a reshape would be a view with time-major
        # strides, whose symbolic form (min(...)) torch 2.11's export cannot prove guards on.
        t = t.permute(1, 2, 3, 4, 0).contiguous().view(self.batch, self.KD, self.M * self.T)
        return t[..., :self.L]

    def group(self, t):                                       # (b, K, N, L) -> (T, b, K, 1, M, N)
        t = self._tm(t.flatten(1, 2)).view(self.T, self.batch, self.K, self.N, self.M)
        return t.transpose(3, 4).unsqueeze(3).contiguous()

    def ungroup(self, t):                                     # (T, b, K, M, N) -> (b, K, N, L)
        t = t.permute(1, 2, 4, 3, 0).reshape(self.batch, self.K, self.N, self.M * self.T)
        return t[..., :self.L]

    def state_view(self, t):                                  # (.., K*D, N) -> (.., K, D, 1, N)
        return t.reshape(t.shape[:-2] + (self.K, self.Dk, 1, self.N))


def _chunked_forward(dt, x, Bt, Ct, Ak, h0):
    """Forward steps 2-4. Returns y (T, b, K, D, M), the chunk-entry states h_in
    (b, K, D, M, N) and the last state (b, K, D, 1, N)."""
    H, y = _scan_chunks(dt, x, Bt, Ct, Ak)                   # (b, K, D, M, N), (T, b, K, D, M)
    s = dt.cumsum(0)                                         # (T, b, K, D, M)
    E = _chain_chunks(H, s[-1], Ak, h0)                      # (b, K, D, M, N) state after m
    start = E.new_zeros(E.shape[:3] + (1, E.shape[-1])) if h0 is None else h0
    h_in = torch.cat([start, E[..., :-1, :]], dim=-2)        # (b, K, D, M, N) state entering m
    y = y + _in_slices(lambda sl: (Ct[sl] * torch.exp(s[sl, ..., None] * Ak) * h_in).sum(-1),
                       s.shape[0], torch.cat)            # (T, b, K, D, M)
    return y, h_in, E[..., -1:, :]


def _chunked_backward(dt, x, Bt, Ct, Ak, h_in, gyt, gh):
    """Backward steps 2-5 (see _ChunkedScan). gyt (T, b, K, D, M); gh (b, K, D, 1, N) or None.
    Returns <B_t, g_t> and <A, a_t h_{t-1} g_t> (T, b, K, D, M), dB and dC (T, b, K, M, N),
    dA (K, D, N) and dh0 (b, K, D, N)."""
    # 4. and 2. one pass forward through every chunk: a_t h_{t-1}, dC_t and G_m
    ah, dC, G = _states_before(dt, x, Bt, Ct, gyt, Ak, h_in)
    # 3. the adjoint arriving at each chunk's last step from the chunks to its right
    last = torch.zeros_like(h_in[..., :1, :]) if gh is None else gh        # (b, K, D, 1, N)
    if h_in.shape[-2] > 1:
        Gr, Sr = G.flip(-2)[..., :-1, :], dt.sum(0).flip(-1)[..., :-1]     # chunks M-1..1
        g_out = torch.cat([_chain_chunks(Gr, Sr, Ak, gh).flip(-2), last], dim=-2)
    else:
        g_out = last                                                        # (b, K, D, M, N)
    # 5. the adjoint recurrence inside every chunk, right to left
    g_first, dA, (gBg, dd, dB) = _adjoint_chunks(dt, x, Bt, Ct, gyt, ah, Ak, g_out)
    return gBg, dd, dB, dC, dA.sum((0, 3)), g_first[..., 0, :]


def _in_slices(f, T, combine, size=8):
    """f(slice over the T steps), combined over slices of `size` steps in eager mode, so that the
    (T, b, K, D, M, N) product inside f exists `size` steps at a time (it set the peak memory of
    a training step). Compiled, one call: Inductor fuses f into a loop that never stores it."""
    if torch.compiler.is_compiling() or T <= size:
        return f(slice(None))
    return combine([f(slice(t, t + size)) for t in range(0, T, size)])


def _loop(step, carry, xs, reverse=False):
    """Run `step` over dim 0 of the tensors in xs: torch's `scan` operator when compiling
    (one fused kernel per step instead of T unrolled copies, which compile slowly and were seen
    miscompiled), a plain Python loop in eager mode (the operator re-traces `step` on every eager
    call, slow for small inputs, and fails under torch.utils.checkpoint's recomputation).
    Returns the last carry and the stacked per-step outputs, in input order."""
    if torch.compiler.is_compiling():
        if not reverse:
            return _hop_scan(step, carry, xs)
        # The operator's reverse=True flips every input and output (full copies, one of them
        # the (L, N)-sized state stack); reading step t through an index costs nothing.
        T = xs[0].shape[0]

        def indexed(c, t):
            return step(c, tuple(v.index_select(0, t.view(1)).squeeze(0) for v in xs))

        carry, outs = _hop_scan(indexed, carry, torch.arange(T - 1, -1, -1, device=xs[0].device))
        return carry, tuple(o.flip(0) for o in outs)
    T = xs[0].shape[0]
    outs = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        carry, outs[t] = step(carry, tuple(v[t] for v in xs))
    if isinstance(outs[0], tuple):
        return carry, tuple(torch.stack(o) for o in zip(*outs))
    return carry, torch.stack(outs)


def _per_step(Ak, T):
    """A (1, K, D, 1, N) repeated for T steps as a real contiguous copy (T*K*D*N numbers, small).
    A must enter the loop as a per-step input, not through the step's closure: with A captured,
    torch 2.13's compiled backward of the `scan` operator returned a wrong dL/dA. And a copy, not
    an expand() view: inside a compiled model Inductor gave A a transposed layout after tracing,
    the steps' outputs inherited it, and the loop rejected carries whose strides changed."""
    return Ak.expand((T,) + Ak.shape).contiguous()


def _carry(t):
    """A loop carry as a fresh contiguous tensor. Under torch.compile the `scan` operator
    rejects a carry that aliases a step output ("might be aliasing"), and its while-loop
    lowering one whose strides differ between the initial and the returned carry (seen with
    layouts that Inductor chose inside a whole model)."""
    if not torch.compiler.is_compiling():
        return t                        # eager: nothing aliases, a copy would only cost time
    return t.clone(memory_format=torch.contiguous_format)


def _scan_chunks(dt, x, Bt, Ct, Ak):
    """Forward step 2: T steps of h = exp(delta' A) h + x B, y = C . h, over all chunks at once.

    dt, x (T, b, K, D, M); Bt, Ct (T, b, K, 1, M, N); Ak (1, K, D, 1, N).
    """
    def step(h, inputs):                                     # h (b, K, D, M, N)
        dt_t, x_t, B_t, C_t, A_t = inputs
        h = torch.exp(dt_t[..., None] * A_t) * h + x_t[..., None] * B_t
        return _carry(h), (h * C_t).sum(-1)                  # (b, K, D, M)

    h = x.new_zeros(x.shape[1:] + (Ak.shape[-1],))           # (b, K, D, M, N)
    return _loop(step, h, (dt, x, Bt, Ct, _per_step(Ak, dt.shape[0])))


def _states_before(dt, x, Bt, Ct, gyt, Ak, h_in):
    """Backward steps 4 and 2 in one pass forward through every chunk, from its saved entry
    state. Returns a_t h_{t-1} for every step (T, b, K, D, M, N), the only (L, N)-sized tensor
    of the scan (it lives during backward; the adjoint needs h_{t-1} only in that product, and
    the decay a_t for its carry anyway); dC_t = dy_t h_t summed over the group (T, b, K, M, N);
    and G (b, K, D, M, N), with exp(A s_t) carried as the running product of the decays a_t:
    a multiply per element instead of an exp (every factor <= 1)."""
    def step(carry, inputs):
        h, P, G = carry
        dt_t, x_t, B_t, C_t, gy_t, A_t = inputs
        a = torch.exp(dt_t[..., None] * A_t)                 # (b, K, D, M, N)
        gy_n = gy_t[..., None]
        # (plain ops, not addcmul, for a carry: with N = 1 addcmul's output strides of the
        # size-1 dim differed from the initial carry's, which the loop operator rejects)
        ah = a * h                                           # a_t h_{t-1}
        h_next = ah + x_t[..., None] * B_t                   # h_t
        P = a * P                                            # exp(A s_t)
        G = G + P * C_t * gy_n
        return (_carry(h_next), _carry(P), _carry(G)), (ah, (h_next * gy_n).sum(2))

    start = (_carry(h_in), torch.ones_like(h_in), torch.zeros_like(h_in))
    (_, _, G), (ah, dC) = _loop(step, start, (dt, x, Bt, Ct, gyt, _per_step(Ak, dt.shape[0])))
    return ah, dC, G


def _adjoint_chunks(dt, x, Bt, Ct, gyt, ah, Ak, g_out):
    """Backward step 5: g_t = C_t dy_t + a_{t+1} g_{t+1} from each chunk's last step to its
    first, all chunks at once, starting from g_out (b, K, D, M, N); ah: a_t h_{t-1} per step.
    Carries a_t g_t and the dA sum; outputs per step <B_t, g_t>, <A, a_t h_{t-1} g_t>
    (b, K, D, M) and the group sum x_t g_t (b, K, M, N).

    Written for Inductor's fusion: the carries come before the outputs, and the product
    g_t a_t h_{t-1} is not named but written into each of its two uses. Then the carries and
    both sums over N run in one loop over the state. With the product named once, Inductor
    stored it and summed it in a loop of its own; with the outputs first, it kept the carries'
    loop apart from the sums' (reads of the same inputs, not fused). Each loop fewer saves a
    read of the whole state per step (compiled fwd+bwd about 5% faster: docs/design.md)."""
    def step(carry, inputs):
        g_next, dA = carry
        dt_t, x_t, B_t, C_t, gy_t, ah_t, A_t = inputs
        a = torch.exp(dt_t[..., None] * A_t)                 # (b, K, D, M, N)
        g = torch.addcmul(g_next, C_t, gy_t[..., None])      # dL/dh_t
        carry = (_carry(a * g), _carry(dA + g * (ah_t * dt_t[..., None])))
        return carry, ((g * B_t).sum(-1), (g * (ah_t * A_t)).sum(-1), (g * x_t[..., None]).sum(2))

    g_out = _carry(g_out)
    (g_first, dA), outs = _loop(step, (g_out, torch.zeros_like(g_out)),
                                (dt, x, Bt, Ct, gyt, ah, _per_step(Ak, dt.shape[0])),
                                reverse=True)
    return g_first, dA, outs


def _chain_chunks(H, S, Ak, h0):
    """Forward step 3 (and backward step 3, run on flipped chunks): E_m = exp(A S_m) E_{m-1}
    + H_m for all m, in ceil(log2 M) doubling rounds.

    H (b, K, D, M, N) chunk end states from zero; S (b, K, D, M) chunk sums of delta'.
    After the round with offset o, E_m covers chunks m-2o+1..m and S_m their summed delta'.
    """
    M = H.shape[-2]
    if h0 is not None:                                       # fold h0 into the first chunk
        first = H[..., :1, :] + torch.exp(Ak * S[..., :1, None]) * h0
        H = torch.cat([first, H[..., 1:, :]], dim=-2)
    E, o = H, 1
    while o < M:
        carried = torch.exp(Ak * S[..., o:, None]) * E[..., :-o, :]          # (b, K, D, M-o, N)
        E = torch.cat([E[..., :o, :], E[..., o:, :] + carried], dim=-2)      # (b, K, D, M, N)
        S = torch.cat([S[..., :o], S[..., o:] + S[..., :-o]], dim=-1)        # (b, K, D, M)
        o *= 2
    return E


# ---------------------------------------------------------------------------------------------
# 2b. N = 1: the scan as a first-order linear recurrence over plain tensors.
# ---------------------------------------------------------------------------------------------
class _ScanState1(torch.autograd.Function):
    """selective_scan for N = 1. u, delta (b, K*D, L); A (K*D, 1); B, C (b, K, 1, L).

    With one state number per channel, h_t = a_t h_{t-1} + x_t with a_t = exp(delta'_t A) and
    x_t = delta'_t B_t u_t; y_t = C_t h_t + D u_t: elementwise work around a first-order linear
    recurrence (`_linear_scan`).
    Why not the N > 1 code: its `scan` operator loop costs a host-side step per time step,
    which is most of the work when a step is one multiply-add per channel (compiled, this path
    takes about half the general path's time at stage 1 of VMamba-T v2: docs/design.md).

    Backward, per channel, with upstream dy_t and dh_L (last state):
    1. The adjoint g_t = dL/dh_t obeys g_t = C_t dy_t + a_{t+1} g_{t+1} (g_{L-1} = C_{L-1}
       dy_{L-1} + dh_L): the same recurrence run right to left, with the decays shifted by one.
    2. dL/dx_t = g_t and dL/da_t = g_t h_{t-1} (h_{-1} = h0 or 0); dh0 = a_0 g_0.
    3. Through x_t = delta'_t u_t B_t: du_t = delta'_t B_t g_t (+ D dy_t), dB_t = delta'_t u_t
       g_t (summed over the group's channels); through a_t = exp(delta'_t A):
       ddelta'_t = u_t B_t g_t + A a_t h_{t-1} g_t, dA = sum_t delta'_t a_t h_{t-1} g_t.
    4. dC_t = dy_t h_t (summed over the group), dD = sum_t dy_t u_t.
    5. Through the softplus as in `_ChunkedScan` (step 6): sigmoid(z) = 1 - exp(-delta').
    Saved: the inputs and the states h, the size of u (a and delta' are recomputed). Autograd
    through the same elementwise code kept about five such tensors (this way a vmamba_tiny_s1l8
    forward saves a third less for backward: docs/design.md). The backward is differentiable:
    where it will be differentiated again (`_differentiated`) it recomputes h under autograd.
    """

    generate_vmap_rule = True         # torch.func.vmap runs the methods below batched

    @staticmethod
    def forward(u, delta, A, B, C, D, delta_bias, h0, softplus, T):
        batch, KD, L = u.shape
        h = _state1_states(u, _delta_prime(delta, delta_bias, softplus), A, B, h0, T)
        y = (h.reshape(batch, B.shape[1], -1, L) * C).reshape(batch, KD, L)   # a view
        y = y.clone() if D is None else y + D[:, None] * u    # not a view: _ChunkedScan.forward
        # (b, K*D, L), the last state (b, K*D, 1), a copy (a view of h refuses in-place
        # ops); and the states, for the backward
        return y, h[..., -1:].clone(), h

    setup_context = staticmethod(_keep)

    @staticmethod
    def backward(ctx, gy, gh, _):
        u, delta, A, B, C, D, delta_bias, h0, h = ctx.saved_tensors
        batch, KD, L = u.shape
        K = B.shape[1]
        grouped = (batch, K, KD // K, L)
        dt = _delta_prime(delta, delta_bias, ctx.softplus)   # delta', recomputed
        if _differentiated():
            h = _state1_states(u, dt, A, B, h0, ctx.T)
        if gy is None:
            gy = torch.zeros_like(u)
        g_in = (gy.reshape(grouped) * C).reshape(batch, KD, L)    # C_t dy_t
        if gh is not None:
            g_in = torch.cat([g_in[..., :-1], g_in[..., -1:] + gh], dim=-1)
        a = torch.exp(dt * A)                                 # recomputed: one exp
        a_next = F.pad(a[..., 1:], (0, 1), value=1.0)        # a_{t+1}; the last is unused
        g = _linear_scan(a_next, g_in, None, ctx.T, reverse=True)    # step 1
        start = h.new_zeros(batch, KD, 1) if h0 is None else h0
        dah = g * torch.cat([start, h[..., :-1]], dim=-1) * a     # a_t h_{t-1} g_t
        gB = (g.reshape(grouped) * B).reshape(batch, KD, L)         # B_t g_t
        du = dt * gB if D is None else dt * gB + D[:, None] * gy
        ddt = u * gB + A * dah                                # step 3
        dB = (g * dt * u).reshape(grouped).sum(2, keepdim=True)
        dC = (gy * h).reshape(grouped).sum(2, keepdim=True)
        dA = (dah * dt).sum((0, 2))[:, None]
        dD = None if D is None else (gy * u).sum((0, 2))
        dz = ddt * -torch.expm1(-dt) if ctx.softplus else ddt     # step 5
        dbias = None if delta_bias is None else dz.sum((0, 2))
        dh0 = None if h0 is None else a[..., :1] * g[..., :1]
        return du, dz, dA, dB, dC, dD, dbias, dh0, None, None


def _state1_states(u, dt, A, B, h0, T):
    """The states h_t of the N = 1 scan, (b, K*D, L): h_t = a_t h_{t-1} + x_t with
    a_t = exp(delta'_t A), x_t = delta'_t B_t u_t, from h0 (b, K*D, 1) or zero."""
    batch, KD, L = u.shape
    a = torch.exp(dt * A)                                     # decays in [0, 1]
    x = ((dt * u).reshape(batch, B.shape[1], -1, L) * B).reshape(batch, KD, L)
    return _linear_scan(a, x, None if h0 is None else h0.reshape(batch, KD), T)


class _ChunkedScanForwardAD(_ChunkedScan):
    """_ChunkedScan with forward-mode derivatives (`_forward_mode`), for eager calls: Dynamo
    does not trace a Function that defines jvp (it breaks the graph, and fullgraph=True fails),
    so compiled code takes the class without it (`_scan_function`)."""

    @staticmethod
    def jvp(ctx, *tangents):
        return _forward_mode(_ChunkedScan.forward, ctx, tangents)


class _ScanState1ForwardAD(_ScanState1):
    """_ScanState1 with forward-mode derivatives, for eager calls (see _ChunkedScanForwardAD)."""

    @staticmethod
    def jvp(ctx, *tangents):
        return _forward_mode(_ScanState1.forward, ctx, tangents)


def _scan_function(N):
    """The autograd Function selective_scan applies: the N = 1 path or the general one; with
    forward-mode derivatives except while compiling."""
    if torch.compiler.is_compiling():
        return _ScanState1 if N == 1 else _ChunkedScan
    return _ScanState1ForwardAD if N == 1 else _ChunkedScanForwardAD


def _linear_scan(a, x, h0, T, reverse=False):
    """h_t = a_t h_{t-1} + x_t along the last dim, for a, x (..., L) and h0 (...) or None
    (h_{-1} = h0, or 0); reverse=True runs right to left: h_t = a_t h_{t+1} + x_t, h_L = h0.
    1. L <= T (or T = 1): L unrolled steps.
    2. Otherwise cut L into M chunks of T steps, (P, M, T) (P: all leading dims), and run the
       T steps inside all chunks at once from a zero state: E_t. Alongside, the decay since
       the chunk's first step (in the scan's direction), P_t = a_t P_{t-1}.
    3. The state leaving each chunk obeys the same recurrence over chunks, with the chunk's
       decay and its own last E: solve it with this function (M steps, recursively; h0 enters
       there).
    4. Fix-up: h_t = E_t + P_t * (state entering the chunk), stacked along the last dim.
    Unrolled steps, not the `scan` operator: Inductor fuses the T steps into one pass over
    (P, M), about 3x faster than a log-step scan inside the chunks (docs/design.md). Only
    products of decays in [0, 1]; nothing is divided.
    Layout: the result is stacked along the last dim, (P, M, T), so it comes out in the input's
    order and Inductor's fused consumers of it read contiguously and vectorise. Stacked
    time-major, (T, P, M), and permuted back, the compiled backward of `_ScanState1` ran its main
    loop scalar over the permuted index, about 4x slower (docs/design.md). reverse=True saves
    flipping the decays, the input and the result (three copies).
    """
    shape, L = a.shape[:-1], a.shape[-1]
    if L <= T or T == 1:
        hs, h = [None] * L, h0
        for t in (range(L - 1, -1, -1) if reverse else range(L)):
            h = x[..., t] if h is None else torch.addcmul(x[..., t], a[..., t], h)
            hs[t] = h
        return torch.stack(hs, dim=-1)
    M = -(-L // T)

    def chunks(t, fill):                                      # (..., L) -> (P, M, T)
        t = F.pad(t, (0, M * T - L), value=fill)             # padded steps: a = 1, x = 0
        return t.reshape(-1, M, T)

    a_t, x_t = chunks(a, 1.0), chunks(x, 0.0)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    E, P = [None] * T, [None] * T
    E[steps[0]], P[steps[0]] = x_t[..., steps[0]], a_t[..., steps[0]]
    for prev, t in zip(steps, steps[1:]):
        E[t] = torch.addcmul(x_t[..., t], a_t[..., t], E[prev])
        P[t] = a_t[..., t] * P[prev]
    h0 = None if h0 is None else h0.reshape(-1)
    leaving = _linear_scan(P[steps[-1]], E[steps[-1]], h0, T, reverse)    # (P, M)
    start = torch.zeros_like(leaving[:, :1]) if h0 is None else h0[:, None]
    entering = (torch.cat([leaving[:, 1:], start], dim=-1) if reverse else
                torch.cat([start, leaving[:, :-1]], dim=-1))
    h = torch.stack([torch.addcmul(E[t], P[t], entering) for t in range(T)], dim=-1)
    return h.reshape(-1, M * T)[:, :L].reshape(shape + (L,))  # (P, M, T) -> (..., L)


# ---------------------------------------------------------------------------------------------
# 3. Cross-scan and cross-merge: the four routes over an (H, W) map.
# ---------------------------------------------------------------------------------------------
def _described(t):
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def cross_scan(x):
    """(b, D, H, W) -> (b, 4, D, L): the four routes of VMamba's Cross-Scan Module.

    Route 0 row-major (l = h*W + w), route 1 column-major (l = w*H + h), routes 2 and 3 the
    same two reversed. Official: cross_scan_fn (classification/models/csm_triton.py; CrossScanF
    is its PyTorch form), in its channel-first layout.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"cross_scan: x must be a (b, D, H, W) tensor, got {_described(x)}")
    # Each route a read of x of its own: a reversed route flips both axes of the grid (the
    # row-major order reversed) rather than the flattened route. A flattened route that a flip
    # or another op also used made torch 2.14's Inductor write the four routes out as copies,
    # where it otherwise reads x along them inside the scan's kernel (design.md).
    rows, cols = x, x.transpose(2, 3)                 # row-major and column-major reads
    return torch.stack([rows.flatten(2), cols.flatten(2), rows.flip(2, 3).flatten(2),
                        cols.flip(2, 3).flatten(2)], dim=1)   # (b, 4, D, L)


def route(t, k):
    """(b, C, H, W) -> (b, C, L): t read along route k of cross_scan (0 row-major, 1 column-
    major, 2 and 3 the same reversed): route 0 a view (of a contiguous or channels-last t),
    route 1 a copy (a column-major read of either layout, H, W > 1), a flip for routes 2, 3."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or type(k) is not int or \
            k not in (0, 1, 2, 3):
        raise ValueError(f"route: t must be a (b, C, H, W) tensor and k one of 0-3, got "
                         f"{_described(t)} and {k!r}")
    t = t.flatten(2) if k % 2 == 0 else t.transpose(2, 3).flatten(2)
    return t.flip(-1) if k >= 2 else t


def route_each(t):
    """(b, 4, C, H, W) -> (b, 4, C, L): map k read along route k (cross_scan's routes; cross_scan
    reads one map along all four). SS2D uses it for per-route maps computed on the grid."""
    if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.shape[1] != 4:
        raise ValueError(f"route_each: t must be a (b, 4, C, H, W) tensor, got {_described(t)}")
    return torch.stack([route(t[:, k], k) for k in range(4)], dim=1)


def cross_merge(ys):
    """(b, 4, D, H, W) -> (b, D, L): undo each route's order and sum (the adjoint of cross_scan).

    ys[:, k] holds route k's outputs in route k's own order, viewed as an (H, W) grid only for
    its shape: route 1/3 sequences are column-major, so they are read as (W, H) and transposed.
    Official: cross_merge_fn (csm_triton.py; CrossMergeF).
    """
    if not isinstance(ys, torch.Tensor) or ys.dim() != 5 or ys.shape[1] != 4:
        raise ValueError(f"cross_merge: ys must be a (b, 4, D, H, W) tensor, got "
                         f"{_described(ys)}")
    batch, _, D, H, W = ys.shape
    ys = ys.flatten(3)                                       # (b, 4, D, L)
    ys = ys[:, :2] + ys[:, 2:].flip(-1)                      # (b, 2, D, L)  un-reverse 2 and 3
    rows = ys[:, 0]                                          # (b, D, L)
    cols = ys[:, 1].view(batch, D, W, H).transpose(2, 3)     # (b, D, H, W)
    return rows + cols.reshape(batch, D, H * W)              # (b, D, L)


# Last, and as a module: scan_assoc imports this file's input checks, so either file may be
# imported first (selective_scan looks up scan_assoc.selective_scan_assoc when it calls it).
import scan_assoc  # noqa: E402
