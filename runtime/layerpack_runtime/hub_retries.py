"""Bounded retries of Hub requests. huggingface_hub retries a request that failed with a retryable
answer (HTTP 408/429/5xx) or a network error 5 times, waiting 1+2+4+8+8 s, and logs a raw warning
per try; a Hub that is down then costs ~25 s and a screenful. We stop after HUB_RETRIES (1+2 s of
waiting) with one error line (remote.hub_error), and keep the warnings off stderr.
"""
from __future__ import annotations

import logging
import re
import threading

from .errors import LayerpackError

HUB_RETRIES = 2
_HF_HTTP_LOGGER = "huggingface_hub.utils._http"   # where huggingface_hub logs each retry


class HubUnavailable(LayerpackError):
    """The Hub kept failing a request (HTTP 5xx, 429, 408, or a network error) through HUB_RETRIES retries."""


class RetryBound(logging.Filter):
    """On huggingface_hub's HTTP logger, which logs every failed try ("HTTP Error 500 thrown while
    requesting HEAD <url>", or "'<error>' thrown while ...") and then "Retrying in 2s [Retry 2/5]"
    before each wait. Those lines are not printed (the outcome is one error line), and once a request
    has failed 1 + HUB_RETRIES times, HubUnavailable is raised from the log call itself, inside
    huggingface_hub's retry loop, instead of waiting out its remaining retries. The library's own
    public hook (a logging filter) is the only one that sees the retries; if a huggingface_hub
    version logs them differently, its retries simply run their course."""

    _last = threading.local()  # per thread: the failure of the request being retried

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        if " thrown while requesting " in msg:
            self._last.reason = msg.split(" thrown while requesting ")[0].strip("'")[:200]  # scrubbed by remote.hub_error
            return False
        m = re.search(r"\[Retry (\d+)/\d+\]", msg)
        if m is None:
            return True
        if int(m.group(1)) > HUB_RETRIES:
            reason = getattr(self._last, "reason", "no answer")
            raise HubUnavailable(f"the Hub keeps failing ({reason}, still after {HUB_RETRIES} retries); it may be down "
                                 "or overloaded, try again later")
        return False


def install_retry_bound() -> None:
    """Put RetryBound on huggingface_hub's HTTP logger (once per process)."""
    log = logging.getLogger(_HF_HTTP_LOGGER)
    if not any(isinstance(f, RetryBound) for f in log.filters):
        log.addFilter(RetryBound())
