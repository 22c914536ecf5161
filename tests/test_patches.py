"""The undo log: every kind of edit is put back exactly, in reverse order, and the log empties."""

import torch
from torch import nn

from effdiff.patches import PatchLog


class Thing:
    def greet(self) -> str:
        return "class"


def test_attr_restores_absence_and_previous_values():
    thing = Thing()
    log = PatchLog()
    replaced = log.attr(thing, "greet", lambda: "patched")
    assert replaced() == "class" and thing.greet() == "patched"
    log.attr(thing, "greet", lambda: "twice")
    log.restore()
    assert "greet" not in vars(thing) and thing.greet() == "class" and len(log) == 0
    thing.extra = 1
    log.attr(thing, "extra", 2)
    log.restore()
    assert thing.extra == 1


def test_forward_tensor_module_class_hook_and_call_unwind_in_reverse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x = torch.randn(2, 3)
    expected = model(x)
    weight, relu = model[0].weight, model[1]
    log, order = PatchLog(), []
    log.forward(model[0], lambda inner: lambda h: inner(h) * 0)
    log.tensor(model[0], "weight", nn.Parameter(torch.zeros(3, 3)))
    log.module(model, "1", nn.Identity())
    log.hook(model.register_forward_hook(lambda m, a, out: out + 1))
    log.call(lambda: order.append("second"))
    log.call(lambda: order.append("first"))
    assert not torch.equal(model(x), expected)
    log.restore()
    assert order == ["first", "second"]
    assert model[0].weight is weight and model[1] is relu and "forward" not in vars(model[0])
    assert not model._forward_hooks and torch.equal(model(x), expected)


def test_klass_swap_is_undone():
    class Other(Thing):
        def greet(self) -> str:
            return "other"

    thing, log = Thing(), PatchLog()
    log.klass(thing, Other)
    assert thing.greet() == "other"
    log.restore()
    assert type(thing) is Thing
