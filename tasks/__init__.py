"""The Celery tasks, one module per capability; each is a thin wrapper over a plain function."""
