"""`pgveil serve --workers N --metrics`: one endpoint for the whole process group, summed at scrape time."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path

import psycopg

from proxy.embedded import free_port
from proxy.metrics import MeteredConnection, Metrics
from proxy.metrics_workers import aggregate, fetch, worker_socket
from proxy.server import MAX_RESTARTS
from tests.proxy_harness import spawn_serve, wait_until
from tests.test_audit_e2e import sample, scrape
from tests.test_metrics import CLIENT, GuardStandIn


def total(text: str, name: str, **labels: str) -> float:
    """Sum of every series of `name` whose labels include `labels`."""
    found = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(2) or "") for k, v in labels.items()):
            found += float(match.group(3))
    return found


async def _some_statements(metrics: Metrics, count: int) -> None:
    from proxy.connection_policy import Outcome

    metered = MeteredConnection(GuardStandIn(), metrics)
    await metered.on_startup({}, CLIENT)
    for _ in range(count):
        await metered.on_query("SELECT 1")
        await metered.on_complete(Outcome(rows=1, sqlstate=None, upstream_seconds=0.003))
    await metered.on_query("SELECT a.ssn FROM a JOIN b USING (ssn)")
    metrics.policy_loaded_now("v1", "/etc/my policy.yaml")  # a space inside a label value


async def test_one_workers_exposition_comes_back_unchanged_and_two_are_summed() -> None:
    first, second = Metrics(), Metrics()
    await _some_statements(first, 3)
    await _some_statements(second, 5)
    alone = first.exposition()
    assert aggregate([alone.decode()]) == alone  # names, labels, types, HELP and order as for N=1
    both = aggregate([alone.decode(), second.exposition().decode()]).decode()
    assert total(both, "pgveil_statements_total", decision="allow") == 8
    assert total(both, "pgveil_statements_total", decision="refuse") == 2
    assert total(both, "pgveil_statement_upstream_seconds_count") == 8
    assert sample(both, "pgveil_statement_upstream_seconds_bucket", le="0.005") == 8
    assert sample(both, "pgveil_connections_total", result="accepted") == 2
    # an info (1 per version loaded), not a count
    assert sample(both, "pgveil_policy_info", source="/etc/my policy.yaml", version="v1") == 1
    assert both.count("# TYPE pgveil_statements_total counter") == 1
    loaded = [float(line.split()[1]) for text in (alone, second.exposition())
              for line in text.decode().splitlines() if line.startswith("pgveil_policy_loaded_timestamp")]
    assert sample(both, "pgveil_policy_loaded_timestamp_seconds") == min(loaded)  # the oldest policy


def worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return sorted(int(pid) for pid in children)


def test_one_scrape_of_the_parent_counts_the_statements_of_every_worker(upstream) -> None:
    port = free_port()
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0", "--metrics",
                     f"127.0.0.1:{port}", "--workers", "2") as served:
        line = served.wait_for_line("metrics on http://")
        directory = line.rsplit(" in ", 1)[1].strip().rstrip(")")
        connections, per_connection = 16, 3
        for attempt in range(connections):  # SO_REUSEPORT spreads these over both workers
            with psycopg.connect(served.dsn(), autocommit=True) as conn:
                for n in range(per_connection):
                    value = attempt * 10 + n
                    assert conn.execute("select %s::int", [value]).fetchone() == (value,)
        status, text = scrape(port)
        assert status == 200
        assert text.count("# TYPE pgveil_statements_total counter") == 1  # once, not once per worker
        assert sample(text, "pgveil_connections_total", result="accepted") == connections
        assert total(text, "pgveil_statements_total") == connections * per_connection
        assert sample(text, "pgveil_workers") == 2 and sample(text, "pgveil_workers_scraped") == 2
        own = [fetch(worker_socket(directory, i), "/metrics") for i in range(2)]
        counts = [sample(answer[1].decode(), "pgveil_connections_total", result="accepted")
                  for answer in own if answer is not None]
        assert len(counts) == 2 and all(counts), f"both workers served clients: {counts}"
        assert sum(counts) == connections
        assert scrape(port, "/healthz") == (200, "ok\n") and scrape(port, "/readyz") == (200, "ready\n")

        victim = worker_pids(served.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: sample(scrape(port)[1], "pgveil_worker_restarts_total") == 1, "the restart")
        served.wait_for_line("exited unexpectedly")
        wait_until(lambda: scrape(port, "/healthz")[0] == 200, "the new worker to answer")
        pids = worker_pids(served.process.pid)
        assert len(pids) == 2 and victim not in pids
        status, text = scrape(port)
        assert status == 200 and sample(text, "pgveil_workers_scraped") == 2
        for _ in range(8):  # both workers serve again
            with psycopg.connect(served.dsn(), autocommit=True) as conn:
                assert conn.execute("select 'after the restart'").fetchone() == ("after the restart",)
        served.terminate()
        assert served.wait() == 0
    assert not Path(directory).exists()  # the private sockets go with the parent


def test_a_worker_that_does_not_answer_is_visible_and_the_scrape_still_answers(upstream) -> None:
    port = free_port()
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0", "--metrics",
                     f"127.0.0.1:{port}", "--workers", "2") as served:
        stopped = worker_pids(served.process.pid)[1]
        os.kill(stopped, signal.SIGSTOP)  # alive but not answering (a wedged event loop)
        try:
            status, text = scrape(port)
            assert status == 200 and sample(text, "pgveil_workers_scraped") == 1
            status, body = scrape(port, "/healthz")
            assert status == 503 and "not answering" in body
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert scrape(port, "/healthz") == (200, "ok\n")
        served.terminate()
        assert served.wait() == 0


def test_signals_reach_the_workers_while_the_parent_is_being_scraped(upstream) -> None:
    """The parent's scrape threads must not swallow SIGHUP/SIGTERM meant for its main thread."""
    port = free_port()
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0", "--metrics",
                     f"127.0.0.1:{port}", "--workers", "2") as served:
        stop = threading.Event()

        def scrape_all_the_time() -> None:
            while not stop.is_set():
                scrape(port)

        scrapers = [threading.Thread(target=scrape_all_the_time) for _ in range(3)]
        for thread in scrapers:
            thread.start()
        try:
            for hangup in range(1, 31):
                served.process.send_signal(signal.SIGHUP)
                wait_until(lambda n=hangup: served.stderr.count("SIGHUP: nothing to reload") == 2 * n,
                           f"both workers to get SIGHUP number {hangup}", timeout=10)
        finally:
            stop.set()
            for thread in scrapers:
                thread.join()
        served.terminate()
        assert served.wait() == 0


def test_a_worker_that_keeps_dying_stops_the_group_instead_of_restarting_forever(upstream) -> None:
    with spawn_serve("--upstream", upstream.dsn(), "--listen", "127.0.0.1:0", "--workers", "2") as served:
        for death in range(1, MAX_RESTARTS + 1):
            victim = worker_pids(served.process.pid)[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda v=victim: len(pids := worker_pids(served.process.pid)) == 2 and v not in pids,
                       f"restart number {death}")
            with psycopg.connect(served.dsn(), autocommit=True) as conn:
                assert conn.execute("select 1").fetchone() == (1,)
        os.kill(worker_pids(served.process.pid)[0], signal.SIGKILL)
        assert served.wait() == 1
        assert f"{MAX_RESTARTS + 1} unexpected exits in" in served.stderr
