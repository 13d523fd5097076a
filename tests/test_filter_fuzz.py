"""Random and hostile filters through the real server: INVALID_ARGUMENT or a correct answer, never a crash."""
from __future__ import annotations

import sys

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import db.domains  # noqa: F401 - every resource in the registry
from db.engine.resource import REGISTRY
from tests.conftest import Client
from tests.support import rich_error, service_of

HOSTILE = [
    "name = \"x'; DROP TABLE users; --\"",
    "username = 'a' OR 1=1 --",
    "id = \"00000000-0000-0000-0000-000000000000\" OR id != \"00000000-0000-0000-0000-000000000000\"",
    "preferences.\"theme\" = \"x\"",
    "preferences.a.b.c.d.e.f.g = 1",
    "tags:\"%\"",
    "title = \"%_\\\\\"",
    "create_time > \"9999-99-99T99:99:99Z\"",
    "(" * 200 + "id = 1" + ")" * 200,
    "NOT " * 100 + "is_active = true",
    "a" * 5000,
    "\x00",
    "status = ",
    "= = =",
    "estimated_hours > 1e400",
    "estimated_hours > -0",
    "due_date < \"2026-02-30\"",
    "username:*",
    "🙂 = 🙂",
]

TOKENS = st.sampled_from(
    ["AND", "OR", "NOT", "-", "(", ")", "=", "!=", "<", "<=", ">", ">=", ":", "*", ".", '"x"', "'y'", "1", "-2.5", "true", "null",
     "id", "name", "title", "username", "status", "DONE", "tags", "member_ids", "preferences", "create_time", '"2026-01-01T00:00:00Z"', "due_date",
     '"2026-01-01"', "estimated_hours", "is_active", "role", "ADMIN", "\\", "\"", ";", "--", "/*"]
)
FILTERS = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=60),
    st.lists(TOKENS, min_size=1, max_size=12).map(" ".join),
)


def _served_lists() -> list[str]:
    """The resources served with a standard List: every one in a servicer's `resources` (a
    document's versions and shares are listed per document, by custom methods, unfiltered)."""
    from service.server import DOMAIN_SERVICES

    return sorted(spec.name for cls, _, _ in DOMAIN_SERVICES for spec in cls.resources)


LISTED = _served_lists()


def _list(client: Client, spec_name: str, flt: str) -> object:
    spec = REGISTRY[spec_name]
    pb = sys.modules[spec.message.__module__]
    stub = client.stub_for(service_of(spec_name))
    return getattr(stub, f"List{spec.plural}")(getattr(pb, f"List{spec.plural}Request")(filter=flt, page_size=5), timeout=10)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec_name=st.sampled_from(LISTED), flt=FILTERS)
def test_any_filter_is_answered_or_refused_precisely(client: Client, spec_name: str, flt: str) -> None:
    try:
        _list(client, spec_name, flt)
    except grpc.RpcError as exc:
        err = rich_error(exc)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, f"{err.code} for {flt!r}: {err.message}"
        assert err.violations and err.violations[0].field == "filter"


def test_hostile_filters_leave_the_data_intact(client: Client) -> None:
    before = _list(client, "User", "").total_size  # type: ignore[attr-defined]
    for flt in HOSTILE:
        for name in LISTED:
            try:
                _list(client, name, flt)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, flt, exc.details())
    assert _list(client, "User", "").total_size == before  # type: ignore[attr-defined]
