"""One error type for bad data-side input, and the CLI convention around it."""

import sys


class DataError(ValueError):
    """Bad input on the data side: the message names the file, flag or value at fault."""


def run_cli(main, argv=None) -> int:
    """Run a tool's ``main(argv)``; a DataError becomes ``error: ...`` on stderr and exit 2."""
    try:
        main(argv)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
