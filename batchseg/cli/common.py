"""What every command shares: exit codes, the argument parser, storage flags, and the checks
that turn a storage or path problem into one line that names the fix."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import textwrap
from collections.abc import Iterator
from typing import Any

from batchseg.config import ConfigError, StorageConfig
from batchseg.errors import user_error

DESCRIPTION = "`batchseg run | export FORMAT | eval | render | review | push TOOL`: annotate images, then get the results out."

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_FAILURE_BUDGET, EXIT_LOCKED, EXIT_STALLED = 0, 1, 2, 3, 4, 5

EXIT_CODES = """exit codes:
  0  done
  1  failed while working (the message, or a traceback, says where)
  2  bad flag, config or input: one line on stderr names the fix; nothing was started
"""
RUN_EXIT_CODES = EXIT_CODES + """\
  3  the run finished, but more images failed than max_failed_fraction allows
     (OUTPUT/runs/RUN_ID.failed/part-*.jsonl list them)
  4  another run is writing to the same output (it holds OUTPUT/_lease.json)
  5  stalled: no image finished for stall_deadline_s while Ray waited for resources no node
     had and no autoscaler could add; what was written stays, the next run resumes
     (docs/cluster.md: reading the stall line)
"""

RESULTS_HELP = "a run's output folder (or its annotations/ folder), local or s3://"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; "(default: X)" after options that have one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or "%(default)" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with a short usage line on errors and "did you mean" for a mistyped flag.

    Leaf commands reject unknown arguments themselves, so the error names the command the
    user typed (`batchseg run: error: ...`), not the top-level program.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not self._subcommands():
            self.error(self._unrecognized(extras))
        return namespace, extras

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"usage: {self._short_usage()}\n{self.prog}: error: {message}\n")

    def _subcommands(self) -> argparse._SubParsersAction | None:
        return next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)

    def _short_usage(self) -> str:
        words = [self.prog, "[options]"]
        for action in self._get_positional_actions():
            if action.choices and isinstance(action, argparse._SubParsersAction):
                words.append("{" + ",".join(action.choices) + "} ...")
            else:
                words.append(action.metavar or action.dest.upper())
        return " ".join(words) + f"   (`{self.prog} --help` lists every option)"

    def _unrecognized(self, extras: list[str]) -> str:
        message = f"unrecognized arguments: {' '.join(extras)}"  # argparse's own wording
        flag = next((x.split("=", 1)[0] for x in extras if x.startswith("-")), None)
        options = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        match = difflib.get_close_matches(flag, options, n=1, cutoff=0.6) if flag else []
        return message + (f"; did you mean {match[0]}?" if match else "")


def command(commands: argparse._SubParsersAction, name: str, help: str, description: str = "",
             epilog: str = EXIT_CODES) -> argparse.ArgumentParser:
    """A subcommand whose --help shows its description, options with defaults, and exit codes."""
    return commands.add_parser(name, help=help, description=wrap(description or help), epilog=epilog)


def wrap(text: str, width: int = 88) -> str:
    """Fill prose paragraphs to `width`; leave paragraphs with indented lines (tables) as written."""
    return "\n\n".join(p if "\n " in p else textwrap.fill(p, width, break_on_hyphens=False) for p in text.split("\n\n"))


def storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint-url", metavar="URL",
                        help="S3-compatible endpoint (MinIO, Ceph, R2, ...); AWS_ENDPOINT_URL_S3 works too")
    parser.add_argument("--s3-anon", action="store_true", help="anonymous S3 access (public buckets)")


def storage_config(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(endpoint_url=args.s3_endpoint_url, anon=args.s3_anon)


@contextlib.contextmanager
def reaching(label: str) -> Iterator[None]:
    """Turn a storage or path error inside the block into ConfigError("LABEL: fix")."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as e:
        line = user_error(e)
        if line is None:
            raise
        raise ConfigError(f"{label}: {line}") from None


def results_of(args: argparse.Namespace):
    from batchseg.store.results import open_results

    with reaching(f"RESULTS {args.results}"):
        return open_results(args.results, storage_config(args).options(args.results),
                            reviews=getattr(args, "reviews", False))


def pair(item: str) -> tuple[str, str]:
    prefix, sep, url = item.partition("=")
    if not sep or not prefix:
        raise ConfigError(f"bad --url-map {item!r}; write it as PREFIX=URL")
    return prefix, url


def require_file(flag: str, uri: str, storage: StorageConfig) -> None:
    from fsspec.core import url_to_fs

    with reaching(f"{flag} {uri}"):
        fs, path = url_to_fs(uri, **storage.options(uri))
        if not fs.isfile(path):
            kind = "a folder" if fs.isdir(path) else "not found"
            raise ConfigError(f"{flag} {uri}: {kind}; give the path of a file")


def require_writable_file(flag: str, uri: str, storage: StorageConfig) -> None:
    """Fail before any work when `uri` cannot become a file: a folder there, or a file where a
    folder of its path should be."""
    from fsspec.core import url_to_fs

    with reaching(f"{flag} {uri}"):
        fs, path = url_to_fs(uri, **storage.options(uri))
        if fs.isdir(path):
            raise ConfigError(f"{flag} {uri}: a folder; give the path of a file, such as {uri.rstrip('/')}/eval.json")
        parent = path.rsplit("/", 1)[0]
        while parent and parent != path and not fs.exists(parent):
            path, parent = parent, parent.rsplit("/", 1)[0]
        if parent and fs.isfile(parent):
            raise ConfigError(f"{flag} {uri}: {parent} is a file, not a folder; give another path")
