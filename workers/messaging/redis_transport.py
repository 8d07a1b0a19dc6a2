"""kombu's Redis transport, with one fault a broker crash exposes corrected until a kombu
release does (kombu 5.7.0, celery 5.7.0 at the time of writing).

When the worker loses Redis, Celery's consumer first `collect()`s the broken connection, which
drops the transport's reference to its `kombu.Connection` (`transport.client = None`), then
closes it. Closing the channel puts its unacknowledged messages back on their queues, which
needs a Redis client, whose parameters kombu reads from that reference: `AttributeError:
'NoneType' object has no attribute 'hostname'` in `_connparams`. It is not a connection error,
so Celery calls it unrecoverable and the worker process exits (about one Redis crash in five
under load; `tests/tasks/test_broker_crash.py`). Same symptom upstream: celery/kombu#582, #970.

Here a channel keeps the parameters it connected with, so the restore can reach Redis again
(or fail as a connection error does, which Celery handles by reconnecting), and so can a task
that was running when the connection dropped and acks when it ends.

And one gap of kombu's ack emulation is narrowed: a message is popped from its queue (BRPOP)
and only then recorded as unacked (HSET). When Redis dies between the two, the message exists
only in this process; it is kept here and put back on its queue once the worker has connected
again (`workers/messaging/consumer.py`). (A worker killed in that instant still loses it: the sweeps
over the rows' state find that work.)
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis, virtual

# Messages popped from Redis whose unacked record Redis did not take: (delivery tag, payload,
# exchange, routing key). Only the worker's consumer thread delivers messages: a list will do.
STRANDED: list[tuple[str, dict[str, Any], str, str]] = []


# Acks Redis did not take (it was away when the task ended): delivery tags, made again once
# the worker has connected again, so the finished task is not run again after the
# visibility timeout. Acks come from the consumer thread only.
UNFINISHED_ACKS: list[str] = []


class QoS(redis.QoS):  # type: ignore[misc]
    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)
        except self.channel.connection_errors:
            UNFINISHED_ACKS.append(delivery_tag)
            raise

    def ack_many(self, delivery_tags: list[str]) -> None:
        """Ack several messages in one round trip: a batch's, settled together
        (workers/messaging/batching.py). As `ack`, an ack Redis did not take is made again
        once the worker has connected again."""
        try:
            with self.pipe_or_acquire() as pipe:
                for tag in delivery_tags:
                    self._remove_from_indices(tag, pipe)
                pipe.execute()
        except self.channel.connection_errors:
            UNFINISHED_ACKS.extend(delivery_tags)
            raise
        for tag in delivery_tags:
            virtual.QoS.ack(self, tag)

    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            delivery = message.delivery_info
            STRANDED.append(
                (delivery_tag, message._raw, delivery["exchange"], delivery["routing_key"])
            )
            raise


def finish_acks(channel: Any) -> int:
    """Make the acks Redis did not take, on `channel` (a live one)."""
    qos = channel.qos
    count = 0
    while UNFINISHED_ACKS:
        tag = UNFINISHED_ACKS[0]
        with channel.conn_or_acquire() as client, client.pipeline() as pipe:
            pipe.zrem(qos.unacked_index_key, tag).hdel(qos.unacked_key, tag).execute()
        UNFINISHED_ACKS.pop(0)
        count += 1
    return count


def put_back_stranded(channel: Any) -> int:
    """Put the stranded messages back on their queues, on `channel` (a live one), first in
    line. One whose unacked record did reach Redis (only its answer was lost) is moved from
    there, so it is not also put back by the visibility timeout later."""
    count = 0
    qos = channel.qos
    while STRANDED:
        tag, payload, exchange, routing_key = STRANDED[0]
        with channel.conn_or_acquire() as client:
            if client.hexists(qos.unacked_key, tag):
                qos.restore_by_tag(tag, client)
            else:
                with client.pipeline() as pipe:
                    channel._do_restore_message(payload, exchange, routing_key, pipe)
                    pipe.execute()
        STRANDED.pop(0)
        count += 1
    return count


class Channel(redis.Channel):  # type: ignore[misc]
    QoS = QoS
    _kept_params: dict[bool, dict[str, Any]] | None = None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        kept = self._kept_params if self._kept_params is not None else {}
        # Closed, the channel has no transport; collected, the transport has no client.
        transport = self.connection
        if transport is None or transport.client is None:
            if asynchronous in kept:
                return dict(kept[asynchronous])
            raise redis.redis.ConnectionError("the broker connection is closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        self._kept_params = {**kept, asynchronous: dict(params)}
        return params


class Transport(redis.Transport):  # type: ignore[misc]
    Channel = Channel
