"""The stage commands, generated from attrib.options: one flag per option, its help and default
from the option's field, and the command runs the API function of the same name.

`attrib fit-factors --max-length 64` is `attrib.fit_factors(..., max_length=64)`; what a command
adds is what it prints for people afterwards (`AFTER`).
"""

from __future__ import annotations

import inspect
from typing import Annotated, Optional

import typer

from attrib.options import STAGES, Input, StageSpec


def _after_fit(result) -> None:
    from attrib.commands.printing import fit_summary

    fit_summary(result.manifest, str(result.out))


def _after_query_gradients(result) -> None:
    from attrib.progress import message

    message(f"query gradients written to {result.out}")


def _after_query(result) -> None:
    from attrib.commands.printing import print_top

    print_top(str(result.out))


def _after_self_influence(result) -> None:
    from attrib.commands.printing import print_table
    from attrib.report import open_scores, top_rows

    scores = open_scores(result.out)
    print_table(top_rows(scores, 5, [q["id"] for q in scores.queries]))


def _after_index(result) -> None:
    from attrib.progress import message

    manifest = result.manifest
    message(f"{manifest.get('counts', {}).get('sequences', 0):,} sequences indexed ({manifest.get('representation')}, "
            f"{manifest.get('bytes_per_sequence', 0):,} bytes each) in {result.out}")


def _after_combine(result) -> None:
    from attrib.progress import message

    message(f"{len(result.manifest['combine'])} score directories combined into {result.out}; "
            f"`attrib top {result.out}` shows them")


AFTER = {"fit-factors": _after_fit, "query-gradients": _after_query_gradients, "query": _after_query,
         "self-influence": _after_self_influence, "index": _after_index, "combine": _after_combine}


def _parameter(name: str, kind, flags: tuple[str, ...], help: str, default=inspect.Parameter.empty):
    option = typer.Option(*flags, help=help)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option], default=default)


def _input(item: Input) -> inspect.Parameter:
    """A stage input: a flag, or the positional arguments of one (`attrib combine A B --out C`)."""
    if item.kind == "stages":
        argument = typer.Argument(help=item.help, show_default=False, metavar=f"{item.name.upper()}_DIR")
        return inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[list[str], argument])
    return _parameter(item.name, str if item.required else Optional[str], item.flags, item.help,
                      inspect.Parameter.empty if item.required else None)


def parameters(spec: StageSpec) -> list[inspect.Parameter]:
    """The command's parameters: the stage's inputs (required flags or arguments), then its options."""
    found = [_input(i) for i in spec.inputs]
    for _, item in spec.option_fields():
        if item.metadata["cli"]:
            kind = str if item.name in ("token_scores_top", "ngram_range") else item.type  # a number or a word
            found.append(_parameter(item.name, kind, item.metadata["flags"], item.metadata["help"], item.default))
    return found


def stage_command(spec: StageSpec):
    """The typer command of one stage."""

    def command(**given) -> None:
        import attrib

        result = getattr(attrib, spec.function)(**given)
        after = AFTER.get(spec.command)
        if after is not None and result.is_main and not result.already_complete:
            after(result)

    found = parameters(spec)
    command.__signature__ = inspect.Signature(found)
    command.__annotations__ = {p.name: p.annotation for p in found}
    command.__name__ = spec.function
    command.__doc__ = f"{spec.summary}\n\nExample: {spec.example}"
    return command


def register(app: typer.Typer) -> None:
    for spec in STAGES.values():
        app.command(spec.command)(stage_command(spec))
