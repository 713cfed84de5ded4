"""TLS and authentication, with real Kafka and real clients.

Client-facing TLS: the three clients produce and consume through keyward over TLS with a client
certificate (mTLS), and ownership is enforced as over plaintext; a client without a certificate,
with one from another CA, or that never finishes its handshake is refused and counted; a rotated
certificate is served without a restart while a broken one keeps the old one serving; the admin
reload token is enforced.

Cluster-facing TLS and SASL, against the `secure` cluster (SASL_SSL with PLAIN and SCRAM, and
an mTLS listener): clients' own SASL passes through keyward untouched (and a wrong password still
fails), keyward's probes and redirected writes authenticate with keyward's own credentials, and
no secret shows up in keyward's logs or on its admin API.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from harness import LibrdkafkaClient, raw, record, unique
from harness.clients import ClientError
from harness.certs import Pki
from harness.keyward import Keyward

from test_keyward import INVALID_RECORD, TABLE, keys_of
from test_operator import wait_for


def _listen_tls(cert, key, client_ca=None, min_version=None) -> str:
    fields = [f"cert: {cert}", f"key: {key}"]
    if client_ca:
        fields.append(f"client_ca: {client_ca}")
    if min_version:
        fields.append(f'min_version: "{min_version}"')
    return "tls: { " + ", ".join(fields) + " }"


@pytest.fixture(scope="module")
def kw_tls(tmp_path_factory, pki, eu, us):
    """The eu proxy with TLS on every client listener and client certificates required."""
    proxy = pki.issue("proxy")
    with Keyward(
        tmp_path_factory.mktemp("kw-tls"),
        "eu",
        {"eu": eu, "us": us},
        TABLE,
        listen_extra=_listen_tls(proxy.cert, proxy.key, pki.ca),
        extra_config="limits: { tls_handshake_timeout_ms: 1500 }\n",
    ) as kw:
        yield kw


def _client_security(pki: Pki, name: str = "client") -> dict:
    leaf = pki.issue(name)
    return {"protocol": "SSL", "ca": str(pki.ca), "cert": str(leaf.cert), "key": str(leaf.key)}


def _tls_socket(port: int, ca, cert=None, key=None, max_version=None) -> ssl.SSLSocket:
    """A TLS connection to keyward as Python's ssl module makes it, handshake done."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    if max_version:
        ctx.maximum_version = max_version
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _refused(port: int, ca, cert=None, key=None, max_version=None) -> bool:
    """Whether keyward refuses this TLS client, in the handshake or (TLS 1.3 reports a refused
    client certificate after the client's side of the handshake) on the first exchange."""
    try:
        with _tls_socket(port, ca, cert, key, max_version) as s:
            s.sendall(raw.api_versions(1))
            return not raw.recv_frame(s)
    except (ssl.SSLError, ConnectionError, EOFError, OSError):
        return True


def test_clients_work_through_tls_with_client_certificates(client, pki, eu, kw_tls):
    topic = unique("orders.tls")
    eu.create_topic(topic, partitions=16)
    security = _client_security(pki)
    eu_keys, us_keys = keys_of(kw_tls, "eu", 3), keys_of(kw_tls, "us", 3)
    recs = [record(k.encode(), f"v-{k}".encode()) for k in eu_keys + us_keys]

    results = client.produce(kw_tls.bootstrap, topic, recs, {"linger_ms": 5, "security": security})

    assert [r["ok"] for r in results] == [True] * 3 + [False] * 3, results
    assert all(r["error_code"] == INVALID_RECORD for r in results[3:]), results
    assert sorted(r["key"] for r in eu.read_all(topic)) == sorted(k.encode() for k in eu_keys)
    got = client.consume(
        kw_tls.bootstrap, [topic], unique("g-tls"), 3, timeout_s=40, config={"security": security}
    )
    assert sorted(r["value"] for r in got) == sorted(f"v-{k}".encode() for k in eu_keys)
    brokers = client.metadata(kw_tls.bootstrap, security=security)
    assert {port for _, _, port in brokers} <= kw_tls.virtual_ports()
    assert kw_tls.metric("keyward_tls_handshakes_total", result="ok") > 0


def test_clients_without_a_trusted_certificate_are_refused_and_counted(tmp_path, pki, kw_tls):
    before = kw_tls.metric("keyward_tls_handshakes_total", result="error")
    stranger = Pki(tmp_path / "stranger", "stranger-ca").issue("intruder")
    client = pki.issue("raw-client")

    assert _refused(kw_tls.bootstrap_port, pki.ca), "no client certificate"
    assert _refused(kw_tls.bootstrap_port, pki.ca, stranger.cert, stranger.key), "a certificate of another CA"
    # Plaintext Kafka bytes on a TLS port are not a handshake.
    with socket.create_connection(("127.0.0.1", kw_tls.bootstrap_port), timeout=5) as plain:
        plain.sendall(raw.api_versions(1))
        plain.settimeout(5)
        assert plain.recv(4096)[:1] in (b"\x15", b""), "an alert or a close, never a Kafka answer"
    wait_for(
        lambda: kw_tls.metric("keyward_tls_handshakes_total", result="error") - before >= 3,
        5,
        "three failed handshakes counted",
    )
    # A trusted client still works on the same listener.
    with _tls_socket(kw_tls.bootstrap_port, pki.ca, client.cert, client.key) as s:
        s.sendall(raw.api_versions(7))
        assert int.from_bytes(raw.recv_frame(s)[:4], "big") == 7


def test_a_client_that_never_finishes_its_handshake_is_closed(kw_tls):
    before = kw_tls.metric("keyward_tls_handshakes_total", result="timeout")
    with socket.create_connection(("127.0.0.1", kw_tls.bootstrap_port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert s.recv(1) == b""
        waited = time.monotonic() - t0
    assert 1.0 < waited < 5, f"closed after {waited:.1f}s; limits.tls_handshake_timeout_ms is 1500"
    wait_for(
        lambda: kw_tls.metric("keyward_tls_handshakes_total", result="timeout") == before + 1,
        5,
        "the timeout counted",
    )


def test_min_version_refuses_older_tls(tmp_path, pki, eu, us):
    proxy = pki.issue("proxy13")
    with Keyward(
        tmp_path, "eu", {"eu": eu, "us": us}, TABLE, listen_extra=_listen_tls(proxy.cert, proxy.key, min_version="1.3")
    ) as kw:
        assert _refused(kw.bootstrap_port, pki.ca, max_version=ssl.TLSVersion.TLSv1_2)
        with _tls_socket(kw.bootstrap_port, pki.ca) as s:
            assert s.version() == "TLSv1.3"


def _not_after(cert) -> float:
    """The certificate's notAfter, in Unix seconds, as openssl reads it."""
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert)], capture_output=True, text=True)
    return ssl.cert_time_to_seconds(out.stdout.strip().removeprefix("notAfter="))


def _served_certificate(port: int, ca) -> bytes:
    with _tls_socket(port, ca) as s:
        return s.getpeercert(binary_form=True)


def _replace(path, content: bytes) -> None:
    """Write-then-rename, as cert-manager and editors do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def test_a_rotated_certificate_is_served_without_a_restart(tmp_path, pki, eu, us):
    """Certificate files are watched like the table: a rotation takes effect for new
    connections, open ones go on; a broken certificate never replaces a working one."""
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live-key.pem"
    first = pki.issue("rotate-1")
    live_cert.write_bytes(first.cert.read_bytes())
    live_key.write_bytes(first.key.read_bytes())
    with Keyward(tmp_path, "eu", {"eu": eu, "us": us}, TABLE, listen_extra=_listen_tls(live_cert, live_key)) as kw:
        served = _served_certificate(kw.bootstrap_port, pki.ca)
        assert served == ssl.PEM_cert_to_DER_cert(first.cert.read_text())
        expiry = kw.metric("keyward_tls_certificate_expiry_timestamp_seconds", cert="listener")
        assert expiry == _not_after(first.cert)
        held = _tls_socket(kw.bootstrap_port, pki.ca)

        second = pki.issue("rotate-2")
        _replace(live_key, second.key.read_bytes())
        _replace(live_cert, second.cert.read_bytes())
        wait_for(
            lambda: _served_certificate(kw.bootstrap_port, pki.ca) == ssl.PEM_cert_to_DER_cert(second.cert.read_text()),
            10,
            "the rotated certificate to be served",
        )
        assert kw.metric("keyward_tls_reloads_total", trigger="file", result="loaded") >= 1
        held.sendall(raw.api_versions(3))
        assert int.from_bytes(raw.recv_frame(held)[:4], "big") == 3, "an open connection goes on"
        held.close()

        # A key that does not fit the certificate: the reload fails, the rotated pair serves on.
        _replace(live_key, pki.issue("unrelated").key.read_bytes())
        wait_for(lambda: kw.metric("keyward_tls_reload_failing") == 1, 10, "the failed reload")
        assert _served_certificate(kw.bootstrap_port, pki.ca) == ssl.PEM_cert_to_DER_cert(second.cert.read_text())
        status, body = kw.admin("/reload", method="POST")
        assert status == 422, body
        assert "listen.tls: the key does not fit the certificate" in json.loads(body)["tls"]["error"], body
        assert "reload failed; the material in force keeps serving" in kw.logs(200)

        _replace(live_key, second.key.read_bytes())
        wait_for(lambda: kw.metric("keyward_tls_reload_failing") == 0, 10, "recovery")


def _post_reload(kw: Keyward, token: str | None) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{kw.admin_port}/reload", method="POST")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_reload_requires_the_bearer_token(tmp_path, eu, us):
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-token\n")
    with Keyward(
        tmp_path, "eu", {"eu": eu, "us": us}, TABLE, admin_extra=f"reload_token_file: {token_file}"
    ) as kw:
        assert _post_reload(kw, None) == 401
        assert _post_reload(kw, "wrong") == 401
        assert _post_reload(kw, "s3cret-token") == 200
        assert kw.metric("keyward_admin_unauthorized_total") == 2
        # Reads stay open: metrics and the table need no token.
        assert kw.admin("/ownership")[0] == 200
        # A rotated token is taken at once: its file is watched like the table.
        loaded = kw.metric("keyward_tls_reloads_total", trigger="file", result="loaded")
        _replace(token_file, b"rotated\n")
        wait_for(
            lambda: kw.metric("keyward_tls_reloads_total", trigger="file", result="loaded") > loaded,
            10,
            "the token file reloaded",
        )
        assert _post_reload(kw, "s3cret-token") == 401
        assert _post_reload(kw, "rotated") == 200
        assert "s3cret-token" not in kw.logs(500)


# --------------------------------------------------------------- a SASL_SSL cluster behind keyward

SEC_TABLE = """
rules:
  - name: orders
    topics: ["orders.*"]
    by: key
    slots: 16
    owners: { sec: ["0-7"], eu: ["8-15"] }
    on_foreign: redirect
default: allow
"""

KEYWARD_USER, KEYWARD_PASSWORD = "keyward", "keyward-secret"

# Every SASL mechanism through keyward, each with another client implementation.
MECHANISM_OF = {"java": "SCRAM-SHA-512", "librdkafka": "PLAIN", "franz": "SCRAM-SHA-256"}


def _secure_cluster_yaml(secure, password_file, addresses=None, sasl=True, cert=None) -> str:
    """The `sec` cluster's entry: TLS trusting the test CA, keyward's own SCRAM login."""
    tls = f"ca: {secure.security.pki.ca}"
    if cert:
        tls += f", cert: {cert.cert}, key: {cert.key}"
    entry = f"bootstrap: [{', '.join(repr(a) for a in (addresses or secure.addresses))}], tls: {{ {tls} }}"
    if sasl:
        entry += f", sasl: {{ mechanism: SCRAM-SHA-512, username: {KEYWARD_USER}, password_file: {password_file} }}"
    return "{ " + entry + " }"


@pytest.fixture(scope="module")
def kw_sec(tmp_path_factory, pki, secure, eu):
    """keyward for region `sec`, whose cluster is SASL_SSL only, serving clients over TLS."""
    d = tmp_path_factory.mktemp("kw-sec")
    password = d / "sec-password"
    password.write_text(KEYWARD_PASSWORD + "\n")
    proxy = pki.issue("proxy-sec")
    with Keyward(
        d,
        "sec",
        {"sec": secure, "eu": eu},
        SEC_TABLE,
        listen_extra=_listen_tls(proxy.cert, proxy.key),
        cluster_yaml={"sec": _secure_cluster_yaml(secure, password)},
    ) as kw:
        yield kw


def test_client_sasl_passes_through_keyward_to_the_broker(client, pki, secure, eu, kw_sec):
    """The client logs in to the broker through keyward (SASL_SSL to keyward, TLS from keyward
    to the broker); keyward enforces ownership on the authenticated connection. alice may write
    every topic on `sec`, so her eu-owned records are redirected to eu, and keyward's log line
    for the redirect names her and her client.id."""
    topic = unique("orders.sasl")
    secure.create_topic(topic, partitions=16)
    eu.create_topic(topic, partitions=16)
    security = {**secure.client_security(MECHANISM_OF[client.name], "alice"), "ca": str(pki.ca)}
    sec_keys, eu_keys = keys_of(kw_sec, "sec", 3), keys_of(kw_sec, "eu", 2)
    recs = [record(k.encode(), f"v-{k}".encode()) for k in sec_keys + eu_keys]
    client_id = unique(f"alice-{client.name}")

    results = client.produce(
        kw_sec.bootstrap, topic, recs, {"linger_ms": 5, "security": security, "client_id": client_id}, timeout_s=40
    )

    assert all(r["ok"] for r in results), results
    assert sorted(r["key"] for r in secure.read_all(topic)) == sorted(k.encode() for k in sec_keys)
    assert sorted(r["key"] for r in eu.read_all(topic)) == sorted(k.encode() for k in eu_keys)
    redirects = [line for line in kw_sec.logs(5000).splitlines() if "redirecting a batch" in line and client_id in line]
    assert redirects, kw_sec.logs(30)
    assert all('user="alice"' in line or "user=alice" in line for line in redirects), redirects
    got = client.consume(kw_sec.bootstrap, [topic], unique("g-sasl"), 3, timeout_s=40, config={"security": security})
    assert sorted(r["value"] for r in got) == sorted(f"v-{k}".encode() for k in sec_keys)


def test_a_wrong_client_password_still_fails_through_keyward(pki, secure, kw_sec):
    security = {**secure.client_security("SCRAM-SHA-512", "alice"), "ca": str(pki.ca), "password": "wrong"}
    with pytest.raises(ClientError, match="(?i)auth"):
        LibrdkafkaClient().metadata(kw_sec.bootstrap, timeout_s=10, security=security)


def test_keyward_probes_the_sasl_cluster_and_shows_no_secret(secure, kw_sec):
    # The first probe may still be running when the listener already accepts.
    wait_for(lambda: kw_sec.metric("keyward_cluster_up", cluster="sec") == 1, 10, "the probe to log in")
    wait_for(lambda: kw_sec.metric("keyward_ready") == 1, 10, "readiness")
    exposed = kw_sec.metrics_text() + kw_sec.admin("/ownership")[1] + kw_sec.logs(2000)
    exposed += kw_sec.config_path.read_text()
    assert KEYWARD_PASSWORD not in exposed
    assert "alice-secret" not in exposed


def test_redirected_writes_log_in_with_keywards_own_credentials(tmp_path, pki, secure, eu, us):
    """eu's keyward redirects sec-owned records to the SASL_SSL cluster as user `keyward`; a
    wrong password makes the cluster unreachable for keyward (and says why, without the
    password), and fixing the password file heals it without a restart."""
    password = tmp_path / "sec-password"
    password.write_text("not-the-password\n")
    kw = Keyward(
        tmp_path,
        "eu",
        {"eu": eu, "sec": secure},
        SEC_TABLE,
        cluster_yaml={"sec": _secure_cluster_yaml(secure, password)},
        extra_config="reads: { prefer: [eu], probe_interval_ms: 500 }\n",
    )
    with kw:
        wait_for(lambda: "cluster probe failed cluster=sec" in kw.logs(200), 10, "the failed login logged")
        assert "authentication as \\\"keyward\\\" with SCRAM-SHA-512 failed" in kw.logs(200), kw.logs(20)
        assert kw.metric("keyward_cluster_up", cluster="sec") == 0
        assert "not-the-password" not in kw.logs(2000)

        password.write_text(KEYWARD_PASSWORD + "\n")
        wait_for(lambda: kw.metric("keyward_cluster_up", cluster="sec") == 1, 15, "the probe to log in")

        topic = unique("orders.redirect-sasl")
        secure.create_topic(topic, partitions=16)
        eu.create_topic(topic, partitions=16)
        sec_keys, eu_keys = keys_of(kw, "sec", 4), keys_of(kw, "eu", 2)
        recs = [record(k.encode(), f"v-{k}".encode()) for k in sec_keys + eu_keys]
        results = LibrdkafkaClient().produce(kw.bootstrap, topic, recs, {"linger_ms": 5})
        assert all(r["ok"] for r in results), results
        assert sorted(r["key"] for r in secure.read_all(topic)) == sorted(k.encode() for k in sec_keys)
        assert sorted(r["key"] for r in eu.read_all(topic)) == sorted(k.encode() for k in eu_keys)
        assert KEYWARD_PASSWORD not in kw.logs(2000)


def test_keyward_presents_its_client_certificate_to_brokers_that_require_one(tmp_path, pki, secure, eu):
    """The mTLS listener refuses connections without a client certificate: keyward reaches it
    with `clusters.<region>.tls.cert`, and redirected writes land."""
    cert = secure.security.pki.issue("keyward-client")
    kw = Keyward(
        tmp_path,
        "eu",
        {"eu": eu, "sec": secure},
        SEC_TABLE,
        cluster_yaml={
            "sec": _secure_cluster_yaml(secure, None, addresses=secure.mtls_addresses, sasl=False, cert=cert)
        },
        extra_config="reads: { prefer: [eu] }\n",
    )
    with kw:
        wait_for(lambda: kw.metric("keyward_cluster_up", cluster="sec") == 1, 10, "the probe over mTLS")
        topic = unique("orders.redirect-mtls")
        secure.create_topic(topic, partitions=1)
        eu.create_topic(topic, partitions=1)
        sec_keys = keys_of(kw, "sec", 3)
        results = LibrdkafkaClient().produce(kw.bootstrap, topic, [record(k.encode(), b"v") for k in sec_keys])
        assert all(r["ok"] for r in results), results
        assert sorted(r["key"] for r in secure.read_all(topic)) == sorted(k.encode() for k in sec_keys)

    # The same without keyward's certificate: the cluster is unreachable, and the log says so.
    kw = Keyward(
        tmp_path,
        "eu",
        {"eu": eu, "sec": secure},
        SEC_TABLE,
        name="kw-nocert",
        cluster_yaml={"sec": _secure_cluster_yaml(secure, None, addresses=secure.mtls_addresses, sasl=False)},
        extra_config="reads: { prefer: [eu] }\n",
    )
    with kw:
        wait_for(lambda: "cluster probe failed cluster=sec" in kw.logs(200), 10, "the refused connection logged")
        assert kw.metric("keyward_cluster_up", cluster="sec") == 0


def test_a_broker_that_never_finishes_tls_costs_one_connect_timeout(tmp_path, pki, eu, us):
    """limits.connect_timeout_ms bounds TCP and TLS together: a broker that accepts and then
    says nothing makes keyward close the client's connection after that long, counted."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        with Keyward(
            tmp_path,
            "eu",
            {"eu": eu, "us": us},
            TABLE,
            cluster_yaml={"eu": f"{{ bootstrap: ['127.0.0.1:{port}'], tls: {{ ca: {pki.ca} }} }}"},
            extra_config="reads: { prefer: [eu] }\nlimits: { connect_timeout_ms: 1000 }\n",
        ) as kw:
            before = kw.metric("keyward_upstream_connect_errors_total", cluster="eu")
            with socket.create_connection(("127.0.0.1", kw.bootstrap_port), timeout=10) as c:
                t0 = time.monotonic()
                c.sendall(raw.api_versions(1))
                try:
                    assert c.recv(1) == b""
                except ConnectionResetError:  # closed with the request unread: a reset
                    pass
                waited = time.monotonic() - t0
            assert 0.9 < waited < 4, f"closed after {waited:.1f}s; connect_timeout_ms is 1000"
            wait_for(
                # (>=: the harness's own start-up check connected too)
                lambda: kw.metric("keyward_upstream_connect_errors_total", cluster="eu") >= before + 1,
                5,
                "the failed connect counted",
            )
            assert "timed out after 1s" in kw.logs(50)
    finally:
        silent.close()


# --------------------------------------------------------------- who keyward writes for

def _eu_batch(kw, n: int = 5) -> tuple[list[str], bytes]:
    keys = keys_of(kw, "eu", n)
    return keys, raw.record_batch([(k.encode(), b"raw") for k in keys])


def _closed_without_answer(sock) -> bool:
    try:
        raw.recv_frame(sock)
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def test_a_hand_written_produce_before_authenticating_writes_nothing_anywhere(pki, secure, eu, kw_sec):
    """A client that never authenticates, or stops half-way through SCRAM, sends a Produce v7 for
    keys eu owns (redirect rule). keyward acts for nobody it cannot name: the connection closes
    without an answer, and no record lands in either region."""
    topic = unique("orders.raw")
    secure.create_topic(topic, partitions=16)
    eu.create_topic(topic, partitions=16)
    keys, batch = _eu_batch(kw_sec)

    # The hand-written client is a working client: straight to eu's leader, its batch lands.
    control = unique("orders.raw-control")
    eu.create_topic(control, partitions=1)
    leader = eu.node(eu.partitions(control)[0]["leader"])
    with socket.create_connection(("127.0.0.1", leader.port), timeout=10) as s:
        s.sendall(raw.produce(1, control, {0: batch}))
        assert raw.produce_errors(raw.recv_frame(s)) == {(control, 0): 0}
    assert sorted(r["key"] for r in eu.read_all(control)) == sorted(k.encode() for k in keys)

    closed = kw_sec.metric("keyward_client_connections_closed_total", cause="unauthenticated")
    with _tls_socket(kw_sec.bootstrap_port, pki.ca) as s:
        s.settimeout(15)
        s.sendall(raw.api_versions(1))
        raw.recv_frame(s)
        s.sendall(raw.produce(2, topic, {8: batch}))
        assert _closed_without_answer(s)
    wait_for(
        lambda: kw_sec.metric("keyward_client_connections_closed_total", cause="unauthenticated") == closed + 1,
        10,
        "the unauthenticated close counted",
    )

    # Half-way through SCRAM the broker has accepted a SaslAuthenticate (error 0), but the
    # client is not authenticated: the broker refuses keyward's question and closes.
    with _tls_socket(kw_sec.bootstrap_port, pki.ca) as s:
        s.settimeout(15)
        s.sendall(raw.sasl_handshake(1, "SCRAM-SHA-512"))
        raw.recv_frame(s)
        s.sendall(raw.sasl_authenticate(2, b"n,,n=alice,r=" + os.urandom(12).hex().encode()))
        assert raw.sasl_authenticate_error(raw.recv_frame(s)) == 0
        s.sendall(raw.produce(3, topic, {8: batch}))
        assert _closed_without_answer(s)

    assert eu.read_all(topic) == []
    assert secure.read_all(topic) == []


def test_a_client_that_may_not_write_on_its_cluster_is_refused_everywhere(client, pki, secure, eu, kw_sec):
    """bob has logged in but may only read on `sec`. His records owned by eu would be redirected:
    keyward asks sec's broker on bob's own connection, and answers TOPIC_AUTHORIZATION_FAILED
    (29) as a broker would; his sec-owned records get the broker's own 29. Nothing lands."""
    topic = unique("orders.bob")
    secure.create_topic(topic, partitions=16)
    eu.create_topic(topic, partitions=16)
    security = {**secure.client_security(MECHANISM_OF[client.name], "bob"), "ca": str(pki.ca)}
    sec_keys, eu_keys = keys_of(kw_sec, "sec", 2), keys_of(kw_sec, "eu", 3)
    refused = kw_sec.metric("keyward_produce_records_total", rule="orders", owner="eu", decision="rejected", reason="not_authorized")

    results = client.produce(
        kw_sec.bootstrap,
        topic,
        [record(k.encode(), b"bob") for k in sec_keys + eu_keys],
        {"linger_ms": 5, "security": security, "idempotence": False, "delivery_timeout_ms": 20000},
        timeout_s=40,
    )

    assert [r["error_code"] for r in results] == [29] * 5, results
    assert kw_sec.metric(
        "keyward_produce_records_total", rule="orders", owner="eu", decision="rejected", reason="not_authorized"
    ) == refused + 3
    assert eu.read_all(topic) == []
    assert secure.read_all(topic) == []


def test_a_sasl_client_behind_a_keyward_told_clients_need_no_login_is_closed(tmp_path, pki, secure, eu):
    """keyward has no login of its own for `sec`, so it takes `sec` for a cluster that does not
    authenticate clients. The broker accepting a client's SASL handshake shows otherwise:
    keyward closes the connection rather than act for a client it cannot tell apart. (The
    conformance walk shows the other side: a plaintext broker's refusal of the handshake
    reaches the client.)"""
    proxy = pki.issue("proxy-nologin")
    kw = Keyward(
        tmp_path,
        "sec",
        {"sec": secure, "eu": eu},
        SEC_TABLE,
        listen_extra=_listen_tls(proxy.cert, proxy.key),
        cluster_yaml={"sec": _secure_cluster_yaml(secure, None, sasl=False)},
        extra_config="reads: { prefer: [sec] }\n",
    )
    with kw:
        security = {**secure.client_security("PLAIN", "alice"), "ca": str(pki.ca)}
        with pytest.raises(ClientError):
            LibrdkafkaClient().metadata(kw.bootstrap, timeout_s=5, security=security)
        assert kw.metric("keyward_client_connections_closed_total", cause="client_auth_mismatch") >= 1
        assert "client_auth" in kw.logs(200)


def test_redirect_is_refused_where_the_broker_sees_keywards_certificate(tmp_path, pki, secure, eu):
    """`sec` reached over mTLS with keyward's own certificate: the broker sees keyward, not the
    client, so nobody can say whether the client may write. Owned records still land (the
    broker authorizes keyward's certificate); redirects are refused with 29."""
    cert = secure.security.pki.issue("keyward-client")
    kw = Keyward(
        tmp_path,
        "sec",
        {"sec": secure, "eu": eu},
        SEC_TABLE,
        cluster_yaml={
            "sec": _secure_cluster_yaml(secure, None, addresses=secure.mtls_addresses, sasl=False, cert=cert)
        },
        extra_config="reads: { prefer: [sec] }\n",
    )
    with kw:
        topic = unique("orders.mtls-seen")
        secure.create_topic(topic, partitions=16)
        eu.create_topic(topic, partitions=16)
        sec_keys, eu_keys = keys_of(kw, "sec", 2), keys_of(kw, "eu", 2)
        results = LibrdkafkaClient().produce(
            kw.bootstrap, topic, [record(k.encode(), b"v") for k in sec_keys + eu_keys], {"idempotence": False}
        )
        assert [r["error_code"] or 0 for r in results] == [0, 0, 29, 29], results
        assert sorted(r["key"] for r in secure.read_all(topic)) == sorted(k.encode() for k in sec_keys)
        assert eu.read_all(topic) == []
