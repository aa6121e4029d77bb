"""The --help of every entry point: the module docstring as written, and each option's default."""

import argparse
import copy
import os


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


# Warnings of megatron-core (and of torch under it) that say nothing to a user of this project:
# its CPU fallbacks are the tested path, the cuda-graph note is about a default megatron-core
# sets itself, and the deprecations are of torch APIs megatron-core's checkpointing calls.
_NOISE = (
    (r".*Transformer Engine and Apex are not installed", UserWarning),
    (r".*Apex is not installed", UserWarning),
    (r"full scope is deprecated", UserWarning),
    (r"`load_state_dict` is deprecated", FutureWarning),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)


def quiet_dependencies() -> None:
    """The one place that filters what megatron-core and transformers print without news for
    the user: the warnings above, megatron-core's INFO lines, transformers' progress bars and
    advisory messages. Every entry point calls it first."""
    import logging
    import os
    import sys
    import warnings

    for message, category in _NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines drown the progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


def no_such_dir(flag: str, path: str):
    """"FLAG PATH: no such directory" when PATH is not a folder, else None. Entry points check their
    input folders with it before importing megatron-core or transformers (about 10 s on 2 cores),
    so that a mistyped path is reported at once; the library functions check again for callers."""
    return None if os.path.isdir(path) else f"{flag} {path}: no such directory"
