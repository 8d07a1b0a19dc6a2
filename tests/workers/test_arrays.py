"""Array literals read back by a real PostgreSQL exactly as the lists they were made from."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from workers.db.arrays import int_array, text_array

TRICKY = [
    "pay_00000000000001",
    "",
    "NULL",
    "null",
    "a,b",
    "{braces}",
    'say "hi"',
    "back\\slash",
    '\\"',
    " leading and trailing ",
    "tab\there\nnewline",
    "ünïcödé ₹ 🙂",
]


def read_text(db: Session, values: list[str]) -> list[str]:
    return list(db.execute(text("SELECT CAST(:v AS text[])"), {"v": text_array(values)}).scalar())


def test_text_arrays_keep_every_character(db: Session) -> None:
    assert read_text(db, TRICKY) == TRICKY
    assert read_text(db, []) == []
    assert read_text(db, ["NULL"]) == ["NULL"]  # the word, not a null


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"))
    )
)
def test_text_arrays_round_trip_any_text(pg_engine: Engine, values: list[str]) -> None:
    with pg_engine.connect() as conn:
        got = conn.execute(text("SELECT CAST(:v AS text[])"), {"v": text_array(values)}).scalar()
    assert list(got) == values


def test_int_arrays(db: Session) -> None:
    values = [0, 1, -1, 10_000, 2**63 - 1, -(2**63)]
    got = db.execute(text("SELECT CAST(:v AS bigint[])"), {"v": int_array(values)}).scalar()
    assert list(got) == values
    assert (
        list(db.execute(text("SELECT CAST(:v AS bigint[])"), {"v": int_array([])}).scalar()) == []
    )


def test_int_arrays_refuse_what_is_not_a_number() -> None:
    with pytest.raises(ValueError):
        int_array(["1; DROP TABLE payments"])  # type: ignore[list-item]
