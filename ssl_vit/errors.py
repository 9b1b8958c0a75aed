"""Exceptions raised by the library. Each says what is wrong and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SslVitError(Exception):
    """Base class of every error the library raises on purpose."""


class IncompatibleBackbone(SslVitError, TypeError):
    """An objective cannot run on a backbone: the message names the missing capability."""


class UnknownNameError(SslVitError, KeyError):
    """A registry name that does not exist; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputShapeError(SslVitError, ValueError):
    """An input whose channels or size do not fit the backbone."""


class InputDtypeError(SslVitError, TypeError):
    """An input tensor of the wrong dtype (e.g. a uint8 image batch given to a backbone)."""


class BadArgument(SslVitError, TypeError, ValueError):
    """A constructor argument of the wrong type or value; the message names the argument and what it expects.
    Also a ValueError: a per-stage argument of the wrong shape is a bad value to callers that check for that."""


class CorruptCheckpoint(SslVitError):
    """A checkpoint or export folder whose files do not match its manifest (missing, truncated or changed)."""


class MalformedExport(SslVitError, ValueError):
    """An export's metadata (backbone.json) is not valid JSON or has fields of the wrong type."""


class ExportNotFound(SslVitError, FileNotFoundError):
    """A folder that is not a backbone export (backbone.json or backbone.safetensors is missing)."""


class OverwriteRefused(SslVitError, FileExistsError):
    """A write that would replace a folder which is not what it writes (e.g. an export over a run folder)."""


class WeightsMismatch(SslVitError, ValueError):
    """Exported weights that do not fit the architecture their backbone.json describes."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The `n` names in `choices` closest to `name` (difflib ratio), best first."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not hits:  # fall back to substring matches so "vit" still suggests something
        hits = [c for c in choices if name in c or c in name][:n]
    return hits
