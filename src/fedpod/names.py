"""The one rule for names that become file names, dataset identifiers or table names.

Identity, pod and dataset names end up in paths (`keys/<name>.key`, the keystore) and in
identifiers (`owner/name`); a name like `../../x` would write outside the folder meant for
it. Every entry point checks names with `check_name` *before* anything is written.
"""

from __future__ import annotations

import re

from fedpod.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)


def check_name(value: str, kind: str) -> str:
    """Return `value` if it is a valid name, else raise ConfigError naming the rule."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{kind} name {value!r} is not allowed",
                          hint="use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return value
