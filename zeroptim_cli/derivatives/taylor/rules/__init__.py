"""Taylor rules: how each ATen op maps truncated polynomials (c0, c1, c2) of its inputs to those of its outputs.

Conventions: ``None`` is a zero coefficient and is never computed with; c2 is the α² coefficient. A rule gets
``(func, args, kwargs)`` exactly as ``__torch_dispatch__`` does and returns plain tensors for outputs that do not
depend on α. Rules may compute on the plain coefficient tensors (the hot ops) or call torch ops on Taylor tensors
again (rare ops written as a composition: the pieces dispatch to their own rules).

Non-differentiable points follow autograd's conventions (relu' = 0 at 0, evenly split ties for max/amax,
clamp's mask inclusive at the bounds), so that the result matches a double backward wherever autograd's does.

Importing this package imports every section module, and so fills ``RULES``. A section imports the sections it
builds on before its own registrations run, so the one overload registered twice (``aten.fill.Tensor``: constant,
then replaced by ``linear``'s affine rule) always ends with the later rule.
"""

from zeroptim_cli.derivatives.taylor.rules import (  # noqa: F401  (each module registers its rules on import)
    attention,
    bilinear,
    constant,
    elementwise,
    embedding_bag,
    linalg,
    linear,
    losses,
    metadata_inplace,
    normalization,
    registry,
    selections,
    softmax,
)
from zeroptim_cli.derivatives.taylor.rules.constant import CONSTANT, DETACHED, constant_if
from zeroptim_cli.derivatives.taylor.rules.linear import LINEAR
from zeroptim_cli.derivatives.taylor.rules.registry import functional_overloads, register

__all__ = ["register", "functional_overloads", "LINEAR", "CONSTANT", "DETACHED", "constant_if"]
