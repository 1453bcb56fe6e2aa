"""TLS for ``amqps://`` URLs: the SSL context from the settings, and one-line errors.

The context verifies the broker's certificate against ``--tls-ca`` (else the system's CAs) and,
unless ``tls_verify_hostname`` is off, that it names the host of the URL. With
``--tls-cert``/``--tls-key`` the client shows its own certificate (mutual TLS); with
``tls_external`` it also logs in with it (SASL EXTERNAL: the broker takes the user name from
the certificate, so the URL needs no password). Nothing here is hand-rolled: the standard
library's :mod:`ssl` does the work.

A refused handshake becomes one sentence that says which of the common causes it is: a
certificate signed by a CA we were not given, one that does not name the host we dialled, or
one that has expired (OpenSSL verify codes 19/20/21, 62 and 10).
"""

from __future__ import annotations

import os
import ssl

from fedmq.broker.settings import BrokerSettings
from fedmq.shared.errors import ConfigError

# OpenSSL X509_V_ERR_* codes of the refusals a user meets
_UNKNOWN_CA = {2, 18, 19, 20, 21}  # unable to get issuer / self-signed / self-signed in chain / local issuer / leaf
_WRONG_HOST = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_EXPIRED = {10}  # X509_V_ERR_CERT_HAS_EXPIRED
_NOT_YET_VALID = {9}


def ssl_context(settings: BrokerSettings) -> ssl.SSLContext:
    """A client context for ``settings`` (TLS 1.2+, certificate always verified)."""
    for what, path in (("--tls-ca", settings.tls_ca), ("--tls-cert", settings.tls_cert),
                       ("--tls-key", settings.tls_key)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{what} {path}: no such file")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together: give both, or neither")
    if settings.tls_external and not settings.tls_cert:
        raise ConfigError("EXTERNAL authentication (--tls-external) needs a client certificate "
                          "(--tls-cert and --tls-key)")
    try:
        ctx = ssl.create_default_context(cafile=settings.tls_ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = settings.tls_verify_hostname
        if settings.tls_cert:
            ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the TLS files ({exc}); check --tls-ca, --tls-cert and --tls-key") from None
    return ctx


def find_ssl_error(exc: BaseException | None) -> ssl.SSLError | None:
    """The :class:`ssl.SSLError` inside a wrapped connection failure, if any."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLError):
            return item
        todo.extend([*item.args, item.__cause__, item.__context__])
    return None


def describe_tls_failure(error: ssl.SSLError, where: str, settings: BrokerSettings) -> str:
    """One line for a refused TLS handshake with the broker at ``where``."""
    code = getattr(error, "verify_code", None)
    message = getattr(error, "verify_message", None) or error.reason or str(error)
    ca = f"--tls-ca {settings.tls_ca}" if settings.tls_ca else "the system's CAs (no --tls-ca given)"
    if code in _UNKNOWN_CA:
        return (f"TLS: the certificate of RabbitMQ at {where} is signed by a CA we do not trust ({message}); "
                f"checked against {ca}: pass the CA that signed the broker's certificate")
    if code in _WRONG_HOST:
        return (f"TLS: the certificate of RabbitMQ at {where} does not name that host ({message}); "
                "dial a host name the certificate lists (CN/subjectAltName), or issue it a certificate for this name")
    if code in _EXPIRED:
        return f"TLS: the certificate of RabbitMQ at {where} has expired ({message}); renew the broker's certificate"
    if code in _NOT_YET_VALID:
        return (f"TLS: the certificate of RabbitMQ at {where} is not valid yet ({message}); "
                "check the clocks, or the certificate's dates")
    reason = (error.reason or "").lower()
    if "certificate" in reason and ("alert" in reason or "required" in reason):
        return (f"TLS: RabbitMQ at {where} refused our client certificate ({error.reason}); "
                "pass one signed by a CA the broker trusts (--tls-cert, --tls-key)")
    if "wrong version" in reason or "unknown protocol" in reason or "record layer" in reason:
        return f"TLS: {where} does not speak TLS on that port ({error.reason}); is it the amqps listener?"
    return f"TLS handshake with RabbitMQ at {where} failed: {message}"
