"""Payments: the in-flight janitor that asks the gateways about payments stuck PENDING or
AUTHORIZED."""
