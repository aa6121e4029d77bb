"""Method policies. Importing this package registers every method: each module in it is
imported, so a new method is a new file here and nothing else."""
import importlib
import pkgutil

from megatron_effmlm.plans.base import POLICIES, Flag, Policy, all_flags, get_policy, register  # noqa: F401

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
