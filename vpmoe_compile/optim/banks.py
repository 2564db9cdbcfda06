"""Shape banks: NorMuon logical matrices grouped into batched ``[N, m, n]`` problems
(docs/design.md#banks).

A *logical matrix* (``Member``) is a parameter or a set of row segments of one (a Q/K/V slice of a
fused QKV weight, a TPA factor of a packed factor weight). Members with the same ``[m, n]``,
the same param group, the same neuron axis, dtype and device form a ``Bank`` that owns contiguous
fp32 buffers:

* ``G``  ``[N, m, n]`` gathered gradients; re-used as the output buffer for the update ``-lr * Delta``.
* ``M``  ``[N, m, n]`` momentum (authoritative optimizer state; whole-parameter members expose
  ``M[i]`` as their ``momentum_buffer`` view).
* ``V``  second moment in the *oriented* layout: ``[N, s, 1]`` or ``[N, 1, L]``
  (``s = min(m, n)``, ``L = max(m, n)``), see :func:`bank_update`.

A 3-D *expert stack* ``[E, m, n]`` (``p[e]`` is expert ``e``'s ``[out, in]`` weight, optionally
split into ``k`` equal row blocks, e.g. gate / up) is a bank in place (:class:`StackSlice`): the
parameter viewed as ``[E * k, m / k, n]`` (a view, expert-major) *is* the bank's ``W`` (fp32 /
fp64 parameters), its gradient viewed the same way is read as ``G`` when it is a contiguous
tensor of the bank dtype, and ``M`` / ``V`` are per-parameter tensors whose views are the
optimizer state (``momentum_buffer`` ``[E, m, n]``, ``second_moment`` ``[E, m, 1]``).

The math of one step of one bank is :func:`bank_update`: elementwise prologue, Polar Express on
the wide orientation, neuron-wise second moment and the fork's scale rule, written so that
``torch.compile(dynamic=False, fullgraph=True)`` sees one graph per bank with hyper-parameters
as 0-d tensors (an LR change never recompiles) and no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .polar_express import Coefficients, _pe_polynomial

# (start row in the parameter, number of rows); a member's rows are its segments concatenated.
Segment = Tuple[int, int]


@dataclass
class Member:
    """One logical matrix: rows ``segments`` of parameter ``param_index`` of group ``group_index``."""

    group_index: int
    param_index: int
    segments: Tuple[Segment, ...]
    shape: Tuple[int, int]
    whole: bool
    name: str = ""


@dataclass
class StackSlice:
    """Members ``lo:hi`` of a stacked parameter ``[E, rows, n]`` viewed as ``[E * k, rows / k, n]``.

    Member ``j`` is row block ``j % k`` of expert ``j // k``; ``lo`` and ``hi`` are multiples of
    ``k`` (a bank holds whole experts), so the bank covers experts ``lo // k : hi // k``.
    """

    param: torch.Tensor
    k: int
    lo: int
    hi: int

    @property
    def member_view(self) -> Tuple[int, int, int]:
        """``[E * k, rows / k, n]``: shape of the parameter (and gradient) seen as members."""
        E, rows, n = self.param.shape
        return (E * self.k, rows // self.k, n)

    def members_of(self, t: torch.Tensor) -> torch.Tensor:
        """``[hi - lo, rows / k, n]`` view of this bank's members in a contiguous param-shaped ``t``."""
        return t.view(self.member_view)[self.lo : self.hi]

    def experts_of(self, t: torch.Tensor) -> torch.Tensor:
        """``[(hi - lo) / k, rows, n]`` slice of a param-shaped ``t`` (any strides)."""
        return t[self.lo // self.k : self.hi // self.k]


@dataclass
class Bank:
    """Equal-shape members of one param group, processed together (one compiled graph)."""

    group_index: int
    shape: Tuple[int, int]  # [m, n] of every member, original [out, in] orientation
    flip: bool  # m > n: PE runs on the transpose
    stat_dim: int  # oriented axis reduced for the neuron statistic (-1: per oriented row)
    stat_on_rows: bool  # neuron axis = original rows
    members: List[Member]
    G: Optional[torch.Tensor]  # None for a stack bank until its first gather
    M: torch.Tensor
    V: torch.Tensor
    shape_scale: float
    # Precomputed views for the gather / scatter (rebuilt with the bank).
    g_dst: List[torch.Tensor] = field(default_factory=list)
    d_src: List[torch.Tensor] = field(default_factory=list)
    w_dst: List[torch.Tensor] = field(default_factory=list)
    seg_member: List[int] = field(default_factory=list)  # member index of each segment view
    g_whole: List[torch.Tensor] = field(default_factory=list)  # G[i] views (whole-member banks)
    params: List[torch.Tensor] = field(default_factory=list)  # parameter of each member
    whole: bool = True  # every member is a whole parameter
    W: Optional[torch.Tensor] = None  # [N, m, n] re-homed parameters (p.data = W[i]) or None
    fused: bool = False  # Polar Express through the fused Triton kernels (pe_triton)
    X: Optional[torch.Tensor] = None  # [N, m, n] workspace of the one-kernel bank step
    direct: bool = False  # the bank kernel reads the members' gradients in place (no gather)
    gptr: Optional[torch.Tensor] = None  # [N] int64 device addresses of those gradients
    gptr_host: Optional[torch.Tensor] = None  # host copy in flight (kept alive)
    flat_idx: List[int] = field(default_factory=list)  # members' index in NorMuon._flat
    compute_dtype: torch.dtype = torch.float32  # Polar Express compute dtype
    # Stack bank (members are slices of one 3-D expert stack, see StackSlice): ``W`` is the
    # parameter's own storage (fp32 / fp64) and ``G`` the gradient itself when it can be read in
    # place, else ``G_buf`` (one whole-tensor copy; also the output buffer when ``W`` is None).
    stack: Optional[StackSlice] = None
    G_buf: Optional[torch.Tensor] = None
    # One-kernel bank step on the caller's stream: runs on NorMuon's per-SM workspace (True),
    # on its own X (False: the kernel configuration can run two programs per SM), untried (None).
    slot_x: Optional[bool] = None
    # The launch that runs this bank's one-kernel step with other banks' (merge_launches), or None.
    launch: Optional["LaunchGroup"] = None

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def device(self) -> torch.device:
        return self.M.device

    def member_v(self, i: int) -> torch.Tensor:
        """Second moment of member ``i`` in original orientation (``[m, 1]`` or ``[1, n]``)."""
        v = self.V[i]
        return v.mT if self.flip else v


@dataclass
class LaunchGroup:
    """Direct banks (gradients read through an address table) of one member shape, param group,
    orientation and Polar Express dtype whose one-kernel bank steps run as one launch
    (``NorMuon(merge_launches=True)``, :func:`~.pe_triton.normuon_banks_fused_`): e.g. the
    expert stacks of every layer, instead of one launch per stack. Each bank's ``gptr`` is a
    view of ``table``'s gradient row, so the bank's address refresh fills the group's table."""

    banks: List[Bank]
    table: torch.Tensor  # [4, N] int64 device addresses: gradient, momentum, second moment, parameter
    X: Optional[torch.Tensor] = None  # [N, m, n] workspace (when not on the per-SM workspace)
    slot_x: Optional[bool] = None  # as Bank.slot_x

    @property
    def size(self) -> int:
        return int(self.table.shape[1])

    @property
    def shape(self) -> Tuple[int, int]:
        return self.banks[0].shape

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.banks[0].compute_dtype

    @property
    def device(self) -> torch.device:
        return self.banks[0].M.device


def bank_layout(shape: Tuple[int, int], neuron_axis: str) -> Tuple[bool, bool, int]:
    """``(flip, stat_on_rows, stat_dim)`` for an ``[m, n]`` member.

    ``neuron_axis="rows"``: one statistic per output neuron (row of ``[out, in]``), the default.
    ``neuron_axis="larger"``: one statistic per index of the larger dimension (rows when m >= n).
    """
    m, n = shape
    flip = m > n
    if neuron_axis == "rows":
        on_rows = True
    elif neuron_axis == "larger":
        on_rows = m >= n
    else:
        raise ValueError(f"neuron_axis must be 'rows' or 'larger', got {neuron_axis!r}")
    # Oriented tensor is the transpose when flipped: original rows are oriented columns.
    if on_rows:
        stat_dim = -2 if flip else -1
    else:
        stat_dim = -1 if flip else -2
    return flip, on_rows, stat_dim


def oriented_v_shape(shape: Tuple[int, int], flip: bool, stat_dim: int) -> Tuple[int, int]:
    s, L = (shape[1], shape[0]) if flip else shape
    return (s, 1) if stat_dim == -1 else (1, L)


def bank_prologue(
    G: torch.Tensor,
    M: torch.Tensor,
    mu: torch.Tensor,
    flip: bool,
    safety: float,
    pe_eps: float,
    compute_dtype: torch.dtype,
    normalize: bool,
):
    """Steps 1-2 of docs/design.md#the-normuon-update and the Polar Express input, in the
    oriented layout.

    Args:
        G: ``[N, m, n]`` gradients (read only).
        M: ``[N, m, n]`` momentum, updated in place (``M <- M + (1 - mu)(G - M)``).
        mu: 0-d tensor, the momentum.
        flip: members are tall (``m > n``): the oriented input is ``U^T`` (``[N, n, m]``).
        normalize: True -> return ``X0 = round(U / ((1 + safety) ||U||_F + pe_eps))``
            oriented (``[N, s, L]``), the input of :func:`~.polar_express._pe_batched`
            (``norm2`` is None); False -> return ``round(U)`` contiguous in the *original*
            ``[N, m, n]`` layout (no transpose is materialised; the caller passes ``X.mT`` for
            tall banks) and ``norm2 = ||U||_F^2`` (fp32 ``[N]``), the input of the fused kernel
            (:func:`~.pe_triton.polar_express_fused_`), which normalises itself.

    Returns:
        ``(X, norm2)`` with ``X`` in ``compute_dtype``.
    """
    M.lerp_(G, 1.0 - mu)  # 1: M <- M + (1-mu)(G - M)
    U = torch.lerp(G, M, mu)  # 2: Nesterov U = G + mu (M - G)
    acc = torch.float64 if compute_dtype == torch.float64 else torch.float32
    if not normalize:
        norm2 = U.to(acc).square().sum(dim=(-2, -1)).to(torch.float32)
        return U.to(compute_dtype).contiguous(), norm2
    Xa = (U.mT if flip else U).to(acc)
    norm = torch.linalg.vector_norm(Xa, dim=(-2, -1), keepdim=True)
    return (Xa / ((1.0 + safety) * norm + pe_eps)).to(compute_dtype), None


def bank_epilogue(
    O: torch.Tensor,
    r_sum: Optional[torch.Tensor],
    G: torch.Tensor,
    V: torch.Tensor,
    W: Optional[torch.Tensor],
    decay: torch.Tensor,
    lr: torch.Tensor,
    beta2: torch.Tensor,
    eps: torch.Tensor,
    flip: bool,
    stat_dim: int,
    scale_mode: str,
    shape_scale: float,
    rms_scale: float,
) -> None:
    """Steps 4-10 of docs/design.md#the-normuon-update for a bank, in place.

    Args:
        O: ``[N, s, L]`` Polar Express output (oriented, compute dtype).
        r_sum: per-neuron sums of ``O^2`` along ``stat_dim`` (``[N, s]`` for ``stat_dim=-1``,
            ``[N, L]`` for ``-2``, fp32) when the fused kernel computed them, else None.
        G: ``[N, m, n]``; when ``W`` is None overwritten with ``-lr * Delta`` (original
            orientation) for the caller to add to the parameters.
        V: ``[N, s, 1]`` / ``[N, 1, L]`` second moment (oriented), updated in place.
        W: ``[N, m, n]`` parameters (re-homed bank) updated in place,
            ``W <- W * decay - lr * Delta`` (step 10), or None.
        decay, lr, beta2, eps: 0-d tensors (``1 - lr * wd``, learning rate, second-moment
            decay, epsilon).
        stat_dim: oriented axis averaged for the per-neuron mean square.
        scale_mode: ``"shape"`` (fork: restore ``||O||_F`` then ``* sqrt(max(1, m/n))``) or
            ``"rms0.2"`` (paper: ``0.2 * sqrt(mn) / ||O_hat||_F``).
        shape_scale: ``sqrt(max(1, m/n))``; rms_scale: ``0.2 * sqrt(m n)``.
    """
    O = O.to(V.dtype)  # 3: caller's fp32 (fp64) copy of the PE output
    length = O.shape[stat_dim]
    if r_sum is None:
        r = O.square().mean(dim=stat_dim, keepdim=True)  # 4: per-neuron mean square
    else:
        r = (r_sum.to(V.dtype) / length).unsqueeze(stat_dim)
    V.lerp_(r, 1.0 - beta2)  # 5
    s = torch.rsqrt(V + eps)  # 6
    R = r.sum(dim=(-2, -1), keepdim=True) * length  # ||O||_F^2
    S = (r * s * s).sum(dim=(-2, -1), keepdim=True) * length  # ||s * O||_F^2
    if scale_mode == "shape":
        k = s * (torch.sqrt(R) / torch.clamp_min(torch.sqrt(S), eps)) * shape_scale  # 7-9
    else:
        k = s * (rms_scale / torch.clamp_min(torch.sqrt(S), eps))
    delta = (k * O) * (-lr)
    delta = delta.mT if flip else delta
    if W is None:
        G.copy_(delta)
    else:
        W.copy_(W * decay + delta)  # 10: W (1 - lr wd) - lr Delta


def bank_update(
    G: torch.Tensor,
    M: torch.Tensor,
    V: torch.Tensor,
    W: Optional[torch.Tensor],
    decay: torch.Tensor,
    lr: torch.Tensor,
    mu: torch.Tensor,
    beta2: torch.Tensor,
    eps: torch.Tensor,
    flip: bool,
    stat_dim: int,
    table: Coefficients,
    safety: float,
    pe_eps: float,
    compute_dtype: torch.dtype,
    scale_mode: str,
    shape_scale: float,
    rms_scale: float,
) -> None:
    """One NorMuon step for a bank (steps 1-10 of docs/design.md#the-normuon-update), in place,
    PyTorch Polar Express.

    ``bank_prologue`` -> :func:`~.polar_express._pe_batched` -> ``bank_epilogue``; see those
    for the arguments (``G`` ``[N, m, n]`` gradients, ``M`` momentum, ``V`` oriented second
    moment, ``W`` re-homed parameters or None, hyper-parameters as 0-d tensors).
    """
    X, _ = bank_prologue(G, M, mu, flip, safety, pe_eps, compute_dtype, True)
    O = _pe_polynomial(X, table, compute_dtype)
    bank_epilogue(
        O, None, G, V, W, decay, lr, beta2, eps, flip, stat_dim, scale_mode, shape_scale, rms_scale
    )
