"""Fault injection: which lines fail and how, and which API calls answer with an error.

Line faults are a pure function of (seed, the batch's creation sequence number, custom_id), so a restart
replays them exactly and the same custom_id retried in a new batch draws again. Faults limited to a number
of `times` keep their counters here, in memory: they start at zero when the server starts and when that
fault setting is set again through `configure`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from emulator.config import LINE_FAULT_KINDS, FaultConfig, LineFaultKind, RouteFault
from emulator.ids import unit
from emulator.responders import Reply, context_length_error, http_error

TIMEOUT_ERROR = {
    "code": "request_timeout",
    "message": "The underlying call to the model timed out.",
}
EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
CANCELLED_ERROR = {
    "code": "batch_cancelled",
    "message": "The batch was cancelled before this request executed.",
}


@dataclass
class FaultCounters:
    forced_used: dict[str, int] = field(default_factory=dict)
    expire_used: int = 0
    stuck_used: int = 0
    route_seen: dict[int, int] = field(default_factory=dict)

    def reset(self, paths: set[str]) -> None:
        everything = "faults" in paths and not any(p.startswith("faults.") for p in paths)
        if everything or "faults.forced_line_failures" in paths:
            self.forced_used.clear()
        if everything or "faults.expire_after_fraction" in paths:
            self.expire_used = 0
        if everything or "faults.stuck_in_finalizing" in paths:
            self.stuck_used = 0
        if everything or "faults.route_faults" in paths:
            self.route_seen.clear()


def choose_line_fault(
    faults: FaultConfig, counters: FaultCounters, seed: int, seq: int, custom_id: str
) -> tuple[LineFaultKind | None, bool]:
    """(the fault kind for this line or None, whether it came from forced_line_failures)."""
    forced = faults.forced_line_failures.get(custom_id)
    if forced is not None:
        used = counters.forced_used.get(custom_id, 0)
        if forced.times is None or used < forced.times:
            counters.forced_used[custom_id] = used + 1
            return forced.kind, True
    if faults.line_failure_rates:
        draw = unit(seed, seq, custom_id, "line-fault")
        threshold = 0.0
        for kind in LINE_FAULT_KINDS:
            threshold += faults.line_failure_rates.get(kind, 0.0)
            if draw < threshold:
                return kind, False
    return None, False


def fault_outcome(
    kind: LineFaultKind, endpoint: str, model: str, prompt_tokens: int, window: int
) -> Reply | dict[str, str]:
    """An HTTP-level failure (a Reply) or a non-HTTP one (an `error` object)."""
    if kind == "request_timeout":
        return dict(TIMEOUT_ERROR)
    if kind == "rate_limit_exceeded":
        return http_error(
            429,
            f"Rate limit reached for {model} in organization org-emulator on requests per min "
            "(RPM): Limit 1000, Used 1000, Requested 1. Please try again in 60ms. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            "requests",
            None,
            "rate_limit_exceeded",
        )
    if kind == "server_error":
        return http_error(
            500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            "server_error",
        )
    return context_length_error(endpoint, max(prompt_tokens, window + 1), window)


def take_route_fault(faults: FaultConfig, counters: FaultCounters, route: str) -> RouteFault | None:
    """Count this call against every route fault for `route`; the first one that fires, if any."""
    fired: RouteFault | None = None
    for index, fault in enumerate(faults.route_faults):
        if fault.route != route:
            continue
        seen = counters.route_seen.get(index, 0) + 1
        counters.route_seen[index] = seen
        if fired is None and fault.skip < seen <= fault.skip + fault.times:
            fired = fault
    return fired


def route_fault_body(fault: RouteFault) -> dict[str, Any]:
    if fault.status == 429:
        message, type, code = (
            "Rate limit reached for requests. Please try again later.",
            "requests",
            "rate_limit_exceeded",
        )
    else:
        message, type, code = (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        )
    return {"error": {"message": message, "type": type, "param": None, "code": code}}
