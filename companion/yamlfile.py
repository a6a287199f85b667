"""Load YAML files through a pydantic schema, with one-line errors that name file, key and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from companion.errors import CompanionError
from companion.textfile import read_text_file

M = TypeVar("M", bound=BaseModel)


class Schema(BaseModel):
    """Base for every YAML schema: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse ``path`` safely; returns the data and its node tree (for line numbers)."""
    text = read_text_file(path, "YAML file")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CompanionError(f"{path}: YAML syntax error{where}: {problem}; fix the file's indentation/quoting") from None
    return data, node


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the key at ``loc`` (or of its deepest existing parent)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def describe_validation_error(path: Path | str, err: ValidationError, node: yaml.Node | None = None) -> str:
    """One line for the first problem in ``err``: ``file: key 'a.b' (line 3): message``."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = _line_of(node, loc)
    at = f" (line {line})" if line else ""
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key '{key}'{at}: remove it or check its spelling"
    if kind == "missing":
        return f"{path}: missing key '{key}': add it"
    others = len(err.errors()) - 1
    more = f" (and {others} more problem{'s' if others > 1 else ''} in this file)" if others else ""
    return f"{path}: key '{key}'{at}: {plain_message(first, 'should be')}{more}"


# pydantic's wording for a wrong type -> the user's words (its own is about Python types and classes)
_TYPE_WORDS = {
    "model_type": "a group of keys (indented `key: value` lines)", "model_attributes_type": "a group of keys",
    "dict_type": "a group of keys (indented `key: value` lines)", "int_parsing": "a whole number",
    "int_type": "a whole number", "int_from_float": "a whole number", "float_parsing": "a number",
    "float_type": "a number", "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "text", "list_type": "a list", "finite_number": "a finite number",
}


def plain_message(error: Any, verb: str) -> str:
    """What is wrong with a value, in the user's words: ``"{verb} a whole number"``,
    ``"{verb} greater than or equal to 0"`` (verb: "should be" for a file, "must be" for a flag)."""
    kind = str(error.get("type", ""))
    if kind in _TYPE_WORDS:
        return f"{verb} {_TYPE_WORDS[kind]}"
    message = str(error.get("msg", "")).removeprefix("Value error, ")
    for prefix in ("Input should be ", "input should be "):
        if message.startswith(prefix):
            return f"{verb} {message.removeprefix(prefix)}"
    return message


def load_yaml(path: str | Path, schema: type[M], *, allow_empty: bool = True) -> M:
    """Read ``path`` and validate it with ``schema``; every failure is a one-line CompanionError."""
    path = Path(path)
    data, node = read_yaml(path)
    if data is None:
        if not allow_empty:
            raise CompanionError(f"{path}: file is empty: fill it in (see the example in config/)")
        data = {}
    if not isinstance(data, dict):
        raise CompanionError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise CompanionError(describe_validation_error(path, err, node)) from None


def dump_yaml(model: BaseModel) -> str:
    """YAML text for a schema instance (only keys that are set or differ from defaults)."""
    data = model.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
