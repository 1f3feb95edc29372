"""``aotpack farm``: a matrix of builds on Hugging Face Jobs, with its live table on stderr."""

from __future__ import annotations

import sys

import click

from aotpack.options import quiet_option, token_option


@click.command()
@quiet_option
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True,
              help="Print the cells, the platform each flavor gives and its price; submit nothing.")
@token_option
def farm(matrix, dry_run, token) -> None:
    """Build a matrix (recipes x schemes x flavors) on Hugging Face Jobs: one job per cell, pushed into the Hub.

    Shows a live table on stderr and prints a summary; a failed cell shows the tail of its log and the others
    go on. Cells a flavor cannot build are refused before anything is submitted. Ctrl-C cancels the jobs.

    \b
    Examples:
      aotpack farm farm.toml --dry-run
      aotpack farm farm.toml
    """
    from aotpack.farm import check_farm, read_matrix, refused, run_farm

    cells = read_matrix(matrix)
    if dry_run:
        planned = check_farm(cells, token=token)
        for p in planned:
            state = f"refused: {p.problem}" if p.problem else f"-> {p.cell.repo}:builds/{p.build}"
            click.echo(f"{p.cell.label:<40} {p.cell.flavor:<14} {p.platform:<10} {p.price:<16} {state}")
            for upload in p.uploads:  # what the job will be sent, as read and checked here
                click.echo(f"    uploads {upload.describe()}")
        error = refused(planned)
        if error:
            raise error
        click.echo(f"{len(cells)} job(s) would be submitted, one per cell")
        return
    view = _FarmView()
    states = run_farm(cells, token=token, on_change=view.show)
    failed = [s for s in states if s.stage != "completed"]
    for s in failed:
        click.echo(f"--- {s.cell.label} on {s.cell.flavor} ({s.stage}: {s.message}); log tail:", err=True)
        for line in s.tail:
            click.echo(f"    {line}", err=True)
    for s in states:
        where = f"{s.cell.repo}:builds/{s.build}" if s.build else (s.message or "")
        click.echo(f"{s.stage:<10} {s.cell.label:<40} {s.cell.flavor:<14} {s.elapsed:6.0f} s  {where}")
    click.echo(f"{len(states) - len(failed)} of {len(states)} builds completed")
    if failed:
        raise click.exceptions.Exit(1)


class _FarmView:
    """The live table on stderr: redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self) -> None:
        self.drawn = 0
        self.last: dict[int, str] = {}

    def show(self, states) -> None:
        rows = [f"{s.stage:<10} {s.elapsed:6.0f} s  {s.cell.label} on {s.cell.flavor}" for s in states]
        if sys.stderr.isatty():
            if self.drawn:
                sys.stderr.write(f"\x1b[{self.drawn}F\x1b[J")
            sys.stderr.write("\n".join(rows) + "\n")
            sys.stderr.flush()
            self.drawn = len(rows)
            return
        for i, (s, row) in enumerate(zip(states, rows)):
            if self.last.get(i) != s.stage:
                self.last[i] = s.stage
                click.echo(row, err=True)
