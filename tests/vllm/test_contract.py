"""The cross-process contract: the request keys in extra_args, combination fingerprints and the cache salt that
isolates steered KV in vLLM's prefix cache."""

from __future__ import annotations

import pytest

from lofit.vllm.contract import (
    MAX_SALT_LENGTH,
    Combination,
    CombinationError,
    combine_salt,
    extra_args_for,
    requested_weights,
)

SHA_A, SHA_B = "a" * 64, "b" * 64


def test_salt_depends_on_content_and_weights_not_names_or_order():
    one = Combination.of({"truthful": (SHA_A, 1.0), "mquake": (SHA_B, 0.5)})
    assert one == Combination.of({"mquake": (SHA_B, 0.5), "truthful": (SHA_A, 1.0)})
    assert one.cache_salt == Combination.of({"x": (SHA_A, 1.0), "y": (SHA_B, 0.5)}).cache_salt
    assert one.cache_salt != Combination.of({"truthful": (SHA_A, 1.0), "mquake": (SHA_B, 0.25)}).cache_salt
    assert one.cache_salt != Combination.of({"truthful": ("c" * 64, 1.0), "mquake": (SHA_B, 0.5)}).cache_salt
    assert one.names == ("mquake", "truthful")


def test_salt_is_valid_for_vllm():
    salt = Combination.of({"a": (SHA_A, 1.0)}).cache_salt
    assert salt.startswith("lofit:") and len(salt) <= MAX_SALT_LENGTH
    assert not set(salt) & set("@/\\\x00")


def test_zero_weights_are_dropped_and_an_empty_combination_is_refused():
    assert Combination.of({"a": (SHA_A, 1.0), "b": (SHA_B, 0.0)}).names == ("a",)
    with pytest.raises(CombinationError, match="at least one adapter"):
        Combination.of({"a": (SHA_A, 0.0)})


@pytest.mark.parametrize(("name", "weight"), [("a", float("nan")), ("a", float("inf")), ("a/b", 1.0), ("", 1.0)])
def test_bad_weights_and_names_are_refused(name, weight):
    with pytest.raises(CombinationError):
        Combination.of({name: (SHA_A, weight)})


def test_client_salts_are_combined_within_the_limit():
    ours = Combination.of({"a": (SHA_A, 1.0)}).cache_salt
    assert combine_salt(ours, None) == ours
    assert combine_salt(ours, "tenant-7") == ours + ":tenant-7"
    long = combine_salt(ours, "t" * 200)
    assert len(long) <= MAX_SALT_LENGTH and long.startswith(ours + ":")
    assert long != combine_salt(ours, "u" * 200)


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
    {"lofit_adapters": ["a:20", "a:20"]},  # a duplicate would silently collapse (and dodge the adapter limit)
    {"lofit_adapters": ["a:1", "b", "a:40"]},
])
def test_malformed_requests_are_refused(extra_args):
    with pytest.raises(CombinationError):
        requested_weights(extra_args)


@pytest.mark.parametrize("choice", [None, "tqa", {"a": 1.0, "b": -0.5}])
def test_what_a_front_end_writes_is_what_the_engine_reads(choice):
    expected = {"tqa": 1.0} if choice == "tqa" else choice
    assert requested_weights(extra_args_for(choice)) == expected


def test_an_adapter_choice_of_another_type_is_refused():
    with pytest.raises(TypeError, match="adapter choice"):
        extra_args_for(["tqa"])
