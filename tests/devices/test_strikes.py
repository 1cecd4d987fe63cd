"""The failed-links table on a fake clock (devices/strikes.py, docs/devices.md)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.strikes import FailedLinks, address_key


def test_an_address_is_held_after_its_failures_and_earns_them_back() -> None:
    table = FailedLinks(3, 3.0)  # one failure earned back a second
    for _ in range(3):
        assert table.held_until("10.0.0.1", 0.0) == 0.0
        table.failed("10.0.0.1", 0.0)
    assert table.held_until("10.0.0.1", 0.0) == pytest.approx(1.0)
    assert table.held_until("10.0.0.2", 0.0) == 0.0  # others are not touched
    assert table.held_until("10.0.0.1", 1.0) == 0.0
    assert len(table) == 1
    assert table.held_until("10.0.0.1", 10.0) == 0.0
    assert len(table) == 0  # recovered in full: forgotten


def test_failing_while_held_holds_longer_but_boundedly() -> None:
    table = FailedLinks(2, 2.0)
    for _ in range(100):
        table.failed("h", 0.0)
    # At most one window's worth of debt below zero: 2 s to pay, 1 s to earn one token.
    assert table.held_until("h", 0.0) == pytest.approx(3.0)


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    assert address_key("not-an-ip") == "not-an-ip"


def test_zero_turns_the_rule_off() -> None:
    table = FailedLinks(0, 1.0)
    for _ in range(10):
        table.failed("h", 0.0)
    assert table.held_until("h", 0.0) == 0.0
    assert len(table) == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_failed_links"):
        FailedLinks(-1, 1.0)
    with pytest.raises(ValueError, match="failed_links_window"):
        FailedLinks(1, 0.0)


@given(st.lists(st.integers(0, 10_000), max_size=300), st.integers(1, 50))
def test_the_table_is_bounded_whatever_the_spread(hosts: list[int], bound: int) -> None:
    table = FailedLinks(1, 60.0, max_addresses=bound)
    for n in hosts:
        table.failed(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 0.0)
        assert len(table) <= bound
