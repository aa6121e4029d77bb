"""The --help of every entry point: the module docstring as written, and each option's default."""

import argparse
import copy


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """RawDescriptionHelpFormatter that appends "(default: X)" to every option with a default,
    with or without a help text (argparse's ArgumentDefaultsHelpFormatter skips options that
    have no help). Flags (store_true) and None defaults show none: their help says what happens."""

    def _format_action(self, action):
        if (action.option_strings and action.nargs != 0 and not action.required
                and action.default not in (None, argparse.SUPPRESS) and "%(default)" not in (action.help or "")):
            action = copy.copy(action)
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
        return super()._format_action(action)
