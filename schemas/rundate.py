"""A run's logical date: `YYYY-MM-DD`, spelled one way only (a second spelling would be a second,
paid, run of the same day), and taken from a schedule in the schedule's own timezone (a nightly run
at 01:00 Europe/Berlin belongs to that Berlin date, on both sides of a daylight-saving change)."""

from __future__ import annotations

import re
from datetime import date, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class RunDateError(ValueError):
    """A run date or timezone that cannot be used; the message says how to write it."""


def parse_run_date(text: str) -> str:
    """The run date, strictly `YYYY-MM-DD` and a real day."""
    value = text.strip()
    try:
        if DATE.fullmatch(value):
            return date.fromisoformat(value).isoformat()
    except ValueError:
        pass
    raise RunDateError(
        f"--run-date {text!r} is not a date written YYYY-MM-DD (for example "
        f"{date.today().isoformat()}): use four-digit years and two-digit months and days"
    )


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise RunDateError(
            f"unknown timezone {name!r}: use an IANA name such as UTC or Europe/Berlin"
        ) from None


def run_date_at(moment: datetime, timezone: str) -> str:
    """The date of `moment` (timezone-aware) on the calendar of `timezone`."""
    return moment.astimezone(zone(timezone)).date().isoformat()
