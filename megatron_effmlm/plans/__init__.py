"""Method policies. Importing this package registers every built-in method."""
from megatron_effmlm.plans.base import POLICIES, Policy, get_policy, register  # noqa: F401
from megatron_effmlm.plans import mlm3, random_ltd, sctd, token_drop, vanilla  # noqa: F401
