"""Choosing modules by name: `targets` / `ignore` patterns, shared by every technique."""

import fnmatch

from slimkit.errors import SlimkitError


def matches(name: str, patterns) -> bool:
    """A module name matches a pattern as a whole or as a suffix after a dot."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def check_patterns(targets, ignore) -> None:
    """Config-time validation of `targets` / `ignore`."""
    for field, value in (("targets", targets), ("ignore", ignore)):
        if isinstance(value, str) or not all(isinstance(p, str) and p for p in value):
            raise SlimkitError(f"{field} must be a list of non-empty name patterns, got {value!r}: write e.g. {field}=('q_proj', 'mlp.*')")
    if not targets:
        raise SlimkitError("targets is empty: give at least one name pattern, e.g. targets=('*',)")
