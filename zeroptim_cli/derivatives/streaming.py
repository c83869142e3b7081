"""Streaming a model's parameters: each module's own parameters exist only while that module runs.

Inside ``streamed(model, load)``, every parameter of ``model`` is replaced by a placeholder with its shape
and dtype but no data; a forward pre-hook on the module that owns it puts ``load(name)`` in its place right
before the module's forward (``name``: the parameter's first name in ``named_parameters()``, so a tied
weight is one name wherever it is used), and a forward hook puts the placeholder back right after, so that
the loaded tensor is released as soon as nothing else holds it. At any moment only the parameters of the
modules being run (one leaf module and its ancestors' own parameters) are resident.

A large weight need not be resident whole either. A module that is a plain ``nn.Linear`` or ``nn.Embedding``
(their own forward, not a subclass's) whose weight exceeds ``CHUNK_BYTES`` in the run's dtype is run from
pieces of it instead: the linear map one block of output rows at a time (``row_slices``: W's rows, and the
bias's, read as ``load(name, rows=slice)``; the outputs concatenated along the last dimension), the embedding
from the rows the batch looks up alone (``load(name, rows=sorted distinct ids)``, gathered with the ids
renumbered). Both give what the whole weight gives: each looked-up row is the same row, and each output
entry the same dot product over the same inputs (equal up to the summation order a matrix-product kernel
picks for another shape; tested in float64 to 1e-12). So a vocabulary's 32000 × 2048 embedding and output head cost the
memory of a block of rows, not of the matrix (and of Δ beside it in Taylor mode).

What ``load`` returns is the caller's choice: w_t + αΔ for a value of f, or the Taylor tensor
(w_t, Δ, 0) for Taylor mode (``pair_point``), which makes the streamed f the same function of the
parameters as the in-memory one, and its Taylor coefficients the same numbers.

This needs every parameter to be used inside its own module's forward, called as ``module(...)``, which
holds for Hugging Face decoder-only and encoder models (tied embeddings too) and the built-in models. A
parameter touched anywhere else (a parent reading ``child.weight`` in its own forward, a module called
through ``.forward`` directly) reaches an op as the placeholder, which raises ``StreamingUnsupported``
naming the parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from zeroptim_cli.allocator import return_freed_memory
from zeroptim_cli.derivatives.taylor._core import TaylorTensor
from zeroptim_cli.errors import ZeroptimError

#: Rows of a parameter: a slice of its first dimension, or sorted distinct indices into it.
Rows = slice | Tensor | None


class Load(Protocol):
    """A parameter's first name (and, for a weight run in pieces, its rows) → the tensor its module uses
    for one forward."""

    def __call__(self, name: str, rows: Rows = None) -> Tensor: ...


#: A weight larger than this (bytes, in the run's dtype) is run in blocks of about this many bytes of rows.
CHUNK_BYTES = 32 * 2**20


def row_slices(shape: torch.Size, itemsize: int, budget: int | None = None) -> list[slice]:
    """Consecutive blocks of the first dimension of a tensor of ``shape``, each about ``budget`` bytes
    (default ``CHUNK_BYTES``; at least one row), covering it."""
    rows = shape[0] if len(shape) else 1
    step = max(1, (budget or CHUNK_BYTES) // max(1, shape[1:].numel() * itemsize))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _in_pieces(module: nn.Module) -> bool:
    """Whether ``module`` is run from pieces of its weight (a plain Linear or Embedding, weight > CHUNK_BYTES)."""
    if type(module).forward not in (nn.Linear.forward, nn.Embedding.forward):
        return False
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return False  # renormalises the looked-up rows of the weight in place
    weight = module._parameters.get("weight")
    return weight is not None and weight.numel() * weight.element_size() > CHUNK_BYTES


def _piecewise_forward(module: nn.Module, names: dict[str, str], load: Load) -> Callable[[Tensor], Tensor]:
    """The forward of ``module`` (``_in_pieces``) computed from pieces of its weight read by ``load``."""
    weight = names["weight"]
    if isinstance(module, nn.Embedding):
        def embedding(ids: Tensor) -> Tensor:
            rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= module.num_embeddings):
                raise IndexError(f"index out of range in self (ids from {int(rows[0])} to {int(rows[-1])}, "
                                 f"{module.num_embeddings} embeddings)")
            return F.embedding(inverse, load(weight, rows=rows))
        return embedding
    bias = names.get("bias")
    shape = module._parameters["weight"].shape
    blocks = row_slices(shape, module._parameters["weight"].element_size())

    def linear(x: Tensor) -> Tensor:
        return torch.cat([F.linear(x, load(weight, rows=r), None if bias is None else load(bias, rows=r))
                          for r in blocks], dim=-1)
    return linear


class StreamingUnsupported(ZeroptimError):
    """A parameter was used outside its own module's forward: the model cannot be streamed."""


class _Placeholder(Tensor):
    """A parameter that is not loaded: metadata only; any op on it raises ``StreamingUnsupported``."""

    @staticmethod
    def __new__(cls, like: Tensor, name: str):
        r = Tensor._make_wrapper_subclass(cls, like.size(), dtype=like.dtype, device=like.device,
                                          requires_grad=False)
        r.param_name = name
        return r

    def __init__(self, *a, **k):
        pass

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"<parameter '{self.param_name}', streamed>"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        name = next(a.param_name for a in tree_leaves((args, kwargs)) if isinstance(a, _Placeholder))
        raise StreamingUnsupported(
            f"parameter '{name}' is used outside its own module's forward ({func}), so the model cannot be "
            "streamed module by module; analyse it without --stream")


def owners(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, its local parameter name, the parameter's first name in ``named_parameters()``) for every
    parameter slot of every module, tied ones included."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    out = []
    for module in model.modules():
        for local, p in module._parameters.items():
            if p is not None:
                out.append((module, local, first[id(p)]))
    return out


@contextlib.contextmanager
def streamed(model: nn.Module, load: Load) -> Iterator[None]:
    """Inside the block, ``model``'s parameters are loaded module by module (see the module docstring);
    freed memory is returned to the system as it is freed and after each module (``allocator.return_freed_memory``)."""
    trim = return_freed_memory()
    slots: dict[nn.Module, list[tuple[str, str]]] = {}
    original: dict[tuple[int, str], Tensor] = {}
    for module, local, name in owners(model):
        slots.setdefault(module, []).append((local, name))
        original[(id(module), local)] = module._parameters[local]
    pieces = {m for m in slots if _in_pieces(m)}

    def rest(module: nn.Module) -> None:
        for local, name in slots[module]:
            module._parameters[local] = _Placeholder(original[(id(module), local)], name)  # type: ignore[assignment]

    def before(module: nn.Module, args: object) -> None:
        if module in pieces:
            return  # its forward reads the pieces it needs
        for local, name in slots[module]:
            module._parameters[local] = load(name)  # type: ignore[assignment]

    def after(module: nn.Module, args: object, output: object) -> None:
        rest(module)
        trim()

    handles = []
    try:
        for module in slots:
            rest(module)
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, always_call=True))
        for module in pieces:
            module.forward = _piecewise_forward(module, dict(slots[module]), load)  # type: ignore[method-assign]
        yield
    finally:
        for module in pieces:
            vars(module).pop("forward", None)
        for handle in handles:
            handle.remove()
        for module, names in slots.items():
            for local, _ in names:
                module._parameters[local] = original[(id(module), local)]  # type: ignore[assignment]


#: Where the parameters are evaluated: "taylor" (the Taylor tensor along Δ) or a scale α of w_t + αΔ.
Point = str | float


def pair_point(read_t: Callable[[], Tensor], read_t1: Callable[[Tensor | None], Tensor],
               point: Point) -> tuple[Tensor, Tensor | None]:
    """(the parameter at ``point``, Δ when the point formed it), from readers of w_t and of w_t1 (less its
    argument when one is given: Δ = w_t1 − w_t formed while w_t1 is read). Each file is read only when needed.

    ``"taylor"``: TaylorTensor(w_t, Δ, 0), as ``taylor.taylor2`` builds it; α = 0: w_t; α = 1: w_t1 as
    stored; other α: w_t + α·Δ (formed in Δ's own memory, the same numbers as ``w_t + α * Δ``)."""
    if point == 0.0:
        return read_t(), None
    if point == 1.0:
        return read_t1(None), None
    w_t = read_t()
    delta = read_t1(w_t)
    if point == "taylor":
        return TaylorTensor(w_t, delta, None), delta
    return delta.mul_(float(point)).add_(w_t), None
