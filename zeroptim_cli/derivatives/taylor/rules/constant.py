"""Constant ops: rules for ops whose result does not depend on α (or that autograd detaches)."""

from __future__ import annotations

from collections.abc import Callable

from zeroptim_cli.derivatives.taylor._core import _constant
from zeroptim_cli.derivatives.taylor.rules.registry import op_packets, register

CONSTANT = op_packets(
    "eq ne lt le gt ge logical_and logical_or logical_not logical_xor isnan isinf isfinite isneginf isposinf "
    "sign signbit floor ceil round trunc argmax argmin argsort bucketize searchsorted any all nonzero "
    "count_nonzero is_nonzero equal isclose bitwise_and bitwise_or bitwise_xor bitwise_not "
    "floor_divide empty_like zeros_like ones_like full_like rand_like randn_like randint_like new_empty "
    "new_zeros new_ones new_full new_empty_strided bernoulli multinomial _fused_sdp_choice is_same_size "
    "_has_compatible_shallow_copy_type histc fill one_hot "
    "_assert_async _assert_tensor_metadata sym_constrain_range_for_size")
# Not constant, but autograd passes no derivative through them (detach, .item()); neither does Taylor mode.
DETACHED = op_packets("detach _local_scalar_dense")
register(*CONSTANT, *DETACHED)(_constant)


def constant_if(pred: Callable, otherwise: Callable) -> Callable:
    """An op that is piecewise constant for some arguments only: ``pred(func, args, kwargs)`` says when; otherwise
    ``otherwise`` is its rule. The predicate is kept on the rule (``.constant_if``) so that tests find every case."""

    def rule(func, args, kwargs):
        return (_constant if pred(func, args, kwargs) else otherwise)(func, args, kwargs)

    rule.constant_if = pred
    return rule
