"""Former home of the routing policies, now :mod:`pdkit.routing.policies` and :mod:`pdkit.routing.types`.

Kept only for ``pdkit.frontend.settings`` (``policy_names``), which another change owns; remove once it
imports from :mod:`pdkit.routing.policies`.
"""

from pdkit.routing.policies import KV_AWARE, LeastLoaded, RoundRobin, make_policy, policy_names, register_policy
from pdkit.routing.types import Policy, RequestContext

__all__ = [
    "KV_AWARE", "LeastLoaded", "Policy", "RequestContext", "RoundRobin", "make_policy", "policy_names",
    "register_policy",
]  # fmt: skip
