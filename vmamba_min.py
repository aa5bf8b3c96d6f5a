"""VMamba (Liu et al., "VMamba: Visual State Space Model", arXiv 2401.10166) in one readable file.

The network of the paper's figure, top to bottom:
    image -> PatchEmbed -> 4 x Stage(VSS blocks, then downsample) -> LayerNorm -> pool -> Linear
    VSS block:  x = x + SS2D(LN(x))            [+ x = x + MLP(LN(x)) in generation 2]
    SS2D:       Linear -> depthwise conv 3x3 -> SiLU -> cross-scan (4 routes) -> selective scan
                -> cross-merge -> LayerNorm [-> * SiLU(gate)] -> Linear
Both generations of the released weights, chosen by `VSSMConfig.generation`:
    0  "vanilla" VMamba (the seed): d_state 16, gate z, 4x4 patch embed, PatchMerging, no MLP;
    2  the released VMamba-T/S/B (official forward_type "v05_noz"): d_state 1, no gate, an MLP
       in every block, a two-conv stem and conv downsampling.
The scan math lives in pure functions: the selective scan, cross-scan and cross-merge in
scan.py, the associative-scan formulation that compiled CUDA code runs in scan_assoc.py.
"Official:" in a docstring names the piece of the official code (MzeroMiko/VMamba,
classification/models/vmamba.py unless said) that a class mirrors.

Letters used in every shape comment:
    b batch (lower case: B is the scan's input matrix), H, W feature-map height and width,
    L = H*W sequence length, C width of a stage, D = ssm_ratio * C inner width of SS2D,
    N d_state, R dt rank (ceil(C/16) by default), K = 4 scan routes.
Layout: between the convolutions the feature map travels as tokens, (b, L, C) in row-major
order, with its height and width beside it: every Linear and LayerNorm acts on the last dim with
no permute, and a conv (or the scan) sees the same memory as (b, C, H, W) through a view, `grid`
(channels-last strides), whose output `tokens` views back. Maps exist only as outputs:
(b, H, W, C) from forward_features, (b, C, H, W) from Backbone and forward_intermediates (or
NHWC with output_fmt="NHWC"). Why tokens and not (b, H, W, C) maps: under torch.compile,
Inductor gives every 4-D tensor on a path into a convolution channels-last strides, which for a
(b, H, W, C) map put H innermost and add transposes around every LayerNorm and Linear
(docs/design.md).
"""
import collections
import contextlib
import inspect
import math
import numbers
import os
import pickle
import types
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from scan import (allow_compile, cross_merge, cross_scan, route_each, selective_scan,
                  selective_scan_ref)
from scan_assoc import selective_scan_assoc, selective_scan_assoc_chunked

__all__ = ["VSSMConfig", "VSSM", "Backbone", "CONFIGS", "build", "build_config",
           "from_official_kwargs", "convert_official_state_dict", "to_official_state_dict",
           "load_official_checkpoint",
           "register_timm", "compile_blocks"]

K = 4  # scan routes: row-major, column-major, and both reversed


def grid(x, H, W):                                           # (b, L, C) -> (b, C, H, W)
    """Tokens as a map for a conv or the scan: a view (strides channels-last), no copy. The
    (b, H, W, C) view in between has this one use, so Inductor leaves its strides alone
    (x.transpose(1, 2).unflatten(2, (H, W)) is the same view, but with b = 1 torch gives it a
    batch stride of C, and a conv then takes it for NCHW and copies it)."""
    return x.unflatten(1, (H, W)).permute(0, 3, 1, 2)


def tokens(x):                                               # (b, C, H, W) -> (b, L, C)
    """A conv's output map as tokens: a view (a copy comes later only where an op needs one)."""
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VSSMConfig:
    generation: int = 2               # 0 = vanilla (seed) VMamba, 2 = released v2 (see docstring)
    dim: int = 96                     # C of stage 0; stage i has C * 2**i
    depths: tuple = (2, 2, 9, 2)
    d_state: Optional[int] = None     # N; None: the generation's (16 for 0, 1 for 2)
    ssm_ratio: float = 2.0            # D = int(ssm_ratio * C)
    dt_rank: Optional[int] = None     # R; None: "auto" = ceil(C / 16), per stage
    mlp_ratio: Optional[float] = None  # None: the generation's (0 = no MLP for 0, 4 for 2)
    in_chans: int = 3
    num_classes: int = 1000
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False  # training mode: each block recomputed in backward
    scan: str = "chunked"             # "chunked" (scan.selective_scan: picks its path itself),
                                      # "reference" (the loop), "assoc" (forced: scan_assoc) or
                                      # "assoc_chunked" (scan_assoc's chunked experiment)
    chunk_size: Optional[int] = None  # chunk length of the chunked scans (speed only); None:
                                      # scan.py's choice by state size (assoc_chunked: 64);
                                      # unused where "chunked" dispatches to scan_assoc

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"VSSMConfig: {msg}")

        # Numbers of any kind (numpy's, from a config file; np.float64 is a float subclass) as
        # Python's, and any sequence of depths (a list, OmegaConf's ListConfig) as a tuple;
        # what is neither is checked below.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, numbers.Real) and type(v) not in (bool, int, float):
                v = int(v) if isinstance(v, numbers.Integral) else float(v)
            elif f.name == "depths" and as_sequence(v) is not None:
                v = tuple(as_int(d) for d in v)
            object.__setattr__(self, f.name, v)               # frozen: set once, here

        def is_int(v):                                       # bool is an int to Python
            return isinstance(v, int) and not isinstance(v, bool)

        def is_real(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        need(is_int(self.generation) and self.generation in (0, 2),
             f"generation must be 0 or 2, got {self.generation!r}")
        # d_state and mlp_ratio stay None here (never filled in): a config is then a record of
        # what was asked for, so dataclasses.replace(cfg, generation=0) gives generation 0's
        # defaults instead of carrying generation 2's d_state 1 and MLP along.
        need(isinstance(self.depths, tuple),
             f"depths must be a sequence of ints (one per stage), got {self.depths!r}")
        need(len(self.depths) >= 1 and all(is_int(d) and d >= 1 for d in self.depths),
             f"depths must be positive ints, got {self.depths!r}")
        need(self.d_state is None or (is_int(self.d_state) and self.d_state >= 1),
             f"d_state must be None (the generation's) or an int >= 1, got {self.d_state!r}")
        for name in ("dim", "in_chans") + (("chunk_size",) if self.chunk_size is not None else ()):
            v = getattr(self, name)
            need(is_int(v) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        # The v2 stem's first conv has C/2 channels (ConvStem).
        need(self.generation == 0 or self.dim >= 2,
             f"dim must be >= 2 for generation 2 (its stem has dim // 2 channels), got "
             f"{self.dim!r}")
        need(is_int(self.num_classes) and self.num_classes >= 0,
             f"num_classes must be an int >= 0, got {self.num_classes!r}")
        need(self.dt_rank is None or (is_int(self.dt_rank) and self.dt_rank >= 1),
             f"dt_rank must be None (auto) or an int >= 1, got {self.dt_rank!r}")
        need(is_real(self.ssm_ratio) and self.ssm_ratio > 0 and
             int(self.ssm_ratio * self.dim) >= 1,
             f"ssm_ratio must be a number giving D = int(ssm_ratio * dim) >= 1, got "
             f"{self.ssm_ratio!r}")
        need(self.mlp_ratio is None or (is_real(self.mlp_ratio) and self.mlp_ratio >= 0),
             f"mlp_ratio must be None or a number >= 0, got {self.mlp_ratio!r}")
        # an MLP in every block or in none: a ratio giving stage 0 no hidden unit dropped its
        # MLPs alone (the official code builds a zero-width one, whose output is its bias)
        need(self.mlp_ratio is None or self.mlp_ratio == 0 or
             int(self.mlp_ratio * self.dim) >= 1,
             f"mlp_ratio must be 0 or give int(mlp_ratio * dim) >= 1 hidden units, got "
             f"{self.mlp_ratio!r} with dim {self.dim}")
        need(is_real(self.drop_path_rate) and 0 <= self.drop_path_rate < 1,
             f"drop_path_rate must be a number in [0, 1), got {self.drop_path_rate!r}")
        need(isinstance(self.grad_checkpointing, bool),
             f"grad_checkpointing must be True or False, got {self.grad_checkpointing!r}")
        need(self.scan in ("chunked", "reference", "assoc", "assoc_chunked"),
             f"scan must be 'chunked', 'reference', 'assoc' or 'assoc_chunked', got "
             f"{self.scan!r}")
        need(self.chunk_size is None or self.scan in ("chunked", "assoc_chunked"),
             f"chunk_size applies to the chunked scans only (scan='chunked' or "
             f"'assoc_chunked'); scan={self.scan!r} has no chunks, got chunk_size="
             f"{self.chunk_size!r}")

    @property
    def n_state(self) -> int:
        """N actually built: d_state, or the generation's default when d_state is None."""
        return self.d_state if self.d_state is not None else (16 if self.generation == 0 else 1)

    @property
    def n_mlp_ratio(self) -> float:
        """MLP width / C actually built (0: no MLP): mlp_ratio, or the generation's default."""
        return self.mlp_ratio if self.mlp_ratio is not None else (
            0.0 if self.generation == 0 else 4.0)

    def stage_dim(self, i):
        return self.dim * 2 ** i


# ---------------------------------------------------------------------------------------------
# Patch embedding: image (b, 3, H, W) -> tokens (b, L, C) of an (H/4, W/4) map, and H/4, W/4
# ---------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Generation 0: one 4x4 stride-4 conv (a linear map of each patch), then LayerNorm.
    Official: VSSM._make_patch_embed."""

    def __init__(self, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):                                    # (b, 3, H, W)
        x = self.proj(x)                                     # (b, C, H/4, W/4), floor like official
        return self.norm(tokens(x)), *x.shape[2:]            # (b, L, C), H/4, W/4


class ConvStem(nn.Module):
    """Generation 2: two 3x3 stride-2 convs (C/2 then C) with LayerNorm, GELU between them.
    Padding 1 makes each conv round odd sizes up: ceil(H/2). Official: VSSM._make_patch_embed_v2."""

    def __init__(self, in_chans, dim):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2)
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x):                                    # (b, 3, H, W)
        x = self.conv1(x)                                    # (b, C/2, H/2, W/2)
        x = grid(F.gelu(self.norm1(tokens(x))), *x.shape[2:])   # LayerNorm over C/2, same shape
        x = self.conv2(x)                                    # (b, C, H/4, W/4)
        return self.norm2(tokens(x)), *x.shape[2:]           # (b, L, C), H/4, W/4


# ---------------------------------------------------------------------------------------------
# SS2D: the 2D selective-scan mixer
# ---------------------------------------------------------------------------------------------
class SS2D(nn.Module):
    """The paper's SS2D box. Parameter names and shapes are the official ones, so checkpoints
    load as they are: per route k, x_proj_weight[k] (R+2N, D) maps a token to [dt R | B N | C N],
    dt_projs_weight[k] (D, R) lifts dt to D channels, dt_projs_bias[k] (D,) is the scan's
    delta_bias; A_logs (K*D, N) and Ds (K*D,) are the per-channel A = -exp(A_logs) and skip D.
    Official: SS2D, run by SS2Dv0.forwardv0 (generation 0) or SS2Dv2.forwardv2 and
    forward_corev2 (generation 2)."""

    def __init__(self, dim, cfg: VSSMConfig):
        super().__init__()
        D, N = int(cfg.ssm_ratio * dim), cfg.n_state
        R = cfg.dt_rank or math.ceil(dim / 16)
        self.d_inner, self.d_state, self.dt_rank = D, N, R
        self.gated = cfg.generation == 0
        self.scan, self.chunk_size = cfg.scan, cfg.chunk_size
        self.in_proj = nn.Linear(dim, 2 * D if self.gated else D, bias=False)
        self.conv2d = nn.Conv2d(D, D, kernel_size=3, padding=1, groups=D, bias=self.gated)
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, D))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, D, R))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, D))
        self.A_logs = nn.Parameter(torch.empty(K * D, N))
        self.Ds = nn.Parameter(torch.empty(K * D))
        self.out_norm = nn.LayerNorm(D)
        self.out_proj = nn.Linear(D, dim, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """The official SSM init (Mamba's): dt starts log-uniform in [1e-3, 1e-1].
        Official: mamba_init.dt_init, A_log_init and D_init."""
        D, N, R = self.d_inner, self.d_state, self.dt_rank
        # x_proj is an nn.Linear in the official code before its weights are stacked, so it
        # keeps nn.Linear's default init (kaiming-uniform: U(+-1/sqrt(fan_in))).
        nn.init.uniform_(self.x_proj_weight, -D ** -0.5, D ** -0.5)
        nn.init.uniform_(self.dt_projs_weight, -R ** -0.5, R ** -0.5)
        dt = torch.exp(torch.rand(K, D) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        _assign(self.dt_projs_bias, dt + torch.log(-torch.expm1(-dt)))   # softplus^-1(dt)
        a_log = torch.log(torch.arange(1, N + 1, dtype=torch.float32))   # A = -(1, ..., N)
        _assign(self.A_logs, a_log.repeat(K * D, 1))
        self.Ds.fill_(1.0)

    # the name torch's meta-device materialisation (FSDP) calls on every module that has it
    reset_parameters = reset_ssm_parameters

    def forward(self, x, H, W):                              # (b, L, C), L = H*W
        x = self.in_proj(x)                                  # (b, L, 2D) or (b, L, D)
        if self.gated:
            x, z = x.chunk(2, dim=-1)                        # (b, L, D) each
        x = self.conv(grid(x, H, W))                         # (b, D, H, W)
        y = self.out_norm(self.ssm(x))                       # (b, L, D)
        if self.gated:
            y = y * F.silu(z)
        return self.out_proj(y)                              # (b, L, C)

    def conv(self, x):                                       # (b, D, H, W)
        """The figure's DWConv and SiLU: a depthwise convolution over the map."""
        return F.silu(self.conv2d(x))

    def selection(self, x):                                  # (b, D, H, W)
        """The scan's input-dependent parameters, in each route's order: delta (b, K, D, L),
        from x_proj's low-rank dt (R channels) through dt_proj, and B, C (b, K, N, L)."""
        R, N = self.dt_rank, self.d_state
        x_dbl = route_each(self.x_proj(x))                  # (b, K, R+2N, L)
        dts, Bs, Cs = x_dbl.split([R, N, N], dim=2)          # (b, K, R|N|N, L)
        return torch.matmul(self.dt_projs_weight, dts), Bs, Cs

    def x_proj(self, x):                                     # (b, D, H, W)
        """Every route's x_proj applied to the unrouted map: per token and route k, [dt R | B N
        | C N], (b, K, R+2N, H, W)."""
        batch, D, H, W = x.shape
        R, N = self.dt_rank, self.d_state
        x_dbl = torch.matmul(self.x_proj_weight.reshape(K * (R + 2 * N), D),
                             x.flatten(2))                   # (b, K*(R+2N), L)
        return x_dbl.view(batch, K, R + 2 * N, H, W)

    def ssm(self, x):                                        # (b, D, H, W)
        """Cross-scan, the selective scan along each route, cross-merge.

        Two per-token steps of each route are taken before the routes split or after they
        merge, exactly (a route only reorders the tokens): x_proj is applied to the map once
        and its R+2N output channels are put in route order (not the D input channels, copied
        into each route); the skip term D_k u of each route, merged, is u times the sum of the
        four D_k, so the scans run without D and the merged output adds it. Under
        torch.compile this spares the memory traffic of D-channel route copies: the
        projection reads the map itself, and the merge reads the scans' outputs, not u."""
        batch, D, H, W = x.shape
        L = H * W
        delta, Bs, Cs = self.selection(x)                    # (b, K, D|N|N, L), route order
        state = torch.promote_types(self.A_logs.dtype, torch.float32)   # the scans' dtype
        scan_args = (cross_scan(x).reshape(batch, K * D, L), delta.reshape(batch, K * D, L),
                     -torch.exp(self.A_logs.to(state)), Bs.contiguous(), Cs.contiguous(),
                     None, self.dt_projs_bias.to(state).reshape(K * D))   # D: added below
        y = self.run_scan(*scan_args)                        # (b, K*D, L)
        y = cross_merge(y.view(batch, K, D, H, W))           # (b, D, L)
        # sum_k D_k u, taken on the grid: x.flatten(2) is cross_scan's route 0, and a second
        # user of it made torch 2.14's Inductor copy the routes out in training (design.md)
        y = y + (x.to(y.dtype) * self.Ds.to(y.dtype).view(K, D, 1, 1).sum(0)).flatten(2)
        # The scans return float32. Back to the parameters' dtype: a model converted with
        # .to(torch.bfloat16) (or .half()) needs it for out_norm; under autocast the
        # parameters stay float32, so out_norm still sees the full-precision scan output.
        return y.transpose(1, 2).to(self.Ds.dtype)          # (b, L, D)

    def run_scan(self, u, delta, A, B, C, D, delta_bias):
        """The selective scan of the path VSSMConfig.scan names, delta' = softplus(delta +
        delta_bias). Under bf16 autocast the projections before it run in bf16, but every
        scan casts its inputs to float32 and keeps the state h in float32, as the official
        kernels do."""
        if self.scan == "reference":
            return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus=True)
        if self.scan == "assoc":
            return selective_scan_assoc(u, delta, A, B, C, D, delta_bias, delta_softplus=True)
        if self.scan == "assoc_chunked":
            return selective_scan_assoc_chunked(u, delta, A, B, C, D, delta_bias,
                                                delta_softplus=True, chunk_size=self.chunk_size)
        return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus=True,
                              chunk_size=self.chunk_size)


def _assign(param, value):
    """param.copy_(value), also for a parameter sharded as a DTensor (FSDP2's fully_shard:
    a plain tensor would not copy into it)."""
    if type(param).__name__ == "DTensor":
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    param.copy_(value)


# ---------------------------------------------------------------------------------------------
# VSS block
# ---------------------------------------------------------------------------------------------
def drop_path(x, p, training: bool):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (a float
    or a 0-dim tensor), and scale the kept ones by 1/(1-p) so that the expected output equals x
    (eval is then a no-op; p = 0 keeps every sample and divides by 1: x exactly; p = 1 drops
    every one: zeros, as timm's)."""
    if not training or (isinstance(p, float) and p == 0.0):
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    if isinstance(p, float):
        return x * keep if p == 1.0 else x * keep / (1 - p)
    return x * torch.where(p < 1, keep / (1 - p), 0)     # p = 1: 0 / 0 was NaN


class DropPath(nn.Module):
    """drop_path as a module (timm's DropPath), so that it shows in print(model) and follows
    model.train() / model.eval(). No parameters: the state-dict keys are unchanged.

    `rate` is None, or, once `compile_blocks` has set it, the rate as a 0-dim tensor (a buffer,
    not saved) that compiled code reads instead of the float `p`: Dynamo treats a float
    attribute as a constant, so every block of a stage, each with its own rate, compiled anew;
    a tensor is an input of the graph and one graph serves them all. Eager code keeps p, and
    with it the random stream of bernoulli_(float) (timm's); compiled code with the tensor rate
    draws from another stream (bernoulli with a tensor probability, in Inductor's generator):
    the same distribution, other masks, so compile_blocks matches eager step for step only with
    drop-path off."""

    def __init__(self, p: float):
        super().__init__()
        self.register_buffer("rate", None, persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or \
                not 0 <= value <= 1:
            raise ValueError(f"DropPath: p must be a number in [0, 1], got {value!r}")
        self._p = float(value)
        if self.rate is not None:
            self.rate.fill_(self._p)

    def forward(self, x):
        compiled = self.rate is not None and torch.compiler.is_compiling()
        return drop_path(x, self.rate if compiled else self.p, self.training)

    def extra_repr(self):
        return f"p={self.p:.3f}"


class MLP(nn.Module):
    """Generation 2's channel MLP: Linear(C -> hidden), GELU, Linear(hidden -> C). Official: Mlp."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):                                    # (b, L, C)
        return self.fc2(F.gelu(self.fc1(x)))                 # exact (erf) GELU, as official


class VSSBlock(nn.Module):
    """One VSS block (the residual sums in the module docstring). Official: VSSBlock._forward."""

    def __init__(self, dim, cfg: VSSMConfig, drop_path_rate: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = SS2D(dim, cfg)   # the seed's name for the SS2D mixer
        self.drop_path = DropPath(drop_path_rate)
        hidden = int(dim * cfg.n_mlp_ratio)
        self.ln_2 = nn.LayerNorm(dim) if hidden else None
        self.mlp = MLP(dim, hidden) if hidden else None

    def forward(self, x, H, W):                              # (b, L, C), L = H*W
        x = x + self.drop_path(self.self_attention(self.ln_1(x), H, W))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.ln_2(x)))
        return x


# ---------------------------------------------------------------------------------------------
# Downsampling between stages: tokens of an (H, W) map -> tokens (b, L', 2C) of a
# (ceil(H/2), ceil(W/2)) map, and that map's height and width
# ---------------------------------------------------------------------------------------------
class PatchMerging(nn.Module):
    """Generation 0: concatenate each 2x2 neighbourhood, LayerNorm(4C), Linear(4C -> 2C).
    Official: PatchMerging2D."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x, H, W):                              # (b, L, C), L = H*W
        if H % 2 or W % 2:
            # Odd maps: zero-pad bottom/right to even, like the official classification code
            # (the one-file code crashes there).
            x = F.pad(x.unflatten(1, (H, W)), (0, 0, 0, W % 2, 0, H % 2)).flatten(1, 2)
            H, W = H + H % 2, W + W % 2
        x = x.unflatten(1, (H // 2, 2, W // 2, 2))           # (b, H/2, dh, W/2, dw, C)
        # Each 2x2 neighbourhood's four tokens side by side, in the checkpoints' order
        # (dh, dw) = (0, 0), (1, 0), (0, 1), (1, 1): dw major, dh minor.
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(x.shape[0], H * W // 4, 4 * x.shape[-1])
        return self.reduction(self.norm(x)), H // 2, W // 2  # (b, L/4, 2C), H/2, W/2


class ConvDownsample(nn.Module):
    """Generation 2: Conv2d(C, 2C, 3, stride 2, padding 1) (rounds up), then LayerNorm(2C).
    Official: VSSM._make_downsample_v3."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Conv2d(dim, 2 * dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x, H, W):                              # (b, L, C), L = H*W
        x = self.reduction(grid(x, H, W))                    # (b, 2C, ceil(H/2), ceil(W/2))
        return self.norm(tokens(x)), *x.shape[2:]            # (b, L', 2C), ceil(H/2), ceil(W/2)


class Stage(nn.Module):
    """The blocks of one width, then (except after the last stage) the downsample.
    Official: VSSM._make_layer."""

    def __init__(self, dim, depth, cfg: VSSMConfig, drop_rates, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, cfg, p) for p in drop_rates)
        down = PatchMerging if cfg.generation == 0 else ConvDownsample
        self.downsample = down(dim) if downsample else None
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, x, H, W, downsample: bool = True):     # (b, L, C), L = H*W
        """Returns the blocks' output (the stage's feature map, as tokens) and the next
        stage's input (tokens, height, width; after the last stage, or with downsample off
        when no stage follows, the same map)."""
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, H, W, use_reentrant=False)   # recompute in backward
            elif BLOCK_REGIONS and _in_compiled_inference(self.training):   # see Compiling
                x = _block_region(blk, x, H, W)
            else:
                x = blk(x, H, W)
        if self.downsample is None or not downsample:
            return x, (x, H, W)
        return x, self.downsample(x, H, W)                   # (b, L, C), ((b, L', 2C), H', W')


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------
class VSSM(nn.Module):
    """The VMamba classifier. forward: (b, in_chans, H, W) image -> (b, num_classes) logits,
    any H, W >= 4. timm-style parts: forward_features (-> an NHWC map (b, H/32, W/32, 8C),
    before the final norm), forward_head(x, pre_logits=False), forward_intermediates (the one
    loop over the stages) and prune_intermediate_layers, feature_info, get_classifier,
    reset_classifier, no_weight_decay, set_grad_checkpointing, load_pretrained (an official
    checkpoint file); init_weights re-draws the official init (after building on the meta
    device and to_empty, say). Official: VSSM."""

    def __init__(self, config: VSSMConfig):
        super().__init__()
        if not isinstance(config, VSSMConfig):
            raise TypeError(f"VSSM takes a VSSMConfig, got {type(config).__name__}")
        allow_compile()   # so that a plain torch.compile(model) works (see scan.allow_compile)
        self.config = cfg = config
        n = len(cfg.depths)
        self.num_features = cfg.stage_dim(n - 1)
        stem = PatchEmbed if cfg.generation == 0 else ConvStem
        self.patch_embed = stem(cfg.in_chans, cfg.dim)
        # Drop-path rates rise linearly from 0 to drop_path_rate over all blocks of all stages,
        # computed as the official code does (float32 torch.linspace, then Python floats).
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        starts = [sum(cfg.depths[:i]) for i in range(n)]
        self.layers = nn.ModuleList(
            Stage(cfg.stage_dim(i), d, cfg, rates[s:s + d], downsample=i < n - 1)
            for i, (d, s) in enumerate(zip(cfg.depths, starts)))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Identity()
        self.reset_classifier(cfg.num_classes)
        self.apply(_init_weights)
        # timm's description of the feature maps forward_intermediates returns
        self.feature_info = [dict(num_chs=cfg.stage_dim(i), reduction=4 * 2 ** i,
                                  module=f"layers.{i}") for i in range(n)]

    @property
    def num_classes(self):
        return self.config.num_classes

    def forward_features(self, x):                           # (b, 3, H, W)
        final, _ = self.forward_intermediates(x, indices=[-1], output_fmt="NHWC")
        return final                                         # (b, H/32, W/32, 8C)

    def forward_head(self, x, pre_logits: bool = False):     # (b, h, w, 8C)
        x = self.norm(x).mean(dim=(1, 2))                    # (b, 8C)  global average pool
        return x if pre_logits else self.head(x)             # (b, num_classes)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's feature API. Returns (final, intermediates), or only the list when
        intermediates_only. indices: None = every stage, an int n = the last n stages, a
        sequence = those stage numbers (negative counts from the end); intermediates come in
        stage order, each a stage's block output before its downsample, (b, C_i, h, w)
        contiguous, or (b, h, w, C_i) with output_fmt "NHWC". final is forward_features' output
        (the last stage's blocks; the last stage has no downsample), whatever norm says, so
        that forward_head(final) is forward(x), as in timm's models. norm: self.norm (the
        head's LayerNorm, sized for the last stage) is applied to the last stage's
        intermediate. stop_early (or intermediates_only): run no stage after the last one
        asked for; final is then the last stage run."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        n = len(self.layers)
        take = stage_indices(n, indices)
        check_image(x, self.config.in_chans, self.patch_embed, type(self).__name__)
        stop = take[-1] if stop_early or intermediates_only else n - 1
        maps = run_stages(self.patch_embed, self.layers, x, sorted(set(take) | {stop}))
        taken = {i: self.norm(maps[i]) if norm and i == n - 1 else maps[i] for i in take}
        nchw = output_fmt == "NCHW"
        intermediates = [taken[i].permute(0, 3, 1, 2).contiguous() if nchw else taken[i]
                         for i in take]                      # (b, C_i, h, w) or (b, h, w, C_i)
        return intermediates if intermediates_only else (maps[stop], intermediates)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False,
                                  prune_head: bool = True):
        """timm's feature API: drop the stages after the last of `indices` (and, as timm does,
        the final norm when any stage goes or prune_norm, the head when prune_head). Returns
        the stage numbers `indices` names (timm's take_indices); stages 0 to the last of them
        stay. num_features, feature_info and config.depths follow the kept stages; a head
        cannot stay (prune_head=False) when stages go: it is sized for the last stage's
        width."""
        take = stage_indices(len(self.layers), indices)
        keep = take[-1] + 1
        if keep < len(self.layers):
            width = self.config.stage_dim(take[-1])
            if not prune_head and isinstance(self.head, nn.Linear):
                raise ValueError(f"prune_intermediate_layers: the head takes "
                                 f"{self.num_features} features and stage {take[-1]} gives "
                                 f"{width}; pass prune_head=True (then reset_classifier(n) "
                                 f"makes a new head)")
            self.layers = self.layers[:keep]
            self.layers[-1].downsample = None                # nothing follows it any more
            self.config = replace(self.config, depths=tuple(self.config.depths[:keep]))
            self.num_features, self.feature_info = width, self.feature_info[:keep]
            prune_norm = True                                # the norm is sized for 8C
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    @torch.no_grad()
    def init_weights(self):
        """Every weight drawn anew from the official init, in place, on its device: the convs'
        PyTorch default, _init_weights, SS2D.reset_ssm_parameters (the distributions that
        construction draws from). For a model built on the meta device:
        model.to_empty(device=...), then init_weights() (or load a checkpoint)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, SS2D):
                m.reset_ssm_parameters()
        self.apply(_init_weights)

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None):
        """A new head of num_classes outputs (0: none, pooled features out), on the device and
        in the dtype of the model's weights; global_pool (timm's argument) None or "avg",
        the only pooling here."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"reset_classifier: global_pool must be None or 'avg' (the model "
                             f"pools by averaging), got {global_pool!r}")
        self.config = replace(self.config, num_classes=num_classes)
        w = next((p for p in self.parameters() if p.is_floating_point()), None)
        where = {} if w is None else dict(device=w.device, dtype=w.dtype)
        self.head = (nn.Linear(self.num_features, num_classes, **where)
                     if num_classes else nn.Identity())
        self.head.apply(_init_weights)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's, after check_generation: weights of the other generation are an error
        naming both, also under strict=False (where almost nothing would load, silently)."""
        check_generation(state_dict, self.config.generation, type(self).__name__)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_grad_checkpointing(self, enable: bool = True):
        self.config = replace(self.config, grad_checkpointing=enable)
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def load_pretrained(self, path, ema: bool = False):
        """Load an official checkpoint file (load_official_checkpoint); timm calls this for
        register_timm's models (pretrained=True, pretrained_cfg_overlay=dict(file=...)). A
        head of another size (num_classes) keeps its fresh init; so does the head of a model
        loading a file that has none (saved with num_classes=0, say, to be fine-tuned here),
        with a warning, as the model's logits are then untrained. Every other key loads
        strictly. With in_chans other than 3 the stem's RGB filters are adapted (adapt_stem).
        Returns the keys left at their init (the head's, or none)."""
        sd = adapt_stem(load_official_checkpoint(path, ema=ema), self.config)
        check_generation(sd, self.config.generation, type(self).__name__)
        own = self.state_dict()
        headless = "head.weight" in own and not any(k.startswith("head.") for k in sd)
        head = [k for k in ("head.weight", "head.bias")
                if k in sd and (k not in own or own[k].shape != sd[k].shape)]
        sd = {k: v for k, v in sd.items() if k not in head}
        check_fit(path, own, sd, may_miss=("head.",) if head or headless else ())
        self.load_state_dict(sd, strict=not (head or headless))
        if headless:
            warnings.warn(f"{path}: the file has no classifier head; the model's head "
                          f"({self.config.num_classes} classes) keeps its random init",
                          stacklevel=2)
        return [k for k in own if k not in sd]

    def no_weight_decay(self):
        """Names of the parameters that take no weight decay (the SSM's A_logs and Ds)."""
        return {n for n, _ in self.named_parameters() if n.split(".")[-1] in ("A_logs", "Ds")}


def check_image(x, in_chans, stem, who="VSSM"):
    """Fail early, with the shape or dtype, instead of deep inside a conv or a reshape. who:
    the model class the message names."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != in_chans:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} expects an image batch (batch, {in_chans}, H, W), got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{who} expects a floating-point image, got dtype {x.dtype}")
    wdtype = next(stem.parameters()).dtype
    # Autocast casts the image and the weights for each op itself, so only without it must the
    # dtypes agree; it leaves float64 as it is (torch.amp: float64 is not eligible). Asked only
    # then: a device autocast does not know (meta, as flops.py counts) is an error to ask about.
    if x.dtype != wdtype:
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast or torch.float64 in (x.dtype, wdtype):
            how = ("autocast does not cast float64: convert the image or the model" if autocast
                   else "convert one of them, or run under torch.autocast")
            raise ValueError(f"the image's dtype {x.dtype} must match the model's parameter "
                             f"dtype {wdtype} ({how})")
    if min(x.shape[2], x.shape[3]) < 4:
        raise ValueError(f"{who} needs H, W >= 4 (one 4x4 patch), got {tuple(x.shape[2:])}")


def as_int(v):
    """An integer of any kind but bool (numpy's too) as a Python int; anything else as it is,
    for the caller's check to name."""
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def as_sequence(v):
    """A sequence but a string (a list, tuple, range, OmegaConf's ListConfig) as a list of its
    items, integers as as_int gives them; anything else None."""
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        return None
    return [as_int(i) for i in v]


def stage_indices(n, indices):
    """timm's `indices` convention -> sorted stage numbers in 0..n-1: None = all, an int k =
    the last k, a sequence = those stages (negative ones count from the end)."""
    def is_int(i):
        return isinstance(i, int) and not isinstance(i, bool)
    indices = as_int(indices)
    if indices is None:
        indices = n
    if is_int(indices):
        if not 1 <= indices <= n:
            raise ValueError(f"indices: the last {indices} stages asked for, the model has {n}")
        return list(range(n - indices, n))
    if isinstance(indices, (str, bytes, torch.Tensor)) or not hasattr(indices, "__iter__"):
        raise TypeError(f"indices must be None, an int or a sequence of ints, got {indices!r}")
    indices = [as_int(i) for i in indices]
    if not indices or not all(is_int(i) and -n <= i < n for i in indices):
        raise ValueError(f"indices must be stage numbers in {-n}..{n - 1}, got {indices!r}")
    return sorted({i % n for i in indices})


def run_stages(stem, stages, x, take):
    """The one loop over the stages (classifier, backbone, timm features, analyses): the stem,
    then stages 0..max(take), the last of them without its downsample (no stage reads it);
    returns {i: stage i's block output (b, h, w, C_i)} for i in take (a view of its tokens)."""
    if torch.compiler.is_compiling():
        # Image height and width stay static under torch.compile: each new size compiles anew
        # (the batch dim may still turn dynamic). Left symbolic, as Dynamo makes them when a
        # second size arrives, they made Inductor (torch 2.13) fail for both generations: in
        # inference "ValueRangeError: Invalid ranges", in training "cannot determine truth
        # value of Relational" on the stem's strides. test_compile.py changes the size.
        torch._dynamo.mark_static(x, 2)
        torch._dynamo.mark_static(x, 3)
    (x, H, W), maps = stem(x), {}                            # (b, L, C), H/4, W/4
    last = max(take)
    for i, stage in enumerate(stages[:last + 1]):
        y, next_input = stage(x, H, W, downsample=i < last)  # blocks' output (b, h*w, C_i)
        if i in take:
            maps[i] = y.unflatten(1, (H, W))                 # (b, h, w, C_i)
        x, H, W = next_input
    return maps


def _init_weights(m):
    """Official init: Linear trunc_normal(std 0.02) with zero bias, LayerNorm (1, 0); convs
    keep PyTorch's default; the SSM parameters are set in SS2D.reset_ssm_parameters."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """Multi-scale features for detection/segmentation (the official Backbone_VSSM).

    Backbone(config, out_indices=None): forward(image) returns a list, one NCHW map
    (b, C*2^i, H/2^(i+2), W/2^(i+2)) per chosen stage i (None: every stage), each the stage's
    block output (before downsampling) through its own LayerNorm `out_norms.i`. No final norm,
    no head. Weights: `load_pretrained(path)` loads an official detection or classification
    file (the output norms of a classification file start anew); `convert_official_state_dict`
    maps the official `outnorm{i}` names. As officially, every stage is built; the stages after
    the last one chosen, and that stage's downsample, are not run, so with the last stage left
    out their weights get no gradient: under DistributedDataParallel pass
    find_unused_parameters=True.
    """

    def __init__(self, config: VSSMConfig, out_indices=None):
        super().__init__()
        if not isinstance(config, VSSMConfig):
            raise TypeError(f"Backbone takes a VSSMConfig (build_config(name) for a named one), "
                            f"got {type(config).__name__}")
        n, given = len(config.depths), out_indices
        if out_indices is None:
            out_indices = range(n)
        out_indices = as_sequence(out_indices)
        if not out_indices or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n
                                  for i in out_indices):
            raise ValueError(f"Backbone: out_indices must be a tuple of stage numbers in "
                             f"0..{n - 1}, got {given!r}")
        trunk = VSSM(replace(config, num_classes=0))
        self.config, self.out_indices = trunk.config, tuple(sorted(set(out_indices)))
        self.patch_embed, self.layers = trunk.patch_embed, trunk.layers
        self.out_norms = nn.ModuleDict({str(i): nn.LayerNorm(config.stage_dim(i))
                                        for i in self.out_indices})

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's, after check_generation (as VSSM.load_state_dict)."""
        check_generation(state_dict, self.config.generation, type(self).__name__)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_pretrained(self, path, ema: bool = False):
        """Load an official file (load_official_checkpoint): a detection/segmentation backbone,
        or a classifier, whose output norms (`out_norms`) start anew and whose final norm and
        head are left out. Any other key missing or left over is an error: strict=False alone
        let a classifier of fewer blocks (VMamba-T into VMamba-S: the same widths) load, its
        missing blocks kept random, silently. Returns the out_norms keys left at their init."""
        sd = adapt_stem(load_official_checkpoint(path, ema=ema), self.config)
        check_generation(sd, self.config.generation, type(self).__name__)
        own = self.state_dict()
        # left over: a classifier's final norm and head, a detection file's other stages' norms
        check_fit(path, own, sd, may_miss=("out_norms.",),
                  may_leave=("norm.", "head.", "out_norms."))
        self.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
        return [k for k in own if k not in sd]

    set_grad_checkpointing = VSSM.set_grad_checkpointing     # the same stages, the same switch
    no_weight_decay = VSSM.no_weight_decay                   # the same SSM parameters
    init_weights = VSSM.init_weights

    def forward(self, x):                                    # (b, 3, H, W)
        check_image(x, self.config.in_chans, self.patch_embed, type(self).__name__)
        maps = run_stages(self.patch_embed, self.layers, x, self.out_indices)
        return [self.out_norms[str(i)](maps[i]).permute(0, 3, 1, 2).contiguous()  # (b, C_i, h, w)
                for i in self.out_indices]


# ---------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------
# The stems tell the generations apart in this file's names (convert_official_state_dict's).
STEM_KEY = {0: "patch_embed.proj.weight", 2: "patch_embed.conv1.weight"}
GENERATION_NAMES = {0: "generation 0 (vanilla_vmamba_*)", 2: "generation 2 (vmamba_*_s*l*)"}


def check_fit(path, own, sd, may_miss=(), may_leave=()):
    """Raise, before anything is loaded, unless the file's state dict sd fits the model's own:
    every key of own in sd (but those starting with a may_miss prefix), every key of sd in own
    (but may_leave ones), and every shared key of one shape; so a refused file changes
    nothing in the model."""
    missing = [k for k in own if k not in sd and not k.startswith(may_miss)]
    unused = [k for k in sd if k not in own and not k.startswith(may_leave)]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
              if k in own and sd[k].shape != own[k].shape]
    if missing or unused or shapes:
        parts = [f"{len(v)} {what}, e.g. {v[:4]}" for what, v in (
            ("keys of the model missing", missing), ("keys of the file unused", unused),
            ("shapes differ (file vs model)", shapes)) if v]
        raise RuntimeError(f"{path}: keys that do not fit this model ({'; '.join(parts)}): "
                           f"{_misfit_advice(own, sd, missing, unused)}")


def _misfit_advice(own, sd, missing, unused):
    """What to do about a file check_fit refuses: a prefix on its keys (a wrapper's), a
    backbone's file loaded into a classifier, or (by default) another configuration."""
    first = {k.split(".", 1)[0] for k in unused}
    if missing and len(first) == 1 and all("." in k for k in unused):
        prefix = first.pop() + "."
        try:                                 # the official names, under the prefix
            bare = convert_official_state_dict({k[len(prefix):]: sd[k] for k in unused})
        except (TypeError, ValueError):
            bare = {}
        if sum(k in own for k in bare) * 2 > len(unused):
            return (f"the file's keys carry a prefix, {prefix!r} (a wrapper's or a trainer's): "
                    f"remove it from the state dict")
    if any(k.startswith("out_norms.") for k in unused) and \
            all(k.startswith(("norm.", "head.")) for k in missing):
        return ("a backbone's file (output norms, no final norm or head): load it with "
                "Backbone(...).load_pretrained")
    return "build the configuration of the file"


def adapt_stem(state_dict, config):
    """RGB weights for a model of config.in_chans input channels, as timm adapts a pretrained
    first conv: for one channel the stem's filters summed over R, G and B (a grey image x then
    gives what the RGB model gives for (x, x, x)); for any other c but 3 the RGB filters
    repeated over the c channels (R, G, B, R, ...) and scaled by 3 / c (c/3 copies of an image
    give the RGB model's output). Computed in float32. A state dict without an RGB stem of
    this generation is returned as it is."""
    key, c = STEM_KEY[config.generation], config.in_chans
    w = state_dict.get(key) if isinstance(state_dict, Mapping) else None
    if c == 3 or not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[1] != 3:
        return state_dict
    w = w.float()
    if c == 1:
        w = w.sum(1, keepdim=True)
    else:
        w = w.repeat(1, -(-c // 3), 1, 1)[:, :c] * (3 / c)
    return {**state_dict, key: w}


def check_generation(state_dict, generation, who="VSSM"):
    """Raise if state_dict holds the stem of the other generation's model."""
    if not isinstance(state_dict, Mapping):
        return                                   # nn.Module's own error follows
    for gen, key in STEM_KEY.items():
        if gen != generation and key in state_dict and STEM_KEY[generation] not in state_dict:
            raise RuntimeError(                  # what nn.Module's load errors raise
                f"{who}.load_state_dict: these weights are of a {GENERATION_NAMES[gen]} model "
                f"({key!r}), the model is {GENERATION_NAMES[generation]}; build the name that "
                f"matches the file")


def convert_official_state_dict(sd):
    """Any official spelling (1: the seed's and released v0's names, 2: the released
    classification code's, 3: the one-file vmamba.py's; optionally wrapped under "model") ->
    this file's names.

    Keys it does not know are passed through unchanged, so `load_state_dict(strict=True)` then
    names them; nothing is dropped silently. A prefix that a DDP ("module.") or torch.compile
    ("_orig_mod.") wrapper gives every key is removed.
    """
    if isinstance(sd, Mapping) and isinstance(sd.get("model"), Mapping):
        sd = sd["model"]
    if not isinstance(sd, Mapping):
        raise TypeError(f"convert_official_state_dict: expected a state dict (a mapping of "
                        f"names to tensors), got {type(sd).__name__}")
    # The state dict of a DDP or torch.compile wrapper: its model's, under the wrapper's name.
    while sd and all(isinstance(k, str) for k in sd):
        prefix = next((p for p in ("module.", "_orig_mod.")
                       if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    for key, v in sd.items():
        if not isinstance(key, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"convert_official_state_dict: expected str names and tensor values, "
                            f"got {key!r}: {type(v).__name__}")
    conv_stem = any(k.startswith("patch_embed.5.") for k in sd)   # v2 stem: 0, 2, 5, 7
    conv_down = any(".downsample.3." in k for k in sd)            # v2 downsample: 1 conv, 3 norm
    stem = {"0": "conv1", "2": "norm1", "5": "conv2", "7": "norm2"} if conv_stem else \
           {"0": "proj", "2": "norm"}
    down = {"1": "reduction", "3": "norm"} if conv_down else {"1": "norm", "2": "reduction"}
    out = {}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] == "patch_embed" and parts[1] in stem:
            parts[1] = stem[parts[1]]
        elif parts[0] == "classifier" and parts[1] in ("norm", "head"):
            parts = parts[1:]
        elif parts[0].startswith("outnorm") and parts[0][7:].isdigit():
            parts = ["out_norms", parts[0][7:]] + parts[1:]
        elif parts[0] == "layers" and len(parts) > 3 and parts[2] == "downsample":
            parts[3] = down.get(parts[3], parts[3])
        elif parts[0] == "layers" and len(parts) > 4 and parts[2] == "blocks":
            parts[4] = {"norm": "ln_1", "norm2": "ln_2", "op": "self_attention"}.get(
                parts[4], parts[4])
            tail = parts[5:]
            # One-file v2 keeps the per-route weights as one Linear: (K*(R+2N), D), (K*D, R).
            if tail in (["x_proj", "weight"], ["dt_projs", "weight"]):
                if v.dim() != 2 or v.shape[0] % K:
                    raise ValueError(f"{key}: expected a (K*rows, cols) matrix with K={K}, "
                                     f"got shape {tuple(v.shape)}")
                parts[5:] = [tail[0] + "_weight"]
                v = v.reshape(K, v.shape[0] // K, v.shape[1])
        name = ".".join(parts)
        if name in out:
            raise ValueError(f"convert_official_state_dict: {key!r} and {out[name][0]!r} both "
                             f"map to {name!r}; the state dict mixes two spellings")
        out[name] = (key, v)
    return {name: v for name, (_, v) in out.items()}


class Opaque:
    """Stands in for any object of a checkpoint whose class or function is not on the loader's
    allow-list (the trainer's yacs CfgNode, a numpy scalar, a __reduce__ payload). It only
    records what the pickle hands it: the class's `global_name`, the constructor arguments,
    the state, items and elements. Nothing it is given is ever called."""
    global_name = "?"

    def __new__(cls, *args, **kwargs):                       # pickle's REDUCE, NEWOBJ, INST
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items, self.elements = args, kwargs, None, {}, []
        return self

    def __setstate__(self, state):                           # BUILD
        self.state = state

    def __setitem__(self, key, value):                       # SETITEM(S)
        self.items[key] = value

    def append(self, value):                                 # APPEND(S)
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def __repr__(self):
        return f"<Opaque {self.global_name}>"


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that never imports: find_class (the only way a pickle reaches a class or
    function) hands out collections.OrderedDict and torch's tensor rebuild function (both of
    which torch's own weights_only loader trusts), for torch's parameter rebuild a function
    that returns the tensor alone (dict(model.named_parameters()) saved), and for every other
    name a fresh Opaque subclass. torch.load adds the storage types itself (StorageType, a
    plain record)."""
    _ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
                ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
                ("torch._utils", "_rebuild_parameter"): lambda data, *rest: data}

    def find_class(self, module, name):
        allowed = self._ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        return type(str(name), (Opaque,), {"global_name": f"{module}.{name}"})


# torch.load(pickle_module=...) wants a module with an Unpickler.
_allow_list_pickle = types.ModuleType("vmamba_min_allow_list_pickle")
_allow_list_pickle.Unpickler = _AllowListUnpickler


def _not_a_zip(path):
    """What a file that is not a zip archive most likely is, for load_official_checkpoint's
    error: empty, a zip cut short (an interrupted download: a zip's directory is at its end), a
    safetensors file, or a torch.save file of the format before torch 1.6."""
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04"):
        return ("a zip archive without its end (its directory): the file is truncated or "
                "corrupt; download it again")
    if len(head) == 9 and head[8:] == b"{":       # an 8-byte header length, then its JSON
        return ("a safetensors file? Read it with safetensors.torch.load_file(path) and pass "
                "the dict to convert_official_state_dict")
    return ("not a torch.save zip archive (torch >= 1.6 format); an older file can be re-saved "
            "with torch.save in a trusted session")


def load_official_checkpoint(path, ema: bool = False):
    """An official checkpoint file -> a state dict for `model.load_state_dict(sd)` (strict).

    The official trainer saves a dict (model, model_ema, optimizer, lr_scheduler, scaler,
    epoch, and the yacs CfgNode `config`); a bare state dict is accepted too, and so is a
    detection/segmentation file as mmcv saves it ({"meta", "state_dict"}): of its state dict,
    the `backbone.` keys, without the prefix, for `Backbone` (neck and head keys are left out).
    It is read without executing anything from the file (see _AllowListUnpickler): torch.load's
    weights_only mode would refuse the CfgNode, and plain torch.load would run whatever the
    pickle names. ema=True takes the EMA weights ("model_ema")."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_official_checkpoint: expected a file path, got "
                        f"{type(path).__name__}")
    if not os.path.isfile(path):
        what = "a directory, not a file" if os.path.isdir(path) else "no such file"
        raise FileNotFoundError(f"load_official_checkpoint: {path}: {what}")
    if not zipfile.is_zipfile(path):   # the pre-1.6 format: not read (official files are zips)
        raise ValueError(f"{path}: {_not_a_zip(path)}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False,
                         pickle_module=_allow_list_pickle)
    except RuntimeError as e:
        if "pickle_module" in str(e):    # TORCH_FORCE_WEIGHTS_ONLY_LOAD set: torch's own
            raise RuntimeError(           # weights-only loader, which refuses ours
                f"{path}: TORCH_FORCE_WEIGHTS_ONLY_LOAD makes torch.load refuse this loader's "
                f"unpickler (which also executes nothing from the file: it admits tensors and "
                f"containers only); unset it for this call, or read a bare state dict with "
                f"torch.load(path, weights_only=True)") from e
        raise ValueError(f"{path}: not readable as a torch.save archive ({e})") from e
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path}: expected a dict (a checkpoint or a state dict), got "
                        f"{type(obj).__name__}")
    wrapped = "model" in obj or "model_ema" in obj
    if ema or wrapped:
        key = "model_ema" if ema else "model"
        if key not in obj:
            keys = sorted(map(str, obj))
            what = ("is a bare state dict, which has no EMA weights" if ema and not wrapped
                    else f"has {len(keys)} entries: {keys[:8]}{' ...' if len(keys) > 8 else ''}")
            raise KeyError(f"{path}: no {key!r} entry; the file {what}")
        obj = obj[key]
    elif isinstance(obj.get("state_dict"), Mapping):          # mmcv's {"meta", "state_dict"}
        obj = obj["state_dict"]
        prefix = "backbone."
        if any(isinstance(k, str) and k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()
                   if isinstance(k, str) and k.startswith(prefix)}
    return convert_official_state_dict(obj)


def to_official_state_dict(sd):
    """This file's names (a VSSM's or a Backbone's state dict) -> the official code's, as its
    released classification checkpoints spell them (a Backbone's output norms as
    `outnorm{i}`), so that weights trained here load into the official VSSM and Backbone_VSSM:
    the inverse of convert_official_state_dict on that spelling. Keys it does not know pass
    through unchanged. A model without a head (num_classes=0) or pruned by
    prune_intermediate_layers has no head or final norm here, where the official VSSM has one:
    load such weights into it with strict=False."""
    if not isinstance(sd, Mapping):
        raise TypeError(f"to_official_state_dict: expected a state dict, got "
                        f"{type(sd).__name__}")
    v2 = STEM_KEY[2] in sd
    if not v2 and STEM_KEY[0] not in sd:
        raise ValueError(f"to_official_state_dict: no stem weight ({STEM_KEY[0]!r} or "
                         f"{STEM_KEY[2]!r}); expected a VSSM's or Backbone's state dict (of a "
                         f"DDP or torch.compile wrapper: the wrapped model's, without the "
                         f"'module.' or '_orig_mod.' prefix)")
    stem = {"conv1": "0", "norm1": "2", "conv2": "5", "norm2": "7"} if v2 else \
           {"proj": "0", "norm": "2"}
    down = {"reduction": "1", "norm": "3"} if v2 else {}    # v0's PatchMerging2D: as here
    block = {"ln_1": "norm", "ln_2": "norm2", "self_attention": "op"}
    out = {}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] == "patch_embed" and len(parts) > 1:
            parts[1] = stem.get(parts[1], parts[1])
        elif parts[0] in ("norm", "head"):
            parts = ["classifier"] + parts
        elif parts[0] == "out_norms" and len(parts) > 1:
            parts = [f"outnorm{parts[1]}"] + parts[2:]
        elif parts[0] == "layers" and len(parts) > 3 and parts[2] == "downsample":
            parts[3] = down.get(parts[3], parts[3])
        elif parts[0] == "layers" and len(parts) > 4 and parts[2] == "blocks":
            parts[4] = block.get(parts[4], parts[4])
        out[".".join(parts)] = v
    return out


# The official VSSM.__init__'s defaults (MzeroMiko/VMamba, classification/models/vmamba.py).
OFFICIAL_DEFAULTS = dict(
    patch_size=4, in_chans=3, num_classes=1000, depths=[2, 2, 9, 2], dims=[96, 192, 384, 768],
    ssm_d_state=16, ssm_ratio=2.0, ssm_dt_rank="auto", ssm_act_layer="silu", ssm_conv=3,
    ssm_conv_bias=True, ssm_drop_rate=0.0, ssm_init="v0", forward_type="v2", mlp_ratio=4.0,
    mlp_act_layer="gelu", mlp_drop_rate=0.0, gmlp=False, drop_path_rate=0.1, patch_norm=True,
    norm_layer="LN", downsample_version="v2", patchembed_version="v1", use_checkpoint=False,
    posembed=False, imgsize=224)


def from_official_kwargs(kwargs) -> VSSMConfig:
    """The official VSSM(**kwargs) arguments -> VSSMConfig. A key left out takes the official
    VSSM's default (OFFICIAL_DEFAULTS), as the official constructor would, not VSSMConfig's.
    Anything this file does not implement (other forward types, conv sizes, dropouts, ...) is
    an error, never ignored."""
    kw = {**OFFICIAL_DEFAULTS, **kwargs}
    gen_of = {"v0": 0, "v05_noz": 2}
    ft = kw.pop("forward_type")
    if ft not in gen_of:
        raise ValueError(f"forward_type {ft!r} not supported (only {sorted(gen_of)})")
    gen = gen_of[ft]
    # Options fixed by the generation (or by this file): official name -> the value we need.
    fixed = {"patch_size": 4, "ssm_act_layer": "silu", "ssm_conv": 3,
             "ssm_conv_bias": gen == 0, "ssm_drop_rate": 0.0, "ssm_init": "v0",
             "mlp_act_layer": "gelu", "mlp_drop_rate": 0.0, "gmlp": False, "patch_norm": True,
             "norm_layer": ("ln", "ln2d"),  # layout only: same numbers either way
             "downsample_version": "v1" if gen == 0 else "v3",
             "patchembed_version": "v1" if gen == 0 else "v2", "posembed": False}
    bad = []
    for name, want in fixed.items():
        got = kw.pop(name)
        if name.endswith("_layer") and isinstance(got, str):
            got = got.lower()   # the official code looks these names up lowercased ("LN")
        if got not in (want if isinstance(want, tuple) else (want,)):
            bad.append(f"{name}={got!r} (need {want!r}"
                       f"{'' if name in kwargs else '; the official default'})")
    kw.pop("imgsize")         # only used by the official position embedding, which is off
    dims = kw.pop("dims")
    if isinstance(dims, (list, tuple)):
        if list(dims) != [dims[0] * 2 ** i for i in range(len(dims))]:
            bad.append(f"dims={dims!r} (need C, 2C, 4C, ...)")
        depths = kw["depths"]
        if isinstance(depths, (list, tuple)) and len(dims) != len(depths):
            bad.append(f"dims={dims!r} (one per stage of depths={depths!r})")
        dims = dims[0]
    if not isinstance(kw["use_checkpoint"], bool):
        bad.append(f"use_checkpoint={kw['use_checkpoint']!r} (need True or False)")
    dt_rank = kw.pop("ssm_dt_rank")
    mapping = {"depths": "depths", "in_chans": "in_chans", "num_classes": "num_classes",
               "ssm_d_state": "d_state", "ssm_ratio": "ssm_ratio", "mlp_ratio": "mlp_ratio",
               "drop_path_rate": "drop_path_rate", "use_checkpoint": "grad_checkpointing"}
    args = {mapping[k]: kw.pop(k) for k in list(kw) if k in mapping}
    bad += [f"{k}={v!r} (unknown)" for k, v in kw.items()]
    if bad:
        raise ValueError("from_official_kwargs: unsupported options: " + ", ".join(bad))
    if gen == 0 and args.get("mlp_ratio", 0.0) != 0.0:
        raise ValueError("from_official_kwargs: forward_type v0 with an MLP is not a release")
    return VSSMConfig(generation=gen, dim=dims, dt_rank=None if dt_rank == "auto" else dt_rank,
                      **args)


# ---------------------------------------------------------------------------------------------
# The nine released configurations (ImageNet-1K); only what differs from VSSMConfig's defaults
# ---------------------------------------------------------------------------------------------
CONFIGS = {
    "vanilla_vmamba_tiny": dict(generation=0, drop_path_rate=0.2),
    "vanilla_vmamba_small": dict(generation=0, depths=(2, 2, 27, 2), drop_path_rate=0.3),
    "vanilla_vmamba_base": dict(generation=0, dim=128, depths=(2, 2, 27, 2), drop_path_rate=0.6),
    "vmamba_tiny_s2l5": dict(depths=(2, 2, 5, 2), drop_path_rate=0.2),
    "vmamba_small_s2l15": dict(depths=(2, 2, 15, 2), drop_path_rate=0.3),
    "vmamba_base_s2l15": dict(dim=128, depths=(2, 2, 15, 2), drop_path_rate=0.6),
    "vmamba_tiny_s1l8": dict(depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.2),
    "vmamba_small_s1l20": dict(depths=(2, 2, 20, 2), ssm_ratio=1.0, drop_path_rate=0.3),
    "vmamba_base_s1l20": dict(dim=128, depths=(2, 2, 20, 2), ssm_ratio=1.0, drop_path_rate=0.5),
}


def build_config(name: str, **overrides) -> VSSMConfig:
    """The VSSMConfig of a released configuration, with keyword overrides (what build builds;
    Backbone takes one)."""
    if not isinstance(name, str):
        raise TypeError(f"a configuration name (a str) is expected, got {type(name).__name__}; "
                        f"valid names: {', '.join(CONFIGS)}")
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; valid names: {', '.join(CONFIGS)}")
    known = {f.name for f in fields(VSSMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; VSSMConfig fields: {sorted(known)}")
    return VSSMConfig(**{**CONFIGS[name], **overrides})


def build(name: str, **overrides) -> VSSM:
    """A released configuration by name, e.g. build("vmamba_tiny_s1l8", num_classes=10)."""
    return VSSM(build_config(name, **overrides))


# ---------------------------------------------------------------------------------------------
# Compiling: a stage's blocks compiled once (torch.compile(model) in inference, compile_blocks)
# ---------------------------------------------------------------------------------------------
# Inference (eval mode, no autograd) under torch.compile(model) calls each block as a "nested
# compile region": Dynamo traces a stage's first block into a subgraph and the stage's other
# blocks, their weights of the same shapes, call it, so Inductor generates one block per stage
# instead of every block in line (docs/design.md, "Nested compile regions"). Not with autograd:
# in training each block's drop-path rate is a constant to Dynamo, so every block would need a
# subgraph of its own. Not under torch.export where torch can tell it apart
# (_in_compiled_inference), nor outside Dynamo. BLOCK_REGIONS = False: every block in line.
def _call_block(blk, x, H, W):
    return blk(x, H, W)


# One subgraph per distinct block signature in a compiled graph: 4 per model and image size.
# torch 2.13 raises past max_reuse_entries (8 by default: three image sizes in one compiled
# function, say a multi-scale evaluation, passed it); torch 2.11 has no such argument, and
# compiled the three sizes.
_REUSE = ({"max_reuse_entries": 1024} if "max_reuse_entries" in
          inspect.signature(torch.compiler.nested_compile_region).parameters else {})
_block_region = torch.compiler.nested_compile_region(_call_block, **_REUSE)


def _in_compiled_inference(training):
    """Whether a block call goes through the region: Dynamo tracing (torch.compile, or a
    strict torch.export), eval mode, no autograd, and not an export that torch can tell apart.
    Outside Dynamo the region must not be reached: torch 2.11's non-strict export called it
    and reused one stage's subgraph for the next stage's wider block (a LayerNorm shape
    error). torch 2.11's Dynamo answers True to torch.compiler.is_exporting() in every trace,
    torch.compile's included (2.13 tells them apart), so there a strict export keeps the
    regions (its outputs are the same)."""
    return (torch.compiler.is_dynamo_compiling() and not training
            and not torch.is_grad_enabled()
            and not (_TELLS_EXPORT and torch.compiler.is_exporting()))


_TELLS_EXPORT = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


BLOCK_REGIONS = True


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Per-block ("regional") compilation: torch.compile every VSS block of model in place
    (nn.Module.compile), the stem, downsampling and head stay eager. Blocks of one stage share
    one compiled graph, so Inductor compiles four blocks instead of tracing all of them into
    one graph, and runs about as fast (docs/results-cpu.md): for training it compiles in about
    a third of torch.compile(model)'s time, for inference in about half (torch.compile(model)
    then compiles a stage's block once as well: BLOCK_REGIONS).
    dynamic=False unless given (dynamic=True warns): with a block's sizes left symbolic,
    Inductor (torch 2.13) failed on the second stage's block in training. Each DropPath gets
    its rate as a tensor (see DropPath: its masks then come from another random stream than
    eager's).
    Every block shares one code object, VSSBlock.forward, and Dynamo keeps at most
    `recompile_limit` graphs (8 by default) per code object: four stages in training and in
    evaluation already fill it, and past it a new batch size ran the blocks eager (with
    fullgraph=True: an error). So this raises the limit for the process, never lowers it,
    to 8 graphs for each stage of every model it was given so far, as if each stage's block
    were a function of its own. Returns model."""
    global _STAGES_COMPILED
    compile_kwargs.setdefault("dynamic", False)
    if compile_kwargs["dynamic"]:
        warnings.warn("compile_blocks: dynamic=True leaves a block's sizes symbolic: inference "
                      "works, but Inductor fails on a training step (torch 2.13: 'cannot "
                      "determine truth value of Relational'); for training pass dynamic=False, "
                      "the default", stacklevel=2)
    blocks = [m for m in model.modules() if isinstance(m, VSSBlock)]
    if not blocks:
        raise ValueError(f"compile_blocks: no VSSBlock in {type(model).__name__}")
    device = blocks[0].ln_1.weight.device
    if device.type == "meta":
        raise ValueError("compile_blocks: the model is on the meta device; materialise it first")
    for block in blocks:
        block.drop_path.rate = torch.tensor(block.drop_path.p, device=device)   # see DropPath
        block.compile(**compile_kwargs)
    _STAGES_COMPILED += sum(1 for m in model.modules() if isinstance(m, Stage) and m.blocks)
    _raise_recompile_limit(_DYNAMO_DEFAULT_LIMIT * _STAGES_COMPILED)
    return model


_STAGES_COMPILED = 0          # stages whose blocks compile_blocks compiled in this process
_DYNAMO_DEFAULT_LIMIT = 8     # torch._dynamo.config.recompile_limit's default


def _raise_recompile_limit(limit):
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


# ---------------------------------------------------------------------------------------------
# timm (optional): timm.create_model("vmamba_tiny_s1l8", ...) after register_timm()
# ---------------------------------------------------------------------------------------------
TIMM_MODULE = "vmamba_min_timm"   # the module name timm files the nine entrypoints under


def _timm_filter(sd, model):
    """timm's pretrained_filter_fn: official names converted, and every key but the head's
    checked against the model (check_fit): timm loads with strict=False when num_classes
    differs from the weights', where a checkpoint of another depth would load its common
    blocks, the rest left random. With in_chans other than 3, timm adapts the file's RGB stem
    after this filter (its first_conv, as adapt_stem does): the shape checked is the adapted
    one."""
    sd = convert_official_state_dict(sd)
    check_generation(sd, model.config.generation, type(model).__name__)
    checked = adapt_stem({k: v for k, v in sd.items() if not k.startswith("head.")},
                         model.config)
    check_fit("pretrained weights", model.state_dict(), checked, may_miss=("head.",))
    return sd


def register_timm():
    """Register the nine CONFIGS names with timm's model registry (explicit, idempotent; timm
    is imported here only). Then timm.create_model(name, pretrained=False, num_classes=...,
    drop_path_rate=..., **VSSMConfig fields) builds them; also timm's own options device,
    dtype, drop_rate=0 (timm's train.py passes its --drop, 0 by default) and global_pool="avg"
    (other options, or a dropout or pooling the model does not have: an error);
    features_only=True with out_indices gives the stages' NCHW maps (forward_intermediates);
    pretrained=True, pretrained_cfg_overlay=dict(file=path) loads an official checkpoint
    (VSSM.load_pretrained). Each pretrained_cfg describes the official evaluation transform
    (resize to 256, bicubic, centre crop 224, ImageNet mean/std). Returns the names."""
    import sys
    import timm.models
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

    if TIMM_MODULE in sys.modules and all(timm.models.is_model(n) for n in CONFIGS):
        return list(CONFIGS)
    # timm's register_model files an entrypoint under its function's module, which must hold
    # `default_cfgs`: a module of our own keeps vmamba_min's namespace (and __all__) as it is.
    module = types.ModuleType(TIMM_MODULE, "timm entrypoints of vmamba_min's nine releases")
    module.default_cfgs = generate_default_cfgs({name: dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875,
        interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="patch_embed." + ("proj" if kw.get("generation") == 0 else "conv1"),
        classifier="head", custom_load=True, license="mit", paper_ids="arXiv:2401.10166",
        origin_url="https://github.com/MzeroMiko/VMamba") for name, kw in CONFIGS.items()})
    sys.modules[TIMM_MODULE] = module

    def entrypoint(name):
        def create(pretrained=False, pretrained_cfg_overlay=None, **kwargs):
            # timm resets custom_load when an overlay names a file; for these names a file is
            # an official checkpoint, read by VSSM.load_pretrained (custom_load=False in the
            # overlay: timm's own weights-only loader, then the name conversion below).
            overlay = dict(pretrained_cfg_overlay or {})
            if overlay.get("file"):
                overlay.setdefault("custom_load", True)
            return build_model_with_cfg(
                lambda **kw: _timm_model(name, **kw), name, pretrained,
                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
                # an in-memory state_dict (pretrained_cfg_overlay=dict(state_dict=...)) or a
                # hub file goes through timm's own loader: official names are converted here
                # (pretrained_strict=False: the names converted, no key check, as asked)
                pretrained_filter_fn=(_timm_filter if kwargs.get("pretrained_strict", True)
                                      else lambda sd, model: convert_official_state_dict(sd)),
                pretrained_cfg_overlay=overlay, **kwargs)
        create.__name__ = create.__qualname__ = name
        create.__module__ = TIMM_MODULE
        create.__doc__ = f"VMamba {name} (vmamba_min.CONFIGS[{name!r}])."
        return create

    for name in CONFIGS:
        setattr(module, name, register_model(entrypoint(name)))
    return list(CONFIGS)


def _timm_model(name, drop_rate=0.0, global_pool="avg", device=None, dtype=None, **kwargs):
    """build(name, **kwargs) for timm's factory, which also passes options of its own: timm's
    train.py gives every model drop_rate (dropout before the head; 0 by default), and
    create_model device and dtype. The official VSSM has no such dropout and pools by
    averaging, so those take only the values that change nothing; the model is built on
    `device` and then cast to `dtype` (as model.to(dtype))."""
    if drop_rate:
        raise ValueError(f"{name}: drop_rate must be 0, got {drop_rate!r}: VMamba has no dropout "
                         f"before its head (drop_path_rate sets the blocks' stochastic depth)")
    if global_pool not in (None, "avg"):
        raise ValueError(f"{name}: global_pool must be None or 'avg' (the model pools by "
                         f"averaging), got {global_pool!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{name}: dtype must be a floating-point torch.dtype, got {dtype!r}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build(name, **kwargs)
    return model if dtype is None else model.to(dtype=dtype)
