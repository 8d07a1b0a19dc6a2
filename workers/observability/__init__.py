"""What an operator sees: logs, task and business metrics, Sentry (scrubbed), health checks,
alerts, the limits in effect."""
