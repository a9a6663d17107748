"""Encoder autoscaling that sees merged requests one by one.

Serve's default policy scales on the calls its handles have in flight. The ingress merges small
requests into one encoder call (``deployments.coalescing``), so under one-text load a replica
holding forty requests shows two calls. Each encoder replica therefore reports the requests it
holds (``Encoder.record_autoscaling_stats``), and this policy is Serve's queue-length policy on
the larger of that count and Serve's own.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

#: The custom metric each encoder replica reports: requests queued in its batcher or running.
REQUESTS_HELD = "requests_held"
#: ``autoscaling_config.policy.policy_function`` of the encoder deployments, unless a config sets its own.
MERGED_REQUESTS_POLICY = "deployments.autoscaling:merged_requests_policy"


def merged_requests_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Replicas for the requests in flight at ``target_ongoing_requests`` each, the requests counted
    one by one (merged ones too); Serve applies the bounds, factors and delays."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    held = sum((ctx.aggregated_metrics or {}).get(REQUESTS_HELD, {}).values())
    return max(ctx.total_num_requests, held) / ctx.config.get_target_ongoing_requests(), {}
