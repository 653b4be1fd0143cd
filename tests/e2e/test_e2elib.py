"""The harness itself: what e2elib's parsers accept and refuse (no
namespaces, no daemon)."""

import pytest

from e2elib import DROP_REASONS, parse_counters

LINE = ("out 10 packets 1000 bytes, in 8 packets 800 bytes, bypassed 2, tun rx 10 tx 8 (errors 0), "
        "net rx 11 tx 10 (errors 0), dropped 3 (icv-failure 2, replay 1)")


def test_drop_reasons_are_read_from_the_engine():
    assert {"icv-failure", "replay", "replay-old", "no-sa", "unknown-spi", "fragment", "malformed",
            "plaintext-refused", "too-big"} <= DROP_REASONS


def test_counters_know_totals_and_reasons():
    c = parse_counters(LINE)
    assert (c["in_packets"], c["dropped"], c["icv-failure"], c["replay"]) == (8, 3, 2, 1)
    # A reason of the engine that dropped nothing is not on the line: 0.
    assert c["no-sa"] == 0


def test_an_unknown_counter_or_reason_raises():
    # A renamed reason (or a typo) must not read as 0 and pass silently.
    c = parse_counters(LINE)
    for name in ("icv-failures", "icv_failure", "replay_old", "bogus"):
        with pytest.raises(KeyError):
            c[name]


def test_a_line_naming_an_unknown_reason_is_refused():
    with pytest.raises(AssertionError, match="not the engine's"):
        parse_counters(LINE.replace("replay 1", "replayed 1"))
