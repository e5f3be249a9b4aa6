"""EpochCache (versionstore/epoch_cache.py): what is reused until anything commits."""

from versionstore.epoch_cache import EpochCache


def test_a_value_is_served_only_under_the_epoch_it_was_read_under() -> None:
    cache: EpochCache[str, bytes] = EpochCache(100, len)
    assert cache.get("a", 1) is None
    cache.put("a", 1, b"one")
    assert cache.get("a", 1) == b"one"
    assert cache.get("a", 2) is None  # something committed: every entry is dropped
    assert cache.get("a", 1) is None  # ... and does not come back with the old epoch


def test_a_value_read_across_a_commit_is_not_kept() -> None:
    """Read under epoch 1 while another request already saw epoch 2: the value may predate the
    commit that moved it, so it is dropped rather than served under epoch 2."""
    cache: EpochCache[str, bytes] = EpochCache(100, len)
    assert cache.get("a", 1) is None
    assert cache.get("b", 2) is None
    cache.put("a", 1, b"stale?")
    assert cache.get("a", 2) is None


def test_without_an_exact_epoch_nothing_is_cached() -> None:
    cache: EpochCache[str, bytes] = EpochCache(100, len)
    assert cache.get("a", None) is None
    cache.put("a", None, b"x")
    assert cache.get("a", None) is None


def test_the_budget_drops_the_oldest_entries_and_refuses_huge_values() -> None:
    cache: EpochCache[str, bytes] = EpochCache(40, len)
    cache.get("", 7)
    for name in "abcd":
        cache.put(name, 7, name.encode() * 10)
    cache.put("e", 7, b"e" * 10)  # over 40 bytes: "a" goes first
    assert [cache.get(n, 7) is not None for n in "abcde"] == [False, True, True, True, True]
    cache.put("huge", 7, b"h" * 11)  # more than a quarter of the budget
    assert cache.get("huge", 7) is None
    assert cache.get("b", 7) == b"b" * 10
