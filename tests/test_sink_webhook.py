"""The webhook sink against a real aiohttp receiver on 127.0.0.1 (see tests/http_receiver.py)."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import ssl
import subprocess
import time
from pathlib import Path

import pydantic
import pytest
from http_receiver import HttpReceiver, Reply, verify_signature
from sink_contract import SinkContract, make_records

from amid.sinks import webhook
from amid.sinks.base import Sink, SinkDisabled, SinkError, SinkRejected
from amid.sinks.delivery import RunnerSettings, SinkRunner

WAIT = 10.0  # bound on every wait in this file (seconds); never reached when things work


@pytest.fixture
async def receiver():
    async with HttpReceiver() as server:
        yield server


@pytest.fixture
async def open_sink():
    """``await open_sink(url, **options)``: a started webhook sink, closed after the test."""
    sinks: list[webhook.WebhookSink] = []

    async def factory(url: str, **options) -> webhook.WebhookSink:
        sink = webhook.create("hook", webhook.Options(url=url, **options))
        sinks.append(sink)
        async with asyncio.timeout(WAIT):
            await sink.start()
        return sink

    yield factory
    for sink in sinks:
        async with asyncio.timeout(WAIT):
            await sink.close()


async def send(sink: webhook.WebhookSink, batch) -> None:
    async with asyncio.timeout(WAIT):
        await sink.send(batch)


async def send_error(sink: webhook.WebhookSink, batch) -> SinkError:
    """Send and return the SinkError it raised (failing the test if it did not raise one)."""
    with pytest.raises(SinkError) as caught:
        await send(sink, batch)
    return caught.value


def whsec(key: bytes) -> str:
    return "whsec_" + base64.b64encode(key).decode()


# -- bodies and headers ---------------------------------------------------------------------------

async def test_json_body_is_an_array_of_the_records(receiver, open_sink):
    sink = await open_sink(receiver.url)
    batch = make_records(3)
    await send(sink, batch)

    [request] = await receiver.wait_for_requests(1, timeout=WAIT)
    assert request.method == "POST" and request.path == "/hook"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("amid/")
    assert request.body == b"[" + b",".join(r.json for r in batch) + b"]"
    assert json.loads(request.body) == [r.data for r in batch]
    assert "webhook-signature" not in request.headers  # no secret, no signing


async def test_ndjson_body_is_one_record_per_line(receiver, open_sink):
    sink = await open_sink(receiver.url, body="ndjson")
    batch = make_records(3)
    await send(sink, batch)

    [request] = await receiver.wait_for_requests(1, timeout=WAIT)
    assert request.headers["content-type"] == "application/x-ndjson"
    assert request.body.split(b"\n") == [r.json for r in batch] + [b""]
    assert request.records == [r.data for r in batch]


async def test_configured_headers_are_sent_and_may_override_defaults(receiver, open_sink):
    sink = await open_sink(receiver.url, headers={"Authorization": "Bearer t0ken",
                                                  "Content-Type": "application/vnd.amid+json"})
    await send(sink, make_records(1))

    [request] = await receiver.wait_for_requests(1, timeout=WAIT)
    assert request.headers["authorization"] == "Bearer t0ken"
    assert request.headers.getall("content-type") == ["application/vnd.amid+json"]


# -- Standard Webhooks signing --------------------------------------------------------------------

async def test_signature_verifies_with_a_whsec_secret(receiver, open_sink):
    secret = whsec(os.urandom(32))
    sink = await open_sink(receiver.url, secret=secret)
    await send(sink, make_records(2))

    [request] = await receiver.wait_for_requests(1, timeout=WAIT)
    assert request.headers["webhook-timestamp"].isdigit()
    assert verify_signature(request, secret)
    assert not verify_signature(request, whsec(os.urandom(32)))
    # The whsec_ prefix means "base64 of the key": the literal string is not the key.
    assert not verify_signature(request, secret.removeprefix("whsec_"))


async def test_signature_carries_one_v1_entry_per_secret_for_rotation(receiver, open_sink):
    new_secret, old_secret = whsec(os.urandom(32)), "old-raw-secret-used-as-utf8-bytes"
    sink = await open_sink(receiver.url, secret=[new_secret, old_secret])
    await send(sink, make_records(2))

    [request] = await receiver.wait_for_requests(1, timeout=WAIT)
    entries = request.headers["webhook-signature"].split(" ")
    assert len(entries) == 2 and all(e.startswith("v1,") for e in entries)
    assert entries[0] != entries[1]
    # A receiver that knows only one of the two secrets accepts the message.
    assert verify_signature(request, new_secret)
    assert verify_signature(request, old_secret)


async def test_a_retried_batch_keeps_its_webhook_id_and_another_batch_gets_a_new_one(
        receiver, open_sink):
    sink = await open_sink(receiver.url, secret="s3cret")
    batch = make_records(4)
    receiver.reply(Reply(503))
    await send_error(sink, batch)
    await send(sink, batch)                              # the runner's retry: same batch
    await send(sink, make_records(4, start=4))

    first, retry, other = await receiver.wait_for_requests(3, timeout=WAIT)
    assert first.headers["webhook-id"] == retry.headers["webhook-id"]
    assert other.headers["webhook-id"] != first.headers["webhook-id"]
    assert "." not in first.headers["webhook-id"]       # it is a field of the signed content
    assert all(verify_signature(r, "s3cret") for r in (first, retry, other))


# -- status codes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [200, 201, 202, 204])
async def test_2xx_means_delivered(receiver, open_sink, status):
    receiver.reply(Reply(status))
    sink = await open_sink(receiver.url)
    await send(sink, make_records(1))
    assert len(await receiver.wait_for_requests(1, timeout=WAIT)) == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_retryable_statuses_raise_plain_sink_error(receiver, open_sink, status):
    receiver.reply(Reply(status))
    sink = await open_sink(receiver.url)
    error = await send_error(sink, make_records(1))
    assert type(error) is SinkError
    assert str(status) in str(error)
    assert error.retry_after is None


async def test_410_gone_disables_the_sink(receiver, open_sink):
    receiver.reply(Reply(410))
    sink = await open_sink(receiver.url)
    error = await send_error(sink, make_records(1))
    assert isinstance(error, SinkDisabled)
    assert "410" in str(error) and "stop" in str(error)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_other_4xx_reject_the_batch_with_status_and_body_excerpt(
        receiver, open_sink, status):
    receiver.reply(Reply(status, body=b'{"error": "field\\n Uniqueid\r\nis required"}'))
    sink = await open_sink(receiver.url)
    error = await send_error(sink, make_records(1))
    assert type(error) is SinkRejected
    assert str(status) in str(error)
    assert "Uniqueid" in str(error) and "\n" not in str(error)


async def test_redirects_are_not_followed(receiver, open_sink):
    receiver.reply(Reply(307, headers={"Location": receiver.url + "/elsewhere"}))
    sink = await open_sink(receiver.url)
    error = await send_error(sink, make_records(1))
    assert type(error) is SinkError and "307" in str(error)
    assert len(receiver.requests) == 1


async def test_error_messages_are_short_and_never_carry_secrets(receiver, open_sink):
    url = receiver.url.replace("://", "://user:passw0rd@") + "/p4th-secret?token=qu3ry-secret"
    secret = whsec(b"k" * 32)
    receiver.reply(Reply(400, body=b"x" * 10_000 + b"passw0rd"))
    sink = await open_sink(url, secret=secret, headers={"X-Api-Key": "h3ader-secret"})
    rejected = await send_error(sink, make_records(1))
    await receiver.go_away()
    refused = await send_error(sink, make_records(1))

    [request] = receiver.requests
    assert request.headers["authorization"].startswith("Basic ")   # userinfo did go as auth
    for error in (rejected, refused, SinkError(repr(sink))):
        text = str(error)
        for leaked in ("passw0rd", "p4th-secret", "qu3ry-secret", "h3ader-secret", secret,
                       "k" * 10):
            assert leaked not in text, text
        assert f"http://127.0.0.1:{receiver.port}" in text
    assert len(str(rejected)) < 400


# -- Retry-After ----------------------------------------------------------------------------------

async def test_retry_after_in_delta_seconds(receiver, open_sink):
    receiver.reply(Reply(503, headers={"Retry-After": "7"}),
                   Reply(429, headers={"Retry-After": "99999999"}))
    sink = await open_sink(receiver.url)
    assert (await send_error(sink, make_records(1))).retry_after == 7.0
    assert (await send_error(sink, make_records(1))).retry_after == webhook.RETRY_AFTER_CAP


async def test_retry_after_as_an_http_date(receiver, open_sink):
    in_ten_minutes = email.utils.formatdate(time.time() + 600, usegmt=True)
    receiver.reply(Reply(503, headers={"Retry-After": in_ten_minutes}))
    sink = await open_sink(receiver.url)
    retry_after = (await send_error(sink, make_records(1))).retry_after
    # The date has one-second resolution and some time passes between reply and parse.
    assert retry_after is not None and 0 < retry_after <= 600


def test_parse_retry_after_forms_and_bounds():
    now = 1_780_000_000.0
    parse = webhook.parse_retry_after
    assert parse("120", now=now) == 120.0
    assert parse(" 0 ", now=now) == 0.0
    assert parse(email.utils.formatdate(now + 90, usegmt=True), now=now) == 90.0
    assert parse("Sun, 06 Nov 1994 08:49:37 GMT", now=now) == 0.0          # in the past
    assert parse(email.utils.formatdate(now + 86400 * 7, usegmt=True), now=now) == 3600.0
    assert parse("99999999999999999999", now=now) == webhook.RETRY_AFTER_CAP
    assert parse("9" * 400, now=now) == webhook.RETRY_AFTER_CAP        # past float's range
    assert parse("1" + "0" * 5000, now=now) == webhook.RETRY_AFTER_CAP  # past int()'s digits
    assert parse("0" * 5000 + "30", now=now) == 30.0
    for garbage in (None, "", "soon", "-5", "1.5", "²"):
        assert parse(garbage, now=now) is None


# -- the network misbehaving ----------------------------------------------------------------------

async def test_a_stalled_receiver_times_out_as_sink_error(receiver, open_sink):
    sink = await open_sink(receiver.url, timeout=0.3)
    receiver.stall()
    error = await send_error(sink, make_records(1))
    assert type(error) is SinkError and "timed out" in str(error)
    assert len(receiver.requests) == 1          # it did reach the receiver, which never answered
    receiver.release()
    await send(sink, make_records(1, start=1))  # and the sink still works afterwards


async def test_connection_refused_is_sink_error_and_the_sink_recovers(receiver, open_sink):
    sink = await open_sink(receiver.url)
    await receiver.go_away()
    error = await send_error(sink, make_records(1))   # no pooled connection: a real connect
    assert type(error) is SinkError and "connect" in str(error).lower()
    await receiver.come_back()
    await send(sink, make_records(1, start=1))
    assert [r["id"] for r in receiver.delivered_records] == ["rec-1"]


async def test_a_receiver_dying_mid_request_is_sink_error(receiver, open_sink):
    sink = await open_sink(receiver.url)
    receiver.stall()
    sending = asyncio.create_task(sink.send(make_records(1)))
    try:
        await receiver.wait_for_requests(1, timeout=WAIT)
        await receiver.go_away()              # drops the held request without an answer
        async with asyncio.timeout(WAIT):
            with pytest.raises(SinkError) as caught:
                await sending
        assert type(caught.value) is SinkError
    finally:
        sending.cancel()
    await receiver.come_back()
    await send(sink, make_records(1, start=1))
    assert [r["id"] for r in receiver.delivered_records] == ["rec-1"]


async def test_connections_are_reused_across_batches(receiver, open_sink):
    sink = await open_sink(receiver.url)
    for n in range(4):
        await send(sink, make_records(2, start=2 * n))
    requests = await receiver.wait_for_requests(4, timeout=WAIT)
    ports = {request.remote_port for request in requests}
    assert len(ports) == 1 and None not in ports


async def test_send_outside_start_and_close_raises_sink_error(receiver):
    sink = webhook.create("hook", {"url": receiver.url})
    assert isinstance(sink, Sink)
    await send_error(sink, make_records(1))
    await sink.start()
    await sink.close()
    await send_error(sink, make_records(1))
    await sink.close()
    assert receiver.requests == []


# -- TLS ------------------------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA, a server cert for 127.0.0.1 and a client cert, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=amid test CA", cwd=d)
    for name, usage, san in (("server", "serverAuth", "subjectAltName=IP:127.0.0.1\n"),
                             ("client", "clientAuth", "")):
        (d / f"{name}.ext").write_text(
            f"{san}basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
            f"extendedKeyUsage={usage}\n")
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=amid test {name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)
    return d


def _server_context(pki: Path, *, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki / "ca.pem")
    return context


async def test_tls_verification_is_on_by_default(pki, open_sink):
    async with HttpReceiver(ssl_context=_server_context(pki)) as tls_receiver:
        untrusting = await open_sink(tls_receiver.url)
        error = await send_error(untrusting, make_records(1))
        assert type(error) is SinkError and "certificate" in str(error).lower()

        trusting = await open_sink(tls_receiver.url, tls_ca_file=str(pki / "ca.pem"))
        await send(trusting, make_records(1, start=1))

        unverified = await open_sink(tls_receiver.url, tls_verify=False)
        await send(unverified, make_records(1, start=2))

        assert [r["id"] for r in tls_receiver.delivered_records] == ["rec-1", "rec-2"]


async def test_tls_client_certificate(pki, open_sink):
    context = _server_context(pki, require_client_cert=True)
    async with HttpReceiver(ssl_context=context) as tls_receiver:
        with_cert = await open_sink(tls_receiver.url, tls_ca_file=str(pki / "ca.pem"),
                                    tls_cert_file=str(pki / "client.pem"),
                                    tls_key_file=str(pki / "client.key"))
        await send(with_cert, make_records(1))

        without_cert = await open_sink(tls_receiver.url, tls_ca_file=str(pki / "ca.pem"))
        await send_error(without_cert, make_records(1, start=1))

        assert [r["id"] for r in tls_receiver.delivered_records] == ["rec-0"]


async def test_unreadable_tls_files_fail_start_with_sink_error(tmp_path):
    sink = webhook.create("hook", {"url": "https://127.0.0.1:9/hook",
                                   "tls_ca_file": str(tmp_path / "missing.pem")})
    with pytest.raises(SinkError, match="TLS"):
        await sink.start()
    await sink.close()


# -- options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, complaint", [
    ({"url": "ftp://example.invalid/x"}, "http:// or https://"),
    ({"url": "http:///nohost"}, "no host"),
    ({"url": "http://h/x", "body": "xml"}, "body"),
    ({"url": "http://h/x", "tls_ca_file": "/ca.pem"}, "https://"),
    ({"url": "https://h/x", "tls_key_file": "/k.pem"}, "tls_cert_file"),
    ({"url": "http://h/x", "headers": {"Webhook-Signature": "v1,x"}}, "set by the sink"),
    ({"url": "http://h/x", "headers": {"X-A": "1\r\nX-B: 2"}}, "CR, LF"),
    ({"url": "http://u:p@h/x", "headers": {"authorization": "Bearer t"}}, "choose one"),
    ({"url": "http://h/x", "secret": "whsec_not*base64!!"}, "not valid base64"),
    ({"url": "http://h/x", "secret": []}, "empty list"),
    ({"url": "http://h/x", "timeout": 0}, "timeout"),
    ({"url": "http://h/x", "retries": 3}, "retries"),
])
def test_invalid_options_are_refused_without_echoing_values(options, complaint):
    with pytest.raises(pydantic.ValidationError) as caught:
        webhook.Options(**options)
    text = str(caught.value)
    assert complaint in text
    assert "not*base64" not in text and "X-B: 2" not in text


def test_options_take_durations_as_people_write_them():
    options = webhook.Options(url="http://h/x", timeout="1m30s", connect_timeout="250ms")
    assert (options.timeout, options.connect_timeout) == (90.0, 0.25)


def test_options_hide_secrets_in_repr():
    options = webhook.Options(url="http://h/t0ken", secret=["whsec_" + "A" * 40, "raw-s3cret"],
                              headers={"X-Api-Key": "h3ader"})
    for hidden in ("raw-s3cret", "AAAA", "t0ken", "h3ader"):
        assert hidden not in repr(options)
    assert webhook.signing_keys(options.secret) == [b"\0" * 30, b"raw-s3cret"]


# -- an outage behind the SinkRunner --------------------------------------------------------------

class FailureCountingSink:
    """The real webhook sink, noting each failed send so the test can await retries."""

    def __init__(self, sink: webhook.WebhookSink) -> None:
        self.name = sink.name
        self.failures = 0
        self._sink = sink
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self._sink.start()

    async def send(self, batch) -> None:
        try:
            await self._sink.send(batch)
        except SinkError:
            self.failures += 1
            self._changed.set()
            raise

    async def close(self) -> None:
        await self._sink.close()

    async def until_failures(self, n: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.failures < n:
                self._changed.clear()
                await self._changed.wait()


async def test_outage_every_event_arrives_and_duplicates_stay_within_one_batch(
        receiver, tmp_path):
    sink = FailureCountingSink(webhook.create("hook", {"url": receiver.url, "secret": "s3cret"}))
    runner = SinkRunner(
        sink, RunnerSettings(name="hook", max_queue_events=20, max_queue_bytes=1 << 20, overflow="spool",
        spool_dir=tmp_path / "spool", spool_max_bytes=1 << 22, spool_fallback="drop_newest",
        spool_fsync_interval=0.005, batch_max_events=10, batch_max_bytes=1 << 20,
        batch_max_wait=0.005, retry_min_delay=0.005, retry_max_delay=0.05,
        dead_letter_path=tmp_path / "dead.jsonl"))
    records = make_records(130)
    await runner.start()
    try:
        for record in records[:25]:
            runner.offer(record)
        await receiver.wait_for_records(25, timeout=WAIT)

        # A batch is in flight when the receiver dies: it got the request, never answered.
        receiver.stall()
        for record in records[25:30]:
            runner.offer(record)
        in_flight = len(receiver.requests) + 1
        await receiver.wait_for_requests(in_flight, timeout=WAIT)
        await receiver.go_away()
        for record in records[30:]:          # more than the queue holds: the rest is spooled
            runner.offer(record)
        await sink.until_failures(3)         # connection refused, again and again

        await receiver.come_back()
        async with asyncio.timeout(WAIT):
            assert await runner.drain(WAIT)
    finally:
        async with asyncio.timeout(WAIT):
            await runner.close(WAIT)

    delivered = [r["id"] for r in receiver.delivered_records]
    assert delivered == [r.id for r in records]          # all of them, once each, in order
    assert sum(runner.stats.dropped_total.values()) == 0 and runner.stats.sent_total == 130
    # The receiver saw some records twice (the batch it never answered), but only as a retry of
    # the same batch: every record travelled under exactly one webhook-id.
    webhook_ids_of: dict[str, set[str]] = {}
    for request in receiver.requests:
        for record in request.records:
            webhook_ids_of.setdefault(record["id"], set()).add(request.headers["webhook-id"])
    assert all(len(ids) == 1 for ids in webhook_ids_of.values())
    unanswered = [r for r in receiver.requests if r.status is None]
    assert len(unanswered) == 1 and [r["id"] for r in unanswered[0].records] == [
        r.id for r in records[25:30]]


# -- the shared sink contract ---------------------------------------------------------------------

class TestWebhookSinkContract(SinkContract):
    @pytest.fixture(autouse=True)
    async def peer(self):
        async with HttpReceiver() as server:
            self.server = server
            yield

    async def make_sink(self) -> Sink:
        return webhook.create("contract", webhook.Options(url=self.server.url))

    async def received(self, n: int) -> list[dict]:
        return await self.server.wait_for_records(n, timeout=self.wait_timeout)

    async def break_peer(self) -> None:
        await self.server.go_away()
