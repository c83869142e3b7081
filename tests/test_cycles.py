"""No reference cycles hold tensors: what an evaluation leaves is freed when its last reference goes, not
at some later run of Python's cyclic collector (per pair of a sweep, the model's worth of memory)."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import torch
from torch import nn

from zeroptim_cli.derivatives import Evaluation, Objective
from zeroptim_cli.derivatives.losses import resolve_loss
from zeroptim_cli.io.batches import Batch


@pytest.fixture
def no_cyclic_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("train", [False, True])
def test_an_objective_is_freed_by_reference_counting(no_cyclic_collector, train: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Tanh(), nn.Linear(4, 2)).double().train(train)
    w = {k: v.detach() for k, v in model.named_parameters()}
    f = Objective(model, {}, [Batch(torch.randn(5, 3), torch.randint(0, 2, (5,)))], resolve_loss("cross_entropy"),
                  Evaluation(dtype=torch.float64, train=train, seed=1))
    f.derivatives(w, {k: torch.randn_like(v) for k, v in w.items()}, "taylor")
    objective, batch = weakref.ref(f), weakref.ref(f.terms[0].batch.inputs)
    del f
    assert objective() is None and batch() is None


FIRST_CALL_GARBAGE = """
import gc, sys, torch
gc.disable()
from zeroptim_cli.derivatives.methods import METHODS
x, w = torch.randn(16, 8), {"w": torch.randn(8, 8), "v": torch.randn(8)}
f = lambda p: torch.tanh(x @ p["w"]).matmul(p["v"]).square().mean()
METHODS[sys.argv[1]](f, w, {k: torch.randn_like(v) for k, v in w.items()})
gc.set_debug(gc.DEBUG_SAVEALL)
gc.collect()
print(sum(isinstance(o, torch.Tensor) for o in gc.garbage))
"""


@pytest.mark.parametrize("method", ["forward-over-reverse", "forward-over-forward"])
def test_the_first_torch_func_call_leaves_no_tensors_in_cycles(method: str) -> None:
    """torch.func's first call imports torch._dynamo, whose cycles would hold that call's frames."""
    proc = subprocess.run([sys.executable, "-c", FIRST_CALL_GARBAGE, method], capture_output=True, text=True,
                          check=True)
    assert int(proc.stdout) == 0
