"""Write the relay's settings file with every setting commented at its default.

Run with a Python that has the project installed (the package's own
virtualenv at build time)::

    python packaging/render_config.py > relay.toml

The keys, defaults and explanations come from the settings classes of
``edge_agent.relay.config`` (their fields, defaults and ``#:`` comments),
so the shipped file cannot drift from the code.  Defaults that are worked
out when the relay starts (the host name, paths under ``relay.state_dir``)
are written as ``(...)`` placeholders, not values: pinning them in the
file would stop them following the setting they derive from.

Section headers of the relay's own sections stay uncommented (an empty
table means "all defaults"), so a setting is changed by uncommenting one
line.  ``[modelsync]`` stays commented: giving that section turns the
model-update agent on.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from edge_agent.relay import config as relay_config

_FIELD_RE = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*:")


def field_comments(cls: type) -> dict[str, list[str]]:
    """The ``#:`` comment lines written above each field of ``cls``."""
    comments: dict[str, list[str]] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = _FIELD_RE.match(line)
        if match and pending:
            comments[match.group(1)] = pending
        if stripped:
            pending = []
    return comments


def module_comment(module: types.ModuleType, name: str) -> list[str]:
    """The ``#:`` comment lines written above the assignment of ``name``."""
    lines = inspect.getsource(module).splitlines()
    for index, line in enumerate(lines):
        if line.startswith(f"{name} ="):
            block: list[str] = []
            for above in reversed(lines[:index]):
                if not above.startswith("#:"):
                    break
                block.insert(0, above[2:].strip())
            return block
    return []


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (the types the settings use)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(
            f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()
        )
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"no TOML form for {value!r}")


def _type_words(kind: Any) -> str:
    """A short name for a setting's type: ``a string``, ``a path``."""
    if get_origin(kind) in (Union, types.UnionType):
        inner = [a for a in get_args(kind) if a is not type(None)]
        if len(inner) == 1:
            kind = inner[0]
    if get_origin(kind) is tuple:
        return "a list"
    words = {str: "a string", Path: "a path", int: "an integer", float: "a number"}
    return words.get(kind, "a value")


def default_line(field: dataclasses.Field[Any], kind: Any) -> str:
    """``key = default``, or ``key = (...)`` when there is no fixed default."""
    if field.default is not dataclasses.MISSING:
        value = field.default
        if value is None:
            return f"{field.name} = (not set: {_type_words(kind)})"
        return f"{field.name} = {toml_value(value)}"
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        # An empty list or table is a fixed default; anything else (the
        # host name) is computed where the relay runs, not where it builds.
        if isinstance(value, tuple | list | Mapping) and not value:
            return f"{field.name} = {toml_value(value)}"
        return f"{field.name} = (computed when the relay starts)"
    return f"{field.name} = (required, unless the relay fills it in)"


_ROLE_RE = re.compile(r":[a-z]+:`~?(?:[\w.]+\.)?(\w+)`")
_LITERAL_RE = re.compile(r"``(.+?)``")


def _comment_block(lines: list[str], indent: str = "# ") -> list[str]:
    """Comment lines, with the docstrings' reST markup taken off."""
    plain = (_LITERAL_RE.sub(r"\1", _ROLE_RE.sub(r"\1", line)) for line in lines)
    return [f"{indent}{line}".rstrip() for line in plain]


def render_section(
    section: str,
    cls: type,
    heading: list[str],
    skip: tuple[str, ...] = (),
    header_prefix: str = "",
) -> list[str]:
    """The lines of one section: heading comments, header, commented keys."""
    out = [*_comment_block(heading), f"{header_prefix}[{section}]"]
    comments = field_comments(cls)
    kinds = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        out.extend(_comment_block(comments.get(field.name, []), "## "))
        out.append(f"# {default_line(field, kinds[field.name])}")
    out.append("")
    return out


def render() -> str:
    """The whole file."""
    out = [
        "# sampleflow relay settings: /etc/sampleflow/relay.toml",
        "#",
        "# Every setting is listed, commented out, at its default: uncomment a",
        "# line to change it.  SAMPLEFLOW_<SECTION>_<KEY> in the environment wins",
        "# over this file (for the service: /etc/default/sampleflow-relay).",
        "# Check the effective settings and where each comes from with",
        "#     sampleflow relay check-config /etc/sampleflow/relay.toml",
        "# Lines starting with ## explain the key below them; a value in",
        "# parentheses is not a value but says how the default is found.",
        "#",
        "# Required to run: [relay] tenant_id.  AWS credentials are never",
        "# settings: the relay uses boto3's credential chain (environment,",
        "# shared files with kinesis.profile, instance or container role).",
        "",
    ]
    for cls in relay_config.SECTIONS:
        section = cls.SECTION  # type: ignore[attr-defined]
        doc = inspect.getdoc(cls) or ""
        heading = [doc.splitlines()[0]] if doc else []
        out.extend(render_section(section, cls, heading))
    modelsync = getattr(relay_config, "MODELSYNC_SECTION", None)
    if modelsync is not None:
        from edge_agent.modelsync.config import ModelSyncConfig  # noqa: PLC0415

        heading = [
            *module_comment(relay_config, "MODELSYNC_SECTION"),
            "",
            "Uncomment the header and the keys you set to turn the agent on.",
        ]
        skip = tuple(getattr(relay_config, "_MODELSYNC_FROM_RELAY", ()))
        lines = render_section(modelsync, ModelSyncConfig, [], skip, "# ")
        header = lines.index(f"# [{modelsync}]")
        out.extend(_comment_block(heading, "## "))
        out.append(lines[header])
        out.append("## false: off even with this section given")
        out.append("# enabled = true")
        out.extend(lines[header + 1 :])
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def main() -> int:
    """Print the file to standard output."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
