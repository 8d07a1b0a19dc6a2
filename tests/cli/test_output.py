"""The one table helper every list command prints through."""

from __future__ import annotations

from workers.cli.output import table


def test_columns_are_as_wide_as_their_widest_cell_and_numbers_align_right() -> None:
    long_name = "notifications.deliver_to_the_partner_webhook_with_a_very_long_name"
    text = table(
        ("id", "task", "attempts", "error"),
        [(7, "holds.expire", 3, "TransientError: busy"), (1234, long_name, 12, "")],
        right=("id", "attempts"),
    )
    assert text.splitlines() == [
        "  id  task" + " " * (len(long_name) - 4) + "  attempts  error",
        "   7  holds.expire" + " " * (len(long_name) - 12) + "         3  TransientError: busy",
        f"1234  {long_name}        12",
    ]


def test_a_header_alone_when_there_are_no_rows() -> None:
    assert table(("check", "status", "detail"), []) == "check  status  detail"
