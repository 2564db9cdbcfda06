"""The pass registry and the pipeline's order.

Adding a pass is one file plus one registration: define a :class:`~passes.base.Pass` subclass
with its declarations (``name``, ``requires``, ``after``, ``installs``, ``enabled``) and decorate
it with :func:`register_pass` (the library's passes register when :mod:`passes` is imported; a
user's pass registers the same way, see ``vpmoe_compile.register_pass``). ``transform`` then
runs it whenever ``enabled(cfg)`` says so, in the order the declarations give, with the same
all-or-nothing guarantee and its own dump page.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Type

from passes.base import AFTER_ALL, Pass, PassError

__all__ = ["order_passes", "register_pass", "registered_passes", "unregister_pass"]

_REGISTRY: Dict[str, Type[Pass]] = {}


def register_pass(cls: Type[Pass]) -> Type[Pass]:
    """Register a pass class (usable as a decorator); its ``name`` must be new."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"register_pass takes a subclass of passes.base.Pass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name or name == AFTER_ALL:
        raise PassError(f"{cls.__qualname__}: a pass needs a non-empty `name` (got {name!r})")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise PassError(
            f"a pass named {name!r} is already registered ({_REGISTRY[name].__module__}."
            f"{_REGISTRY[name].__qualname__}); choose another name"
        )
    for attr in ("requires", "after", "installs"):
        value = getattr(cls, attr)
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise PassError(f"{cls.__qualname__}.{attr} must be a tuple of strings, got {value!r}")
    if cls.run is Pass.run:
        raise PassError(f"{cls.__qualname__} does not implement run(ctx, result)")
    _REGISTRY[name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Remove a registered pass (e.g. a user's, after a test)."""
    _REGISTRY.pop(name, None)


def registered_passes() -> Dict[str, Type[Pass]]:
    """Name -> class, in registration order."""
    import passes  # noqa: F401  (registers the library's passes)

    return dict(_REGISTRY)


def order_passes(pipeline: Sequence[Pass]) -> List[Pass]:
    """The passes in an order that honours every ``requires`` and ``after`` among them, keeping
    the given order wherever the declarations leave it free (a stable topological sort).

    Raises:
        PassError: a cycle, or a pass listed twice.
    """
    names = [p.name for p in pipeline]
    if len(set(names)) != len(names):
        raise PassError(f"a pass appears twice in the pipeline: {names}")
    present = set(names)
    last = {p.name for p in pipeline if AFTER_ALL in p.after}
    deps = {}
    for p in pipeline:
        d = {r for r in p.requires if r in present} | {a for a in p.after if a in present}
        if p.name in last:
            d |= present - last
        deps[p.name] = d - {p.name}
    ordered, done = [], set()
    remaining = list(pipeline)
    while remaining:
        for i, p in enumerate(remaining):
            if deps[p.name] <= done:
                ordered.append(p)
                done.add(p.name)
                del remaining[i]
                break
        else:
            raise PassError(
                "the passes' requires/after declarations form a cycle among "
                f"{[p.name for p in remaining]}"
            )
    return ordered
