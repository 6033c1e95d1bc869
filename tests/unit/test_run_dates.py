"""Run dates: one spelling per day, and a scheduled night's date on its schedule's calendar across
both daylight-saving changes of 2026 (Europe/Berlin: 29 March and 25 October)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from schemas.rundate import RunDateError, parse_run_date, run_date_at

BERLIN = ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    ("berlin_day", "utc_moment"),
    [
        ("2026-03-28", "2026-03-28T00:00:00+00:00"),  # CET: 01:00 is 00:00 UTC
        ("2026-03-29", "2026-03-29T00:00:00+00:00"),  # the night of the change (before 02:00)
        ("2026-03-30", "2026-03-29T23:00:00+00:00"),  # CEST: 01:00 is 23:00 UTC the day before
        ("2026-07-15", "2026-07-14T23:00:00+00:00"),  # every summer night
        ("2026-10-24", "2026-10-23T23:00:00+00:00"),
        ("2026-10-25", "2026-10-24T23:00:00+00:00"),  # still CEST at 01:00; CET from 03:00
        ("2026-10-26", "2026-10-26T00:00:00+00:00"),  # CET again
    ],
)
def test_a_nightly_0100_berlin_schedule_gets_the_berlin_date(
    berlin_day: str, utc_moment: str
) -> None:
    scheduled = datetime.fromisoformat(utc_moment)
    assert scheduled.astimezone(BERLIN).hour == 1  # the cron `0 1 * * *` Europe/Berlin fired
    assert run_date_at(scheduled, "Europe/Berlin") == berlin_day


def test_every_night_of_2026_gets_its_own_date() -> None:
    nights = [
        datetime(2026, 1, 1, 1, tzinfo=BERLIN) + timedelta(days=d) for d in range(365)
    ]  # wall-clock 01:00 each day, as the scheduler fires it
    dates = [run_date_at(n.astimezone(UTC), "Europe/Berlin") for n in nights]
    assert len(set(dates)) == 365 and dates[0] == "2026-01-01" and dates[-1] == "2026-12-31"


@pytest.mark.parametrize(
    "text", ["2024-1-5", "20240105", "2024/01/05", "2024-02-30", "yesterday", ""]
)
def test_a_run_date_has_one_spelling(text: str) -> None:
    with pytest.raises(RunDateError, match="YYYY-MM-DD"):
        parse_run_date(text)
    assert parse_run_date(" 2024-01-05 ") == "2024-01-05"


def test_the_cli_refuses_a_misspelt_run_date_before_starting_anything(
    capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    from flows.cli import main

    assert main(["run", "examples/ticket-triage.yaml", "--run-date", "2024-1-5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'2024-1-5' is not a date written YYYY-MM-DD" in err
    assert "Traceback" not in err
