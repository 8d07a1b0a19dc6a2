"""`backstop console`: the operator console's web server, and `hash-password` for its users."""

from __future__ import annotations

import click

from workers.cli.options import listen_options


@click.group(invoke_without_command=True)
@listen_options(8000, env="CONSOLE")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 64))
@click.pass_context
def console(ctx: click.Context, address: str, port: int, threads: int) -> None:
    """Serve the operator console: dead letters to triage, replay and discard, every action
    audited with the operator's name. Needs CONSOLE_USERS or CONSOLE_TRUSTED_USER_HEADER."""
    if ctx.invoked_subcommand is not None:
        return
    # Imported here: the web app and its server, which no other command needs.
    import waitress

    from config import get_settings
    from workers.console import create_app
    from workers.console.auth import ConsoleConfigError
    from workers.observability import logs

    settings = get_settings()
    logs.configure(settings)
    try:
        app = create_app(settings)
    except ConsoleConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"backstop console on http://{address}:{port}", err=True)
    waitress.serve(app, host=address, port=port, threads=threads, ident="backstop")


@console.command("hash-password")
@click.option(
    "--password",
    prompt=True,
    hide_input=True,
    confirmation_prompt=True,
    help="Read from a prompt when not given.",
)
def hash_password(password: str) -> None:
    """Print the scrypt hash of a password, for a CONSOLE_USERS entry (name:role:HASH)."""
    from workers.console.auth import hash_password as make_hash

    if len(password) < 12:
        raise click.ClickException("a console password needs at least 12 characters")
    click.echo(make_hash(password))
