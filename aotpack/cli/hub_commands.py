"""The commands that move builds through a Hub repo: ``push`` one in, ``pull`` the one that fits this machine."""

from __future__ import annotations

from pathlib import Path

import click

from aotpack.cli.output import echo_result
from aotpack.options import json_option, quiet_option, token_option, trusted_key_option


def pushed_json(result) -> dict:
    """What ``--json`` prints of a push."""
    return {"repo_id": result.repo_id, "build": result.build, "commit": result.commit, "url": result.url,
            "tag": result.tag, "uploaded": result.uploaded}


@click.command()
@quiet_option
@click.argument("artifact", type=click.Path())
@click.argument("repo", required=False, metavar="[REPO_ID]")
@click.option("--repo-id", default=None, help="Hub repo, owner/name (created if missing); or give it as REPO_ID.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default="main", show_default=True, help="Branch to commit to.")
@click.option("--tag", "tag_name", default=None, help="Tag the resulting commit (a pin for serving boxes).")
@token_option
@json_option
def push(artifact, repo, repo_id, private, revision, tag_name, token, as_json) -> None:
    """Add (or replace) one build in a Hub repo, in one commit; prints the URL of the build at that commit.

    The repo keeps several builds (scheme x options x platform) under builds/, an index and a model card.
    Pushing a build the repo already holds uploads nothing; a signature.sig in the folder goes with it.

    \b
    Examples:
      aotpack push artifacts/tiny-flux-int8wo-cpu-x86_64-avx2 me/tiny-flux-aot --tag v1
      aotpack push my-artifact --repo-id me/flux-aot --private --revision dev
      aotpack push my-artifact me/flux-aot --json    # {"url": ..., "commit": ..., "uploaded": ...}
    """
    if repo and repo_id and repo != repo_id:
        raise click.UsageError(f"two repos given: {repo} and --repo-id {repo_id}")
    repo_id = repo or repo_id
    if not repo_id:
        raise click.UsageError("name the Hub repo: aotpack push ARTIFACT OWNER/NAME (or --repo-id OWNER/NAME)")
    from aotpack.hub import push as push_build

    result = push_build(artifact, repo_id, private=private, revision=revision, tag_name=tag_name, token=token)
    if not result.uploaded:  # still a result on stdout: a script that pushes twice gets the URL both times
        click.echo(f"{repo_id}: build {result.build} is already there; nothing uploaded", err=True)
    echo_result(as_json, pushed_json(result), result.url)


@click.command()
@quiet_option
@click.argument("repo_id")
@click.option("--revision", default=None, help="Tag or commit to pull (a branch needs --trust).")
@click.option("--quant", default=None, help="Only a build of this scheme.")
@click.option("--build", "build_name", default=None, metavar="NAME",
              help="This build of the repo (e.g. int8wo-qkv-cuda-sm90) instead of the best fit.")
@click.option("--trust", is_flag=True, help="Accept a branch (a moving revision) for native code.")
@click.option("--refresh-pins", is_flag=True,
              help="Accept a tag that now points to another commit than at its first pull here, and pin that.")
@token_option
@trusted_key_option
@json_option
def pull(repo_id, revision, quant, build_name, trust, refresh_pins, token, trusted_keys, as_json) -> None:
    """Download the build of REPO_ID that fits this machine, verify it, print its folder.

    A tag is pinned to its commit at its first pull here; if it is moved later, pulls refuse it until
    --refresh-pins. Works offline from the Hub cache (HF_HUB_OFFLINE=1) once pulled.

    \b
    Examples:
      aotpack pull me/tiny-flux-aot --revision v1
      aotpack pull me/tiny-flux-aot --revision v1 --quant int8wo
      aotpack pull me/tiny-flux-aot --revision v1 --build int8wo-qkv-cuda-sm90
      aotpack pull me/tiny-flux-aot --revision v1 --refresh-pins   # you moved tag v1 on purpose
      aotpack pull me/tiny-flux-aot --trust            # latest main: only for repos you control
      aotpack pull me/tiny-flux-aot --revision v1 --trusted-key builder.pub   # only what that key signed
    """
    from aotpack.hub import pull as pull_build

    folder = pull_build(repo_id, revision=revision, quant=quant, build=build_name, token=token, trust=trust,
                        refresh_pins=refresh_pins, trusted_keys=list(trusted_keys) or None)
    # pulled builds sit at .../COMMIT/builds/NAME
    echo_result(as_json, {"path": str(folder), "repo_id": repo_id, "build": Path(folder).name,
                      "commit": Path(folder).parent.parent.name}, str(folder))
