"""The config loader and what every section shares: YAML files with file:line errors, dotted
command-line overrides reported against the override that set a field, strict models.

    cfg = load_config(DemoConfig, "jobs/demo.yaml", ["model.hidden_size=64"])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo

from ..core.export import check_export


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the field."""


def check_paths(info: ValidationInfo) -> bool:
    """Input paths must exist, except where a caller only checks a config's shape."""
    return (info.context or {}).get("check_paths", True)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def plain_name(value: str) -> str:
    """A name that becomes one folder: letters, digits, '.', '_', '-'; never a path."""
    if not NAME.match(value):
        raise ValueError(f"{value!r} must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..')")
    return value


def exported_model(folder: str, info: ValidationInfo) -> str:
    """A model folder must be a whole MultiStreamLM export before a replica or an evaluation
    tries to load it (a bad one otherwise fails inside Ray, retried, after 30 s)."""
    if check_paths(info):
        check_export(folder)  # ExportError is a ValueError: reported against the field
    return folder


POLICY_RE = re.compile(r"^(after_input|teacher|wait_k\((\d+)\))$")


def parse_policy(policy: str) -> tuple[str, int | None]:
    """A conversion policy as written in a data config: 'after_input' -> ('after_input', None);
    'wait_k(3)' -> ('wait_k', 3); 'teacher' -> ('teacher', None)."""
    m = POLICY_RE.match(policy.replace(" ", ""))
    if not m:
        raise ValueError(f"unknown conversion policy {policy!r}; use after_input, wait_k(K) or teacher")
    if m.group(2) is None:
        return m.group(1), None
    k = int(m.group(2))
    if k < 2:
        raise ValueError(f"wait_k({k}): k must be >= 2, since an input token reaches an output two rows later")
    return "wait_k", k


C = TypeVar("C", bound=BaseModel)


# Besides YAMLError, PyYAML's constructors raise these for some scalars ("2020-13-45", "!!bool x",
# "!!timestamp x", integers of over 4300 digits), and its composer RecursionError for deep nesting.
YAML_LEAKS = (RecursionError, ValueError, TypeError, KeyError, AttributeError)


def yaml_leak(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return f"a value YAML cannot read ({str(e).split(';')[0]})"


def read_yaml(path: str | Path):
    """A YAML file's content, or a ConfigError naming the file and what is wrong with it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{source} is a folder, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source} is not a text (UTF-8) file (byte {e.start}): give a YAML config") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {source}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except YAML_LEAKS as e:
        raise ConfigError(f"{source}: not valid YAML: {yaml_leak(e)}") from None


def apply_override(tree: dict, override: str) -> tuple[str, ...]:
    """Apply one `a.b.c=value` override in place (the value is parsed as YAML); returns the key's path."""
    key, sep, raw = override.partition("=")
    parts = tuple(p.strip() for p in key.strip().split("."))
    if not sep or not all(parts):
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                          "quote it, e.g. key='[1'") from None
    except YAML_LEAKS as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {yaml_leak(e)}") from None
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return parts


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None,
                check_paths: bool = True, source: str | None = None) -> C:
    """Build `cls` from a YAML file (or a dict) plus dotted overrides, or raise ConfigError.
    An error is reported against the override that set the field, else against the file.
    check_paths=False skips the existence of input paths (checking shipped configs' shape)."""
    source = source or (str(path) if path else "<config>")
    tree = dict(data or {})
    if path is not None:
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of settings, got {type(loaded).__name__}")
        tree.update(loaded or {})
    set_by = {apply_override(tree, o): o for o in overrides}
    try:
        return cls.model_validate(tree, context={"check_paths": check_paths})
    except OSError as e:  # a path check that cannot even ask (e.g. a name over 255 bytes)
        raise ConfigError(f"{source}: cannot check path {e.filename!r}: {e.strerror or e}") from None
    except UnicodeError:  # pydantic cannot even report a str holding an unpaired surrogate
        raise ConfigError(f"{source}: a value is not Unicode text: it holds an unpaired surrogate such as "
                          "\"\\ud800\" (YAML does not join \\uD83D\\uDE00 pairs: write the character, "
                          "or \\U0001F600)") from None
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(str(p) for p in err["loc"])
            override = next((o for keys, o in set_by.items() if loc[: len(keys)] == keys or keys[: len(loc)] == loc
                             and loc), None)
            where = f"override {override} (over {source})" if override else source
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {'.'.join(loc) or cls.__name__}: {msg}")
        raise ConfigError("\n".join(lines)) from None
