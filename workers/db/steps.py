"""Steps: how a service that must commit between its steps does so without owning the
transaction. The owner (the base task, a CLI command, a test) lends its session as `Steps`;
the service marks each step, and the step's end is its commit:

    with steps.step("claim") as session:
        claim = claim_attempt(session, ...)
    result = call_gateway(claim)            # no transaction open
    with steps.step("outcome") as session:
        record_outcome(session, ...)

A step that raises is not committed; the owner rolls back. A service handed a bare `Session`
never commits: its caller decides. Nothing else in `workers/` calls `commit()` (a test says so).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Engine
from sqlalchemy.orm import Session


class Steps:
    dry_run = False  # DryRunSteps: every step is rolled back

    def __init__(self, session: Session) -> None:
        self.session = session

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Session]:
        """Run one step in the session's transaction and commit it when the block ends."""
        yield self.session
        self.session.commit()

    def undo(self) -> None:
        """Roll back what the current step wrote (a step that failed, before its error is
        recorded in a step of its own)."""
        self.session.rollback()


class DryRunSteps(Steps):
    """Steps whose every step is rolled back at its end: a dry run takes the same path as the
    real one and leaves nothing behind (what a step asked to send after commit is dropped)."""

    dry_run = True

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Session]:
        try:
            yield self.session
        finally:
            self.session.rollback()


@contextlib.contextmanager
def steps_on_one_connection(session: Session) -> Iterator[Steps]:
    """Steps for a long run that commits every batch (a reconciliation run): on one connection
    of `session`'s engine for all of them, where a session on the engine would check its
    connection out of the pool, and ping it, after every commit. The owner chooses it, and
    closes it when the block ends."""
    bind = session.get_bind()
    if not isinstance(bind, Engine):
        yield Steps(session)
        return
    with bind.connect() as connection:
        pinned = Session(bind=connection, expire_on_commit=False)
        try:
            yield Steps(pinned)
        finally:
            pinned.close()
