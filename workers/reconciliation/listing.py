"""Paging through a gateway's payments over a window, several slices at once.

Each hourly slice of the window is paged from its saved cursor, one page after the other (a
Stripe cursor is the last id of the page before, so nothing else is possible), and
`concurrency` slices are paged at a time by threads that only talk HTTP. Pages reach the
caller's thread through a bounded queue, in order within each slice: memory stays bounded by
the queue, and only the caller touches the database.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from workers.gateways.base import Gateway, PaymentPage

_DONE = object()


class Lister:
    def __init__(
        self,
        gateway: Gateway,
        slices: list[tuple[datetime, datetime]],
        state: list[list[Any]],
        concurrency: int,
        batch_pages: int,
    ) -> None:
        self.gateway = gateway
        self.slices = slices
        self.cursors = {index: cursor for index, (cursor, done) in enumerate(state) if not done}
        self.todo = list(self.cursors)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.batch_pages = batch_pages
        # Room for a whole batch and then some: the threads go on reading while the caller
        # compares the batch before.
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=batch_pages + 2 * concurrency)
        self.threads = [
            threading.Thread(target=self._work, name=f"reconcile-list-{n}", daemon=True)
            for n in range(min(concurrency, len(self.todo)))
        ]

    def _next_slice(self) -> int | None:
        with self.lock:
            return self.todo.pop(0) if self.todo else None

    def _work(self) -> None:
        try:
            while not self.stopping.is_set():
                index = self._next_slice()
                if index is None:
                    return
                start, end = self.slices[index]
                cursor = self.cursors[index]
                while not self.stopping.is_set():
                    page = self.gateway.payment_page(start, end, cursor)
                    self.queue.put((index, page))
                    if page.cursor is None:
                        break
                    cursor = page.cursor
        except Exception as exc:  # handed to the caller, which stops everything
            self.queue.put((None, exc))
        finally:
            self.queue.put(_DONE)

    def batches(self) -> Iterator[list[tuple[int, PaymentPage]]]:
        """Batches of (slice index, page), `batch_pages` each but the last: every batch costs a
        query, a commit and the run's progress written, whatever its size. A page request
        that failed is raised once the pages before it were handed out; the threads are
        stopped whenever the caller stops."""
        for thread in self.threads:
            thread.start()
        running = len(self.threads)
        try:
            while running:
                batch: list[tuple[int, PaymentPage]] = []
                error: Exception | None = None
                item = self.queue.get()
                while True:
                    if item is _DONE:
                        running -= 1
                    elif item[0] is None:
                        error = error or item[1]
                    else:
                        batch.append(item)
                    if len(batch) >= self.batch_pages or error is not None or not running:
                        break
                    item = self.queue.get()
                if batch:
                    yield batch
                if error is not None:
                    raise error
        finally:
            self.stopping.set()
            while running > 0:  # unblock fetchers waiting to hand over a page, until all end
                if self.queue.get() is _DONE:
                    running -= 1
            for thread in self.threads:
                thread.join()
