"""Combination fingerprints and the cache salt that isolates steered KV in vLLM's prefix cache."""

from __future__ import annotations

import pytest

from lofit.vllm.salt import MAX_SALT_LENGTH, Combination, CombinationError, combine_salt

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
