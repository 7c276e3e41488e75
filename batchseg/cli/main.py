"""`batchseg COMMAND`: the parser of every command, and the exit codes of failures."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable

from batchseg.cli.common import DESCRIPTION, EXIT_BAD_INPUT, EXIT_LOCKED, RUN_EXIT_CODES, Parser
from batchseg.cli.evaluation import add_acceptance, add_eval, add_render, add_review
from batchseg.cli.exports import add_export
from batchseg.cli.pull import add_pull
from batchseg.cli.push import add_push
from batchseg.cli.run import add_run
from batchseg.cli.train import add_train
from batchseg.config import ConfigError
from batchseg.errors import user_error

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_run, add_export, add_eval, add_render, add_review,
                                                               add_push, add_pull, add_acceptance, add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="batchseg", description=DESCRIPTION, epilog=RUN_EXIT_CODES)
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND",
                                     help="`batchseg COMMAND --help` for its options")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # batchseg's own progress notes at INFO; other libraries only when they warn.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("batchseg").setLevel(logging.INFO)
    # Import-time notices from detectron2's dependencies; they would bury a one-line error.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f"batchseg: {e}", file=sys.stderr)
        return _exit_code(e)
    except KeyboardInterrupt as e:  # its text, where a command gives one, says what the same command does next
        print(f"batchseg: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `batchseg review ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # 128 + SIGPIPE, what a shell reports for a producer stopped this way
    except Exception as e:
        line = user_error(e)  # a storage or path problem surfacing where no check caught it
        if line is None:
            raise
        print(f"batchseg: {line}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _exit_code(e: ConfigError) -> int:
    """4 for OutputLocked, 2 for any other ConfigError. Matched by name: importing the lease
    module here would import Ray into every command."""
    return EXIT_LOCKED if any(c.__name__ == "OutputLocked" for c in type(e).__mro__) else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
