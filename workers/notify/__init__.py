"""Notifications: persisted once, delivered by email (SMTP), SMS or push (HTTP providers), with
every attempt recorded, transient failures retried with backoff and the rest dead-lettered."""
