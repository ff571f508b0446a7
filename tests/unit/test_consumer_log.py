"""What a worker's log says of a task message Celery's consumer discards: one line at most.

Celery logs each discarded message with its traceback and body; anyone who can push to a
queue could grow a worker's log by a dozen lines a message. Records go through the real
consumer logger, with the filter the worker installs at start (worker/tasks.py).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from celery.worker.consumer.consumer import INVALID_TASK_ERROR, UNKNOWN_TASK_ERROR

from config.message_checks import CONSUMER_LOGGER, MessageRejected, rejections_in_one_line


@pytest.fixture
def consumer_log() -> Iterator[io.StringIO]:
    rejections_in_one_line()
    rejections_in_one_line()  # installed once, however often the worker's hook runs
    logger = logging.getLogger(CONSUMER_LOGGER)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)


def logged(template: str, exc: Exception, *rest: object) -> None:
    try:
        raise exc
    except Exception as raised:
        logging.getLogger(CONSUMER_LOGGER).error(template, raised, *rest, exc_info=True)


def test_a_message_drovers_checks_refused_is_not_logged_again(consumer_log: io.StringIO) -> None:
    logged(INVALID_TASK_ERROR, MessageRejected("envelope: expired"), "body " * 200)
    assert consumer_log.getvalue() == ""


@pytest.mark.parametrize(
    ("template", "exc", "rest", "what"),
    [
        (UNKNOWN_TASK_ERROR, KeyError("evil.task"), ("body", {}, {}), "unregistered task"),
        (INVALID_TASK_ERROR, ValueError("bad\nshape " * 50), ("body " * 300,), "invalid message"),
    ],
)
def test_any_other_discarded_message_is_one_line_without_traceback(
    consumer_log: io.StringIO, template: str, exc: Exception, rest: tuple[object, ...], what: str
) -> None:
    logged(template, exc, *rest)
    text = consumer_log.getvalue()
    assert text.count("\n") == 1 and "Traceback" not in text, text
    assert text.startswith(f"discarded a task message ({what}): "), text
    assert len(text) < 200, text
