"""TLS against a real TLS listener: a private RabbitMQ node with certificates made here (CA,
server for ``localhost``, client), a federation over ``amqps://`` (workers logging in with their
client certificate, SASL EXTERNAL), and the one-line refusals: an unknown CA, a host name the
certificate does not list, an expired certificate."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmq.broker.client import open_connection
from fedmq.broker.provision import PrivateNode, free_port
from fedmq.broker.settings import BrokerSettings
from fedmq.shared.errors import ConfigError, TLSRefused
from tests.certs import CA
from tests.conftest import new_namespace, skip_or_fail
from tests.helpers import Procs, assert_ledger_invariant, confirmed_updates, read_history

pytestmark = [pytest.mark.broker]

WORKER_USER = "fedmq-tls-worker"


@dataclass
class TLSNode:
    node: PrivateNode
    ca: CA
    port: int
    certs: Path

    def url(self, host: str = "localhost", user: str = "guest:guest@") -> str:
        return f"amqps://{user}{host}:{self.port}/"


@pytest.fixture(scope="module")
def tls_node() -> Iterator[TLSNode]:
    if not PrivateNode.available():
        skip_or_fail("rabbitmq-server is not installed: the TLS tests need a private node")
    node = PrivateNode(plugins=["rabbitmq_auth_mechanism_ssl"])
    certs = node.base / "certs"  # inside the node's directory: readable by the user it runs as
    ca = CA(certs)
    server = ca.issue("server", "localhost", dns=("localhost",))
    port = free_port()
    node.config.update({
        "listeners.ssl.default": str(port),
        "ssl_options.cacertfile": str(ca.path),
        "ssl_options.certfile": str(server.cert),
        "ssl_options.keyfile": str(server.key),
        "ssl_options.verify": "verify_peer",
        "ssl_options.fail_if_no_peer_cert": "false",
        "auth_mechanisms.1": "PLAIN",
        "auth_mechanisms.2": "EXTERNAL",
        "ssl_cert_login_from": "common_name",
    })
    node.start(timeout=120)
    try:
        node.ctl("add_user", WORKER_USER, "unused-password")
        node.ctl("clear_password", WORKER_USER)  # it can only log in with its certificate
        node.ctl("set_permissions", "-p", "/", WORKER_USER, ".*", ".*", ".*")
        yield TLSNode(node, ca, port, certs)
    finally:
        node.remove()


def refusal(settings: BrokerSettings) -> str:
    with pytest.raises(TLSRefused) as info:
        open_connection(settings, "fedmq-tls-test")
    text = str(info.value)
    assert "\n" not in text
    return text


def test_a_federation_runs_over_amqps_with_certificate_login(tls_node: TLSNode, shards: Path, procs: Procs,
                                                              tmp_path: Path) -> None:
    client = tls_node.ca.issue("worker", WORKER_USER, client=True)
    ns, run = new_namespace("tls"), tmp_path / "run"
    tls = ["--tls-ca", str(tls_node.ca.path)]
    procs.start("agg", "aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
                "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", "2", "--max-updates", "16",
                "--amqp-url", tls_node.url(), "--namespace", ns, *tls)
    for i in range(2):
        # EXTERNAL: no password; the URL names the certificate's user, so updates carry it as user_id
        procs.start(f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                    "--log-format", "json", "--amqp-url", tls_node.url(user=f"{WORKER_USER}@"), "--namespace", ns,
                    *tls, "--tls-cert", str(client.cert), "--tls-key", str(client.key), "--tls-external")
    assert procs.wait("agg", 180) == 0, procs.dump()
    assert read_history(run)["final"]["updates_applied"] >= 16
    assert_ledger_invariant(run, [c for i in range(2) for c in confirmed_updates(procs.log(f"w{i}"))])


def test_a_broker_certificate_from_another_ca_is_refused_in_one_line(tls_node: TLSNode, tmp_path: Path) -> None:
    other = CA(tmp_path / "other", name="some other CA")
    text = refusal(BrokerSettings.from_url(tls_node.url(), tls_ca=str(other.path)))
    assert "signed by a CA we do not trust" in text and str(other.path) in text


def test_a_certificate_for_another_host_name_is_refused_in_one_line(tls_node: TLSNode) -> None:
    # the server's certificate names localhost, not 127.0.0.1
    text = refusal(BrokerSettings.from_url(tls_node.url(host="127.0.0.1"), tls_ca=str(tls_node.ca.path)))
    assert "does not name that host" in text and "127.0.0.1" in text
    # on by default; turning it off still verifies the certificate itself
    conn = open_connection(BrokerSettings.from_url(tls_node.url(host="127.0.0.1"), tls_ca=str(tls_node.ca.path),
                                                   tls_verify_hostname=False))
    conn.close()


def test_a_client_certificate_without_a_user_is_refused(tls_node: TLSNode, tmp_path: Path) -> None:
    stranger = tls_node.ca.issue("stranger", "nobody-we-know", client=True)
    from fedmq.shared.errors import LoginRefused

    with pytest.raises(LoginRefused) as info:
        open_connection(BrokerSettings.from_url(tls_node.url(user=""), tls_ca=str(tls_node.ca.path),
                                                tls_cert=str(stranger.cert), tls_key=str(stranger.key),
                                                tls_external=True))
    assert "client certificate" in str(info.value)


def test_an_expired_certificate_is_refused_in_one_line(tmp_path: Path) -> None:
    """A TLS server (the standard library's) whose certificate expired yesterday."""
    ca = CA(tmp_path / "ca")
    expired = ca.issue("expired", "localhost", dns=("localhost",), expired=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(expired.cert, expired.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            with contextlib.suppress(OSError):
                sock, _ = listener.accept()
                with contextlib.suppress(OSError, ssl.SSLError), server_ctx.wrap_socket(sock, server_side=True):
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        text = refusal(BrokerSettings.from_url(f"amqps://guest:guest@localhost:{port}/", tls_ca=str(ca.path)))
        thread.join(10)
    assert "has expired" in text


def test_tls_files_are_checked_before_connecting(tmp_path: Path) -> None:
    url = "amqps://guest:guest@localhost:5671/"
    with pytest.raises(ConfigError, match="--tls-ca .*no such file"):
        open_connection(BrokerSettings.from_url(url, tls_ca=str(tmp_path / "missing.pem")))
    ca = CA(tmp_path / "ca")
    with pytest.raises(ConfigError, match="go together"):
        open_connection(BrokerSettings.from_url(url, tls_cert=str(ca.path)))
    with pytest.raises(ConfigError, match="needs a client certificate"):
        open_connection(BrokerSettings.from_url(url, tls_external=True))
