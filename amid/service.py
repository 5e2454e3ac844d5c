"""The composition root: builds everything from the validated config and owns every task.

Nothing imports this module. It wires AMI sessions -> router -> sink runners -> sinks, serves
metrics and health, talks to systemd, and handles signals:

* SIGTERM / SIGINT: stop reading (Logoff), drain the sink queues within ``shutdown_timeout``,
  spool what is left for spooled sinks, exit 0. A second signal exits at once.
* SIGHUP: re-read and validate the config; keep the old one if the new one is invalid;
  otherwise apply it without losing queued or spooled events (sinks added, removed, changed;
  servers reconnect only if their settings changed); file sinks reopen their files.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amid import __version__
from amid.ami.aio import cancel_and_wait
from amid.ami.protocol import Event
from amid.ami.session import AMIClient, ConnectionState, SessionSettings, StateChange
from amid.ami.stats import SessionStats
from amid.config import Config, ConfigError, DeprecatedKeys, ServerConfig, SinkConfig, load
from amid.logs import set_log_level
from amid.metrics import ReloadStats
from amid.records import Record, format_iso
from amid.router import EventFilter, Router
from amid.sinks.base import Reopenable, ReportsCounters
from amid.sinks.delivery import RunnerSettings, SinkRunner, SinkStats
from amid.sinks.registry import SinkTypes
from amid.sinks.spool import Spool

log = logging.getLogger("amid.service")

STATUS_INTERVAL = 5.0
RELOAD_DRAIN_TIMEOUT = 2.0
# A second SIGTERM/SIGINT sooner than this after the first is the same request to stop (drain);
# a later one exits at once.
STOP_SIGNAL_REPEAT_WINDOW = 1.0


def load_config(path: str | None, environ: Mapping[str, str], types: SinkTypes) -> Config:
    """Load the config, validating each sink's own keys with its type's model from ``types``
    (a type whose plugin failed to load is "not available: <why>", not "unknown")."""
    return load(path, environ, sink_option_models=types.option_models)


def config_warnings(config: Config) -> list[str]:
    """What is valid but probably not meant (``check-config`` prints it, ``run`` logs it)."""
    if not config.sinks:
        return ["no sinks configured: events are received and counted, and go nowhere"]
    return [f"sinks[{index}] ({sink.name}): {message}"
            for index, sink in enumerate(config.sinks) if isinstance(sink.options, DeprecatedKeys)
            for message in sink.options.deprecations()]


def _client_for(server: ServerConfig, *, on_events, on_state, stats: SessionStats,
                initial_epoch: int = 0, outage_since: float | None = None) -> AMIClient:
    settings = SessionSettings(
        host=server.host, port=server.port, username=server.username, secret=server.secret,
        auth=server.auth, tls=server.tls.settings if server.tls else None, name=server.name,
        events=server.events, filters=server.filters, ping_interval=server.ping_interval,
        ping_timeout=server.ping_timeout, connect_timeout=server.connect_timeout,
        action_timeout=server.action_timeout, reconnect_min_delay=server.reconnect.min_delay,
        reconnect_max_delay=server.reconnect.max_delay,
        reconnect_stable_after=server.reconnect.stable_after,
        max_message_bytes=server.max_message_bytes, max_malformed=server.max_malformed,
        malformed_window=server.malformed_window, read_coalesce=server.read_coalesce)
    client = AMIClient.from_settings(settings, stats=stats, initial_epoch=initial_epoch,
                                     outage_since=outage_since)
    client.add_batch_listener(on_events)
    client.on_state_change(on_state)
    return client


@dataclass
class _SinkSlot:
    config: SinkConfig
    sink: Any
    runner: SinkRunner
    filter: EventFilter


class Daemon:
    """One running amid: sessions, router, sinks, HTTP server, systemd notifications."""

    def __init__(self, config: Config, *, config_path: str | None, environ: Mapping[str, str],
                 types: SinkTypes | None = None, notifier: Any = None,
                 install_signals: bool = True, status_interval: float = STATUS_INTERVAL,
                 reload_drain_timeout: float = RELOAD_DRAIN_TIMEOUT,
                 log_pinned: frozenset[str] = frozenset(),
                 spool_factory: Callable[..., Spool] = Spool) -> None:
        self.config = config
        self._spool_factory = spool_factory  # how sinks' spools are opened (tests inject)
        self._log_pinned = log_pinned  # log keys set on the command line: reloads keep them
        self.config_path = config_path
        self.environ = environ
        self.types = types or SinkTypes.discover()
        self.notifier = notifier
        self.router = Router(run_id=secrets.token_hex(4))
        self.clients: dict[str, AMIClient] = {}
        self._retired: dict[str, tuple[int, float]] = {}  # server -> (last epoch, closed at)
        self.server_stats: dict[str, SessionStats] = {}
        self.sinks: dict[str, _SinkSlot] = {}
        self._replaced_stats: dict[str, SinkStats] = {}  # see reload: shown while handing over
        self.reload_stats = ReloadStats()  # outcome of the last reload, for the metrics
        self.http: Any = None  # amid.http.HealthServer once started (imported lazily)
        self._install_signal_handlers = install_signals
        self.status_interval = status_interval
        # How long a reload lets a replaced or removed sink deliver what it holds before its
        # leftovers are handed to its successor (capped by shutdown_timeout).
        self.reload_drain_timeout = reload_drain_timeout
        self._stop = asyncio.Event()
        self._stop_signal_at: float | None = None  # monotonic time of the first stop signal
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        # The settings each running session was started with (reload compares against these).
        self._server_configs: dict[str, ServerConfig] = {}
        self._reload_lock = asyncio.Lock()
        self._signals: list[int] = []
        self.ready = asyncio.Event()
        self.started = asyncio.Event()  # the sinks are built and routed to (before any server)
        # What every session hands its events to; stop_after() puts a limit in front.
        self._events_listener: Callable[[list[Event]], None] = self.router.on_events
        self._rate_last = (time.monotonic(), 0)
        self._heartbeat = time.monotonic()

    # ------------------------------------------------------------------ building

    def _spool_dir(self, sink: SinkConfig) -> Path:
        return Path(self.config.state_dir) / "spool" / sink.name

    def _build_sink(self, cfg: SinkConfig) -> _SinkSlot:
        spool_dir = self._spool_dir(cfg)
        if cfg.overflow != "spool" and any(spool_dir.glob("*.seg")):
            log.warning("sink %s: %s holds events spooled by an earlier configuration; they are "
                        "delivered only with overflow: spool", cfg.name, spool_dir,
                        extra={"sink": cfg.name})
        factory = self.types.factory(cfg.type)
        sink = factory(cfg.name, cfg.options)
        runner = SinkRunner(sink, RunnerSettings.of_sink(cfg, spool_dir),
                            spool_factory=self._spool_factory)
        return _SinkSlot(cfg, sink, runner, EventFilter(cfg.include, cfg.exclude, cfg.match))

    def _update_routes(self) -> None:
        self.router.set_routes([(slot.filter, slot.runner) for slot in self.sinks.values()])

    def _start_client(self, server: ServerConfig) -> AMIClient:
        # Nothing is consumed before the client exists: a client that cannot be built (a
        # missing CA file) must leave the retired epoch for the next attempt, or record ids
        # (server:run:epoch:seq) would repeat.
        epoch, outage_since = self._retired.get(server.name, (0, None))
        stats = self.server_stats.get(server.name) or SessionStats()
        client = _client_for(server, on_events=self._events_listener, on_state=self._on_state,
                             stats=stats, initial_epoch=epoch, outage_since=outage_since)
        self._retired.pop(server.name, None)
        self.server_stats[server.name] = stats
        self.clients[server.name] = client
        self._server_configs[server.name] = server
        return client

    def _on_state(self, change: StateChange) -> None:
        if self.notifier is not None and self.ready.is_set() and change.state in (
                ConnectionState.CONNECTED, ConnectionState.DISCONNECTED):
            self.notifier.status(self.status_line())
        if change.state is ConnectionState.CONNECTED and change.gap_start is not None:
            end = change.at
            # Consumers learn what they may have missed while the session was down.
            self.router.emit(Record.synthetic(
                id=f"{change.server}:{self.router.run_id}:{change.epoch}:gap",
                server=change.server, name="AmidGap", received_at=end, epoch=change.epoch,
                fields={"Server": change.server, "Start": format_iso(change.gap_start),
                        "End": format_iso(end), "Seconds": f"{change.gap_seconds or 0.0:.3f}"}))

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the process exit code."""
        loop = asyncio.get_running_loop()
        if self._install_signal_handlers:
            self._install_signals(loop)
        try:
            for err in self.types.errors:
                log.error("%s", err)
            for warning in config_warnings(self.config):
                log.warning("%s", warning)
            try:
                for cfg in self.config.sinks:
                    slot = self._build_sink(cfg)
                    self.sinks[cfg.name] = slot
                    await slot.runner.start()
                await self._start_http()
            except OSError as exc:  # SpoolLocked and ssl.SSLError are OSErrors too
                # A spool or listen address we cannot use: say which, exit non-zero, no traceback.
                log.error("cannot start: %s", exc)
                return 1
            self._update_routes()
            self.started.set()
            _tune_gc()
            for server in self.config.servers:
                await self._start_client(server).start()
            self._spawn(self._announce_ready(), "ready")
            self._spawn(self._status_loop(), "status")
            if self.notifier is not None and self.notifier.watchdog_interval:
                self._spawn(self._watchdog_loop(self.notifier.watchdog_interval), "watchdog")
            await self._stop.wait()
        finally:
            await self._shutdown()
            self._restore_signals(loop)
        return 0

    def request_stop(self) -> None:
        self._stop.set()

    def stop_after(self, count: int) -> None:
        """Route only the first ``count`` AMI events to the sinks, then stop (draining what
        they hold): ``amid demo --count N``. Call before :meth:`run`."""
        if self.clients:
            raise RuntimeError("stop_after() must be called before run()")
        self._events_listener = _FirstEvents(count, self.router.on_events, self.request_stop)
        if count <= 0:
            self.request_stop()

    async def sink_disabled(self, name: str) -> None:
        """Return once sink ``name`` is disabled for good: its peer said stop (a file sink on
        stdout: the reader of the pipe went away, ``amid demo | head``). Waits for start-up."""
        await self.started.wait()
        await self.sinks[name].runner.disabled.wait()

    def sink_is_disabled(self, name: str) -> bool:
        slot = self.sinks.get(name)
        return slot is not None and slot.runner.disabled.is_set()

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"amid-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start_http(self) -> None:
        address = self.config.http.address
        if address is None:
            return
        from amid.http import HealthServer
        from amid.metrics import AmidCollector, build_registry
        collector = AmidCollector(
            servers=lambda: list(self.server_stats.items()),
            sinks=lambda: [(name, slot.config.type, self._replaced_stats.get(name, slot.runner.stats),
                            slot.sink) for name, slot in self.sinks.items()],
            config=self.reload_stats, version=__version__)
        registry = build_registry(collector)
        assert self.config.http.listen is not None  # an address means a listen text
        self.http = HealthServer(self.config.http.listen, registry, live=self.liveness,
                                 ready=self.readiness)
        http = self.http
        try:
            await http.start()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OSError(exc.errno, f"http.listen {self.config.http.listen}: {reason}") from exc

    async def _announce_ready(self) -> None:
        timeout = self.config.start_timeout
        logged_in, _ = await asyncio.gather(
            asyncio.gather(*(client.wait_connected(timeout) for client in self.clients.values())),
            asyncio.gather(*(slot.runner.wait_opened(timeout) for slot in self.sinks.values())))
        if self._stopping:  # shut down while waiting: nothing to announce
            return
        if not all(logged_in):
            log.warning("not every server logged in within start_timeout (%ss); reporting ready anyway",
                        timeout)
        # Asked of the sinks running now: a reload meanwhile may have replaced some.
        unopened = [name for name, slot in self.sinks.items() if not slot.runner.sink_opened]
        if unopened:
            log.warning("sinks not opened within start_timeout (%ss): %s; their events queue "
                        "until they open; reporting ready anyway", timeout, ", ".join(unopened))
        self.ready.set()
        if self.notifier is not None:
            self.notifier.ready(self.status_line())

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.status_interval)
            self._heartbeat = time.monotonic()
            if all(slot.runner.stats.queue_events == 0 for slot in self.sinks.values()):
                _release_free_memory()
            if self.notifier is not None:
                self.notifier.status(self.status_line())

    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._heartbeat = time.monotonic()
            if self.reader_progressing():
                self.notifier.watchdog()
            else:
                log.error("AMI reader made no progress: withholding the systemd watchdog ping")

    def reader_progressing(self) -> bool:
        """True while every session either answers pings or is (re)connecting."""
        now = time.time()
        for client in self.clients.values():
            if client.state is not ConnectionState.CONNECTED:
                continue  # the supervisor is retrying; a restart would not help
            last = client.stats.last_pong_time
            allowance = 2 * (client.ping_interval + client.ping_timeout) + 5
            if last is not None and now - last > allowance:
                return False
        return True

    def status_line(self) -> str:
        now = time.monotonic()
        total = sum(s.events_total for s in self.server_stats.values())
        then, before = self._rate_last
        rate = (total - before) / (now - then) if now > then else 0.0
        self._rate_last = (now, total)
        parts = []
        up = [n for n, c in self.clients.items() if c.connected]
        down = [n for n, c in self.clients.items() if not c.connected]
        if up:
            parts.append("connected to " + ", ".join(up))
        if down:
            parts.append("connecting to " + ", ".join(down))
        parts.append(f"{rate:.0f} events/s")
        for name, slot in self.sinks.items():
            state = slot.runner.stats.state
            if state != "ok":
                parts.append(f"{name}: {state}")
        return "; ".join(parts)

    def liveness(self) -> tuple[bool, dict]:
        stale = time.monotonic() - self._heartbeat
        ok_loop = stale < 3 * self.status_interval + 5
        progressing = self.reader_progressing()
        return ok_loop and progressing, {"event_loop": "ok" if ok_loop else f"stalled {stale:.0f}s",
                                         "reader": "ok" if progressing else "no ping answered"}

    def readiness(self) -> tuple[bool, dict]:
        checks: dict[str, Any] = {}
        ok = True
        for name, client in self.clients.items():
            if client.connected:
                checks[f"server:{name}"] = "logged in"
            else:
                ok = False
                checks[f"server:{name}"] = f"{client.state.value}: {client.last_error or 'connecting'}"
        for name, slot in self.sinks.items():
            stats = slot.runner.stats
            if not slot.runner.accepting:
                ok = False
                checks[f"sink:{name}"] = f"not accepting ({stats.state}: " \
                                         f"{stats.last_error or 'queue full'})"
            elif not slot.runner.sink_opened:
                # Never opened since it was (re)built: most often a wrong path, address or
                # permission, not an outage that the queue is there to ride out.
                ok = False
                checks[f"sink:{name}"] = f"not opened yet ({stats.state}: " \
                                         f"{stats.last_error or 'opening'})"
            else:
                checks[f"sink:{name}"] = stats.state
        if self._stopping:
            ok = False
            checks["daemon"] = "shutting down"
        return ok, checks

    async def _shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        async with self._reload_lock:  # a reload in progress finishes first, then nothing starts
            await self._shut_down()

    async def _shut_down(self) -> None:
        if self.notifier is not None:
            self.notifier.stopping()
        deadline = time.monotonic() + self.config.shutdown_timeout
        log.info("shutting down: logging off, draining sinks (up to %.0fs)", self.config.shutdown_timeout)
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)
        remaining = max(0.5, deadline - time.monotonic())
        results = await asyncio.gather(*(slot.runner.close(remaining) for slot in self.sinks.values()),
                                       return_exceptions=True)
        for slot, result in zip(self.sinks.values(), results, strict=False):
            if isinstance(result, BaseException):
                log.error("sink %s did not close cleanly: %s", slot.config.name, result,
                          extra={"sink": slot.config.name})
        for task in list(self._tasks):
            task.cancel()  # all asked at once, then awaited: none waits for another's cleanup
        for task in list(self._tasks):
            await cancel_and_wait(task)  # a task's own failure was logged by itself
        if self.http is not None:
            await self.http.close()
        received = ", ".join(f"{name} {stats.events_total}" for name, stats in self.server_stats.items())
        delivered = ", ".join(
            f"{name} sent {slot.runner.stats.sent_total}, spooled {slot.runner.stats.spool_events}, "
            f"dropped {sum(slot.runner.stats.dropped_total.values())}"
            for name, slot in self.sinks.items())
        log.info("stopped; events received: %s; sinks: %s", received or "none", delivered or "none")

    # ------------------------------------------------------------------ signals and reload

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        if sys.platform == "win32":
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
            self._signals.append(sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        self._signals.append(signal.SIGHUP)

    def _restore_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_stop_signal(self, sig: int) -> None:
        now = time.monotonic()
        if self._stop.is_set():
            # `timeout -s TERM`, a supervisor and its process group, or a double Ctrl-C can
            # deliver two signals at once: within STOP_SIGNAL_REPEAT_WINDOW they are one request.
            if self._stop_signal_at is not None and now - self._stop_signal_at < STOP_SIGNAL_REPEAT_WINDOW:
                log.info("%s received again within %gs: still draining", signal.Signals(sig).name,
                         STOP_SIGNAL_REPEAT_WINDOW)
                return
            log.warning("second %s: exiting at once", signal.Signals(sig).name)
            logging.shutdown()
            os._exit(128 + sig)
        log.info("%s received", signal.Signals(sig).name)
        self._stop_signal_at = now
        self._stop.set()

    def _on_reload_signal(self) -> None:
        self._spawn(self.reload(), "reload")

    async def reload(self) -> bool:
        """Re-read the config and apply it; False (old config kept) if it is invalid."""
        async with self._reload_lock:
            if self.notifier is not None:
                self.notifier.reloading()
            try:
                try:
                    if self._stopping:
                        return False
                    new = await asyncio.to_thread(load_config, self.config_path, self.environ, self.types)
                except ConfigError as exc:
                    log.error("reload refused, keeping the running config:\n%s", exc)
                    self.reload_stats.record(False)
                    return False
                if self._stopping:  # a stop arrived while the file was read
                    return False
                problems = await self._apply(new)
                if problems:
                    log.error("reload only partly applied:\n%s", "\n".join(problems))
                    self.reload_stats.record(False)
                    return False
                log.info("configuration reloaded")
                self.reload_stats.record(True)
                return True
            finally:
                if self.notifier is not None:
                    if self.ready.is_set():
                        self.notifier.ready(self.status_line())
                    else:  # a SIGHUP before start-up finished must not announce READY early
                        self.notifier.status(self.status_line())

    async def _apply(self, new: Config) -> list[str]:
        """Apply a valid config; return what could not be applied (empty when all was).

        A step that fails never stops the others: each sink and each server is compared with
        what actually runs (its own config), not with the previous file, so a later reload
        retries what failed. A sink that cannot be built keeps its previous settings; one whose
        runner cannot start (its spool) is routed to anyway, within its queue bounds, reported
        not ready, and started again in the background."""
        problems: list[str] = []
        old = self.config
        self.config = new
        if new.http != old.http:
            log.warning("http: the new metrics/health settings take effect at the next restart")
        if new.log.format != old.log.format and "format" not in self._log_pinned:
            log.warning("log: the new format takes effect at the next restart")
        if new.log.level != old.log.level and "level" not in self._log_pinned:
            log.warning("log level is now %s", new.log.level)  # said before it may be muted
            set_log_level(new.log.level)
        drain = min(self.reload_drain_timeout, new.shutdown_timeout)
        # Sinks. New runners are routed to *before* the old ones are detached, so no event
        # reaches a closed runner; what an old runner still holds is then handed to its
        # successor (a spooled sink's events wait in the spool it reopens).
        new_sinks = {s.name: s for s in new.sinks}
        replaced: list[tuple[_SinkSlot, _SinkSlot]] = []
        removed: list[_SinkSlot] = []
        added: list[_SinkSlot] = []
        slots: dict[str, _SinkSlot] = {}
        for name, slot in self.sinks.items():
            cfg = new_sinks.get(name)
            if cfg is None:
                removed.append(slot)
                continue
            fresh = None
            if cfg != slot.config:
                fresh = self._try_build_sink(cfg, problems, "keeping its previous settings")
            if fresh is None:  # kept as it runs: SIGHUP reopens its file (logrotate)
                slots[name] = slot
                self._reopen(slot, problems)
            else:
                replaced.append((slot, fresh))
                slots[name] = fresh
        for name, cfg in new_sinks.items():
            if name not in slots:
                fresh = self._try_build_sink(cfg, problems, "not added")
                if fresh is not None:
                    added.append(fresh)
                    slots[name] = fresh
        # Until a replacement has taken over its predecessor's counters, metrics show the
        # predecessor's (still moving) ones: a scrape in between must not see them drop.
        for old_slot, _ in replaced:
            self._replaced_stats[old_slot.config.name] = old_slot.runner.stats
        self.sinks = slots
        self._update_routes()
        for old_slot, fresh in replaced:
            name = old_slot.config.name
            leftovers = await old_slot.runner.detach(drain)
            fresh.runner.continue_counters(old_slot.runner.stats)
            if isinstance(old_slot.sink, ReportsCounters):  # a sink's own counters never go back
                fresh.runner.stats.carried_operations.update(old_slot.sink.sink_counters())
            try:
                await self._start_runner(fresh, problems)
            finally:
                fresh.runner.adopt(leftovers)
                self._replaced_stats.pop(name, None)
            log.info("sink %s reconfigured (%d queued events handed over)", name, len(leftovers),
                     extra={"sink": name})
        for slot in removed:
            name = slot.config.name
            leftovers = await slot.runner.detach(drain)
            if leftovers:
                log.warning("sink %s removed with %d undelivered events: dropped", name,
                            len(leftovers), extra={"sink": name})
            else:
                log.info("sink %s removed", name, extra={"sink": name})
        for slot in added:
            if await self._start_runner(slot, problems):
                log.info("sink %s added", slot.config.name, extra={"sink": slot.config.name})
        # Servers: reconnect only those whose settings changed. A replacement continues the
        # epochs of its predecessor (record ids stay unique) and reports the switch as a gap.
        new_servers = {s.name: s for s in new.servers}
        for name, running in list(self._server_configs.items()):
            if new_servers.get(name) == running:
                continue
            if name in new_servers:
                log.info("server %s: settings changed: reconnecting (reported as a gap)", name,
                         extra={"server": name})
            else:
                log.info("server %s removed: logging off", name, extra={"server": name})
            client = self.clients.pop(name)
            del self._server_configs[name]
            try:
                await client.close()
            except Exception as exc:
                problems.append(f"server {name}: closing the old session failed: {exc}")
            self._retired[name] = (client.epoch, time.time())
            if name not in new_servers:
                self.server_stats.pop(name, None)
        for name, server in new_servers.items():
            if name not in self.clients:
                try:
                    await self._start_client(server).start()
                except Exception as exc:
                    problems.append(f"server {name}: {exc}")
        return problems

    @staticmethod
    def _reopen(slot: _SinkSlot, problems: list[str]) -> None:
        if isinstance(slot.sink, Reopenable):
            try:
                slot.sink.reopen()
            except Exception as exc:
                problems.append(f"sink {slot.config.name}: reopen failed: {exc}")

    def _try_build_sink(self, cfg: SinkConfig, problems: list[str], outcome: str) -> _SinkSlot | None:
        try:
            return self._build_sink(cfg)
        except Exception as exc:
            problems.append(f"sink {cfg.name}: {exc}; {outcome}")
            return None

    async def _start_runner(self, slot: _SinkSlot, problems: list[str]) -> bool:
        try:
            await slot.runner.start()
            return True
        except OSError as exc:
            problems.append(f"sink {slot.config.name}: cannot start ({exc}); retrying in the "
                            f"background, events are queued meanwhile")
            self._spawn(self._keep_starting(slot), f"start-{slot.config.name}")
            return False

    async def _keep_starting(self, slot: _SinkSlot) -> None:
        """Start a runner that failed to start on reload, with capped backoff, for as long as it
        is the sink's current runner."""
        delay = 1.0
        name = slot.config.name
        while True:
            await asyncio.sleep(delay)
            try:
                # Under the reload lock: a reload cannot replace (and detach) this runner
                # while it is half-way through opening its spool.
                async with self._reload_lock:
                    if self._stopping or self.sinks.get(name) is not slot:
                        return
                    await slot.runner.start()
            except OSError as exc:
                log.warning("sink %s still cannot start: %s", name, exc, extra={"sink": name})
                delay = min(delay * 2, 60.0)
                continue
            except RuntimeError:  # closed meanwhile
                return
            log.info("sink %s started", name, extra={"sink": name})
            return


class _FirstEvents:
    """A batch listener that passes the first ``count`` events on, then asks for a stop."""

    def __init__(self, count: int, route: Callable[[list[Event]], None], stop: Callable[[], None]) -> None:
        self.remaining = count
        self._route, self._stop = route, stop

    def __call__(self, events: list[Event]) -> None:
        if self.remaining <= 0:
            return
        taken = events[:self.remaining]
        self.remaining -= len(taken)
        self._route(taken)
        if self.remaining == 0:
            self._stop()


def _tune_gc() -> None:
    """Every event allocates a handful of objects that reference counting frees (none forms a
    cycle); the cyclic collector's default gen-0 threshold (700 allocations) would scan them
    thousands of times a second for nothing. Start-up objects are frozen out of its scans."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)


def _glibc_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def _release_free_memory() -> None:
    """Give memory freed after a burst (a queue that filled up and drained) back to the OS.

    Two things keep it otherwise. CPython's free lists (tuples, floats, lists, dicts) hold
    thousands of spare objects scattered over its 1 MiB arenas, and one such object keeps a
    whole arena mapped: a full collection empties the free lists (measured: 25 of 58 arenas
    released after an 80k-event burst). And glibc keeps what CPython frees in its heap:
    malloc_trim returns it. Called at the status tick when every queue is empty; the start-up
    objects are frozen out of the collector, so the collection takes about 2 ms.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


async def run_daemon(config_path: str | None, environ: Mapping[str, str], *, notifier: Any = None,
                     config: Config | None = None, types: SinkTypes | None = None,
                     log_pinned: frozenset[str] = frozenset()) -> int:
    """``log_pinned``: the ``log`` keys the command line set (``level``, ``format``); a reload
    leaves those alone."""
    types = types or SinkTypes.discover()
    if config is None:
        config = load_config(config_path, environ, types)
    daemon = Daemon(config, config_path=config_path, environ=environ, types=types, notifier=notifier,
                    log_pinned=log_pinned)
    return await daemon.run()
