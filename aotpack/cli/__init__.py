"""The ``aotpack`` command: a thin Click layer over the library, one module per command group. Results on stdout,
progress on stderr.

``cli`` (the group) and ``main`` (the console entry point) are the names to import from here."""

from __future__ import annotations

from aotpack.cli.app import cli
from aotpack.cli.artifact_commands import inspect, run, sign
from aotpack.cli.bench_command import bench
from aotpack.cli.build_command import build
from aotpack.cli.farm_command import farm
from aotpack.cli.hub_commands import pull, push
from aotpack.cli.recipe_commands import recipe, recipes, schemes

for _command in (recipes, schemes, recipe, build, inspect, sign, run, push, pull, farm, bench):
    cli.add_command(_command)

__all__ = ["cli", "main"]


def main() -> None:
    """The ``aotpack`` console script."""
    cli(prog_name="aotpack")
