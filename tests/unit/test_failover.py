"""Several broker addresses: the order they are tried in, and what failing them all says."""

from __future__ import annotations

import pytest

from fedmq.broker.failover import attempt_order, connect_first
from fedmq.broker.settings import BrokerSettings
from fedmq.shared.errors import ConfigError, ConnectionLost, LoginRefused

URLS = ("amqp://u:p@a:5672/", "amqp://u:p@b:5672/", "amqp://u:p@c:5672/")


def test_addresses_are_tried_in_order_from_the_one_after_the_lost_node() -> None:
    assert attempt_order(3, 0) == [0, 1, 2]
    assert attempt_order(3, 1) == [1, 2, 0]  # node 0 was lost: it is tried last
    assert attempt_order(3, 3) == [0, 1, 2]
    assert attempt_order(1, 5) == [0]


def test_the_first_address_that_accepts_wins() -> None:
    tried: list[str] = []

    def connect(url: str) -> str:
        tried.append(url)
        if url != URLS[2]:
            raise ConnectionLost(f"{url} is down")
        return "conn"

    assert connect_first(URLS, 1, connect, str) == ("conn", 2)
    assert tried == [URLS[1], URLS[2]]


def test_no_address_accepting_names_each_and_keeps_a_permanent_refusal() -> None:
    def down(url: str) -> str:
        raise ConnectionLost("connection refused")

    with pytest.raises(ConnectionLost) as info:
        connect_first(URLS, 0, down, str)
    assert "none of the 3 broker nodes answered" in str(info.value)
    assert all(url in str(info.value) for url in URLS)

    def refused(url: str) -> str:
        if url == URLS[1]:
            raise LoginRefused("bad password", reply_code=403)
        raise ConnectionLost("connection refused")

    with pytest.raises(LoginRefused) as refusal:
        connect_first(URLS, 0, refused, str)
    assert "bad password" in str(refusal.value) and refusal.value.reply_code == 403


def test_one_address_raises_its_own_error_unchanged() -> None:
    error = ConnectionLost("cannot reach RabbitMQ at a")

    def down(url: str) -> str:
        raise error

    with pytest.raises(ConnectionLost) as info:
        connect_first(URLS[:1], 0, down, str)
    assert info.value is error


def test_settings_take_a_comma_separated_list_of_one_user_and_vhost() -> None:
    settings = BrokerSettings.from_url(" , ".join(URLS) + ",")
    assert settings.urls == URLS and settings.username == "u"
    assert "p@" not in settings.masked_url and settings.masked_url.count("***") == 3
    with pytest.raises(ConfigError, match="different users or vhosts"):
        BrokerSettings.from_url("amqp://u:p@a/,amqp://v:p@b/")
    with pytest.raises(ConfigError, match="different users or vhosts"):
        BrokerSettings.from_url("amqp://u:p@a/x,amqp://u:p@b/y")
    with pytest.raises(ConfigError, match="must start with amqp"):
        BrokerSettings.from_url("amqp://u:p@a/,http://b/")
    with pytest.raises(ConfigError, match="empty"):
        BrokerSettings.from_url(" , ")


def test_tls_settings_come_from_the_environment_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_TLS_CA", "/ca.pem")
    monkeypatch.setenv("FEDMQ_TLS_VERIFY_HOSTNAME", "false")
    monkeypatch.setenv("FEDMQ_TLS_EXTERNAL", "yes")
    settings = BrokerSettings.from_url("amqps://h/")
    assert (settings.tls_ca, settings.tls_verify_hostname, settings.tls_external, settings.tls) == (
        "/ca.pem", False, True, True)
    assert settings.identity is None  # EXTERNAL without a user in the URL: no user_id to claim
    assert BrokerSettings.from_url("amqps://worker-3@h/").identity == "worker-3"
    assert BrokerSettings.from_url("amqps://h/", tls_ca="/other.pem").tls_ca == "/other.pem"
    monkeypatch.setenv("FEDMQ_TLS_EXTERNAL", "maybe")
    with pytest.raises(ConfigError, match="FEDMQ_TLS_EXTERNAL"):
        BrokerSettings.from_url("amqps://h/")


def test_tls_options_from_the_command_line_and_a_config_file_reach_the_settings(
        tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from fedmq.broker.settings import TLS_ENV
    from fedmq.cli import main

    for name in TLS_ENV.values():
        monkeypatch.delenv(name, raising=False)
    config = Path(str(tmp_path)) / "fedmq.toml"
    config.write_text('[worker]\ntls-ca = "/from/toml.pem"\ntls-external = true\n')
    worker = main.commands["worker"]
    worker.make_context("worker", ["--config", str(config), "--data", "x.npz", "--tls-cert", "/c.pem",
                                   "--tls-key", "/k.pem", "--tls-no-verify-hostname"])
    settings = BrokerSettings.from_url("amqps://w1@broker/")
    assert (settings.tls_ca, settings.tls_cert, settings.tls_key) == ("/from/toml.pem", "/c.pem", "/k.pem")
    assert settings.tls_external and not settings.tls_verify_hostname


def test_a_queue_whose_node_is_still_coming_back_is_retried_not_refused() -> None:
    """A restarted node answers 404 for its durable queues until it has started them: that passes
    (the aggregator retries the declare); a queue that does not exist stays a 404 for good."""
    import pika.exceptions as pex

    from fedmq.broker.client import classify

    down = pex.ChannelClosedByBroker(404, "NOT_FOUND - home node 'fedmq1@localhost' of durable queue "
                                          "'ns.models' in vhost '/' is down or inaccessible")
    assert classify(down, "declaring namespace 'ns'").retryable
    missing = pex.ChannelClosedByBroker(404, "NOT_FOUND - no queue 'ns.tasks' in vhost '/'")
    assert not classify(missing, "subscribing to queue 'ns.tasks'").retryable
