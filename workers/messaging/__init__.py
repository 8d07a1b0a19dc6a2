"""Everything between a task and the broker: sending after commit, the Redis transport and
consumer that keep messages through a broker crash, the embedded broker, the singleton beat
scheduler, the notification outbox."""
