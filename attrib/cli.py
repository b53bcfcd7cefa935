"""The `attrib` command line: a thin layer over the stage functions.

Every failure ends as one line `error: …` on stderr (exit 2 for bad usage or input,
1 for a failure at run time) unless `--debug` asks for the traceback. Options can
come from a recipe (`--config FILE.toml`); flags on the command line override it.
"""

from __future__ import annotations

import os
import sys

import typer

from attrib import __version__, runtime
from attrib.commands import demo, inspect, report, stages
from attrib.errors import AttribError, InputError

app = typer.Typer(
    name="attrib",
    help="Which training documents made a language model say what it said (EK-FAC influence functions).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("inspect")(inspect.inspect_model)
stages.register(app)  # fit-factors, prefilter, query-gradients, query, self-influence, index, combine: attrib.options
app.command("report")(report.report)
app.command("top")(report.top)
app.command("demo")(demo.demo)

GLOBAL_FLAGS = ("--debug", "--quiet")


def _version(value: bool) -> None:
    if value:
        print(f"attrib {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: str = typer.Option(
        None, "--config", help="Recipe TOML with defaults for the command's options (flags override it)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of failures."),
    quiet: bool = typer.Option(False, "--quiet", help="Hide progress bars and status lines."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Global options; `--config`, `--debug` and `--quiet` may also follow the command name.

    `--debug` and `--quiet` are read by `main` (they hold for the whole run, as a runtime session)."""
    if config and ctx.invoked_subcommand:
        from attrib.recipes import load_recipe

        group = typer.main.get_command(app)
        ctx.default_map = {ctx.invoked_subcommand: load_recipe(config, ctx.invoked_subcommand, group)}


def _hoist_global_options(argv: list[str]) -> list[str]:
    """Move --config/--debug/--quiet given after the command name in front of it."""
    hoisted, rest = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in GLOBAL_FLAGS:
            hoisted.append(arg)
        elif arg == "--config" and index + 1 < len(argv):
            hoisted += argv[index : index + 2]
            index += 1
        elif arg.startswith("--config="):
            hoisted.append(arg)
        else:
            rest.append(arg)
        index += 1
    return hoisted + rest


MEMORY_SETTINGS = (
    "lower --tokens-per-batch, use --layers-per-pass or --queries-per-pass to hold fewer layers or queries at "
    "once, or track fewer layers with --modules"
)


def out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), a CPU allocator failure, or Python's MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _click_exceptions():
    """click's exceptions: typer >= 0.26 vendors click as the private typer._click; else click itself."""
    try:
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click import exceptions
    return exceptions


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app and turn every failure into `error: …` and an exit code.

    Under torchrun / accelerate (WORLD_SIZE > 1) the process ends with `os._exit` once the
    command has finished, its files are written and the process group is destroyed: gloo's
    worker threads can otherwise abort the interpreter's finalization (SIGABRT, "terminate
    called without an active exception"; pytorch/pytorch#179291), failing a complete run.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _main(argv)
    try:
        _main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> None:
    click_exceptions = _click_exceptions()
    no_args_is_help = getattr(click_exceptions, "NoArgsIsHelpError", ())  # click >= 8.2 (typer's vendored click)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # CSV and hub corpora: our bars, not theirs
    argv = _hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    command = typer.main.get_command(app)
    session = runtime.session(caller="cli", quiet="--quiet" in argv, debug=debug)
    try:
        with session:
            status = command.main(argv, prog_name="attrib", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    except no_args_is_help:
        sys.exit(2)  # the help text is already printed
    except click_exceptions.UsageError as exc:
        if debug:
            raise
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except AttribError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if out_of_memory(exc):
            print(f"error: out of memory ({first or type(exc).__name__}); {MEMORY_SETTINGS}", file=sys.stderr)
            sys.exit(1)
        print(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
    if status == 130:  # typer turns Ctrl-C into exit status 130
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
    if isinstance(status, int) and status != 0:
        sys.exit(status)


__all__ = ["app", "main", "InputError"]
