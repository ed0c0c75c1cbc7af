"""Module swaps by class: how a backend puts its native-backed modules into a built model, and takes them out.

A backend names, per reference class (``RMSNorm``, ``Linear``, ``QuantLinear``, ...), the subclass that runs it
natively. The swap assigns ``module.__class__``: parameters, buffers, hooks and checkpoint names stay as they are, no
tensor is copied, and ``revert`` restores the reference class. A module of a *subclass* of a reference class (tensor
parallel's ``TPAttention``, expert parallel's ``ParallelExperts``, a LoRA wrapper) gets a native subclass of its own
class carrying only the native methods it inherits unchanged from the reference: a subclass that overrides a method
keeps its own. A native class lists those methods in ``accelerates``, and in ``needs`` the methods one of them
assumes are the reference's (the fused experts call is the reference's per-expert math, not a LoRA expert's).
``local_linear`` is the hook sharded linears offer (``ernie45.parallel.tensor_parallel``) for the matmul between
their communications.
"""

from __future__ import annotations

from torch import nn

HOOKS = ("local_linear",)
"""Methods a subclass defines for backends to override although its reference class has none."""

_derived: dict[tuple[type, type], type | None] = {}


def native_class(cls: type, table: dict[type, type]) -> type | None:
    """The class a module of class ``cls`` becomes under ``table`` (reference class -> native class); None: none."""
    if cls in table:
        return table[cls]
    ref = next((r for r in cls.__mro__ if r in table), None)
    if ref is None:
        return None
    native = table[ref]
    if (cls, native) not in _derived:
        def inherited(name: str) -> bool:
            return hasattr(ref, name) and getattr(cls, name) is getattr(ref, name)

        needs = getattr(native, "needs", {})
        methods = {name: native.__dict__[name] for name in native.accelerates
                   if (inherited(name) and all(inherited(d) for d in needs.get(name, ())))
                   or (name in HOOKS and not hasattr(ref, name) and hasattr(cls, name))}
        _derived[cls, native] = type(f"Native{cls.__name__}", (cls,), {
            **methods, "reference": cls, "__module__": native.__module__,
            "__doc__": f"{cls.__name__} with {native.__name__}'s {', '.join(methods)}"}) if methods else None
    return _derived[cls, native]


def is_native(module: nn.Module) -> bool:
    return "reference" in type(module).__dict__


def swap(model: nn.Module, table: dict[type, type]) -> int:
    """Give every module of ``model`` its native class under ``table``, in place; returns how many changed."""
    n = 0
    for m in model.modules():
        if is_native(m):
            continue
        cls = native_class(type(m), table)
        if cls is not None:
            m.__class__ = cls
            init = getattr(cls, "accel_init", None)
            if init is not None:
                init(m)
            n += 1
    return n


def revert(model: nn.Module) -> int:
    """Put every swapped module of ``model`` back to its reference class; returns how many."""
    n = 0
    for m in model.modules():
        while is_native(m):
            m.__class__ = type(m).__dict__["reference"]
            n += 1
        for key in [k for k in m.__dict__ if k.startswith("_accel_")]:
            del m.__dict__[key]
    return n
