"""Forward over forward (nested jvp): with φ(α) = f(w + αΔ), φ'(0) = gᵀΔ by one jvp and
φ''(0) = ΔᵀHΔ by a jvp of that jvp.

No stored activations at all, but no g and no HΔ, hence no gradient norm and no per-layer split.
torch's forward-mode rules for LayerNorm and train-mode BatchNorm are not differentiable again (nested,
they give a wrong ΔᵀHΔ with no error, seen with torch 2.13 and 2.14), so models holding them are refused.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import jvp

from zeroptim_cli.derivatives.base import Derivatives, ScalarFn
from zeroptim_cli.derivatives.functorch_import import import_dynamo
from zeroptim_cli.derivatives.refusals import NoForwardAD, torch_refusals_as
from zeroptim_cli.errors import ConfigError
from zeroptim_cli.vectors import Params


def forward_over_forward(f: ScalarFn, w: Params, delta: Params) -> Derivatives:
    """(f(w), φ'(0), φ''(0)) by nested jvp."""
    import_dynamo()

    def slope(p: Params) -> tuple[Tensor, Tensor]:
        loss, d1 = jvp(f, (p,), (delta,))
        return d1, loss

    with torch_refusals_as(NoForwardAD):
        grad_corr, dir_sharpness, loss = jvp(slope, (w,), (delta,), has_aux=True)
    return Derivatives(loss, grad_corr, dir_sharpness)


def check_forward_over_forward(model: nn.Module, train: bool) -> None:
    """Refuse models whose normalization layers break nested forward mode (see the module docstring)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or (train and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            raise ConfigError(
                f"--method forward-over-forward gives wrong second derivatives through {type(module).__name__} "
                f"('{name}') in torch; use forward-over-reverse or reverse-over-reverse"
            )
