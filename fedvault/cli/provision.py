"""`fedvault provision`, `add-site` and `revoke-site`: typer wiring of fedvault.server.provision."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console

from fedvault.cli import EXIT_HELP
from fedvault.runtime.kits import load_kit
from fedvault.server.provision import MAX_VALIDITY_DAYS, add_site, provision_federation
from fedvault.server.revocation import revoke_site

# soft_wrap: a kit's path is printed whole on its line, never broken by the console's width
# (the terminal wraps it for the eye; a copy of it stays one path).
console = Console(soft_wrap=True)

provision_app = typer.Typer(
    name="provision",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    epilog=EXIT_HELP,
)


def split_sites(values: list[str] | None) -> list[str]:
    """Site names from ``--sites a,b --sites c``; blanks are kept so validation reports them."""
    return [name.strip() for value in values or [] for name in value.split(",")]


@provision_app.callback(invoke_without_command=True, epilog=EXIT_HELP)
def provision_command(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Option(
            help="Federation name (letters, digits, '.', '_', '-'); it names the CA and every kit.",
            show_default=False,
        ),
    ] = None,
    server_address: Annotated[
        str | None,
        typer.Option(
            help="HOST:PORT that sites connect to (the SuperLink's Fleet API); IPv6 as "
            "[::1]:9092. The server certificate covers HOST plus localhost, 127.0.0.1 and ::1.",
            show_default=False,
        ),
    ] = None,
    sites: Annotated[
        list[str] | None,
        typer.Option(
            help="Site names, comma-separated (a,b,c) or the option repeated; each gets its own "
            "key pair and kit.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Federation folder to create: authority/ (the CA; keep it here), server/ (the "
            "coordinator's kit) and sites/SITE/ (one kit per site).",
            show_default=False,
        ),
    ] = None,
    validity_days: Annotated[
        int,
        typer.Option(
            help=f"Days the CA and server certificates stay valid (1..{MAX_VALIDITY_DAYS}).",
        ),
    ] = 365,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing federation in --out: a new CA, and every kit re-issued.",
        ),
    ] = False,
) -> None:
    """Create a federation's certificate authority, the server's TLS kit and one kit per site.

    Give `server/` to the coordinator and `sites/<site>/` to each site over a trusted channel;
    keep `authority/` (the CA private key) where it is. Use `add-site` to add a site later
    without re-issuing anything else.
    """
    options = (
        ("--name", name),
        ("--server-address", server_address),
        ("--sites", sites),
        ("--out", out),
    )
    if ctx.invoked_subcommand is not None:
        given = [flag for flag, value in options if value is not None] + (
            ["--force"] if force else []
        )
        if given:
            raise click.UsageError(
                f"{', '.join(given)} belong(s) to `provision` itself, not to "
                f"`{ctx.invoked_subcommand}`; see `{ctx.invoked_subcommand} --help`.",
                ctx=ctx,
            )
        return
    if name is None or server_address is None or sites is None or out is None:
        missing = [flag for flag, value in options if value is None]
        raise click.UsageError(f"Missing option(s) {', '.join(missing)}.", ctx=ctx)
    site_names = split_sites(sites)
    root = provision_federation(
        name=name,
        server_address=server_address,
        sites=site_names,
        out=out,
        validity_days=validity_days,
        force=force,
    )
    console.print(
        f"[bold]fedvault provision[/bold] {name}: CA, server kit and {len(site_names)} site "
        f"kit(s) in {root}, valid {validity_days} days",
        highlight=False,
    )
    console.print(f"  coordinator: {root / 'server'}", highlight=False)
    for site in site_names:
        console.print(f"  site {site}: {root / 'sites' / site}", highlight=False)
    console.print(
        f"Keep {root / 'authority'} on this machine; it is never part of a kit.", highlight=False
    )


@provision_app.command("add-site", epilog=EXIT_HELP)
def add_site_command(
    out: Annotated[
        Path,
        typer.Option(
            help="The federation folder `fedvault provision` wrote (it holds authority/).",
            show_default=False,
        ),
    ],
    site: Annotated[
        str,
        typer.Option(
            help="Name of the new site (letters, digits, '.', '_', '-'); it must be new.",
            show_default=False,
        ),
    ],
) -> None:
    """Add one site to an existing federation, re-issuing nothing else.

    Writes `sites/<site>/` (the new kit), `server/sites/<site>.pub` and an updated
    `federation.toml`. Copy the new public key to the coordinator's server kit if it lives
    elsewhere.
    """
    kit = add_site(out, site)
    console.print(f"[bold]fedvault provision add-site[/bold] {site}: kit in {kit}", highlight=False)
    public_key = kit.parent.parent / "server" / "sites" / f"{site}.pub"
    console.print(f"  public key for the server kit: {public_key}", highlight=False)


@provision_app.command("revoke-site", epilog=EXIT_HELP)
def revoke_site_command(
    out: Annotated[
        Path,
        typer.Option(
            help="The federation folder `fedvault provision` wrote (it holds server/).",
            show_default=False,
        ),
    ],
    site: Annotated[
        str, typer.Option(help="Name of the site whose key is revoked.", show_default=False)
    ],
) -> None:
    """Revoke a site's key: it can never join again, even with its kit.

    Records the key's fingerprint as revoked in `federation.toml` and the server kit, removes
    `server/sites/<site>.pub`, and moves the federation's copy of the site's kit to
    `revoked/`. When `fedvault server start` runs for this server kit, the key is also
    unregistered there at once: the site's next request is refused. A later `server start`
    never registers it. `add-site` may then issue the site a new key.
    """
    from fedvault.server.deploy import revoke_at_running_coordinator

    revocation = revoke_site(out, site)
    console.print(
        f"[bold]fedvault provision revoke-site[/bold] {site}: key {revocation.fingerprint} "
        f"revoked in {revocation.server_kit}",
        highlight=False,
        soft_wrap=True,
    )
    if revocation.kit_moved_to is not None:
        console.print(f"  site kit moved to {revocation.kit_moved_to}", highlight=False)
    node_id = revoke_at_running_coordinator(
        load_kit(revocation.server_kit, role="server"), revocation.fingerprint
    )
    if node_id is None:
        console.print(
            "  no running coordinator has this key registered: `fedvault server start` will "
            "not register it",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(
            f"  unregistered node {node_id} at the running coordinator: the site is refused "
            "at its next request",
            highlight=False,
            soft_wrap=True,
        )
