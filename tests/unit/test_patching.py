"""Instance-level method patches and per-thread call state (vtprune.core.patching): reversible,
signature-preserving, deep-copy safe, one state per thread."""

import copy
import inspect
import threading

import pytest

from vtprune.core.patching import MethodPatch, PerThread


class Model:
    def __init__(self, scale):
        self.scale = scale

    def forward(self, x, *, factor: int = 1):
        """The original forward."""
        return x * self.scale * factor


class Doubler:
    """A patch's owner: bound methods, never closures, so deep copies call their own."""

    def __init__(self, model):
        self.model = model

    def forward(self, original, *args, **kwargs):
        return 2 * original(*args, **kwargs)


def test_a_patch_replaces_the_method_keeps_its_signature_and_undo_restores_it():
    model = Model(3)
    patch = MethodPatch(model, "forward", Doubler(model).forward)
    assert model.forward(1, factor=2) == 12
    assert inspect.signature(model.forward) == inspect.signature(Model(1).forward)
    assert model.forward.__doc__ == "The original forward."
    patch.undo()
    assert "forward" not in model.__dict__ and model.forward(1) == 3


def test_undo_restores_a_method_the_instance_already_had_of_its_own():
    model = Model(3)
    own = model.forward
    model.forward = own
    MethodPatch(model, "forward", Doubler(model).forward).undo()
    assert model.__dict__["forward"] is own


def test_a_deep_copy_runs_its_own_weights_and_undoes_its_own_patch():
    model = Model(3)
    doubler = Doubler(model)
    patch = MethodPatch(model, "forward", doubler.forward)
    clone = copy.deepcopy((model, patch))
    clone_model, clone_patch = clone
    clone_model.scale = 5
    assert clone_model.forward(1) == 10 and model.forward(1) == 6
    clone_patch.undo()
    assert clone_model.forward(1) == 5 and model.forward(1) == 6


def test_a_patch_moved_by_a_wrapper_is_undone_where_it_sits():
    model = Model(3)
    patch = MethodPatch(model, "forward", Doubler(model).forward)
    # accelerate's add_hook_to_module keeps the wrapped forward in _old_forward
    model._old_forward = model.__dict__.pop("forward")
    model.forward = lambda *a, **k: model._old_forward(*a, **k)
    patch.undo()
    assert model._old_forward(1) == 3


def test_undo_says_what_happened_when_the_patch_was_replaced():
    model = Model(3)
    patch = MethodPatch(model, "forward", Doubler(model).forward)
    model.forward = lambda x: x
    with pytest.raises(RuntimeError, match="no longer on the model"):
        patch.undo()


def test_per_thread_values_are_separate_nest_and_reset():
    state = PerThread()
    seen = {}

    def worker():
        with state.set("worker"):
            seen["worker"] = state.get()
        seen["after"] = state.get()

    with state.set("outer"):
        with state.set("inner"):
            assert state.get() == "inner"
        assert state.get() == "outer"
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert state.get() == "outer"
    assert state.get() is None and seen == {"worker": "worker", "after": None}


def test_per_thread_state_restores_after_an_exception_and_copies_empty():
    state = PerThread()
    with pytest.raises(KeyError):
        with state.set("call"):
            raise KeyError
    assert state.get() is None
    with state.set("in flight"):
        assert copy.deepcopy(state).get() is None
