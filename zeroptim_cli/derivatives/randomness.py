"""Train mode's random draws from a generator of the evaluation's own, never from torch's global one.

In train mode f must still be one deterministic function of w: dropout (and any other random op of the
model) has to draw the same masks in every evaluation — f(w_t), its derivatives, f(w_t1), each chunk and
line-search point. Reseeding torch's global generator would do that for this thread, but reseed every other
thread of the process in the middle of its work (a data loader, a second analysis). Instead, inside
``seeded(seed)`` a dispatch mode (thread-local, like every torch dispatch mode) gives each random ATen op
this block's own ``torch.Generator`` (one per device, seeded with ``seed``):

- an op with a ``generator`` argument gets it (``bernoulli_``, which CPU dropout draws its mask with,
  ``uniform_``, ``normal_``, ``rand.generator``, …);
- an op without one is rewritten into ops with one: ``native_dropout`` (fused dropout) as a Bernoulli mask
  times 1/(1−p), the factories ``rand``/``randn``/``randint``/``randperm`` as their ``generator`` overloads,
  ``rand_like``/``randn_like``/``randint_like`` as an empty tensor filled in place;
- any other random op is refused with an error naming it, rather than drawing from the global generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from zeroptim_cli.derivatives.dispatch_mode import EagerDispatchMode
from zeroptim_cli.errors import ZeroptimError

aten = torch.ops.aten


def _device_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device(kwargs.get("device") or "cpu")


def _dropout(gen: torch.Generator, x: torch.Tensor, p: float, train: bool | None) -> tuple[torch.Tensor, torch.Tensor]:
    """native_dropout(x, p, train) = (x·m/(1−p), m), m_i ~ Bernoulli(1−p) drawn with ``gen``."""
    if not train or p == 0:
        return x.clone(), torch.ones(x.shape, dtype=torch.bool, device=x.device)
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p, generator=gen)
    return (x * keep * (1.0 / (1 - p)) if p < 1 else x * 0), keep.bool()


def _filled(fill: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``*_like(x, …)`` as an empty tensor like x filled in place by ``fill(t, *args, generator=gen)``."""
    def rule(gen: torch.Generator, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        like = {k: kwargs[k] for k in ("dtype", "layout", "device", "memory_format") if kwargs.get(k) is not None}
        return fill(torch.empty_like(x, **like), *args, generator=gen)
    return rule


def _with_generator(overload: Any) -> Callable[..., torch.Tensor]:
    def rule(gen: torch.Generator, *args: Any, **kwargs: Any) -> torch.Tensor:
        return overload(*args, generator=gen, **kwargs)
    return rule


#: random ops without a ``generator`` argument, rewritten into ops with one
_REWRITES: dict[Any, Callable[..., Any]] = {
    aten.native_dropout.default: _dropout,
    aten.rand.default: _with_generator(aten.rand.generator),
    aten.randn.default: _with_generator(aten.randn.generator),
    aten.randint.default: _with_generator(aten.randint.generator),
    aten.randint.low: _with_generator(aten.randint.low_generator),
    aten.randperm.default: _with_generator(aten.randperm.generator),
    aten.rand_like.default: _filled(lambda t, generator: t.uniform_(0, 1, generator=generator)),
    aten.randn_like.default: _filled(lambda t, generator: t.normal_(0, 1, generator=generator)),
    aten.randint_like.default: _filled(lambda t, high, generator: t.random_(0, high, generator=generator)),
    aten.randint_like.low_dtype: _filled(lambda t, low, high, generator: t.random_(low, high, generator=generator)),
}


class _Seeded(EagerDispatchMode):
    """Every random op draws from this block's generators (module docstring)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        gen = self.generator(_device_of(args, kwargs))
        if any(a.name == "generator" for a in func._schema.arguments):
            if kwargs.get("generator") is None:
                kwargs = {**kwargs, "generator": gen}
            return func(*args, **kwargs)
        rewrite = _REWRITES.get(func)
        if rewrite is None:
            raise ZeroptimError(f"train mode: the model draws random numbers with {func}, which takes no generator, "
                                "so its draws cannot be fixed for every evaluation of f; analyse in eval mode")
        return rewrite(gen, *args, **kwargs)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block, every random op of this thread draws from generators seeded with ``seed``, made
    afresh for the block: the same draws each time, and no other thread's generator touched."""
    with _Seeded(seed):
        yield
