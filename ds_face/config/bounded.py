"""Bounded readers for every YAML or JSON file ds_face reads (run YAML, ``--set`` values, DeepSpeed JSON,
``ds_face_meta.json``, ``manifest.json``): the size is checked before parsing, the nesting while parsing, and
YAML anchors and aliases are refused. Low in the layout (it needs only ``ConfigError``), so the shard format and
the checkpoint reader use it without importing the config checks.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from ds_face.config.schema import ConfigError

# Bounds for every YAML or JSON file ds_face reads (run YAML, --set values, DeepSpeed JSON, ds_face_meta.json,
# manifest.json): the size is checked before parsing, the nesting while parsing, and YAML aliases are refused
# (one 1 KB `--set` value of nested aliases once expanded to 3 GB). Far above any real file.
MAX_CONFIG_BYTES = 1 << 20
MAX_SET_VALUE_BYTES = 64 << 10
MAX_DEPTH = 32


class NotARegularFile(OSError):
    """A path that names a directory, fifo, device or socket where a file is to be read."""


def read_at_most(path: str | Path, limit: int, follow_links: bool = True) -> bytes:
    """At most ``limit + 1`` bytes of a regular file (one more than allowed tells the caller it is too large),
    opened non-blocking (a fifo is refused, not waited on) and, with ``follow_links=False``, never through a
    link. Raises OSError (NotARegularFile for anything but a file); each caller names the file its own way."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotARegularFile("not a regular file (a directory, fifo, device or socket)")
        return f.read(limit + 1)


def read_bounded(path: str | Path, limit: int = MAX_CONFIG_BYTES, what: str = "config file") -> str:
    """A regular file's text, at most ``limit`` bytes (only that much is read). Raises ConfigError naming it."""
    path = Path(path)
    try:
        data = read_at_most(path, limit)
    except NotARegularFile:
        raise ConfigError(f"{path}: not a regular file; the {what} must be a file") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit} bytes; too large for a {what} (refused unread)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def parse_json(text: str, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """JSON nested at most ``max_depth`` deep (counted before parsing: a 100,000-deep file is one line, not a
    RecursionError). Raises ConfigError naming ``where``."""
    depth = 0
    for token in _JSON_TOKENS.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > max_depth:
                line = text.count("\n", 0, token.start()) + 1
                raise ConfigError(f"{where}: nested deeper than {max_depth} levels (line {line}); not a file "
                                  f"ds_face reads")
        elif bracket in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except ValueError as err:  # JSONDecodeError, and ints past Python's 4300-digit limit
        raise ConfigError(f"{where}: not valid JSON: {err}") from None


def load_json_file(path: str | Path, limit: int = MAX_CONFIG_BYTES, what: str = "JSON file") -> Any:
    """A JSON file, bounded in size and depth: the one reader of ds_face's JSON files (DeepSpeed config,
    ds_face_meta.json; manifest.json may use it with a larger ``limit``). Raises ConfigError naming the file."""
    return parse_json(read_bounded(path, limit, what), str(path))


class _BoundedYAML(yaml.SafeLoader):
    """PyYAML's safe loader without aliases or anchors (``&a``/``*a``: the only way a few bytes of YAML expand
    to gigabytes) and nested at most MAX_DEPTH deep (the composer recurses per level)."""
    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not "
                                              "accepted in ds_face configs", event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                              event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases and nested at most MAX_DEPTH deep. Raises yaml.YAMLError, or
    ValueError for a number Python will not convert (an integer of more than 4300 digits)."""
    loader = _BoundedYAML(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
