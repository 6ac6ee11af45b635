"""The decision-log line is byte-for-byte what json.dumps of the record's fields wrote before it was hand-written."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from mesh_gateway.authz.decision_log import REDACTED, DecisionRecord, decision_line
from mesh_gateway.stamps import UtcStamps

text = st.text(max_size=20)  # any unicode: quotes, backslashes, control characters, astral-plane characters
REDACT = frozenset({"authorization", "cookie"})


def reference(record: DecisionRecord, stamp: str) -> str:
    """What DecisionLog.write produced with json.dumps (the original code, kept as the specification)."""
    line = {
        "decision_id": record.decision_id, "timestamp": stamp, "route": record.route, "principal": record.principal,
        "method": record.method, "path": record.path, "result": record.result, "http_status": record.http_status,
        "duration_us": record.duration_us, "revision": record.revision, "engine": record.engine,
        "query": record.query, "dry_run": record.dry_run, "cached": record.cached, "trace_id": record.trace_id,
        "span_id": record.span_id,
        "headers": {name: (REDACTED if name in REDACT else value) for name, value in record.headers.items()},
    }
    if record.reason:
        line["reason"] = record.reason
    return json.dumps(line, separators=(",", ":"))


@given(st.builds(DecisionRecord, decision_id=text, route=text, principal=text, method=text, path=text, result=text,
                 http_status=st.integers(100, 599), duration_us=st.integers(0, 10**9), revision=text, engine=text,
                 query=text, dry_run=st.booleans(), trace_id=text, span_id=text,
                 headers=st.dictionaries(st.one_of(text, st.sampled_from(sorted(REDACT))), text, max_size=6),
                 reason=text, cached=st.booleans()))
def test_line_matches_json_dumps(record: DecisionRecord) -> None:
    stamp = "2023-11-14T22:13:20.250000+00:00"
    line = decision_line(record, stamp, REDACT)
    assert line == reference(record, stamp)
    assert json.loads(line)["headers"].keys() == record.headers.keys()


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_stamps_match_datetime_isoformat(now: float) -> None:
    stamps, zulu = UtcStamps(timespec="microseconds", suffix="+00:00"), UtcStamps(timespec="microseconds")
    expected = datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
    assert stamps(now) == expected
    assert stamps(now) == expected  # the cached second gives the same text
    assert zulu(now) == expected.replace("+00:00", "Z")  # input.attributes.request.time


def test_stamps_across_seconds_and_rounding_carry() -> None:
    stamps = UtcStamps(timespec="microseconds", suffix="+00:00")
    for now in (1_700_000_000.25, 1_700_000_000.9999996, 1_700_000_001.0, 1_700_000_000.5, 1_699_999_999.0000004):
        assert stamps(now) == datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
