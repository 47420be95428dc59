"""/metrics for `zep serve --workers N`: every worker's own exposition, fetched over its channel at
scrape time, with a `worker` label on each sample, beside the supervisor's series about the workers.

A worker that does not answer within SCRAPE_TIMEOUT is left out of that scrape (its
`zep_worker_scraped` is 0), so one stuck worker never holds up the scrape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from zep.supervisor import Supervisor, Worker

log = logging.getLogger("zep.supervisor")

SCRAPE_TIMEOUT = 2.0  # for each worker's answer to a scrape (asked in parallel)


class WorkerMetrics:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._families: list[Metric] = []
        self._scraped: dict[str, bool] = {}

    async def refresh(self) -> None:
        """Ask every worker for its metrics; keep what came back for the exposition that follows."""
        workers = self.supervisor.workers
        texts = await asyncio.gather(*(self._scrape(worker) for worker in workers))
        merged: dict[str, Metric] = {}
        for worker, text in zip(workers, texts):
            families = _parse(text) if text is not None else None
            self._scraped[worker.spec.name] = families is not None
            for family in families or ():
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
                into.samples.extend(sample._replace(labels={**sample.labels, "worker": worker.spec.name})
                                    for sample in family.samples)
        self._families = list(merged.values())

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._families
        workers = self.supervisor.workers
        yield GaugeMetricFamily("zep_workers", "Worker processes configured", value=len(workers))
        yield GaugeMetricFamily("zep_workers_up", "Worker processes running and ready",
                                value=sum(w.ready is not None for w in workers))
        restarts = CounterMetricFamily("zep_worker_restarts", "Times a worker was started again after it ended",
                                       labels=["worker"])
        scraped = GaugeMetricFamily("zep_worker_scraped", "1: the worker's metrics are in this scrape; 0: it was "
                                    f"not ready or did not answer within {SCRAPE_TIMEOUT:g} s", labels=["worker"])
        for worker in workers:
            restarts.add_metric([worker.spec.name], worker.restarts)
            scraped.add_metric([worker.spec.name], int(self._scraped.get(worker.spec.name, False)))
        yield restarts
        yield scraped

    async def _scrape(self, worker: Worker) -> str | None:
        answer = await self.supervisor.ask(worker, {"scrape": True}, SCRAPE_TIMEOUT)
        text = answer.get("metrics") if answer is not None else None
        if not isinstance(text, str):
            if worker.ready is not None:
                log.warning("%s did not answer the scrape within %g s: left out of it", worker, SCRAPE_TIMEOUT)
            return None
        return text


def _parse(text: str) -> list[Metric] | None:
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:
        log.warning("a worker's metrics could not be parsed: left out of the scrape")
        return None
