"""The parameter registry: quantized weight ``Parameter`` → its quantizer (docs/design.md §1).

Optimizer wrappers receive parameters, not modules; the registry lets them find, from the
parameter alone, the step ``s`` (:meth:`QuantEntry.scale`), the grid (Qn, Qp), the surrogate
and the STE kind FOGZO smooths with. Weights are held weakly (by identity), so a deleted
model leaves no trace.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "QuantEntry",
    "register",
    "lookup",
    "record_root",
    "model_roots",
    "claim",
    "claim_all",
    "release",
    "mark_foreign",
    "foreign_libraries",
    "quantized_weights",
    "surrogate_parameters",
]

_REGISTRY: WeakIdKeyDictionary = WeakIdKeyDictionary()
_ROOTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight → weakref of the model it was quantized in
_FOREIGN: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight quantized by another library → its name
_CLAIMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # quantizer → {role: (owner ref, name)}
_VERSION = [0]  # bumped by every register(): lets wrappers cache their lookups


def version() -> int:
    """A counter that changes whenever a weight is (re-)registered."""
    return _VERSION[0]


@dataclass(frozen=True, eq=False)
class QuantEntry:
    """What a wrapper needs to know about one quantized weight."""

    weight: nn.Parameter
    quantizer: nn.Module

    @property
    def qn(self) -> int:
        return self.quantizer.qn

    @property
    def qp(self) -> int:
        return self.quantizer.qp

    @property
    def surrogate(self) -> nn.Module:
        return self.quantizer.surrogate

    @property
    def ste_kind(self) -> str:
        """``"identity"`` for round-based grids, ``"hardtanh"``/``"tanh"``/``"approxsign"``
        for binary weights (docs/design.md §4.2)."""
        return self.quantizer.ste_kind

    def scale(self) -> Tensor:
        """The current step s (detached), broadcastable to the weight."""
        return self.quantizer.scale(self.weight.detach())

    def u(self) -> Tensor:
        """The weight in step units, u = v / s (detached)."""
        return self.quantizer.u(self.weight.detach())


def register(weight: nn.Parameter, quantizer: nn.Module) -> None:
    """Record that ``weight`` is quantized by ``quantizer`` (layers call this themselves).

    The quantizer is held as long as the weight lives (it does not refer back to the weight), so
    ``FOGZO(SGD(make_model().parameters()))`` still finds it after the model object is gone."""
    _REGISTRY[weight] = quantizer
    _VERSION[0] += 1


def lookup(param: Tensor) -> QuantEntry | None:
    """The registry entry of ``param``, or ``None`` if it is not a quantized weight."""
    q = _REGISTRY.get(param)
    return None if q is None else QuantEntry(param, q)


def mark_foreign(weight: Tensor, library: str) -> None:
    """Record that ``weight`` is fake-quantized by ``library`` (torchao, brevitas): the adapters
    call it, so a wrapper that needs metaste's own quantizers can say why it finds none."""
    _FOREIGN[weight] = library


def foreign_libraries(model: nn.Module | None, params: Iterable[Tensor]) -> set[str]:
    """The other libraries that fake-quantize ``params`` (marked by an adapter) or whose modules
    ``model`` holds."""
    libs = {_FOREIGN[p] for p in params if p in _FOREIGN}
    if model is not None:
        libs |= {type(m).__module__.split(".")[0] for m in model.modules()} & {"torchao", "brevitas"}
    return libs


def record_root(model: nn.Module) -> None:
    """Record ``model`` as the model its quantized weights belong to (``quantize_model`` calls
    it): a wrapper then knows, from its parameters alone, whose buffers (BatchNorm statistics) a
    step may change, without reading the closure."""
    ref = weakref.ref(model)
    for p in model.parameters():
        if p in _REGISTRY:
            _ROOTS[p] = ref


def model_roots(params: Iterable[Tensor]) -> list[nn.Module]:
    """The models (alive, each once) that the quantized weights among ``params`` were quantized in."""
    out: dict[int, nn.Module] = {}
    for p in params:
        ref = _ROOTS.get(p)
        m = None if ref is None else ref()
        if m is not None:
            out[id(m)] = m
    return list(out.values())


def claim(quantizer: nn.Module, role: str, owner: object, name: str | None = None) -> None:
    """Record that ``owner`` drives ``role`` of ``quantizer``'s weight — ``"forward"`` (what the
    training forward sees: PEGE, a QuantCurriculum) or ``"gradient"`` (ψ applied after backward:
    HyperSTE, JacQuant). Raises ``ValueError`` if another live owner holds the role: two of them
    cannot drive the same weight. Claiming again by the same owner is a no-op."""
    held = _CLAIMS.setdefault(quantizer, {})
    other = held.get(role)
    if other is not None:
        ref, other_name = other
        alive = ref()
        if alive is not None and alive is not owner:
            what = name or type(owner).__name__
            raise ValueError(
                f"a quantized weight's {role} is already driven by a {other_name}; a {what} cannot drive it "
                f"too. Hand it back first ({other_name}.release() / remove() / close()), or build the "
                f"{what} over other weights"
            )
    held[role] = (weakref.ref(owner), name or type(owner).__name__)


def claim_all(quantizers: Iterable[nn.Module], role: str, owner: object, name: str | None = None) -> None:
    """:func:`claim` each of ``quantizers``, all or none."""
    done: list[nn.Module] = []
    try:
        for q in quantizers:
            claim(q, role, owner, name)
            done.append(q)
    except BaseException:
        for q in done:
            release(q, role, owner)
        raise


def release(quantizer: nn.Module, role: str, owner: object) -> None:
    """Undo :func:`claim` (only ``owner``'s own claim)."""
    held = _CLAIMS.get(quantizer)
    if held and role in held and held[role][0]() is owner:
        del held[role]


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, QuantEntry]]:
    """(name, entry) for every quantized weight of ``model``."""
    for name, p in model.named_parameters():
        entry = lookup(p)
        if entry is not None:
            yield name, entry


def surrogate_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(qualified name, tensor) of every learnable surrogate parameter of ``model``.

    They are buffers — outside ``model.parameters()`` so the base optimizer never trains them,
    inside ``state_dict()`` so checkpoints keep them (docs/design.md §2 decision).
    """
    for mname, module in model.named_modules():
        if getattr(module, "learnable", False) and hasattr(module, "param_names"):
            for pname in module.param_names:
                yield (f"{mname}.{pname}" if mname else pname), getattr(module, pname)
