"""Errors that aotpack raises: one line naming the cause, one line naming the fix.

The library never prints or exits; only the CLI (``aotpack/cli/app.py``) turns these into ``Error: ...`` / ``Hint: ...``.
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its class name if empty): long library errors stay one line."""
    text = str(e).strip()
    return one_line(text.splitlines()[0], limit) if text else type(e).__name__


def one_line(text: str, limit: int = 300) -> str:
    """``text`` made safe to print as part of one line: control characters (newlines, escapes that move the
    cursor or fake a line) are shown escaped, and it is cut at ``limit`` characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


class AotpackError(Exception):
    """Base class: ``cause`` is one line saying what is wrong, ``hint`` one line saying what to do."""

    def __init__(self, cause: str, hint: str = "") -> None:
        super().__init__(cause)
        self.cause = cause
        self.hint = hint

    def __str__(self) -> str:
        return self.cause if not self.hint else f"{self.cause} ({self.hint})"


class RecipeError(AotpackError):
    """Unknown recipe, bad recipe file, or a model folder that does not fit the recipe."""


class SchemeError(AotpackError):
    """Unknown quantization scheme, or one this machine / torchao cannot run."""


class ManifestError(AotpackError):
    """manifest.json is missing, unreadable or does not follow the schema."""


class IncompatibleArtifactError(AotpackError):
    """The artifact was built for another platform (torch version, device, GPU capability, CPU ISA)."""


class IntegrityError(AotpackError):
    """A file of the artifact is missing or its bytes do not match the manifest."""


class InputError(AotpackError):
    """An input passed to the compiled transformer is outside what was exported."""


class BuildError(AotpackError):
    """A build stage failed."""


class OutputExistsError(AotpackError):
    """The output folder exists and --overwrite was not given."""


class ResourceError(AotpackError):
    """Not enough memory or disk for the requested work."""


class HubError(AotpackError):
    """A Hub operation failed: auth, missing repo or revision, network."""


class SignatureError(AotpackError):
    """A signature is missing, unreadable, not from a trusted key, or does not cover the artifact's files."""


class FarmError(AotpackError):
    """A build matrix or a cell that cannot be submitted as it is."""


class ConfigError(AotpackError):
    """An environment variable or setting aotpack reads has a value it cannot use."""
