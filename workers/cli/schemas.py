"""`backstop tasks schema`: the task contract other services read."""

from __future__ import annotations

import click


@click.group()
def tasks() -> None:
    """The task contract for other services."""


@tasks.command("schema")
@click.option("--check", is_flag=True, help="Fail if docs/task-schemas is not up to date.")
def tasks_schema(check: bool) -> None:
    """Write the JSON Schema of every public task's payload to docs/task-schemas/."""
    from workers.client import SCHEMA_DIR, UnknownTask, schema_files

    try:
        files = schema_files()
    except UnknownTask as exc:
        raise click.ClickException(str(exc)) from None
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    if check:
        if stale:
            names = ", ".join(path.name for path in stale)
            raise click.ClickException(
                f"task schemas out of date: {names}; run `backstop tasks schema`"
            )
        click.echo(f"{len(files)} task schemas up to date")
        return
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.write_text(files[path])
    click.echo(f"{len(stale)} of {len(files)} task schemas written to {SCHEMA_DIR}")
