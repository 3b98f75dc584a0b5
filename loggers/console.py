"""Console logging helpers shared by the command-line tools."""

import contextlib
import logging


@contextlib.contextmanager
def quiet_logger(name, level=logging.ERROR):
    """Raise logger `name` to `level` inside the block, then restore it (a command that lists failures
    itself silences their per-item warnings without changing the logger for the rest of the process).

    Example::

        with quiet_logger("models.image_captioning.prediction"):
            results = predict(model, images)
    """
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield logger
    finally:
        logger.setLevel(previous)
