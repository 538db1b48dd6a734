"""One exception family for everything a user can get wrong.

Every error a person can fix (bad data, an unknown backbone, missing weights, a bundle that does
not match) is an `ImgclfError`. The CLI prints its message without a traceback and exits with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ImgclfError(Exception):
    """A mistake the user can fix. The message says what happened, what was expected and how to fix it.

    Example:
        >>> raise ImgclfError("no images in 'x/'", expected="a folder per class", fix="add images")
        Traceback (most recent call last):
        ...
        imgclf.errors.ImgclfError: no images in 'x/'
          expected: a folder per class
          fix: add images
    """

    def __init__(self, what: str, *, expected: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.expected = expected
        self.fix = fix
        parts = [what]
        if expected:
            parts.append(f"  expected: {expected}")
        if fix:
            parts.append(f"  fix: {fix}")
        super().__init__("\n".join(parts))


class DataError(ImgclfError):
    """The data could not be found, parsed or used."""


class BackboneError(ImgclfError):
    """The backbone name is unknown or its weights cannot be had."""


class BundleError(ImgclfError):
    """A model bundle is missing, corrupt or does not match what it is used with."""


class ConfigError(ImgclfError):
    """A configuration value or file is invalid."""


class ExportError(ImgclfError):
    """An export could not be written, or it does not match the eager model."""


def check_format(
    values: object, *, source: str, kind: str, format: str, version: int, error: type[ImgclfError]
) -> None:
    """Raise `error` unless `values` (a parsed JSON description read from `source`) declares
    `format` at a `format_version` this imgclf reads (at most `version`).

    Example:
        >>> check_format({"format": "imgclf-bundle", "format_version": 1}, source="m/imgclf.json",
        ...              kind="bundle", format="imgclf-bundle", version=1, error=ImgclfError)
    """
    if not isinstance(values, dict) or values.get("format") != format:
        raise error(f"{source!r} is not an imgclf {kind} (format != {format!r})")
    if int(values.get("format_version", 0)) > version:
        raise error(
            f"{kind} format {values.get('format_version')} is newer than this imgclf reads ({version})",
            fix="upgrade imgclf",
        )

