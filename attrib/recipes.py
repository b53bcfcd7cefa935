"""Recipes: TOML files of option defaults, checked before a long run starts.

Top-level keys apply to every command that has the option; a `[command]` table
applies to that command only. A key that no command knows is an error, never
silently ignored.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from attrib.errors import InputError


def _option_names(command) -> set[str]:
    return {param.name for param in command.params if param.name}


def load_recipe(path: str, command_name: str, group) -> dict:
    """The default_map for `command_name` from the recipe at `path`; `group` is the click group of
    every command (a recipe's top-level keys may belong to any of them)."""
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        recipe = tomllib.loads(recipe_path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--config {path} is not valid TOML: {exc}") from exc
    commands = {name: group.commands[name] for name in group.commands}
    command = commands[command_name]
    known_anywhere = set().union(*(_option_names(c) for c in commands.values()))
    defaults: dict = {}
    for key, value in recipe.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            if key not in commands:
                raise InputError(f"--config {path}: [{key}] is not an attrib command ({', '.join(sorted(commands))})")
            if key != command_name:
                continue
            for sub_key, sub_value in value.items():
                sub_name = sub_key.replace("-", "_")
                if sub_name not in _option_names(command):
                    raise InputError(f"--config {path}: [{key}] has unknown option '{sub_key}'")
                defaults[sub_name] = sub_value
        elif name not in known_anywhere:
            raise InputError(f"--config {path}: unknown option '{key}'")
        elif name in _option_names(command):
            defaults.setdefault(name, value)
    return defaults
