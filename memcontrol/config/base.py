"""The building blocks of the typed configuration: a strict section model, config-relative paths, and the
translation of a validation failure into one ``ConfigError`` that names the file, the key path and, for a
misspelt key, the closest valid name.

pydantic does the checking (types, ranges, unknown keys at any depth); this module only words its findings for a
person editing a YAML file.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, model_serializer
from pydantic.functional_validators import BeforeValidator

from ..errors import ConfigError


class Section(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment too, field names are the YAML
    keys (so ``model_dump`` gives back the mapping a user would write)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Spec(Section):
    """A section whose unset optional keys are left out of its dump, so that ``{type: vae}`` stays exactly that in
    a study's fingerprint however many options the kind has."""

    @model_serializer(mode="wrap")
    def _without_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


def relative_to_config(value: str | None, info: ValidationInfo) -> str | None:
    """A path written in a config file is relative to that file's folder: a ``base:`` preset's own (the string is
    ``files.Written``), else the folder of the file the job was given."""
    if value is None:
        return None
    folder = getattr(value, "folder", None) or (info.context or {}).get("dir")
    path = Path(value).expanduser()
    if folder is not None and not path.is_absolute():
        path = (Path(folder) / path).resolve()
    return str(path)


# A file or folder named in a config. Resolved before pydantic's own check, which turns a marked string into a
# plain one and so would lose the preset's folder.
ConfigPath = Annotated[str, BeforeValidator(lambda value, info: relative_to_config(value, info)
                                            if isinstance(value, str) else value)]


def as_number(value):
    """A YAML value that PyYAML left as a string although it is a number (``1e-4``), as a float; else as it is."""
    if isinstance(value, str) and any(ch.isdigit() for ch in value):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def validated(model: type[BaseModel], data: dict, where: str | Path | None = None, folder: str | Path | None = None,
              prefix: tuple = ()):
    """``model`` built from ``data``; any problem becomes a ``ConfigError`` naming ``where`` (the config file)."""
    try:
        return model.model_validate(data, context={"dir": None if folder is None else str(folder)})
    except ValidationError as err:
        raise ConfigError(describe(err, model, where, prefix)) from None


def describe(err: ValidationError, model: type[BaseModel], where=None, prefix: tuple = ()) -> str:
    """One line per wrong key: ``FILE: `a.b.c`: problem``; for an unknown key, the closest valid name."""
    found = [(tuple(_walk(model, tuple(e["loc"]))[0]), e) for e in err.errors()]
    paths = {path for path, _ in found}
    lines, done = [], set()
    for path, item in found:
        # A value that may take several forms (a path or a mapping; a number or "heldout") fails once per form:
        # the failure deeper inside, or the first one, is about what the user actually wrote.
        if path in done or any(len(q) > len(path) and q[:len(path)] == path for q in paths):
            continue
        done.add(path)
        shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (*prefix, *path)).lstrip(".")
        if item["type"] == "extra_forbidden":
            valid = _walk(model, tuple(item["loc"]))[1]
            close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else f"valid keys: {', '.join(sorted(valid)) or 'none'}"
            lines.append(f"`{shown}`: unknown; {hint}")
        else:
            got = "" if item["type"] == "missing" else f" (got {item['input']!r})"
            lines.append(f"`{shown or '(top level)'}`: {item['msg'].removeprefix('Value error, ')}{got}")
    head = f"{where}: " if where else ""
    return head + ("\n" + " " * len(head)).join(lines)


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list, list[str]]:
    """The user's key path for a pydantic error location (without the names of union members that pydantic puts
    in it), and the valid keys of the mapping the last key sits in."""
    path: list = []
    annotation: Any = model
    valid: list[str] = []
    for part in loc:
        models = _models_in(annotation)
        if isinstance(part, int) and not models:
            path.append(part)
            annotation = _item_type(annotation)
            continue
        field_owner = next((m for m in models if part in m.model_fields), None)
        if field_owner is not None:
            valid = list(field_owner.model_fields)
            path.append(part)
            annotation = field_owner.model_fields[part].annotation
            continue
        member = _member_named(annotation, part)
        if member is not None:  # a union member's name or tag: not a key the user wrote
            annotation = member
            continue
        if models:
            valid = sorted({name for m in models for name in m.model_fields})
        path.append(part)
        annotation = _item_type(annotation)
    return path, valid


def _args(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _args(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return tuple(a for arg in typing.get_args(annotation) for a in (_args(arg) or (arg,)))
    return ()


def _models_in(annotation) -> list[type[BaseModel]]:
    members = _args(annotation) or (annotation,)
    out = []
    for m in members:
        m = typing.get_args(m)[0] if typing.get_origin(m) is Annotated else m
        if isinstance(m, type) and issubclass(m, BaseModel):
            out.append(m)
    return out


def _member_named(annotation, part) -> type | None:
    for m in _args(annotation) or ():
        m = typing.get_args(m)[0] if typing.get_origin(m) is Annotated else m
        if isinstance(m, type) and issubclass(m, BaseModel):
            tag = m.model_fields.get("type")
            tags = typing.get_args(tag.annotation) if tag is not None else ()
            if part == m.__name__ or part in tags:
                return m
        elif isinstance(part, str) and (not part.isidentifier() or part in ("str", "int", "float", "bool")):
            return m
    return None


def _item_type(annotation):
    for arg in _args(annotation) or (annotation,):
        args = typing.get_args(arg)
        if typing.get_origin(arg) in (list, tuple):
            return args[0] if args else Any
        if typing.get_origin(arg) is dict:
            return args[1] if len(args) == 2 else Any
    return Any
