"""NorMuon with Polar Express (docs/design.md#the-normuon-update), batched over shape banks.

``NorMuon`` is a plain :class:`torch.optim.Optimizer` over 2-D tensors and 3-D expert stacks
(below). Per logical matrix ``W`` (``m x n``, ``[out, in]``) with gradient ``G``:

    M <- M + (1 - mu)(G - M)                 momentum (EMA form), fp32
    U  = G + mu (M - G)                      Nesterov
    O  = PE(U)                               Polar Express, bf16 on CUDA (fp32 on CPU by default)
    r_i = mean_j O_ij^2;  v <- v + (1 - beta2)(r - v)
    O_hat = O / sqrt(v + eps)  (rows), rescaled to ||O||_F, times sqrt(max(1, m/n))
    W <- W (1 - lr wd) - lr O_hat

A parameter can hold several logical matrices: a group may carry ``"blocks"`` (a list aligned
with ``"params"``), each entry ``None`` (whole matrix) or a tuple of logical matrices, each a
tuple of ``(row_start, num_rows)`` segments (e.g. the Q rows of every query group of a fused QKV
weight). The second moment of such a parameter stays ``[m, 1]`` in the parameter's row order.
A group may also carry ``"layouts"`` (aligned with ``"params"``): ``None`` (the parameter is an
``[out, in]`` matrix) or ``(E, in, out)`` for Megatron's legacy ``GroupedMLP`` storage, whose
memory viewed as ``[E, in, out]`` holds expert ``e``'s weight transposed; its logical matrix is
``[E * out, in]`` (row ``e * out + j`` = output neuron ``j`` of expert ``e``), blocks index those
rows (default: one logical matrix per expert) and never cross an expert, and every read or write
goes through strided per-expert views (docs/design.md#the-optimizer). Its second moment is
``[E * out, 1]``.

Expert stacks: a 3-D parameter ``[E, m, n]`` holds ``E`` matrices, ``p[e]`` being expert ``e``'s
``[out, in]`` weight; each is orthogonalised on its own, exactly as ``E`` separate 2-D
parameters. Its ``blocks`` entry (``None``: one logical matrix per expert) applies to every
``p[e]`` and must cut it into ``k`` equal row blocks in order (the gate / up halves of a gated
fc1: ``(((0, F),), ((F, F),))``), so that ``p.view(E * k, m / k, n)`` lists the logical matrices
expert-major. That view is the bank itself (:class:`~.banks.StackSlice`), nothing per expert:

* fp32 (fp64) stacks are updated in place: the bank's ``W`` is a view of the parameter's own
  storage (no ``p.data`` re-binding, no copy);
* the gradient is read in place as the bank's ``G`` when it is a contiguous tensor of the
  parameter's dtype and shape (Megatron's fp32 ``main_grad`` views, plain autograd gradients)
  and the step runs eagerly. The bank kernels only *read* ``G`` when ``W`` is present, so the
  gradient is left unchanged. Otherwise (other dtype or strides; CUDA graphs, whose captured
  kernels must read a fixed address) ``G`` is the bank's own buffer, filled by one whole-tensor
  copy per stack per step; with ``direct_grads`` the one-kernel bank step of a graph reads the
  gradient in place through its address table instead;
* low-precision (bf16) stacks gather (one cast-copy), get ``-lr * Delta`` in the bank's buffer
  and add it back with one whole-tensor op; weight decay is one op on the whole stack.

State of a stack: ``momentum_buffer`` ``[E, m, n]`` and ``second_moment`` ``[E, m, 1]`` (rows
in the parameter's order; ``[E, 1, n]`` for ``neuron_axis="larger"`` on wide unsplit experts,
refused for split ones), both views of the bank buffers. A stack's gradient is present or
``None`` as a whole: a ``None`` gradient skips the stack (no state change, no decay).

Execution: members are grouped into banks (:mod:`.banks`) and each bank runs one batched,
optionally ``torch.compile``-d function (for banks of short-wide matrices on CUDA, one Triton
kernel for the whole bank step, or a compiled prologue, the fused Polar Express kernel and a
compiled epilogue: :mod:`.pe_triton`); hyper-parameters live in persistent 0-d tensors updated
with ``fill_`` (no recompilation when the scheduler changes ``lr`` / ``weight_decay``), and our
code issues no host synchronisation (no ``.item()``, no branching on tensor values). Whole fp32
parameters are re-homed into their bank's contiguous storage (``rehome=True``) so momentum,
PE, second moment, weight decay and the update of a bank run as one batched function; split
(QKV / TPA) parameters are gathered / scattered with foreach ops. Parameters whose ``grad`` is
``None`` are skipped exactly (no state change, no weight decay), as in the reference fork.

CUDA graphs (``cuda_graph=True``, docs/design.md#banks): the first step with all gradients
present runs eagerly (compilation, autotuning, workspaces), the next one captures the whole bank
computation (weight decay, every bank, the update, split-parameter state) into one graph and
later steps replay it; the gradient gather is a second graph, captured once the gradients'
addresses are the same on two consecutive steps (Megatron's ``main_grad`` buffers) and replayed
while they stay there (otherwise the gather runs eagerly). Hyper-parameters are written into
their 0-d tensors before the replay, so schedules apply. Graphs are dropped and re-captured
whenever the banks are rebuilt (new parameters, re-bound ``.data``, ``load_state_dict``). A step
with some gradients ``None`` runs eagerly.

State (``state_dict``): per parameter ``momentum_buffer`` (param shape) and ``second_moment``
(``[m, 1]``, or ``[1, n]`` for ``neuron_axis="larger"`` on wide matrices; ``[E, m, 1]`` /
``[E, 1, n]`` for expert stacks), both fp32 (fp64 for fp64 parameters); per group
``normuon_step``. ``state_dict`` / ``load_state_dict`` round-trip exactly. ``load_state_dict``
first checks the checkpoint against the parameters (:meth:`NorMuon.check_state_dict`: counts,
state shapes, blocks / layouts, expert stacks) and raises
:class:`~.state_check.StateDictMismatch` naming the first mismatching parameter (by
``param_names``) with the optimizer unchanged; an unexpected error half-way is rolled back.
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .banks import (
    Bank,
    LaunchGroup,
    Member,
    StackSlice,
    bank_epilogue,
    bank_layout,
    bank_prologue,
    bank_update,
    oriented_v_shape,
)
from .polar_express import PE_EPS, PE_FORMS, resolve_coefficients
from .state_check import (
    StateDictMismatch,
    check_group_counts,
    mismatch,
    param_label,
    param_state,
    rollback_on_error,
    shape_of,
    state_parts,
)

__all__ = ["NorMuon"]

#: One-kernel bank steps on the caller's stream share a per-SM workspace (``_sm_workspace``)
#: instead of a workspace matrix per member. Off by default: opt in with ``True`` (not yet run on
#: a GPU; docs/design.md#banks).
SM_WORKSPACE = False

_HYPER_KEYS = ("lr", "momentum", "beta2", "eps", "weight_decay")

Layout = Optional[Tuple[int, int, int]]

#: Set to True (benchmarks) to wrap the step's phases in ``torch.profiler.record_function``
#: ranges ``normuon.{decay,gather,prologue,pe,epilogue,update,scatter,export}``.
PROFILE_RANGES = False


def _range(name: str):
    return torch.profiler.record_function(name) if PROFILE_RANGES else contextlib.nullcontext()


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _logical_shape(p: torch.Tensor, layout: Layout) -> Tuple[int, int]:
    """``[rows, cols]`` of a parameter's logical ``[out, in]`` matrix (see module docstring); of
    each expert's matrix for a 3-D expert stack."""
    if p.ndim == 3:
        return int(p.shape[1]), int(p.shape[2])
    if layout is None:
        return int(p.shape[0]), int(p.shape[1])
    E, fin, fout = layout
    return E * fout, fin


def _rows(t: torch.Tensor, layout: Layout, start: int, length: int) -> torch.Tensor:
    """View of rows ``[start, start + length)`` of the logical matrix of ``t`` (param-shaped)."""
    if layout is None:
        return t[start : start + length]
    E, fin, fout = layout
    e, j = divmod(start, fout)
    return t.view(E, fin, fout)[e].mT[j : j + length]


def _stack_split(p: torch.Tensor, blocks) -> int:
    """``k``: the equal, in-order row blocks that ``blocks`` cut each ``p[e]`` of a 3-D expert
    stack ``[E, m, n]`` into (1 for ``None``).

    Raises:
        ValueError: blocks that are not ``k`` single segments ``(j * m / k, m / k)`` in order
            (reading them would need a gather per expert).
    """
    if blocks is None:
        return 1
    k, rows = len(blocks), int(p.shape[1])
    size = rows // k if k else 0
    expected = tuple(((j * size, size),) for j in range(k))
    got = tuple(tuple((int(s), int(n)) for s, n in member) for member in blocks)
    if k == 0 or size * k != rows or got != expected:
        raise ValueError(
            f"blocks {blocks} of an expert stack {tuple(p.shape)} must cut each expert's "
            f"[{rows}, {int(p.shape[2])}] matrix into equal row blocks in order, e.g. the "
            "gate / up halves (((0, F),), ((F, F),))"
        )
    return k


class _Graphs:
    """CUDA graphs of one bank set (see module docstring)."""

    def __init__(self):
        self.warm = False
        self.compute: Optional[torch.cuda.CUDAGraph] = None
        self.gather: Optional[torch.cuda.CUDAGraph] = None
        self.gather_key: Optional[List[int]] = None
        self.last_ptrs: Optional[List[int]] = None
        self.captures = 0


class NorMuon(torch.optim.Optimizer):
    """NorMuon + Polar Express over 2-D parameters and 3-D expert stacks ``[E, m, n]``.

    Args:
        params: parameters or param groups (2-D tensors, or contiguous 3-D expert stacks
            ``[E, m, n]``). A group may carry ``"blocks"`` and ``"layouts"`` (see module
            docstring) and any Megatron scheduler keys (``max_lr``, ``wd_mult``...).
        lr: learning rate (fork scale: RMS of an update is about ``lr / sqrt(fan_in)``).
        momentum: ``mu`` of the EMA momentum (Nesterov).
        beta2: decay of the per-neuron second moment.
        eps: epsilon of the second-moment normalisation and of the Frobenius rescale.
        weight_decay: decoupled weight decay ``W <- W (1 - lr wd)``.
        coefficients: explicit Polar Express table; ``None`` -> generated for ``(pe_steps, safety)``.
        pe_steps, safety: Polar Express steps and safety factor (must be the ones of the table).
        pe_eps: Polar Express normalisation epsilon (1e-6).
        pe_dtype: PE compute dtype; ``None`` -> bf16 on CUDA, fp32 on CPU (the fork's CPU path),
            fp64 for fp64 parameters.
        scale_mode: ``"shape"`` (fork, default) or ``"rms0.2"`` (paper).
        neuron_axis: ``"rows"`` (default) or ``"larger"``.
        compile: ``False``, ``True`` (inductor) or a backend name for ``torch.compile`` of the
            per-bank functions. ``None`` -> compile only on CUDA.
        max_bank_size: most members in one bank (bounds workspace memory).
        rehome: store whole-matrix fp32 (fp64) parameters as views of their bank's contiguous
            ``[N, m, n]`` storage (``p.data = bank.W[i]``), so that weight decay and the
            update run inside the bank kernel; parameters whose ``.data`` is later replaced are
            detected and the banks rebuilt. Split (QKV / TPA / GroupedMLP) and low-precision
            parameters are never re-homed (updated through foreach ops instead). fp32 expert
            stacks need no re-homing: they are their bank's storage (whatever ``rehome`` says).
        pe_backend: ``"auto"`` (the fused Triton kernel of :mod:`.pe_triton` for CUDA banks with
            ``min(m, n) <= 128`` in bf16 / fp32, PyTorch ``bmm`` otherwise), ``"torch"``
            (always PyTorch), ``"triton"`` (the fused kernel wherever it applies, also under
            ``TRITON_INTERPRET=1`` on the CPU in fp32; PyTorch for the other banks).
        cuda_graph: capture the step into CUDA graphs (CUDA parameters only;
            docs/design.md#banks).
        fused_bank: for the banks of the fused kernel, run the whole bank step (momentum,
            Polar Express, second moment, update) in one kernel
            (:func:`~.pe_triton.normuon_bank_fused_`); False: compiled prologue, the fused
            Polar Express kernel and a compiled epilogue.
        direct_grads: the one-kernel bank step of a bank of whole, re-homed parameters (or of an
            fp32 expert stack) reads each member's gradient where it is (a table of addresses,
            refreshed when they change) instead of gathering them into the bank first;
            gradients must then be contiguous, 16-byte aligned fp32 tensors of the parameter's
            shape (otherwise that bank gathers). Off by default; on the GPU its steps equal
            the gathered ones bitwise (``tests/vpmoe_compile/optim/test_normuon_gpu.py``).
        pe_form: ``"gram"`` (default) or ``"standard"``: the Polar Express form of the fused
            kernels' banks (docs/design.md#gram-form; the other banks always run the standard
            form). The Gram form runs the steps on the ``s x s`` Gram matrix and sweeps ``X``
            twice instead of five times (restarted after :data:`~.pe_triton.GRAM_RESTART`
            steps); measured on an H100 with the vpMoE-8L parameter set: 9.0 vs 10.7 ms per step.
        merge_launches: run the one-kernel bank steps of the direct banks (``direct_grads``)
            that share member shape, param group, orientation and Polar Express dtype -- the
            expert stacks of every layer -- as one kernel launch through a table of member
            addresses (:func:`~.pe_triton.normuon_banks_fused_`) instead of one launch per bank,
            so the GPU does not drain at the end of each bank. The result is bitwise that of one
            launch per bank; a step with a missing gradient launches each bank on its own, and so
            does a bank whose members are not a multiple of 16 bytes.
            Off by default (not yet timed on a GPU; docs/design.md#banks).
        overlap_banks: in a CUDA-graph step, run the banks that do not fill the GPU by
            themselves (every bank but the one-kernel bank steps of at least one member per
            SM, i.e. the expert stacks) on a second, higher-priority stream beside those that
            do: their short, latency-bound kernels fill the SMs that the big bank kernels leave
            idle instead of running after them (docs/design.md#banks). The result is the same
            bitwise (the banks are independent); False runs every bank on the caller's stream.
        param_names: ``{id(param): name}`` (e.g. the model's parameter names); errors of the
            construction and of :meth:`load_state_dict` name parameters by it. Also settable
            later as the ``param_names`` attribute.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        momentum: float = 0.95,
        beta2: float = 0.95,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        *,
        coefficients: Optional[Sequence[Sequence[float]]] = None,
        pe_steps: int = 5,
        safety: float = 2e-2,
        pe_eps: float = PE_EPS,
        pe_dtype: Optional[torch.dtype] = None,
        scale_mode: str = "shape",
        neuron_axis: str = "rows",
        compile: Union[bool, str, None] = False,
        max_bank_size: int = 2048,
        rehome: bool = True,
        pe_backend: str = "auto",
        cuda_graph: bool = False,
        fused_bank: bool = True,
        direct_grads: bool = False,
        merge_launches: bool = False,
        pe_form: str = "gram",
        overlap_banks: bool = True,
        param_names: Optional[Dict[int, str]] = None,
    ):
        self.param_names: Dict[int, str] = dict(param_names or {})
        if lr < 0.0:
            raise ValueError(f"invalid lr {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"invalid beta2 {beta2}")
        if scale_mode not in ("shape", "rms0.2"):
            raise ValueError(f"scale_mode must be 'shape' or 'rms0.2', got {scale_mode!r}")
        if neuron_axis not in ("rows", "larger"):
            raise ValueError(f"neuron_axis must be 'rows' or 'larger', got {neuron_axis!r}")
        if pe_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"pe_backend must be 'auto', 'torch' or 'triton', got {pe_backend!r}")
        if pe_form not in PE_FORMS:
            raise ValueError(f"pe_form must be one of {PE_FORMS}, got {pe_form!r}")
        defaults = dict(
            lr=lr, momentum=momentum, beta2=beta2, eps=eps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)
        self.table = resolve_coefficients(coefficients, steps=pe_steps, safety=safety)
        self.pe_record = (
            dict(steps=int(pe_steps), safety=float(safety), ell=1e-3, cushion=2e-2, eps=float(pe_eps))
            if coefficients is None
            else dict(table=[list(t) for t in self.table], safety=float(safety), eps=float(pe_eps))
        )
        self.safety = float(safety)
        self.pe_eps = float(pe_eps)
        self.pe_dtype = pe_dtype
        self.scale_mode = scale_mode
        self.neuron_axis = neuron_axis
        self.max_bank_size = int(max_bank_size)
        self.compile_mode = compile
        self.rehome = bool(rehome)
        self.pe_backend = pe_backend
        self.cuda_graph = bool(cuda_graph)
        self.fused_bank = bool(fused_bank)
        self.direct_grads = bool(direct_grads)
        self.merge_launches = bool(merge_launches)
        self.pe_form = pe_form
        self.overlap_banks = bool(overlap_banks)
        self._side_stream: Optional[torch.cuda.Stream] = None
        # per-SM workspaces of the one-kernel bank steps on the caller's stream (_sm_workspace)
        self._sm_ws: Dict[Tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
        self._banks: Optional[List[Bank]] = None
        self._groups: List[LaunchGroup] = []  # merge_launches
        self._flat: List[torch.Tensor] = []
        # expert stacks: (param, M [E*k, m/k, n], V oriented, second-moment state shape)
        self._stacks: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[int, ...]]] = []
        self._ptrs: List[int] = []
        self._decay_lists: Dict[int, Dict[Tuple, List[torch.Tensor]]] = {}
        self._hyper: Dict[Tuple[int, torch.device, torch.dtype], Dict[str, Any]] = {}
        self._hyper_keys: List[Tuple[int, torch.device, torch.dtype]] = []
        self._fns = None
        self._graphs: Optional[_Graphs] = None
        self._dense_grads: Optional[List[torch.Tensor]] = None  # last all-present dense grads
        self._table_key: Optional[List[int]] = None  # gradient addresses in the banks' tables
        self._all_cuda = False
        self._any_direct = False

    # ------------------------------------------------------------------ setup helpers
    def _check_group(self, group: Dict[str, Any], gi: Optional[int] = None) -> None:
        n_params = len(group["params"])
        layouts = group.get("layouts")
        if layouts is None:
            group["layouts"] = [None] * n_params
        elif len(layouts) != n_params:
            raise ValueError("group 'layouts' must be aligned with group 'params'")
        group["layouts"] = [None if lay is None else tuple(int(v) for v in lay) for lay in group["layouts"]]
        blocks = group.get("blocks")
        if blocks is None:
            group["blocks"] = [None] * n_params
        elif len(blocks) != n_params:
            raise ValueError("group 'blocks' must be aligned with group 'params'")
        else:
            group["blocks"] = list(blocks)
        group.setdefault("normuon_step", 0)
        # The table's generating parameters travel with it (checkpoints, logs;
        # docs/design.md#polar-express).
        group["polar_express"] = dict(self.pe_record)
        for i in range(n_params):
            self._check_param(group, i, gi)

    def _label(self, p: torch.Tensor, gi: Optional[int], pi: int) -> str:
        return param_label(p, self.param_names, gi, pi)

    def _check_param(self, group: Dict[str, Any], i: int, gi: Optional[int] = None) -> None:
        """Check parameter ``i`` of ``group`` against its blocks / layout (normalising
        ``group["blocks"][i]``); errors name the parameter."""
        p = group["params"][i]
        try:
            self._check_param_unlabelled(group, i, p, group["blocks"][i], group["layouts"][i])
        except (ValueError, NotImplementedError) as e:
            raise type(e)(f"{self._label(p, gi, i)}: {e}") from None

    def _check_param_unlabelled(self, group, i, p, blk, lay) -> None:
        """The checks of :meth:`_check_param` (also run by :meth:`check_state_dict` on a copy of
        the group with the checkpoint's blocks / layouts)."""
        if p.ndim == 3:
            if lay is not None:
                raise ValueError("a 3-D expert stack [E, m, n] takes no GroupedMLP layout")
            if not p.is_contiguous() or min(p.shape) <= 0:
                raise ValueError(
                    f"a 3-D expert stack must be a non-empty contiguous [E, m, n] tensor, got "
                    f"shape {tuple(p.shape)} strides {p.stride()}"
                )
            if blk is not None and len(blk) == 1:
                blk = group["blocks"][i] = None if _stack_split(p, blk) == 1 else blk
            _stack_split(p, blk)
        elif p.ndim != 2:
            raise ValueError(
                f"NorMuon only takes 2-D parameters and 3-D expert stacks [E, m, n], got "
                f"shape {tuple(p.shape)}; route other tensors to AdamW"
            )
        if lay is not None:
            E, fin, fout = lay
            if min(lay) <= 0 or E * fin * fout != p.numel():
                raise ValueError(
                    f"layout (E, in, out) = {lay} does not match a parameter of "
                    f"{p.numel()} elements ({tuple(p.shape)})"
                )
            if not p.is_contiguous():
                raise ValueError("a parameter with a GroupedMLP layout must be contiguous")
            if blk is None:  # default: one logical matrix per expert
                blk = tuple(((e * fout, fout),) for e in range(E))
                group["blocks"][i] = blk
            for member in blk:
                for start, length in member:
                    if start // fout != (start + length - 1) // fout:
                        raise ValueError(
                            f"block segment {(start, length)} crosses an expert boundary "
                            f"(rows per expert {fout})"
                        )
        rows, cols = _logical_shape(p, lay)
        if blk is not None:
            segs = sorted(seg for member in blk for seg in member)
            covered = 0
            for start, length in segs:
                if start != covered or length <= 0:
                    raise ValueError(f"blocks {blk} do not tile the {rows} rows")
                covered += length
            if covered != rows:
                raise ValueError(f"blocks {blk} cover {covered} of {rows} rows")
            if self.neuron_axis == "larger":
                for member in blk:
                    m = sum(length for _, length in member)
                    if m < cols:
                        raise NotImplementedError(
                            "neuron_axis='larger' with per-column statistics is not "
                            "supported for split (QKV / TPA / GroupedMLP / gate-up expert "
                            f"stack) parameters, got a [{m}, {cols}] block of a "
                            f"{tuple(p.shape)} parameter"
                        )

    def _state_shapes(self, p: torch.Tensor, blk, lay: Layout) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """``(momentum_buffer, second_moment)`` shapes of a (checked) parameter's state, as
        :meth:`state_dict` writes them and :meth:`_import_state` reads them."""
        if p.ndim == 3:
            E, rows, n = (int(v) for v in p.shape)
            k = _stack_split(p, blk)
            on_rows = bank_layout((rows // k, n), self.neuron_axis)[1]
            return tuple(p.shape), ((E, rows, 1) if on_rows else (E, 1, n))
        rows, cols = _logical_shape(p, lay)
        whole = lay is None and (
            blk is None
            or (len(blk) == 1 and tuple((int(a), int(b)) for a, b in blk[0]) == ((0, rows),))
        )
        if whole:
            on_rows = bank_layout((rows, cols), self.neuron_axis)[1]
            return tuple(p.shape), ((rows, 1) if on_rows else (1, cols))
        return tuple(p.shape), (rows, 1)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "table"):
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
            self._banks = None

    def _compute_dtype(self, p: torch.Tensor) -> torch.dtype:
        if p.dtype == torch.float64:
            return torch.float64
        if self.pe_dtype is not None:
            return self.pe_dtype
        return torch.bfloat16 if p.is_cuda else torch.float32

    def _use_fused(self, shape: Tuple[int, int], device: torch.device, dtype: torch.dtype) -> bool:
        if self.pe_backend == "torch" or dtype == torch.float64:
            return False
        if self.pe_backend == "auto" and device.type != "cuda":
            return False
        try:
            from .pe_triton import fused_pe_supported
        except Exception:  # pragma: no cover - triton missing or broken
            if self.pe_backend == "triton":
                raise
            return False
        return fused_pe_supported(shape, device, dtype)

    def _get_fns(self):
        """``(update, prologue, epilogue)``: compiled (or plain) bank functions."""
        if self._fns is not None:
            return self._fns
        mode = self.compile_mode
        if mode is None:
            mode = torch.cuda.is_available()
        if mode:
            import torch._dynamo

            n_banks = len(self._banks or [])
            cfg = torch._dynamo.config
            cfg.cache_size_limit = max(cfg.cache_size_limit, 2 * n_banks + 8)
            if hasattr(cfg, "accumulated_cache_size_limit"):
                cfg.accumulated_cache_size_limit = max(
                    cfg.accumulated_cache_size_limit, 4 * n_banks + 64
                )
            backend = mode if isinstance(mode, str) else "inductor"
            self._fns = tuple(
                torch.compile(f, dynamic=False, fullgraph=True, backend=backend)
                for f in (bank_update, bank_prologue, bank_epilogue)
            )
        else:
            self._fns = (bank_update, bank_prologue, bank_epilogue)
        return self._fns

    def _params_changed(self) -> bool:
        """Parameters replaced (e.g. Megatron's fp32 main params) or their ``.data`` re-bound."""
        flat = [p for g in self.param_groups for p in g["params"]]
        if len(flat) != len(self._flat) or not all(map(operator.is_, flat, self._flat)):
            return True
        return list(map(torch.Tensor.data_ptr, flat)) != self._ptrs

    # ------------------------------------------------------------------ banks
    def _members(self) -> List[Member]:
        members = []
        for gi, group in enumerate(self.param_groups):
            for pi, (p, blk, lay) in enumerate(zip(group["params"], group["blocks"], group["layouts"])):
                if p.ndim == 3:
                    continue  # an expert stack is its own bank(s): _stack_banks
                rows, cols = _logical_shape(p, lay)
                if blk is None:
                    members.append(Member(gi, pi, ((0, rows),), (rows, cols), True))
                else:
                    for segs in blk:
                        segs = tuple((int(s), int(n)) for s, n in segs)
                        m = sum(n for _, n in segs)
                        whole = lay is None and len(blk) == 1 and segs == ((0, rows),)
                        members.append(Member(gi, pi, segs, (m, cols), whole))
        return members

    def _build_banks(self) -> None:
        """(Re)build banks; state already present in ``self.state`` is imported."""
        if self._banks is not None:
            self._export_state()
        buckets: Dict[Tuple, List[Member]] = {}
        for mem in self._members():
            p = self.param_groups[mem.group_index]["params"][mem.param_index]
            sdtype = _state_dtype(p)
            rehome = self.rehome and mem.whole and p.dtype == sdtype
            key = (mem.group_index, mem.shape, p.device, sdtype, rehome, self._compute_dtype(p))
            buckets.setdefault(key, []).append(mem)
        banks: List[Bank] = []
        for (gi, shape, device, sdtype, rehome, cdtype), mems in buckets.items():
            flip, on_rows, stat_dim = bank_layout(shape, self.neuron_axis)
            vshape = oriented_v_shape(shape, flip, stat_dim)
            m, n = shape
            fused = self._use_fused(shape, device, cdtype)
            for start in range(0, len(mems), self.max_bank_size):
                chunk = mems[start : start + self.max_bank_size]
                N = len(chunk)
                bank = Bank(
                    group_index=gi,
                    shape=shape,
                    flip=flip,
                    stat_dim=stat_dim,
                    stat_on_rows=on_rows,
                    members=chunk,
                    G=torch.zeros((N, m, n), dtype=sdtype, device=device),
                    M=torch.zeros((N, m, n), dtype=sdtype, device=device),
                    V=torch.zeros((N, *vshape), dtype=sdtype, device=device),
                    shape_scale=math.sqrt(max(1.0, m / n)),
                    fused=fused,
                    compute_dtype=cdtype,
                )
                bank.params = [self._param_of(mem) for mem in chunk]
                bank.whole = all(mem.whole for mem in chunk)
                if rehome:
                    bank.W = torch.empty((N, m, n), dtype=sdtype, device=device)
                    for i, p in enumerate(bank.params):
                        bank.W[i].copy_(p.detach())
                        p.data = bank.W[i]
                banks.append(bank)
        self._stacks = []
        for gi, group in enumerate(self.param_groups):
            for pi, (p, blk) in enumerate(zip(group["params"], group["blocks"])):
                if p.ndim == 3:
                    banks += self._stack_banks(gi, pi, p, blk)
        self._banks = banks
        self._import_state()
        # Weight decay of the parameters not updated inside a bank kernel, once per parameter.
        rehomed = {id(p) for b in banks if b.W is not None for p in b.params}
        self._decay_lists = {}
        keys = {(b.group_index, b.M.device, b.M.dtype) for b in banks}
        for gi, group in enumerate(self.param_groups):
            lists: Dict[Tuple, List[torch.Tensor]] = {}
            for p in group["params"]:
                if id(p) not in rehomed:
                    lists.setdefault((p.device, _state_dtype(p)), []).append(p)
            self._decay_lists[gi] = lists
            keys.update((gi, d, dt) for d, dt in lists)
        self._hyper_keys = sorted(keys, key=str)
        self._flat = [p for g in self.param_groups for p in g["params"]]
        self._ptrs = list(map(torch.Tensor.data_ptr, self._flat))
        self._all_cuda = all(p.is_cuda for p in self._flat)
        index = {id(p): i for i, p in enumerate(self._flat)}
        for bank in banks:
            bank.flat_idx = [index[id(p)] for p in bank.params]
            bank.direct = (
                self.direct_grads and bank.fused and self.fused_bank
                and (bank.whole or bank.stack is not None)
                and bank.W is not None and bank.M.dtype == torch.float32
            )
            if bank.direct:
                bank.gptr = torch.zeros(bank.size, dtype=torch.int64, device=bank.M.device)
        self._any_direct = any(b.direct for b in banks)
        self._table_key = None
        self._fns = None
        self._graphs = None
        self._dense_grads = None
        self._merge_launches()

    def _stack_banks(self, gi: int, pi: int, p: torch.Tensor, blocks) -> List[Bank]:
        """Banks of the 3-D expert stack ``p`` ``[E, rows, n]`` (parameter ``pi`` of group
        ``gi``): ``N = E * k`` members ``[rows / k, n]`` (``k`` row blocks per expert), in chunks of
        whole experts of at most ``max_bank_size`` members. ``M`` / ``V`` are allocated once for
        the stack (the bank's are slices; the state's are views); an fp32 (fp64) stack is its
        banks' ``W``, a low-precision one gets an fp32 ``G_buf`` for gradient and update."""
        E, rows, n = (int(v) for v in p.shape)
        k = _stack_split(p, blocks)
        m, N = rows // k, E * k
        shape = (m, n)
        sdtype, cdtype = _state_dtype(p), self._compute_dtype(p)
        flip, on_rows, stat_dim = bank_layout(shape, self.neuron_axis)
        vshape = oriented_v_shape(shape, flip, stat_dim)
        M = torch.zeros((N, m, n), dtype=sdtype, device=p.device)
        V = torch.zeros((N, *vshape), dtype=sdtype, device=p.device)
        # [N, m, 1] and [N, 1, m] (rows statistic, tall or wide) share the memory of [E, rows, 1]
        self._stacks.append((p, M, V, (E, rows, 1) if on_rows else (E, 1, n)))
        fused = self._use_fused(shape, p.device, cdtype)
        names = ("",) if k == 1 else tuple(f".b{j}" for j in range(k))
        per_bank = max(1, self.max_bank_size // k) * k
        banks = []
        for lo in range(0, N, per_bank):
            hi = min(N, lo + per_bank)
            members = [
                Member(gi, pi, ((j % k * m, m),), shape, False, f"e{j // k}{names[j % k]}")
                for j in range(lo, hi)
            ]
            bank = Bank(
                group_index=gi, shape=shape, flip=flip, stat_dim=stat_dim, stat_on_rows=on_rows,
                members=members, G=None, M=M[lo:hi], V=V[lo:hi],
                shape_scale=math.sqrt(max(1.0, m / n)), fused=fused, compute_dtype=cdtype,
            )
            bank.stack = StackSlice(p, k, lo, hi)
            bank.params = [p]
            bank.whole = False
            view = bank.stack.members_of(p.detach())
            if p.dtype == sdtype:
                bank.W = view  # the parameter's own storage
            else:
                bank.G = bank.G_buf = torch.zeros_like(bank.M)
                bank.w_dst, bank.d_src, bank.seg_member = [view], [bank.G_buf], [0]
            banks.append(bank)
        return banks

    def _merge_launches(self) -> None:
        """(Re)form the launch groups of ``merge_launches``: the direct banks of one key (param
        group, member shape, orientation, statistic, scale, Polar Express dtype, device), two or
        more, whose members are 16-byte aligned (a bank of ``[3, 17]`` fp32 members launches on
        its own), share one ``[4, N]`` address table; each bank's ``gptr`` becomes a view of its
        gradient row (filled by :meth:`_refresh_tables`, which must run before the next launch:
        the caller resets ``_table_key``). The momentum, second-moment and parameter rows are
        fixed for the banks' life (rebuilding the banks re-forms the groups)."""
        from .pe_triton import member_addresses

        for bank in self._banks:
            if bank.launch is not None:  # leave the old group: its own gradient table again
                bank.launch = None
                if bank.direct:
                    bank.gptr = torch.zeros(bank.size, dtype=torch.int64, device=bank.device)
        self._groups = []
        self._table_key = None
        if not self.merge_launches:
            return
        buckets: Dict[Tuple, List[Bank]] = {}
        for bank in self._banks:
            m, n = bank.shape
            # the kernel reads M and W through the table with 16-byte alignment hints (a bank of
            # other members launches on its own, as it would without merging)
            aligned = (m * n * bank.M.element_size()) % 16 == 0 and all(
                t.data_ptr() % 16 == 0 for t in (bank.M, bank.W))
            if bank.direct and aligned:
                key = (bank.group_index, bank.shape, bank.flip, bank.stat_dim, bank.shape_scale,
                       bank.compute_dtype, bank.device)
                buckets.setdefault(key, []).append(bank)
        for banks in buckets.values():
            if len(banks) < 2:
                continue
            # (the gradient row is a placeholder here: M's addresses, overwritten by the refresh)
            host = torch.cat([member_addresses(b.M, b.M, b.V, b.W) for b in banks], dim=1)
            group = LaunchGroup(banks=banks, table=host.to(banks[0].device))
            lo = 0
            for b in banks:
                b.launch = group
                b.gptr = group.table[0, lo : lo + b.size]
                lo += b.size
            self._groups.append(group)

    def _param_of(self, mem: Member) -> torch.Tensor:
        return self.param_groups[mem.group_index]["params"][mem.param_index]

    def _layout_of(self, mem: Member) -> Layout:
        return self.param_groups[mem.group_index]["layouts"][mem.param_index]

    def _import_state(self, source: Optional[Dict[torch.Tensor, Dict[str, torch.Tensor]]] = None):
        """Copy per-parameter state into the banks and point ``self.state`` at bank views."""
        source = self.state if source is None else source
        for p, M, V, v_shape in self._stacks:  # one whole-tensor copy per stack and state
            st = source.get(p, {}) if hasattr(source, "get") else {}
            mom, v = st.get("momentum_buffer"), st.get("second_moment")
            if mom is not None:
                M.view(p.shape).copy_(mom)
            if v is not None:
                V.view(v_shape).copy_(v)
            self.state[p] = {"momentum_buffer": M.view(p.shape), "second_moment": V.view(v_shape)}
        split_params = {}
        for bank in self._banks:
            if bank.stack is not None:
                continue
            bank.g_dst, bank.d_src, bank.w_dst, bank.seg_member = [], [], [], []
            bank.g_whole = [bank.G[i] for i in range(bank.size)]
            for i, mem in enumerate(bank.members):
                p = self._param_of(mem)
                lay = self._layout_of(mem)
                st = source.get(p, {}) if hasattr(source, "get") else {}
                mom, v = st.get("momentum_buffer"), st.get("second_moment")
                row = 0
                for start, length in mem.segments:
                    if mom is not None:
                        bank.M[i, row : row + length].copy_(_rows(mom, lay, start, length))
                    if v is not None:
                        if bank.stat_on_rows:
                            bank.member_v(i)[row : row + length].copy_(v[start : start + length])
                        else:
                            bank.member_v(i).copy_(v)
                    bank.g_dst.append(bank.G[i, row : row + length])
                    bank.d_src.append(bank.G[i, row : row + length])
                    bank.w_dst.append(_rows(p.detach(), lay, start, length))
                    bank.seg_member.append(i)
                    row += length
                if mem.whole:
                    self.state[p] = {"momentum_buffer": bank.M[i], "second_moment": bank.member_v(i)}
                else:
                    split_params[p] = lay
        for p, lay in split_params.items():
            sdt = _state_dtype(p)
            self.state[p] = {
                "momentum_buffer": torch.zeros(p.shape, dtype=sdt, device=p.device),
                "second_moment": torch.zeros(
                    (_logical_shape(p, lay)[0], 1), dtype=sdt, device=p.device
                ),
            }
        self._export_state()

    def _export_state(self) -> None:
        """Write bank rows of split parameters into their per-parameter state tensors."""
        if self._banks is None:
            return
        for bank in self._banks:
            if bank.stack is not None:
                continue  # its state tensors are views of the bank's
            for i, mem in enumerate(bank.members):
                if mem.whole:
                    continue
                p = self._param_of(mem)
                lay = self._layout_of(mem)
                st = self.state.get(p)
                if st is None or "momentum_buffer" not in st:
                    continue
                row = 0
                for start, length in mem.segments:
                    _rows(st["momentum_buffer"], lay, start, length).copy_(
                        bank.M[i, row : row + length]
                    )
                    st["second_moment"][start : start + length].copy_(
                        bank.member_v(i)[row : row + length]
                    )
                    row += length

    def _ensure_banks(self) -> None:
        if self._banks is None or self._params_changed():
            self._build_banks()

    def init_state(self) -> None:
        """Allocate (zero) state for every parameter (Megatron ``init_state_fn``)."""
        self._ensure_banks()

    def bank_summary(self) -> List[Dict[str, Any]]:
        """One dict per bank: shape ``[m, n]``, members, group, flip, fused kernels, gradients
        read through an address table, updated in the bank (``rehomed``: re-homed whole params
        or an fp32 expert stack in place), ``stack``: ``None`` or the expert stack's shape
        ``[E, rows, n]`` and the bank's members ``[lo, hi)`` of it, Polar Express dtype,
        ``launch_group``: index of its ``merge_launches`` group (one launch) or None."""
        self._ensure_banks()
        groups = {id(g): i for i, g in enumerate(self._groups)}
        return [
            dict(shape=list(b.shape), members=b.size, group=b.group_index, flip=b.flip,
                 fused=b.fused, direct_grads=b.direct, rehomed=b.W is not None,
                 launch_group=None if b.launch is None else groups[id(b.launch)],
                 stack=None if b.stack is None
                 else dict(shape=list(b.stack.param.shape), members=[b.stack.lo, b.stack.hi]),
                 compute_dtype=str(b.compute_dtype))
            for b in self._banks
        ]

    # ------------------------------------------------------------------ hyper-parameters
    def _hyper_tensors(self, gi: int, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
        """The 0-d hyper-parameter tensors of ``(group, device, dtype)``, refreshed from the group."""
        key = (gi, device, dtype)
        group = self.param_groups[gi]
        entry = self._hyper.get(key)
        if entry is None:
            entry = {k: torch.zeros((), dtype=dtype, device=device) for k in _HYPER_KEYS}
            entry["decay"] = torch.ones((), dtype=dtype, device=device)
            entry["_cache"] = {}
            self._hyper[key] = entry
        cache = entry["_cache"]
        changed = False
        for k in _HYPER_KEYS:
            val = float(group[k])
            if cache.get(k) != val:
                entry[k].fill_(val)
                cache[k] = val
                changed = True
        if changed:
            entry["decay"].fill_(1.0 - float(group["lr"]) * float(group["weight_decay"]))
        return entry

    def _refresh_hyper(self) -> None:
        for key in self._hyper_keys:
            self._hyper_tensors(*key)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One NorMuon step over all banks; returns ``closure()`` if given.

        No host synchronisation: hyper-parameters reach the kernels as 0-d device tensors.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_banks()
        grads = [p.grad for p in self._flat]
        last = self._dense_grads
        if last is not None and len(last) == len(grads) and all(map(operator.is_, grads, last)):
            active = None  # the very gradient tensors of the last full step: present and dense
        else:
            all_present = True
            for g in grads:
                if g is None:
                    all_present = False
                elif g.is_sparse:
                    raise RuntimeError("NorMuon does not support sparse gradients")
            active = None if all_present else {id(p) for p in self._flat if p.grad is not None}
            self._dense_grads = grads if all_present else None
        self._refresh_hyper()
        ptrs = None
        if active is None and (self.cuda_graph or self._any_direct):
            ptrs = list(map(torch.Tensor.data_ptr, grads))
            if self._any_direct and ptrs != self._table_key:
                self._refresh_tables(grads)
                self._table_key = ptrs
        if active is None and self.cuda_graph:
            self._graph_step(ptrs)
        else:
            self._apply_decay(active, skip_zero=True)
            for bank in self._banks:
                present = self._present(bank, active)
                if present is not None and not any(present):
                    continue
                self._gather_bank(bank, present)
                if present is None:
                    self._compute_unit(bank)  # (a launch group's banks gather nothing: direct)
                else:
                    self._compute_bank(bank, present)
                if bank.stack is not None:
                    bank.G = bank.G_buf  # hold no reference to a gradient read in place
            self._export_state()  # keep self.state of split (QKV / TPA) parameters current
        for group in self.param_groups:
            if active is None or any(id(p) in active for p in group["params"]):
                group["normuon_step"] = int(group.get("normuon_step", 0)) + 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; with ``set_to_none`` also forgets the last
        step's gradient tensors (kept for the identity fast path of :meth:`step`), so that
        gradients the caller drops are freed (and a new backward can reuse their memory)."""
        if set_to_none:
            self._dense_grads = None
        super().zero_grad(set_to_none=set_to_none)

    def _refresh_tables(self, grads: List[torch.Tensor]) -> None:
        """Point the direct banks' address tables at the current gradients (asynchronous
        copy from pinned memory, no host sync). A bank whose gradients are not contiguous,
        16-byte aligned fp32 tensors of the parameters' shapes falls back to gathering for good
        (and its graphs are re-made; it leaves its launch group)."""
        fell_back = False
        for bank in self._banks:
            if not bank.direct:
                continue
            gl = [grads[i] for i in bank.flat_idx]
            step = 0  # bytes between a stack's members
            if bank.stack is not None:
                step = bank.M[0].numel() * bank.M.element_size()
            ok = step % 16 == 0 and all(
                g.dtype == torch.float32 and g.is_contiguous() and g.shape == p.shape
                and g.device == p.device and g.data_ptr() % 16 == 0
                for g, p in zip(gl, bank.params)
            )
            if not ok:
                bank.direct = False
                self._graphs = None
                fell_back = fell_back or bank.launch is not None
        if fell_back:
            self._merge_launches()
        for bank in self._banks:
            if not bank.direct:
                continue
            gl = [grads[i] for i in bank.flat_idx]
            if bank.stack is not None:  # member j of the stack starts j * step bytes in
                step = bank.M[0].numel() * bank.M.element_size()
                lo, hi = bank.stack.lo, bank.stack.hi
                host = torch.arange(lo, hi, dtype=torch.int64) * step + gl[0].data_ptr()
            else:
                host = torch.tensor([g.data_ptr() for g in gl], dtype=torch.int64)
            if bank.gptr.is_cuda:
                host = host.pin_memory()
            bank.gptr.copy_(host, non_blocking=True)
            bank.gptr_host = host  # alive until the copy has run (the allocator tracks it too)

    @staticmethod
    def _present(bank: Bank, active: Optional[set]) -> Optional[List[bool]]:
        return None if active is None else [id(p) in active for p in bank.params]

    def _apply_decay(self, active: Optional[set], skip_zero: bool) -> None:
        """Weight decay of parameters updated outside the bank kernels (split / low precision).

        ``skip_zero``: skip groups with ``weight_decay == 0`` (eager path); the CUDA-graph path
        always multiplies (by exactly 1.0 then), so the captured work does not depend on it.
        """
        for gi, group in enumerate(self.param_groups):
            if skip_zero and float(group["weight_decay"]) == 0.0:
                continue
            for (device, sdtype), plist in self._decay_lists[gi].items():
                if active is not None:
                    plist = [p for p in plist if id(p) in active]
                if plist:
                    h = self._hyper[(gi, device, sdtype)]
                    with _range("normuon.decay"):
                        torch._foreach_mul_([p.detach() for p in plist], h["decay"])

    def _gather_bank(self, bank: Bank, present: Optional[List[bool]]) -> None:
        """Copy the members' gradients into ``bank.G`` (zeros for absent members); nothing for
        a direct bank in a full step (its kernel reads the gradients in place)."""
        if bank.direct and present is None:
            return
        if bank.stack is not None:
            self._gather_stack(bank)
            return
        params = bank.params
        masked = present is not None and not all(present)
        if masked:
            bank.G.zero_()
        if bank.whole and not masked:
            src = [p.grad for p in params]
            dst = bank.g_whole
        else:
            src, dst = [], []
            seg = 0
            for i, mem in enumerate(bank.members):
                g = params[i].grad
                lay = self._layout_of(mem)
                for start, length in mem.segments:
                    if present is None or present[i]:
                        src.append(g if mem.whole else _rows(g, lay, start, length))
                        dst.append(bank.g_dst[seg])
                    seg += 1
        with _range("normuon.gather"):
            if dst and dst[0].dtype == src[0].dtype:
                torch._foreach_copy_(dst, src)
            else:
                for d, g in zip(dst, src):
                    d.copy_(g)

    def _gather_stack(self, bank: Bank) -> None:
        """``bank.G`` of an expert-stack bank (its gradient is present): the gradient itself when
        the step is eager, ``W`` is the parameter (the bank only reads ``G`` then) and the
        gradient is a contiguous tensor of the bank's dtype and the parameter's shape; else one
        whole-tensor copy (cast) into ``bank.G_buf`` (always under CUDA graphs, whose kernels
        read a fixed address). :meth:`step` sets ``bank.G`` back to ``G_buf`` after the bank's
        compute, so a gradient that the caller drops (``zero_grad``) is freed."""
        stack = bank.stack
        p, g = stack.param, stack.param.grad
        if (
            bank.W is not None and not self.cuda_graph and g.dtype == bank.M.dtype
            and g.device == bank.M.device and g.shape == p.shape and g.is_contiguous()
        ):
            bank.G = stack.members_of(g)
            return
        if bank.G_buf is None:
            bank.G_buf = torch.empty_like(bank.M)
        bank.G = bank.G_buf
        with _range("normuon.gather"):
            bank.G.view(-1, *p.shape[1:]).copy_(stack.experts_of(g))

    def _gather_all(self) -> None:
        for bank in self._banks:
            self._gather_bank(bank, None)

    def _sm_workspace(self, unit: Union[Bank, LaunchGroup]) -> Optional[torch.Tensor]:
        """The per-SM workspace of a one-kernel bank step (a bank or a launch group) on the
        caller's stream (:func:`~.pe_triton.sm_workspace`: one matrix per SM, reused by every
        member that SM runs, so it can stay in L2), shared by the steps of the same member size
        and dtype; None where the step takes a workspace per member (CPU, fewer than 128 rows:
        kernels that may run two programs per SM)."""
        from .pe_triton import MAX_ROWS, _block_rows, interpreter_active, sm_workspace

        if (not SM_WORKSPACE or unit.device.type != "cuda" or interpreter_active()
                or unit.slot_x is False or _block_rows(min(unit.shape)) != MAX_ROWS):
            return None
        m, n = unit.shape
        key = (unit.device, unit.compute_dtype, m * n)
        ws = self._sm_ws.get(key)
        if ws is None:
            ws = self._sm_ws[key] = sm_workspace((m * n,), unit.compute_dtype, unit.device)
        return ws.view(-1, m, n)

    def _run_bank_kernel(self, unit: Union[Bank, LaunchGroup], launch, main: bool) -> None:
        """``launch(X, x_per_sm)`` of a one-kernel bank step (a bank or a launch group) on the
        per-SM workspace where it may use one (``main``: the caller's stream), else on the unit's
        own ``[N, m, n]`` workspace (made on first use)."""
        from .pe_triton import SharedWorkspaceError

        ws = self._sm_workspace(unit) if main else None
        if ws is not None:
            try:
                launch(ws, True)
                unit.slot_x = True
                return
            except SharedWorkspaceError:  # checked before the first launch: nothing ran
                unit.slot_x = False
        if unit.X is None:
            unit.X = torch.empty((unit.size, *unit.shape), dtype=unit.compute_dtype, device=unit.device)
        launch(unit.X, False)

    def _compute_group(self, group: LaunchGroup, main: bool = True) -> None:
        """The one-kernel bank steps of a launch group's banks (every gradient present), as one
        launch (:func:`~.pe_triton.normuon_banks_fused_`)."""
        from .pe_triton import normuon_banks_fused_

        b = group.banks[0]
        h = self._hyper[(b.group_index, b.M.device, b.M.dtype)]
        m, n = b.shape

        def launch(X, per_sm):
            normuon_banks_fused_(
                group.table, b.shape, X, h, self.table, self.safety, self.pe_eps, b.flip,
                b.stat_dim, self.scale_mode, b.shape_scale, 0.2 * math.sqrt(m * n),
                form=self.pe_form, x_per_sm=per_sm,
            )

        with _range("normuon.bank_kernel"):
            self._run_bank_kernel(group, launch, main)

    def _compute_unit(self, bank: Bank, main: bool = True) -> None:
        """:meth:`_compute_bank` of a bank in a step with every gradient present, where a bank
        of a launch group launches the whole group once its last bank is reached."""
        if bank.launch is None:
            self._compute_bank(bank, None, main)
        elif bank is bank.launch.banks[-1]:
            self._compute_group(bank.launch, main)

    def _compute_bank(self, bank: Bank, present: Optional[List[bool]], main: bool = True) -> None:
        """Momentum, Polar Express, second moment and update of one bank (``bank.G`` gathered);
        ``main``: the bank runs on the caller's stream (it may use the shared per-SM workspace)."""
        gi = bank.group_index
        h = self._hyper[(gi, bank.M.device, bank.M.dtype)]
        masked = present is not None and not all(present)
        if masked:
            keep = [i for i, ok in enumerate(present) if not ok]
            saved = [(i, bank.M[i].clone(), bank.V[i].clone(),
                      bank.W[i].clone() if bank.W is not None else None) for i in keep]
        update, prologue, epilogue = self._get_fns()
        m, n = bank.shape
        rms_scale = 0.2 * math.sqrt(m * n)
        if bank.fused and self.fused_bank:
            from .pe_triton import normuon_bank_fused_

            # A direct stack bank has no G: the kernel reads grad_ptrs and writes W, never G.
            G = bank.G if bank.G is not None else bank.M

            def launch(X, per_sm):
                normuon_bank_fused_(
                    G, bank.M, bank.V, bank.W, X, h, self.table, self.safety,
                    self.pe_eps, bank.flip, bank.stat_dim, self.scale_mode, bank.shape_scale,
                    rms_scale, grad_ptrs=bank.gptr if bank.direct and present is None else None,
                    form=self.pe_form, x_per_sm=per_sm,
                )

            with _range("normuon.bank_kernel"):
                self._run_bank_kernel(bank, launch, main)
        elif bank.fused:
            from .pe_triton import polar_express_fused_

            with _range("normuon.prologue"):
                X, norm2 = prologue(
                    bank.G, bank.M, h["momentum"], bank.flip, self.safety, self.pe_eps,
                    bank.compute_dtype, False,
                )
            X = X.mT if bank.flip else X  # oriented view, no copy
            with _range("normuon.pe"):
                r = polar_express_fused_(
                    X, norm2, self.table, self.safety, self.pe_eps,
                    stat=1 if bank.stat_dim == -1 else 2, form=self.pe_form,
                )
            with _range("normuon.epilogue"):
                epilogue(
                    X, r, bank.G, bank.V, bank.W, h["decay"], h["lr"], h["beta2"], h["eps"],
                    bank.flip, bank.stat_dim, self.scale_mode, bank.shape_scale, rms_scale,
                )
        else:
            with _range("normuon.update"):
                update(
                    bank.G, bank.M, bank.V, bank.W, h["decay"], h["lr"], h["momentum"],
                    h["beta2"], h["eps"], bank.flip, bank.stat_dim, self.table, self.safety,
                    self.pe_eps, bank.compute_dtype, self.scale_mode, bank.shape_scale, rms_scale,
                )
        if masked:
            for i, mi, vi, wi in saved:
                bank.M[i].copy_(mi)
                bank.V[i].copy_(vi)
                if wi is not None:
                    bank.W[i].copy_(wi)
        if bank.W is not None:
            return
        if masked:
            w = [t for t, j in zip(bank.w_dst, bank.seg_member) if present[j]]
            d = [t for t, j in zip(bank.d_src, bank.seg_member) if present[j]]
        else:
            w, d = bank.w_dst, bank.d_src
        with _range("normuon.scatter"):
            if w[0].dtype == d[0].dtype:
                torch._foreach_add_(w, d)
            else:
                for wt, dt in zip(w, d):
                    wt.add_(dt.to(wt.dtype))

    def stream_split(self) -> Tuple[List[Bank], List[Bank]]:
        """``(main, side)``: the banks of a CUDA-graph step on the caller's stream and on the
        second stream (``overlap_banks``). Main: the one-kernel bank steps with at least one
        member per SM of their device (each fills the GPU alone); side: every other bank.
        ``side`` is empty when there is nothing to overlap (``overlap_banks`` off, no CUDA,
        or either list empty)."""
        self._ensure_banks()
        banks = list(self._banks)
        if not (self.overlap_banks and self._all_cuda and banks):
            return banks, []
        main, side = [], []
        for bank in banks:
            sms = torch.cuda.get_device_properties(bank.M.device).multi_processor_count
            size = bank.size if bank.launch is None else bank.launch.size
            big = bank.fused and self.fused_bank and size >= sms
            (main if big else side).append(bank)
        if not main or not side:
            return banks, []
        return main, side

    def _compute_all(self) -> None:
        """Everything after the gather, for all banks (the captured part of a graph step);
        with :meth:`stream_split`'s side banks on a second stream, forked after the weight
        decay and joined before the state export (also inside a graph capture)."""
        self._apply_decay(None, skip_zero=False)
        main, side = self.stream_split()
        if side:
            cur = torch.cuda.current_stream()
            if self._side_stream is None or self._side_stream.device != cur.device:
                self._side_stream = torch.cuda.Stream(device=cur.device, priority=-1)
            stream = self._side_stream
            if any(b.fused for b in self._banks):
                # the kernels' coefficient table is shared by both streams: made here, on the
                # caller's stream, not lazily by whichever stream launches first
                from .pe_triton import coefficient_tensor

                coefficient_tensor(self.table, cur.device)
            stream.wait_stream(cur)
            with torch.cuda.stream(stream):
                for bank in side:
                    self._compute_unit(bank, main=False)
        for bank in main:
            self._compute_unit(bank)
        if side:
            cur.wait_stream(stream)
        with _range("normuon.export"):
            self._export_state()

    # ------------------------------------------------------------------ CUDA graphs
    def _check_graph_device(self) -> None:
        if not self._all_cuda:
            raise RuntimeError("NorMuon(cuda_graph=True) needs every parameter on a CUDA device")

    def _graph_step(self, ptrs: List[int]) -> None:
        self._check_graph_device()
        gs = self._graphs
        if gs is None:
            gs = self._graphs = _Graphs()
        if all(b.direct for b in self._banks):
            pass  # nothing to gather: every bank reads its gradients in place
        elif gs.gather is not None and gs.gather_key == ptrs:
            gs.gather.replay()
        else:
            self._gather_all()
            if gs.warm and ptrs == gs.last_ptrs:
                gs.gather = self._capture(self._gather_all)
                gs.gather_key = ptrs
        gs.last_ptrs = ptrs
        if gs.compute is not None:
            gs.compute.replay()
        elif not gs.warm:
            self._compute_all()  # warm-up: compilation, autotuning, lazy workspaces
            gs.warm = True
        else:
            gs.compute = self._capture(self._compute_all)
            gs.compute.replay()

    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        if self._graphs is not None:
            self._graphs.captures += 1
        return graph

    @property
    def graph_captures(self) -> int:
        """How many CUDA graphs were captured for the current banks (diagnostics)."""
        return 0 if self._graphs is None else self._graphs.captures

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> Dict[str, Any]:
        self._export_state()
        return super().state_dict()

    def check_state_dict(
        self, state_dict: Dict[str, Any], names: Optional[Dict[int, str]] = None
    ) -> None:
        """Check that ``state_dict`` fits this optimizer, changing nothing.

        Checked, parameter by parameter in order: the number of groups and of parameters, the
        saved ``momentum_buffer`` against the parameter's shape, the saved blocks / layouts
        (which :meth:`load_state_dict` adopts; absent ones keep the current) against the
        parameter (tiling, expert boundaries, expert-stack row blocks), and the saved
        ``second_moment`` against the shape those imply (``[m, 1]``, ``[1, n]``,
        ``[E, m, 1]``...).

        Raises:
            StateDictMismatch: (a ``ValueError``) naming the first mismatching parameter (by
                ``names`` or :attr:`param_names`) and both shapes.
        """
        names = names if names is not None else self.param_names
        label = lambda p, gi, pi: param_label(p, names, gi, pi)  # noqa: E731
        saved_groups, state = state_parts(state_dict, "NorMuon")
        check_group_counts("NorMuon", self.param_groups, saved_groups, state, names, ("momentum_buffer",))
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            n = len(group["params"])
            cand = {"params": group["params"]}
            for key in ("blocks", "layouts"):
                val = saved.get(key)
                if val is None:
                    val = group[key]
                if not isinstance(val, (list, tuple)) or len(val) != n:
                    raise StateDictMismatch(
                        f"NorMuon group {gi}: the checkpoint's {key!r} is not a list of {n} "
                        "entries (one per parameter); nothing was loaded"
                    )
                cand[key] = list(val)
            for pi, (p, idx) in enumerate(zip(group["params"], saved["params"])):
                where = label(p, gi, pi)
                st = param_state(state, idx, where, "NorMuon parameter")
                mom, v = st.get("momentum_buffer"), st.get("second_moment")
                for key, val in (("momentum_buffer", mom), ("second_moment", v)):
                    if val is not None and not isinstance(val, torch.Tensor):
                        raise StateDictMismatch(
                            f"NorMuon parameter {where}: the checkpoint's {key} is a "
                            f"{type(val).__name__}, not a tensor; nothing was loaded"
                        )
                if mom is not None and shape_of(mom) != tuple(p.shape):
                    raise mismatch("NorMuon", where, "momentum_buffer", tuple(p.shape), shape_of(mom))
                lay = cand["layouts"][pi]
                try:
                    lay = cand["layouts"][pi] = None if lay is None else tuple(int(x) for x in lay)
                    self._check_param_unlabelled(cand, pi, p, cand["blocks"][pi], lay)
                except (ValueError, NotImplementedError, TypeError) as e:
                    raise StateDictMismatch(
                        f"NorMuon parameter {where}: the checkpoint's blocks / layout do not fit "
                        f"it ({e}); nothing was loaded"
                    ) from None
                if v is not None:
                    expected = self._state_shapes(p, cand["blocks"][pi], lay)[1]
                    if shape_of(v) != expected:
                        raise mismatch("NorMuon", where, "second_moment", expected, shape_of(v))

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; checked first (:meth:`check_state_dict`), so a checkpoint
        that does not fit raises :class:`~.state_check.StateDictMismatch` with the optimizer
        unchanged (and an unexpected error half-way rolls every attribute back)."""
        self.check_state_dict(state_dict)
        with rollback_on_error(self):
            self._load_checked(state_dict)

    def _load_checked(self, state_dict: Dict[str, Any]) -> None:
        # Keep the saved tensors at their saved precision: torch casts state to the param dtype.
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        index_to_param = {}
        for group, saved in zip(self.param_groups, saved_groups):
            for p, idx in zip(group["params"], saved["params"]):
                index_to_param[idx] = p
        originals = {}
        for idx, st in saved_state.items():
            if idx in index_to_param and isinstance(st, dict):
                originals[index_to_param[idx]] = {
                    k: v for k, v in st.items() if k in ("momentum_buffer", "second_moment")
                }
        current = [(g["blocks"], g["layouts"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for gi, (group, (blk, lay)) in enumerate(zip(self.param_groups, current)):
            if group.get("layouts") is None:  # saved before layouts existed
                group["layouts"] = lay
            if group.get("blocks") is None:  # saved without blocks: keep the current split
                group["blocks"] = blk
            self._check_group(group, gi)
        self._banks = None
        self._build_banks_from(originals)

    def _build_banks_from(self, source) -> None:
        self.state.clear()
        for p, st in source.items():
            self.state[p] = dict(st)
        self._build_banks()
