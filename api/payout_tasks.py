"""The node's own payout work: scheduled runs (`LEDGER_PAYOUT_SCHEDULE`) and the start-up resume.

- **Scheduled runs** (finance/payout_schedule.py): at each scheduled time the node makes an "all
  due" run with `payout_date` = the UTC date of the run, through the same code as `POST
  /finance/payout/run` (`payout_routes.run_payouts`: holdbacks released first, one batch per date,
  multisig gating, idempotent resume), as principal `node:payout-schedule`. A second run on the same
  date resumes that date's batch; a run that would plan no payout creates no batch. `every:<s>`
  waits `s` seconds after each run ends. Metrics: `ledger_payout_schedule_last_run_timestamp_seconds`,
  `ledger_payout_schedule_runs_total`, `ledger_payout_schedule_failures_total`; a failing run is
  logged and the next scheduled one tries again.
- **Resume at start-up**: batches left `open` (payouts planned or pending when the node stopped) are
  run again in the background as `node:payout-resume`; re-running never pays twice (ids and provider
  idempotency keys derive from the payout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import date, datetime
from typing import Any, Final

from aiohttp import web

from api.finance_routes import FINANCE
from api.payout_routes import resume_open_batches, run_payouts
from api.services import SERVICES
from finance import payout_schedule, payouts
from ledger.errors import ErrorCode, LedgerError

log = logging.getLogger(__name__)

PAYOUT_SCHEDULE: Final[web.AppKey[payout_schedule.Schedule]] = web.AppKey("payout_schedule")
"""The node's payout schedule; absent: no scheduled runs."""
SCHEDULE_ACTOR: Final = "node:payout-schedule"
RESUME_ACTOR: Final = "node:payout-resume"
RESUME_ATTEMPTS: Final = 6
RESUME_BACKOFF_S: Final = 0.5
RESUME_BACKOFF_CAP_S: Final = 8.0


async def scheduled_run(app: web.Application, due_at: datetime) -> tuple[int, dict[str, Any]] | None:
    """One scheduled "all due" run for the UTC date of `due_at`; its (status, answer), None when
    there was nothing to pay or the run failed (counted and logged)."""
    metrics = app[SERVICES].metrics
    now = app[FINANCE].clock()
    metrics.payout_schedule_runs.inc()
    metrics.payout_schedule_last_run.set(now.timestamp())
    day = payout_schedule.payout_date(due_at, now)
    try:
        return await run_payouts(
            app, date.fromisoformat(day), payouts.batch_id_for(day), None, SCHEDULE_ACTOR, skip_empty=True
        )
    except Exception:
        metrics.payout_schedule_failures.inc()
        log.exception("scheduled payout run for %s failed; the next scheduled run tries again", day)
        return None


async def _schedule_loop(app: web.Application, schedule: payout_schedule.Schedule) -> None:
    while True:
        now = app[FINANCE].clock()
        due_at = payout_schedule.next_run(schedule, now)
        await asyncio.sleep(max(0.0, (due_at - now).total_seconds()))
        await scheduled_run(app, due_at)


async def _resume(app: web.Application) -> None:
    """Resume open batches; a retryable failure (a shard still settling after start-up) is tried
    again with backoff, `RESUME_ATTEMPTS` times in all."""
    for attempt in range(1, RESUME_ATTEMPTS + 1):
        try:
            resumed = await resume_open_batches(app, RESUME_ACTOR)
        except LedgerError as exc:
            if exc.code == ErrorCode.SERVICE_UNAVAILABLE and attempt < RESUME_ATTEMPTS:
                await asyncio.sleep(payouts.backoff_s(attempt, RESUME_BACKOFF_S, RESUME_BACKOFF_CAP_S))
                continue
            log.warning("payout batches left open were not resumed: %s (run them again by hand)", exc.message)
        except Exception:
            log.exception("payout batches left open were not resumed (run them again by hand)")
        else:
            if resumed:
                log.info("resumed payout batches left open: %s", ", ".join(resumed))
        return


async def payout_tasks(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx`: resume open batches once, run the schedule while the app serves; both are
    cancelled at shutdown."""
    tasks = [asyncio.create_task(_resume(app), name="payout-resume")]
    schedule = app.get(PAYOUT_SCHEDULE)
    if schedule is not None:
        log.info("payout schedule: %s", payout_schedule.describe(schedule))
        tasks.append(asyncio.create_task(_schedule_loop(app, schedule), name="payout-schedule"))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
