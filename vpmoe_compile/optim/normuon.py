"""NorMuon with Polar Express (spec ``normuon.md`` §1.4), batched over shape banks.

``NorMuon`` is a plain :class:`torch.optim.Optimizer` over 2-D tensors. Per logical matrix
``W`` (``m x n``, ``[out, in]``) with gradient ``G``:

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

Execution: members are grouped into banks (:mod:`.banks`) and each bank runs one batched,
optionally ``torch.compile``-d function; hyper-parameters live in persistent 0-d tensors updated
with ``fill_`` (no recompilation when the scheduler changes ``lr`` / ``weight_decay``), and our
code issues no host synchronisation (no ``.item()``, no branching on tensor values). Whole fp32
parameters are re-homed into their bank's contiguous storage (``rehome=True``) so momentum,
PE, second moment, weight decay and the update of a bank run as one batched function; split
(QKV / TPA) parameters are gathered / scattered with foreach ops. Parameters whose ``grad`` is
``None`` are skipped exactly (no state change, no weight decay), as in the reference fork.

State (``state_dict``): per parameter ``momentum_buffer`` (param shape) and ``second_moment``
(``[m, 1]``, or ``[1, n]`` for ``neuron_axis="larger"`` on wide matrices), both fp32 (fp64 for
fp64 parameters); per group ``normuon_step``. ``state_dict`` / ``load_state_dict`` round-trip
exactly.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .banks import Bank, Member, bank_layout, bank_update, oriented_v_shape
from .polar_express import PE_EPS, resolve_coefficients

__all__ = ["NorMuon"]

_HYPER_KEYS = ("lr", "momentum", "beta2", "eps", "weight_decay")


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class NorMuon(torch.optim.Optimizer):
    """NorMuon + Polar Express over 2-D parameters.

    Args:
        params: parameters or param groups (2-D tensors only). A group may carry ``"blocks"``
            (see module docstring) and any Megatron scheduler keys (``max_lr``, ``wd_mult``...).
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
            per-bank function. ``None`` -> compile only on CUDA.
        max_bank_size: most members in one bank (bounds workspace memory), spec R1.
        rehome: store whole-matrix fp32 (fp64) parameters as views of their bank's contiguous
            ``[N, m, n]`` storage (``p.data = bank.W[i]``, spec R3), so that weight decay and the
            update run inside the bank kernel; parameters whose ``.data`` is later replaced are
            detected and the banks rebuilt. Split (QKV / TPA) and low-precision parameters are
            never re-homed (updated through foreach ops instead).
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
    ):
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
        for group in self.param_groups:
            self._check_group(group)
        self._banks: Optional[List[Bank]] = None
        self._flat: List[torch.Tensor] = []
        self._ptrs: List[int] = []
        self._decay_lists: Dict[int, Dict[Tuple, List[torch.Tensor]]] = {}
        self._hyper: Dict[Tuple[int, torch.device, torch.dtype], Dict[str, Any]] = {}
        self._fn = None

    # ------------------------------------------------------------------ setup helpers
    def _check_group(self, group: Dict[str, Any]) -> None:
        blocks = group.get("blocks")
        if blocks is None:
            group["blocks"] = [None] * len(group["params"])
        elif len(blocks) != len(group["params"]):
            raise ValueError("group 'blocks' must be aligned with group 'params'")
        group.setdefault("normuon_step", 0)
        # Spec §2.3: the table's generating parameters travel with it (checkpoints, logs).
        group["polar_express"] = dict(self.pe_record)
        for p, blk in zip(group["params"], group["blocks"]):
            if p.ndim != 2:
                raise ValueError(
                    f"NorMuon only takes 2-D parameters, got shape {tuple(p.shape)}; "
                    "route other tensors to AdamW"
                )
            if blk is not None:
                rows = sorted(seg for member in blk for seg in member)
                covered = 0
                for start, length in rows:
                    if start != covered or length <= 0:
                        raise ValueError(f"blocks {blk} do not tile the {p.shape[0]} rows")
                    covered += length
                if covered != p.shape[0]:
                    raise ValueError(f"blocks {blk} cover {covered} of {p.shape[0]} rows")
                if self.neuron_axis == "larger":
                    for member in blk:
                        m = sum(length for _, length in member)
                        if m < p.shape[1]:
                            raise NotImplementedError(
                                "neuron_axis='larger' with per-column statistics is not "
                                "supported for split (QKV / TPA) parameters"
                            )

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "table"):
            self._check_group(self.param_groups[-1])
            self._banks = None

    def _compute_dtype(self, p: torch.Tensor) -> torch.dtype:
        if p.dtype == torch.float64:
            return torch.float64
        if self.pe_dtype is not None:
            return self.pe_dtype
        return torch.bfloat16 if p.is_cuda else torch.float32

    def _get_fn(self):
        if self._fn is not None:
            return self._fn
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
            self._fn = torch.compile(bank_update, dynamic=False, fullgraph=True, backend=backend)
        else:
            self._fn = bank_update
        return self._fn

    def _params_changed(self) -> bool:
        """Parameters replaced (e.g. Megatron's fp32 main params) or their ``.data`` re-bound."""
        flat = [p for g in self.param_groups for p in g["params"]]
        if len(flat) != len(self._flat) or any(a is not b for a, b in zip(flat, self._flat)):
            return True
        return [p.data_ptr() for p in flat] != self._ptrs

    # ------------------------------------------------------------------ banks
    def _members(self) -> List[Member]:
        members = []
        for gi, group in enumerate(self.param_groups):
            for pi, (p, blk) in enumerate(zip(group["params"], group["blocks"])):
                if blk is None:
                    members.append(
                        Member(gi, pi, ((0, p.shape[0]),), (p.shape[0], p.shape[1]), True)
                    )
                else:
                    for segs in blk:
                        segs = tuple((int(s), int(n)) for s, n in segs)
                        m = sum(n for _, n in segs)
                        whole = len(blk) == 1 and segs == ((0, p.shape[0]),)
                        members.append(Member(gi, pi, segs, (m, p.shape[1]), whole))
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
            key = (mem.group_index, mem.shape, p.device, sdtype, rehome)
            buckets.setdefault(key, []).append(mem)
        banks: List[Bank] = []
        for (gi, shape, device, sdtype, rehome), mems in buckets.items():
            flip, on_rows, stat_dim = bank_layout(shape, self.neuron_axis)
            vshape = oriented_v_shape(shape, flip, stat_dim)
            m, n = shape
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
                )
                bank.params = [self._param_of(mem) for mem in chunk]
                bank.whole = all(mem.whole for mem in chunk)
                if rehome:
                    bank.W = torch.empty((N, m, n), dtype=sdtype, device=device)
                    for i, p in enumerate(bank.params):
                        bank.W[i].copy_(p.detach())
                        p.data = bank.W[i]
                banks.append(bank)
        self._banks = banks
        self._import_state()
        # Weight decay of the parameters not updated inside a bank kernel, once per parameter.
        rehomed = {id(p) for b in banks if b.W is not None for p in b.params}
        self._decay_lists = {}
        for gi, group in enumerate(self.param_groups):
            lists: Dict[Tuple, List[torch.Tensor]] = {}
            for p in group["params"]:
                if id(p) not in rehomed:
                    lists.setdefault((p.device, _state_dtype(p)), []).append(p)
            self._decay_lists[gi] = lists
        self._flat = [p for g in self.param_groups for p in g["params"]]
        self._ptrs = [p.data_ptr() for p in self._flat]
        self._fn = None

    def _param_of(self, mem: Member) -> torch.Tensor:
        return self.param_groups[mem.group_index]["params"][mem.param_index]

    def _import_state(self, source: Optional[Dict[torch.Tensor, Dict[str, torch.Tensor]]] = None):
        """Copy per-parameter state into the banks and point ``self.state`` at bank views."""
        source = self.state if source is None else source
        split_params = {}
        for bank in self._banks:
            bank.g_dst, bank.d_src, bank.w_dst, bank.seg_member = [], [], [], []
            bank.g_whole = [bank.G[i] for i in range(bank.size)]
            for i, mem in enumerate(bank.members):
                p = self._param_of(mem)
                st = source.get(p, {}) if hasattr(source, "get") else {}
                mom, v = st.get("momentum_buffer"), st.get("second_moment")
                row = 0
                for start, length in mem.segments:
                    if mom is not None:
                        bank.M[i, row : row + length].copy_(mom[start : start + length])
                    if v is not None:
                        if bank.stat_on_rows:
                            bank.member_v(i)[row : row + length].copy_(v[start : start + length])
                        else:
                            bank.member_v(i).copy_(v)
                    bank.g_dst.append(bank.G[i, row : row + length])
                    bank.d_src.append(bank.G[i, row : row + length])
                    bank.w_dst.append(p.detach()[start : start + length])
                    bank.seg_member.append(i)
                    row += length
                if mem.whole:
                    self.state[p] = {"momentum_buffer": bank.M[i], "second_moment": bank.member_v(i)}
                else:
                    split_params[p] = True
        for p in split_params:
            sdt = _state_dtype(p)
            self.state[p] = {
                "momentum_buffer": torch.zeros(p.shape, dtype=sdt, device=p.device),
                "second_moment": torch.zeros((p.shape[0], 1), dtype=sdt, device=p.device),
            }
        self._export_state()

    def _export_state(self) -> None:
        """Write bank rows of split parameters into their per-parameter state tensors."""
        if self._banks is None:
            return
        for bank in self._banks:
            for i, mem in enumerate(bank.members):
                if mem.whole:
                    continue
                p = self._param_of(mem)
                st = self.state.get(p)
                if st is None or "momentum_buffer" not in st:
                    continue
                row = 0
                for start, length in mem.segments:
                    st["momentum_buffer"][start : start + length].copy_(bank.M[i, row : row + length])
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

    # ------------------------------------------------------------------ hyper-parameters
    def _hyper_tensors(self, gi: int, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
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
        fn = self._get_fn()
        all_present = True
        for p in self._flat:
            if p.grad is None:
                all_present = False
            elif p.grad.is_sparse:
                raise RuntimeError("NorMuon does not support sparse gradients")
        active = None if all_present else {id(p) for p in self._flat if p.grad is not None}

        # Weight decay of parameters updated outside the bank kernels (split / low precision).
        for gi, group in enumerate(self.param_groups):
            if float(group["weight_decay"]) == 0.0:
                continue
            for (device, sdtype), plist in self._decay_lists[gi].items():
                if active is not None:
                    plist = [p for p in plist if id(p) in active]
                if plist:
                    h = self._hyper_tensors(gi, device, sdtype)
                    torch._foreach_mul_([p.detach() for p in plist], h["decay"])

        for bank in self._banks:
            self._step_bank(bank, fn, active)
        for group in self.param_groups:
            if active is None or any(id(p) in active for p in group["params"]):
                group["normuon_step"] = int(group.get("normuon_step", 0)) + 1
        self._export_state()  # keep self.state of split (QKV / TPA) parameters current
        return loss

    def _step_bank(self, bank: Bank, fn, active: Optional[set]) -> None:
        gi = bank.group_index
        h = self._hyper_tensors(gi, bank.G.device, bank.G.dtype)
        params = bank.params
        present = None if active is None else [id(p) in active for p in params]
        if present is not None and not any(present):
            return
        masked = present is not None and not all(present)
        if masked:
            bank.G.zero_()
            keep = [i for i, ok in enumerate(present) if not ok]
            saved = [(i, bank.M[i].clone(), bank.V[i].clone(),
                      bank.W[i].clone() if bank.W is not None else None) for i in keep]
        if bank.whole and not masked:
            src = [p.grad for p in params]
            dst = bank.g_whole
        else:
            src, dst = [], []
            seg = 0
            for i, mem in enumerate(bank.members):
                g = params[i].grad
                for start, length in mem.segments:
                    if present is None or present[i]:
                        src.append(g if mem.whole else g[start : start + length])
                        dst.append(bank.g_dst[seg])
                    seg += 1
        if dst and dst[0].dtype == src[0].dtype:
            torch._foreach_copy_(dst, src)
        else:
            for d, g in zip(dst, src):
                d.copy_(g)
        m, n = bank.shape
        fn(
            bank.G,
            bank.M,
            bank.V,
            bank.W,
            h["decay"],
            h["lr"],
            h["momentum"],
            h["beta2"],
            h["eps"],
            bank.flip,
            bank.stat_dim,
            self.table,
            self.safety,
            self.pe_eps,
            self._compute_dtype(params[0]),
            self.scale_mode,
            bank.shape_scale,
            0.2 * math.sqrt(m * n),
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
        if w[0].dtype == d[0].dtype:
            torch._foreach_add_(w, d)
        else:
            for wt, dt in zip(w, d):
                wt.add_(dt.to(wt.dtype))

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> Dict[str, Any]:
        self._export_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
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
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._check_group(group)
        self._banks = None
        self._build_banks_from(originals)

    def _build_banks_from(self, source) -> None:
        self.state.clear()
        for p, st in source.items():
            self.state[p] = dict(st)
        self._build_banks()
