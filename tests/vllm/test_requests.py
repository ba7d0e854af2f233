"""Reading a request's adapter choice from extra_args, and the rows running requests hold."""

from __future__ import annotations

import pytest
import torch

from lofit.adapter import LofitAdapter
from lofit.vllm.bank import AdapterBank
from lofit.vllm.requests import RequestRows, requested_weights
from lofit.vllm.salt import CombinationError


def test_requested_weights_forms():
    assert requested_weights(None) is None and requested_weights({"other": 1}) is None
    assert requested_weights({"lofit_adapter": "tqa"}) == {"tqa": 1.0}
    assert requested_weights({"lofit_adapter": "tqa", "lofit_scale": 2}) == {"tqa": 2.0}
    assert requested_weights({"lofit_adapters": {"a": 1, "b": -0.5}}) == {"a": 1.0, "b": -0.5}
    assert requested_weights({"lofit_adapters": ["a:1", "b:-0.5", "c"]}) == {"a": 1.0, "b": -0.5, "c": 1.0}


@pytest.mark.parametrize("extra_args", [
    {"lofit_adapter": "a", "lofit_adapters": {"b": 1.0}},
    {"lofit_adapters": {}},
    {"lofit_adapters": [1.0]},
    {"lofit_adapters": ["a:strong"]},
    {"lofit_adapters": ["a:nan"]},
    {"lofit_adapter": 3},
    {"lofit_adapter": "a", "lofit_scale": "big"},
    {"lofit_adapter": "a", "lofit_scale": float("nan")},
    {"lofit_adapters": {"a": True}},
])
def test_malformed_requests_are_refused(extra_args):
    with pytest.raises(CombinationError):
        requested_weights(extra_args)


def test_rows_are_held_until_the_request_ends(stories_identity):
    bank = AdapterBank(stories_identity, capacity=3, max_num_tokens=8)
    bank.load(LofitAdapter(heads=torch.tensor([[0, 0]]), offsets=torch.ones(1, 8), base_model=stories_identity,
                           name="a"))
    rows = RequestRows(bank)
    first = rows.row_for("r1", {"lofit_adapter": "a"})
    assert rows.row_for("r1", {"lofit_adapter": "a"}) == first, "a request keeps its row across steps"
    assert rows.row_for("r2", {"lofit_adapter": "a"}) == first and rows.row_for("r3", None) == 0
    assert bank.refcounts()[("a",)] == 2
    rows.release_finished({"r2", "r3"})
    assert bank.refcounts()[("a",)] == 1
    rows.release_finished(set())
    assert bank.refcounts()[("a",)] == 0
    bank.unload("a")
