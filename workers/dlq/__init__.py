"""The dead-letter queue, the operators' side: triage by rules every 15 minutes, replay and
discard. Letters are written by `workers.dead_letters`."""
