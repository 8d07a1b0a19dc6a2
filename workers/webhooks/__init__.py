"""Gateway webhooks: verified on the raw body, recorded once, applied forward only."""
