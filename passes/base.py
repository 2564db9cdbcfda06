"""Pass machinery: the ``Pass`` interface, per-pass result records and the pass manager.

A pass works on the **module tree** of a stock Megatron-Core ``GPTModel`` (the whole model
cannot be traced by ``torch.fx``): it takes its sites from the layer plan, swaps in modules that
are drop-in for the stock call signature and creates or moves parameters. The manager

* orders passes and refuses a pass whose prerequisite did not run (before touching anything),
* snapshots the model before the pipeline and restores it exactly if any pass or verification
  fails (all-or-nothing: modules, parameters, buffers and module attributes as before),
* diffs the module tree and the parameter table around every pass, checks that existing
  tensors were not modified in place, and verifies the model after each pass (parameter
  accounting always; a forward on a tiny batch where cheap),
* captures the graph of every changed site before and after (when a dump was asked for),
* hands the records to the dump writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class PassError(RuntimeError):
    """A pass cannot run on this model; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class ParamInfo:
    name: str
    shape: Tuple[int, ...]
    dtype: str
    numel: int

    @classmethod
    def of(cls, name: str, p: torch.Tensor) -> "ParamInfo":
        return cls(name, tuple(p.shape), str(p.dtype).replace("torch.", ""), p.numel())


@dataclass
class ModuleReplacement:
    path: str
    old: str
    new: str


@dataclass
class SiteGraph:
    """Graph text of one rewritten site (captured with TorchDynamo)."""

    site: str
    before: str = ""
    after: str = ""
    before_graphs: int = 0
    after_graphs: int = 0
    note: str = ""


@dataclass
class PassResult:
    """What a pass reports while it runs (the one object ``run`` fills): a summary, the sites it
    rewrote, notes, tables and any graphs it captured itself for the dump;
    :meth:`Pass.replace_module` adds ``replaced``. The
    manager measures everything else and freezes both into a :class:`PassRecord`."""

    name: str
    summary: str = ""
    sites: List[str] = field(default_factory=list)
    replaced: List[ModuleReplacement] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    data: Dict[str, Any] = field(default_factory=dict)
    graphs: List[SiteGraph] = field(default_factory=list)  # site graphs the pass captured itself


@dataclass(frozen=True)
class PassRecord:
    """What one pass changed, as recorded by the manager (immutable): the pass's report plus the
    parameter-table diff, module trees, site graphs, verification and time."""

    name: str
    summary: str
    sites: Tuple[str, ...]
    replaced: Tuple[ModuleReplacement, ...]
    notes: Tuple[str, ...]
    data: Dict[str, Any]
    params_added: Tuple[ParamInfo, ...]
    params_removed: Tuple[ParamInfo, ...]
    params_kept_moved: Tuple[Tuple[str, str], ...]
    tree_before: str
    tree_after: str
    graphs: Tuple[SiteGraph, ...]
    verified: str
    time_s: float

    @property
    def params_added_count(self) -> int:
        return sum(p.numel for p in self.params_added)

    @property
    def params_removed_count(self) -> int:
        return sum(p.numel for p in self.params_removed)

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["params_added_count"] = self.params_added_count
        d["params_removed_count"] = self.params_removed_count
        return d


# --------------------------------------------------------------------------------------------
# Context and the Pass interface
# --------------------------------------------------------------------------------------------


@dataclass
class PassContext:
    """State shared by the passes of one ``transform`` call."""

    model: nn.Module
    cfg: Any  # megatron_base.config.VpMoEConfig
    plan: Any = None  # passes.layer_plan.LayerPlan, set by the layer-plan pass
    results: List[PassRecord] = field(default_factory=list)
    options: Dict[str, Any] = field(default_factory=dict)
    kernels: Any = None  # vpmoe_compile.kernels.KernelPolicy, set by transform; see kernel_policy()

    def ran(self, name: str) -> bool:
        return any(r.name == name for r in self.results)

    def kernel_policy(self):
        """The kernel policy the passes hand to the modules they install: the one ``transform``
        resolved (:attr:`kernels`), or for a context built by hand the one of its config."""
        if self.kernels is None:
            from vpmoe_compile.kernels import KernelPolicy

            self.kernels = KernelPolicy.from_config(self.cfg)
        return self.kernels


#: ``Pass.after`` value: run after every other pass of the pipeline.
AFTER_ALL = "*"


class Pass:
    """Base class. A pass declares what it needs and does; the pipeline orders passes from
    those declarations (:func:`passes.registry.order_passes`).

    Declarations (class attributes):
        name: unique name (the dump page, ``passes=[...]``).
        requires: passes that must run before this one (their absence is an error).
        after: passes this one runs after when they are in the pipeline (soft order);
            ``(AFTER_ALL,)`` runs it last (e.g. a read-only pass that looks at every parameter).
        installs: class names (``fnmatch`` patterns) of the modules it installs; the manager
            checks every module it puts in the tree is one of them, so the pattern (``sites``)
            and its replacement are read side by side.
        read_only: changes nothing (checked).
        enabled(cfg): whether the default pipeline runs it for a config.

    ``check(ctx)`` runs for every pass of the pipeline *before any pass mutates the model*, so
    unsupported configurations are refused with nothing applied. ``run(ctx, result)`` performs
    the rewrite and fills ``result`` (summary, sites, notes, data; :meth:`replace_module`
    records replacements); the manager measures the rest into a :class:`PassRecord`.
    ``sites(ctx)`` lists the module paths whose graph is dumped before and after.
    """

    name: str = ""
    requires: Tuple[str, ...] = ()
    after: Tuple[str, ...] = ()
    installs: Tuple[str, ...] = ()
    read_only: bool = False

    @classmethod
    def enabled(cls, cfg) -> bool:
        """Whether the default pipeline runs this pass for ``cfg`` (a ``VpMoEConfig``)."""
        return True

    def check(self, ctx: PassContext) -> None:  # pragma: no cover - default: nothing to check
        pass

    def sites(self, ctx: PassContext) -> List[str]:
        return []

    def run(self, ctx: PassContext, result: PassResult) -> None:
        raise NotImplementedError

    # helpers ------------------------------------------------------------------------------
    @staticmethod
    def replace_module(model: nn.Module, path: str, new: nn.Module, result: PassResult) -> nn.Module:
        """Replace the submodule at ``path`` by ``new``; records old -> new class."""
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr)
        if not isinstance(old, nn.Module):
            raise PassError(f"{path} is not a module (got {type(old).__name__})")
        setattr(parent, attr, new)
        result.replaced.append(ModuleReplacement(path, _qualname(old), _qualname(new)))
        return old


def _check_installs(p: Pass, result: PassResult) -> None:
    """Every module a pass put into the tree is one its ``installs`` declares."""
    if p.read_only:
        return
    import fnmatch

    installed = {r.new.rpartition(".")[2] for r in result.replaced}
    undeclared = sorted(c for c in installed if not any(fnmatch.fnmatchcase(c, pat) for pat in p.installs))
    if undeclared:
        raise PassError(
            f"pass {p.name!r} installed {undeclared} but declares installs={tuple(p.installs)}; "
            "list every module class a pass installs in its `installs`"
        )


def _qualname(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------
# Snapshot / restore (all-or-nothing) and diffs
# --------------------------------------------------------------------------------------------


class ModelSnapshot:
    """Everything a pass may change, recorded so the model can be restored exactly.

    Module structure (``_modules``, ``_parameters``, ``_buffers`` and the other instance
    attributes of every module reachable from the root, including modules a pass later
    detaches), each module's class (a pass may swap ``__class__`` for a subclass) plus the
    attribute dicts and version counters of every parameter and buffer. Passes must not modify
    existing tensors in place; ``changed_in_place`` detects it.

    ``structure=False`` records the tensors only (for ``changed_in_place`` and ``storages``, as
    each pass's guard needs): copying every module's attributes is most of a snapshot's cost on
    a large model, and only the pipeline's one all-or-nothing snapshot restores them.
    """

    def __init__(self, root: nn.Module, structure: bool = True):
        self.root = root
        self.structure = structure
        self.modules: List[Tuple[nn.Module, dict, dict, dict, dict]] = []
        self.classes: List[Tuple[nn.Module, type]] = []
        self.tensors: List[Tuple[torch.Tensor, dict, int, torch.Tensor]] = []
        seen = set()
        self.rng = torch.random.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        for _, m in root.named_modules(remove_duplicate=True):
            if structure:
                attrs = {
                    k: (type(v)(v) if isinstance(v, (dict, set)) and k not in ("_modules", "_parameters", "_buffers") else v)
                    for k, v in m.__dict__.items()
                }
                self.modules.append((m, attrs, dict(m._modules), dict(m._parameters), dict(m._buffers)))
                self.classes.append((m, type(m)))
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                # t.data: an alias of the current storage (no copy), to undo a `.data = ...` rebind
                self.tensors.append((t, dict(getattr(t, "__dict__", {})), t._version, t.data))

    def restore(self) -> None:
        """Undo everything (module structure, classes, hooks, attributes, tensor attributes, RNG state)."""
        if not self.structure:
            raise RuntimeError("a tensors-only ModelSnapshot (structure=False) cannot restore a model")
        torch.random.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        for m, cls in self.classes:
            if type(m) is not cls:
                m.__class__ = cls
        for m, attrs, mods, params, bufs in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._modules.clear()
            m._modules.update(mods)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(bufs)
        for t, attrs, _, data in self.tensors:
            if (t.data_ptr(), t.shape, t.dtype, t.device) != (data.data_ptr(), data.shape, data.dtype, data.device):
                with torch.no_grad():
                    t.data = data
            d = getattr(t, "__dict__", None)
            if d is not None:
                d.clear()
                d.update(attrs)

    def changed_in_place(self, allowed: Sequence[torch.Tensor] = ()) -> List[str]:
        allowed_ids = {id(t) for t in allowed}
        names = {id(t): n for n, t in _named_tensors(self.root)}
        bad = []
        for t, _, version, _ in self.tensors:
            if id(t) in allowed_ids:
                continue
            if t._version != version:
                bad.append(names.get(id(t), f"<detached tensor {tuple(t.shape)}>"))
        return bad


    def storages(self) -> Dict[int, str]:
        """``storage address -> tensor name`` of every parameter and buffer (not meta)."""
        names = {id(t): n for n, t in _named_tensors(self.root)}
        out = {}
        for t, *_ in self.tensors:
            if not t.is_meta and t.untyped_storage().nbytes():
                out[t.untyped_storage().data_ptr()] = names.get(id(t), f"<tensor {tuple(t.shape)}>")
        return out


class InPlaceGuard(TorchDispatchMode):
    """Raises :class:`PassError` *before* any op writes into the storage of a protected tensor
    (every parameter and buffer the model had when the pass started), so a pass can never change
    an existing tensor's values; rebinding ``.data`` is undone by :meth:`ModelSnapshot.restore`."""

    def __init__(self, protected: Dict[int, str], pass_name: str):
        super().__init__()
        self.protected = protected
        self.pass_name = pass_name

    def _check(self, func, value) -> None:
        for t in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                name = self.protected.get(t.untyped_storage().data_ptr())
                if name is not None:
                    raise PassError(
                        f"pass {self.pass_name!r} tried to modify existing tensor {name} in place "
                        f"({func}); passes must create new tensors so a failed transform can be undone"
                    )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                self._check(func, args[i] if i < len(args) else kwargs.get(arg.name))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector paused (and restored to its previous state): the
    snapshots and parameter tables of a pipeline allocate millions of small containers on a
    large model (the 80-layer ``vpmoe`` has 62k modules), and every full collection they trigger
    walks the whole heap. Measured on this repository's 2-core CPU machine: ``transform`` of
    ``vpmoe`` on the meta device 52.7 s with the collector, 17.6 s without. Nothing the
    pipeline allocates depends on a collection: cycles are collected once it resumes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def param_table(model: nn.Module) -> Dict[str, Tuple[int, ParamInfo]]:
    """``name -> (id(param), ParamInfo)`` for every parameter (shared ones under each name)."""
    return {n: (id(p), ParamInfo.of(n, p)) for n, p in model.named_parameters(remove_duplicate=False)}


def module_tree(model: nn.Module) -> str:
    """One line per module: ``path: Class``, indented by depth."""
    lines = []
    for path, m in model.named_modules(remove_duplicate=False):
        depth = path.count(".") + (1 if path else 0)
        label = path.rpartition(".")[2] if path else "(root)"
        lines.append(f"{'  ' * depth}{label}: {type(m).__name__}")
    return "\n".join(lines)


def diff_params(before: Dict[str, Tuple[int, ParamInfo]], after: Dict[str, Tuple[int, ParamInfo]]):
    """Parameters added / removed (by identity) and kept-but-renamed."""
    before_ids = {pid: name for name, (pid, _) in before.items()}
    after_ids = {pid: name for name, (pid, _) in after.items()}
    added = [info for name, (pid, info) in after.items() if pid not in before_ids]
    removed = [info for name, (pid, info) in before.items() if pid not in after_ids]
    moved = [
        (before_ids[pid], name)
        for name, (pid, _) in after.items()
        if pid in before_ids and before_ids[pid] != name
    ]
    # A parameter shared under several names is reported once per name; dedupe by name.
    added = sorted({p.name: p for p in added}.values(), key=lambda p: p.name)
    removed = sorted({p.name: p for p in removed}.values(), key=lambda p: p.name)
    return added, removed, sorted(set(moved))


# --------------------------------------------------------------------------------------------
# Graph capture of sites (for the dump)
# --------------------------------------------------------------------------------------------


class SiteRecorder:
    """Records the inputs of site modules during one forward (forward pre-hooks)."""

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        self.inputs: Dict[str, Tuple[tuple, dict]] = {}
        self.handles = []
        for path in paths:
            mod = model.get_submodule(path)
            self.handles.append(mod.register_forward_pre_hook(self._hook(path), with_kwargs=True))

    def _hook(self, path):
        def hook(module, args, kwargs):
            if path not in self.inputs:
                self.inputs[path] = (detached_copy(args), detached_copy(kwargs))

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def detached_copy(obj):
    """Tensors in (nested) tuples / lists / dicts detached and cloned, everything else as is
    (captured module inputs that later code may not change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(detached_copy(o) for o in obj)
    if isinstance(obj, list):
        return [detached_copy(o) for o in obj]
    if isinstance(obj, dict):
        return {k: detached_copy(v) for k, v in obj.items()}
    return obj


def capture_graph(module: nn.Module, args: tuple, kwargs: dict) -> Tuple[str, int]:
    """TorchDynamo-capture ``module(*args, **kwargs)``; returns (readable graphs, #graphs)."""
    import torch._dynamo

    from megatron_base.compat import dynamo_config

    graphs: List[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm.print_readable(print_output=False))
        return gm.forward

    torch._dynamo.reset()
    try:
        with dynamo_config(), torch.no_grad():
            torch.compile(module, backend=backend, fullgraph=False, dynamic=False)(*args, **kwargs)
    except Exception as exc:  # capture is diagnostic only: report, never fail the transform
        graphs.append(f"# capture failed: {type(exc).__name__}: {exc}")
    finally:
        torch._dynamo.reset()
    text = "\n\n".join(
        (f"# ---- graph {i + 1} of {len(graphs)} ----\n" if len(graphs) > 1 else "") + g
        for i, g in enumerate(graphs)
    )
    return _short_paths(text), len(graphs)


def _short_paths(text: str) -> str:
    """Source locations in graph comments, relative to site-packages / this project."""
    import os
    import sysconfig

    for prefix, label in (
        (sysconfig.get_paths()["purelib"], "<site-packages>"),
        (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "<vpmoe-compile>"),
    ):
        text = text.replace(prefix.rstrip("/") + "/", label + "/")
    return text


def _signature(module: nn.Module, args, kwargs) -> Tuple:
    def sig(o):
        if isinstance(o, torch.Tensor):
            return ("T", tuple(o.shape), str(o.dtype))
        if isinstance(o, (tuple, list)):
            return tuple(sig(x) for x in o)
        if isinstance(o, dict):
            return tuple(sorted((k, sig(v)) for k, v in o.items()))
        return repr(o) if isinstance(o, (int, float, str, bool, type(None))) else type(o).__name__

    classes = tuple(type(m).__name__ for m in module.modules())
    return (classes, sig(args), sig(kwargs))


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


class PassManager:
    """Runs an ordered list of passes over one model, all-or-nothing.

    Args:
        passes: the pipeline, in order.
        verify: ``"auto"`` (forward check on a tiny batch unless the model is on the meta
            device), ``"forward"`` or ``"params"`` (parameter accounting only).
        capture_graphs: capture each changed site's graph before/after (for the dump).
        progress: optional callable ``(pass_name, index, total)`` for progress display.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify: str = "auto",
        capture_graphs: bool = False,
        progress: Optional[Callable[[str, int, int], None]] = None,
    ):
        if verify not in ("auto", "forward", "params"):
            raise ValueError(f"verify must be 'auto', 'forward' or 'params', got {verify!r}")
        self.passes = list(passes)
        self.verify = verify
        self.capture_graphs = capture_graphs
        self.progress = progress
        names = [p.name for p in self.passes]
        if len(set(names)) != len(names):
            raise PassError(f"a pass appears twice in the pipeline: {names}")

    def check_order(self, already: Sequence[str] = ()) -> None:
        done = set(already)
        for p in self.passes:
            missing = [r for r in p.requires if r not in done]
            if missing:
                raise PassError(
                    f"pass {p.name!r} requires {missing} to run before it; pipeline is "
                    f"{[q.name for q in self.passes]}. Add the missing pass earlier in the list."
                )
            done.add(p.name)

    def run(self, ctx: PassContext, on_success: Optional[Callable[[PassContext], None]] = None) -> List[PassRecord]:
        """Run the pipeline; ``on_success`` (e.g. the dump writer, the transformed marker)
        runs inside the all-or-nothing region, so its failure also restores the model."""
        self.check_order()
        with _gc_paused():
            snapshot = ModelSnapshot(ctx.model)
            try:
                for p in self.passes:
                    p.check(ctx)
                batch = _sample_batch(ctx) if self._do_forward(ctx) else None
                for i, p in enumerate(self.passes):
                    if self.progress:
                        self.progress(p.name, i, len(self.passes))
                    self._run_one(p, ctx, batch)
                if on_success is not None:
                    on_success(ctx)
            except BaseException:
                snapshot.restore()
                raise
        return ctx.results

    def _do_forward(self, ctx) -> bool:
        if self.verify == "params":
            return False
        on_meta = any(p.is_meta for p in ctx.model.parameters())
        if on_meta and self.verify == "forward":
            raise PassError("verify='forward' is impossible on a meta-device model")
        return not on_meta

    def _run_one(self, p: Pass, ctx: PassContext, batch) -> None:
        result = PassResult(name=p.name)
        t0 = time.perf_counter()
        before = param_table(ctx.model)
        tree_before = module_tree(ctx.model)
        site_paths = p.sites(ctx) if (self.capture_graphs and batch is not None) else []
        site_inputs, before_graphs = {}, {}
        if site_paths:
            site_inputs = _record_site_inputs(ctx.model, site_paths, batch)
            before_graphs = _capture_sites(ctx.model, site_inputs)
        pre = ModelSnapshot(ctx.model, structure=False)
        with InPlaceGuard(pre.storages(), p.name):
            p.run(ctx, result)
        bad = pre.changed_in_place()
        if bad:
            raise PassError(
                f"pass {p.name!r} modified existing tensors in place ({bad[:5]}); passes must "
                "create new tensors so a failed transform can be undone"
            )
        _check_installs(p, result)
        after = param_table(ctx.model)
        added, removed, moved = diff_params(before, after)
        if p.read_only and (added or removed or result.replaced):
            raise PassError(f"read-only pass {p.name!r} changed the model")
        verified = self._verify(ctx, batch)
        graphs = list(result.graphs)
        if site_paths:
            after_graphs = _capture_sites(ctx.model, site_inputs)
            for path in site_paths:
                b, nb = before_graphs.get(path, ("", 0))
                a, na = after_graphs.get(path, ("", 0))
                graphs.append(SiteGraph(path, b, a, nb, na))
        ctx.results.append(
            PassRecord(
                name=p.name, summary=result.summary, sites=tuple(result.sites),
                replaced=tuple(result.replaced), notes=tuple(result.notes), data=dict(result.data),
                params_added=tuple(added), params_removed=tuple(removed), params_kept_moved=tuple(moved),
                tree_before=tree_before, tree_after=module_tree(ctx.model), graphs=tuple(graphs),
                verified=verified, time_s=time.perf_counter() - t0,
            )
        )

    def _verify(self, ctx: PassContext, batch) -> str:
        params = list(ctx.model.named_parameters())
        for name, prm in params:
            if not isinstance(prm, nn.Parameter):
                raise PassError(f"{name} is not an nn.Parameter after the pass")
        if batch is None:
            return f"parameter accounting ({len(params)} tensors)"
        logits = _forward(ctx.model, batch)
        vocab = getattr(ctx.model, "vocab_size", None)
        s, b = batch[0].shape[1], batch[0].shape[0]
        if not getattr(ctx.model, "post_process", True):
            # a pipeline stage before the last returns its hidden states [s, b, h]
            hidden = ctx.model.config.hidden_size
            if tuple(logits.shape) != (s, b, hidden):
                raise PassError(f"verification forward of a pipeline stage returned {tuple(logits.shape)}, "
                                f"not the hidden states [{s}, {b}, {hidden}]")
        elif logits.shape[:2] != (b, s) or (vocab and logits.shape[-1] * _vocab_split(ctx.model) != vocab):
            raise PassError(f"verification forward returned logits of shape {tuple(logits.shape)}")
        if not torch.isfinite(logits.float()).all():
            raise PassError("verification forward produced non-finite outputs")
        return f"parameter accounting ({len(params)} tensors) + forward [b={b}, s={s}] finite"


def head_tp_size(model: nn.Module) -> int:
    """The tensor-parallel size of the model's output layer (its own group's, else the config's)."""
    head = getattr(model, "output_layer", None)
    group = getattr(head, "tp_group", None)
    if group is not None and hasattr(group, "size"):
        return int(group.size())
    return int(getattr(model.config, "tensor_model_parallel_size", 1) or 1)


def _vocab_split(model: nn.Module) -> int:
    """Over how many tensor-parallel ranks the logits' vocabulary is split (Megatron's output
    layer returns this rank's vocabulary slice unless it gathers the output)."""
    head = getattr(model, "output_layer", None)
    if head is None or getattr(head, "gather_output", False):
        return 1
    return head_tp_size(model)


def _sample_batch(ctx: PassContext):
    """A tiny deterministic batch (own generator: the global RNG is not consumed)."""
    model = ctx.model
    device = next(model.parameters()).device
    s = int(ctx.options.get("verify_seq_len", 0) or min(32, getattr(model, "max_sequence_length", 32)))
    g = torch.Generator().manual_seed(0)
    vocab = getattr(model, "vocab_size", 1000)
    ids = torch.randint(0, vocab, (1, s), generator=g).to(device)
    pos = torch.arange(s, device=device).unsqueeze(0)
    return ids, pos


def _stage_input(model: nn.Module, batch) -> torch.Tensor:
    """The decoder input ``[s, b, h]`` of a pipeline stage without the embedding
    (``pre_process=False``): deterministic values from an own generator, in the decoder's dtype."""
    s, b = batch[0].shape[1], batch[0].shape[0]
    ref = next(model.decoder.parameters())
    g = torch.Generator().manual_seed(1)
    return torch.randn(s, b, model.config.hidden_size, generator=g).to(device=ref.device, dtype=ref.dtype)


def _forward(model: nn.Module, batch):
    """Forward without side effects: eval mode, no grad, buffers and every module's training
    flag restored afterwards. A pipeline stage without the embedding gets its decoder input
    through ``set_input_tensor``, as the pipeline schedules give it (cleared afterwards)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    staged = not getattr(model, "pre_process", True)
    model.eval()
    try:
        with torch.no_grad():
            if staged:
                model.set_input_tensor(_stage_input(model, batch))
            return model(batch[0], batch[1], None)
    finally:
        if staged:
            model.set_input_tensor(None)
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


def _record_site_inputs(model, paths, batch):
    rec = SiteRecorder(model, paths)
    try:
        _forward(model, batch)
    finally:
        rec.close()
    return rec.inputs


def _capture_sites(model, site_inputs) -> Dict[str, Tuple[str, int]]:
    out: Dict[str, Tuple[str, int]] = {}
    cache: Dict[Tuple, Tuple[str, int, str]] = {}
    for path, (args, kwargs) in site_inputs.items():
        module = model.get_submodule(path)
        key = _signature(module, args, kwargs)
        if key in cache:
            text, n, first = cache[key]
            out[path] = (f"# same graph as {first} (same module classes and input shapes)\n", n)
            continue
        text, n = capture_graph(module, args, kwargs)
        cache[key] = (text, n, path)
        out[path] = (text, n)
    return out
