"""Refunds: submission at most once per refund, the hourly retry job, re-checks at the
gateway."""
