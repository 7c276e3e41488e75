"""`batchseg run | export FORMAT | eval | render | review | push TOOL`: annotate images, then get the results out.

Every command checks its flags and inputs before it starts work; a problem the user can fix
ends with exit code 2 and one line on stderr that names the fix.

One module per verb family (run, exports, push, evaluation); `common` holds what they share.
Adding a command: write `add_NAME(commands)` in its module, building its parser with
`common.command(...)` and setting `handler=` to a function `(args) -> exit code`, then list it
in main.COMMANDS. An export format is the same with `exports._export_format(...)`, listed in
EXPORT_FORMATS.
"""

from batchseg.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
