"""The ``crackmap`` command: starts a run's Prefect API server before anything else loads.

The embedded API server (``flows.embedded``) is a new interpreter importing Prefect's
server: ~5 s.  Started here, before this process imports the pipeline and Prefect and
loads the model, it starts on another core during that work instead of after it.  Only
the commands that run flows start one, and ``flows.embedded.start_api_server`` hands
it to the command; a command that then stops early (bad input) stops it unused.
A Ctrl-C while the command is still loading ends it with one line, not a traceback.
The commands that run flows also run with rarer garbage collections (``flows.embedded.GC_THRESHOLD``),
and every command exits without the interpreter's final one (``gc.freeze``).
"""

from __future__ import annotations

import gc
import sys

from flows.embedded import GC_THRESHOLD, quiet_prefect_environment, start_api_server  # stdlib only

FLOW_COMMANDS = frozenset({"run", "reprocess"})


def command_of(args: list[str]) -> str | None:
    """The subcommand: the first argument that is not an option (the group takes only flags)."""
    return next((a for a in args if not a.startswith("-")), None)


def main() -> None:
    args = sys.argv[1:]
    command = command_of(args)
    try:
        if command in FLOW_COMMANDS and not {"--help", "-h"} & set(args):
            gc.set_threshold(*GC_THRESHOLD)
            group_flags = set(args[: args.index(command)])  # crackmap -v run ...
            quiet_prefect_environment(verbose=bool(group_flags & {"-v", "--verbose"}))
            start_api_server()
        from flows.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while the command was still loading: an early server stops at exit
        print("interrupted before the command started; nothing was written", file=sys.stderr)
        sys.exit(130)
    try:
        cli_main()
    finally:
        # Everything the command opened is closed by now.  Frozen objects are left out of the
        # interpreter's last garbage collection at exit, which otherwise walks every object
        # Prefect, pydantic and the pipeline created: 1.2 s of a one-scene run here.
        gc.freeze()


if __name__ == "__main__":
    main()
