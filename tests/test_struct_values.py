"""A Struct's JSON value (engine/codecs.struct_value): the one walk that replaced
json_format.MessageToDict and a separate check answers exactly as they did."""
from __future__ import annotations

import json
import math

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from db import errors
from db.engine.codecs import MAX_JSON_DEPTH, struct_value

scalars = st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**53, 2**53) | st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_it_answers_as_message_to_dict(value: dict) -> None:
    struct = struct_pb2.Struct()
    struct.update(value)
    # As JSON text: 3 and 3.0 are equal in Python, not in what is stored.
    assert json.dumps(struct_value(struct, "f"), sort_keys=True) == json.dumps(json_format.MessageToDict(struct), sort_keys=True)


def test_a_value_without_a_kind_is_null() -> None:
    struct = struct_pb2.Struct()
    struct.fields["empty"].Clear()
    struct.fields["empty"].list_value.values.add()
    assert struct_value(struct, "f") == json_format.MessageToDict(struct) == {"empty": [None]}


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_numbers_json_cannot_hold_are_refused(number: float) -> None:
    struct = struct_pb2.Struct()
    struct.update({"deep": [{"n": 1.0}]})
    struct.fields["deep"].list_value.values[0].struct_value.fields["n"].number_value = number
    with pytest.raises(errors.InvalidArgument) as raised:
        struct_value(struct, "meta")
    assert raised.value.violations[0].field == "meta"


def _nested(levels: int, in_lists: bool) -> struct_pb2.Struct:
    value: object = "leaf"
    for _ in range(levels - 1):
        value = [value] if in_lists else {"k": value}
    struct = struct_pb2.Struct()
    struct.update({"k": value})
    return struct


@pytest.mark.parametrize("in_lists", [False, True])
def test_nesting_stops_at_the_limit(in_lists: bool) -> None:
    struct_value(_nested(MAX_JSON_DEPTH, in_lists), "f")
    with pytest.raises(errors.InvalidArgument) as raised:
        struct_value(_nested(MAX_JSON_DEPTH + 1, in_lists), "f")
    assert raised.value.violations[0].reason == "FIELD_TOO_LARGE"
