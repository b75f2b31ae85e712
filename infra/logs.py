"""structlog configuration: one call at the entry point, console or JSON lines.

Secrets never reach a log line: :func:`redact_secrets` runs before the renderer and masks the
value of every key that names a secret (``password``, ``secret``, ``token``, ``api_key``,
``sasl.password``, ...), at any depth of a logged dict or list, and every pydantic ``SecretStr``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

import structlog
from pydantic import SecretBytes, SecretStr

REDACTED = "**********"
# A key names a secret when one of its words (split at "_", "." or "-") is one of these, or it
# ends in a key word after api/private/secret/pseudonym/signing/encryption: "sasl.password",
# "api_key", "apiKey", "auth_token", "ssl.key.password", but not "tokens" or "item_key".
_SECRET_KEY = re.compile(
    r"(?:^|_)(?:password|passwd|passphrase|secret|token|credentials?|authorization)(?:_|$)"
    r"|(?:^|_)(?:api|private|secret|pseudonym|signing|encryption)_?key(?:_|$)"
)


def is_secret_key(key: object) -> bool:
    """Whether a log or config key names a secret (its value must not be shown)."""
    if not isinstance(key, str):
        return False
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key)  # apiKey -> api_Key
    return bool(_SECRET_KEY.search(re.sub(r"[.\-\s]+", "_", words).lower()))


def _redacted(value: Any, depth: int = 0) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if depth > 8:  # configs are shallow; a cycle or a deep tree stops here
        return value
    if isinstance(value, Mapping):
        return {
            k: REDACTED if is_secret_key(k) and v is not None else _redacted(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list) or type(value) is tuple:
        return type(value)(_redacted(v, depth + 1) for v in value)
    return value


def redact_secrets(
    logger: Any, method_name: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """structlog processor: mask secret-named keys (at any depth) and ``SecretStr`` values."""
    return {
        key: REDACTED if is_secret_key(key) and value is not None else _redacted(value)
        for key, value in event_dict.items()
    }


def configure_logging(level: str = "info", json: bool = False) -> None:
    """Route structlog (and stdlib logging, which Faust and Kafka clients use) to stderr."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s"
    )
    logging.getLogger("recstream.librdkafka").setLevel(
        logging.DEBUG if numeric <= logging.DEBUG else logging.CRITICAL
    )
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
