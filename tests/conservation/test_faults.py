"""Faults against a real ``amid run`` process; after each, the oracle accounts for every event.

Each test is bounded (a few seconds of streaming at a few thousand events/s). Tests that need
work not yet merged were marked ``xfail``; none is now.
"""

from __future__ import annotations

import asyncio
import random
import resource
import signal
from pathlib import Path

import pytest

from .harness import Harness

RATE = 2000.0   # numbered events per second per session


async def test_graceful_stop_delivers_every_event_to_every_sink(tmp_path: Path) -> None:
    async with Harness(tmp_path, stream_rate=RATE) as h:
        await h.start_amid()
        await h.wait_sent(2000)
        assert await h.stop_amid() == 0
        reports = h.check()
        assert h.sim.stats.streams[1].end == "logoff"
        assert all(r.delivered == h.sim.stats.streams[1].sent for r in reports.values())


async def test_sigterm_under_load_leaves_the_rest_in_the_spool(tmp_path: Path) -> None:
    async with Harness(tmp_path, stream_rate=RATE) as h:
        h.write_config(shutdown_timeout="1s")
        await h.start_amid()
        await h.wait_sent(500)
        await h.webhook.go_away()               # the webhook's records pile up
        await h.wait_sent(2500)
        assert await h.stop_amid(settle=False) == 0   # drains what it can, spools the rest
        await h.webhook.come_back()
        await h.restart_amid()                  # delivers the spool first
        assert await h.stop_amid() == 0
        h.check()


async def test_sighup_under_load_loses_nothing(tmp_path: Path) -> None:
    async with Harness(tmp_path, stream_rate=RATE) as h:
        await h.start_amid()
        for round_ in range(3):
            await h.wait_sent(600 * (round_ + 1))
            h.sinks = {"webhook": {"batch": {"max_wait": f"{5 + round_}ms"}}}  # a real change
            h.write_config()
            h.amid.signal(signal.SIGHUP)
        await h.wait_sent(2400)
        assert await h.stop_amid() == 0
        h.check()


async def test_kill9_at_random_moments_during_a_webhook_outage(tmp_path: Path) -> None:
    rng = random.Random(1313)
    async with Harness(tmp_path, stream_rate=RATE) as h:
        await h.start_amid()
        await h.wait_sent(300)
        await h.webhook.go_away()
        for _ in range(3):
            await asyncio.sleep(rng.uniform(0.2, 0.8))   # a random moment of the outage
            await h.kill_amid()
            await h.restart_amid()
        await h.wait_sent(300, session=4)
        await h.webhook.come_back()
        assert await h.stop_amid() == 0
        h.check()


async def test_kill9_while_draining_a_backlog(tmp_path: Path) -> None:
    rng = random.Random(1314)
    small_batches = {"batch": {"max_events": 50, "max_wait": "5ms"}}  # a drain of many requests
    async with Harness(tmp_path, stream_rate=RATE, sinks={"webhook": small_batches}) as h:
        await h.start_amid()
        await h.wait_sent(300)
        for _ in range(2):
            await h.webhook.go_away()
            await h.wait_sent(h.sim.stats.streams[max(h.sim.stats.streams)].sent + 3000)
            answered = len(h.webhook.requests)
            await h.webhook.come_back()
            await h.webhook.wait_for_requests(answered + 1)       # draining has begun
            await asyncio.sleep(rng.uniform(0.0, 0.05))
            await h.kill_amid()
            await h.restart_amid()
        assert await h.stop_amid() == 0
        h.check()


@pytest.mark.parametrize("fault", ["5xx", "429", "hang", "down"])
async def test_webhook_faults_lose_nothing(tmp_path: Path, fault: str) -> None:
    from http_receiver import Reply

    async with Harness(tmp_path, stream_rate=RATE) as h:
        await h.start_amid()
        await h.wait_sent(500)
        held = []
        if fault == "5xx":
            h.webhook.reply(*[Reply(503)] * 3, Reply(500), Reply(502))
            await h.webhook.wait_for_requests(len(h.webhook.requests) + 5)
        elif fault == "429":
            h.webhook.reply(Reply(429, headers={"Retry-After": "1"}), Reply(429))
            await h.webhook.wait_for_requests(len(h.webhook.requests) + 3)
        elif fault == "hang":
            h.webhook.stall()                   # requests hang past amid's 1 s timeout
            await h.wait_sent(h.sim.stats.streams[1].sent + 2 * int(RATE))
            held = [r for r in h.webhook.requests if r.status is None]
            h.webhook.release()                 # answered late: amid already gave up on them
        else:
            await h.webhook.go_away()
            await h.wait_sent(h.sim.stats.streams[1].sent + int(RATE))
            await h.webhook.come_back()
        await h.wait_sent(h.sim.stats.streams[1].sent + 500)
        assert await h.stop_amid() == 0
        # A request amid abandoned and the receiver answered later is a duplicate in flight.
        h.check(max_duplicates=sum(len(r.records) for r in held))


async def test_syslog_tcp_receiver_reset_loses_nothing(tmp_path: Path) -> None:
    async with Harness(tmp_path, stream_rate=RATE) as h:
        await h.start_amid()
        for round_ in range(5):
            await h.wait_sent(400 * (round_ + 1))
            await h.syslog.reset(down_for=0.1)
        await h.wait_sent(2400)
        assert await h.stop_amid() == 0
        # What the receiver's TCP acknowledged and the crash lost counts as delivered (see
        # SyslogReceiver.reset); what amid resent may arrive twice.
        h.check(max_duplicates=5 * 500)


async def test_ami_peer_gone_mid_message(tmp_path: Path) -> None:
    async with Harness(tmp_path, stream_rate=RATE) as h:
        await h.start_amid()
        await h.wait_sent(800)
        (session,) = h.sim.sessions
        session.faults.close_mid_message_after = 0
        await h.wait_session(2)                 # amid reconnected
        await h.wait_sent(500, session=2)
        assert await h.stop_amid() == 0
        first = h.sim.stats.streams[1]
        assert first.end == "close_mid_message" and first.half_sent == first.sent + 1
        h.check()


async def test_half_open_peer_is_left_and_nothing_read_is_lost(tmp_path: Path) -> None:
    quick_pings = {"ping_interval": "300ms", "ping_timeout": "500ms"}
    async with Harness(tmp_path, stream_rate=RATE, server=quick_pings) as h:
        await h.start_amid()
        await h.wait_sent(800)
        (session,) = h.sim.sessions
        session.faults.stall = session.faults.ignore_pings = True   # silent, socket open
        await h.wait_session(2)                 # amid's ping timed out; it reconnected
        await h.wait_sent(500, session=2)
        assert await h.stop_amid() == 0
        assert h.sim.stats.streams[1].end == "half_open"
        h.check()


async def test_garbage_after_login_drops_the_session_and_loses_nothing_read(tmp_path: Path) -> None:
    rng = random.Random(1315)
    async with Harness(tmp_path, stream_rate=RATE) as h:
        await h.start_amid()
        await h.wait_sent(800)
        (session,) = h.sim.sessions
        async with asyncio.timeout(5):          # a peer that keeps sending garbage, until amid
            while 2 not in h.sim.stats.streams:  # gives up on it and comes back
                if not session.faults.garbage:
                    session.faults.garbage = rng.randbytes(512)
                await asyncio.sleep(0.005)
        await h.wait_sent(300, session=2)
        assert await h.stop_amid() == 0
        h.check()


async def test_asterisk_restart_loses_nothing(tmp_path: Path) -> None:
    async with Harness(tmp_path, stream_rate=RATE) as h:
        await h.start_amid()
        await h.wait_sent(800)
        await h.sim.restart(down_for=0.3)
        await h.wait_session(2)
        await h.wait_sent(500, session=2)
        assert await h.stop_amid() == 0
        assert h.sim.stats.streams[1].end == "restart"
        h.check()


async def test_every_dropped_record_is_in_the_drop_counter(tmp_path: Path) -> None:
    overrides = {"overflow": "drop_oldest", "queue": {"max_events": 300}}
    async with Harness(tmp_path, stream_rate=RATE, sinks={"webhook": overrides}) as h:
        await h.start_amid()
        await h.wait_sent(300)
        await h.webhook.go_away()
        await h.wait_sent(h.sim.stats.streams[1].sent + int(RATE))
        await h.webhook.come_back()
        await h.wait_sent(h.sim.stats.streams[1].sent + 300)
        assert await h.stop_amid() == 0
        reports = h.check(expect_drops=True)
        assert reports["webhook"].missing > 0 and reports["file"].missing == 0


async def test_disk_full_and_back_leaves_whole_lines_written_once(tmp_path: Path) -> None:
    # "Disk full" without privileges: amid's file size limit (RLIMIT_FSIZE, set from outside
    # with prlimit) stops its writes mid-line with EFBIG, as ENOSPC would; then it is lifted.
    # The limit holds for every file amid writes, so no sink spools here: the file sink's own
    # writes meet it first (a full disk under the spool is tests/test_disk_full.py's).
    in_memory = {"overflow": "drop_oldest"}
    sinks = {"file": in_memory, "webhook": in_memory, "syslog": in_memory}
    async with Harness(tmp_path, stream_rate=RATE, sinks=sinks) as h:
        await h.start_amid()
        await h.wait_sent(800)
        hard = resource.prlimit(h.amid.pid, resource.RLIMIT_FSIZE)[1]
        size = h.events_file.stat().st_size
        resource.prlimit(h.amid.pid, resource.RLIMIT_FSIZE, (size + 10_000, hard))
        async with asyncio.timeout(10):            # until the file stopped growing: full
            while h.events_file.stat().st_size < size + 10_000 - 2_000:
                await asyncio.sleep(0.02)
        await h.wait_sent(h.sim.stats.streams[1].sent + int(RATE))
        resource.prlimit(h.amid.pid, resource.RLIMIT_FSIZE, (hard, hard))
        await h.wait_sent(h.sim.stats.streams[1].sent + 500)
        assert await h.stop_amid() == 0
        h.check()
