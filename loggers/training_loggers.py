"""Training logs: console (logging + a tqdm bar), CSV rows and TensorBoard scalars, behind one interface.

Every logger gets ``begin(info)``, ``log_step(step, metrics)`` every ``log_every`` steps, ``log_epoch(epoch,
metrics)`` at the end of each epoch, ``resume(step)`` when a run continues from a checkpoint (the CSV logger
drops rows written after that step by the interrupted run, so the file reads as one uninterrupted run), and
``close()``.

Example::

    loggers = build_loggers(run_dir, console=True, csv=True, tensorboard=True)
    loggers.log_step(120, {"loss": 2.31, "lr": 4.8e-7})
"""

import csv
import itertools
import logging
import os
import re
from pathlib import Path

from utils.file_utils import atomic_open

logger = logging.getLogger("training")


class TrainingLogger:
    """The interface (every method does nothing by default)."""

    def begin(self, info):
        pass

    def resume(self, step):
        pass

    def log_step(self, step, metrics):
        pass

    def log_epoch(self, epoch, metrics):
        pass

    def close(self):
        pass


class ConsoleLogger(TrainingLogger):
    """A tqdm bar over the steps of each epoch (loss in its postfix) and one log line per epoch."""

    def __init__(self, progress=True):
        self.progress = progress
        self._bar = None

    def begin(self, info):
        logger.info("training: %s", ", ".join(f"{k}={v}" for k, v in info.items()))

    def start_epoch(self, epoch, total_steps, initial=0):
        from tqdm.auto import tqdm

        self.close()
        if self.progress:
            self._bar = tqdm(total=total_steps, initial=initial, desc=f"epoch {epoch + 1}", unit="step",
                             leave=False)

    def advance(self, loss=None):
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def log_epoch(self, epoch, metrics):
        self.close()
        logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CSVLogger(TrainingLogger):
    """``steps.csv`` (step, epoch, metrics...) and ``epochs.csv`` (epoch, metrics...) in ``directory``.

    A run rewrites these files (`resume` drops the rows past its checkpoint, step 0 for a new run): a file of
    that name that is not a log of ours (`is_log_file`: a user's ``logs/steps.csv`` in the folder given as
    ``--output``, a link, a folder) is refused when the logger is made, before any work, never emptied."""

    FIRST_COLUMNS = {"steps.csv": "step", "epochs.csv": "epoch"}

    def __init__(self, directory):
        from utils.file_utils import check_overwritable

        self.directory = Path(directory)
        for name, first in self.FIRST_COLUMNS.items():
            check_overwritable(self.directory / name, lambda path, first=first: is_log_file(path, first),
                               f"a training log ({first}, metrics...)")
        self.directory.mkdir(parents=True, exist_ok=True)

    def _append(self, name, row):
        path = self.directory / name
        fieldnames = list(row)
        if path.exists() and path.stat().st_size:
            with open(path, newline="") as f:
                header = next(csv.reader(f), fieldnames)
            fieldnames = header + [k for k in row if k not in header]
            if fieldnames != header:  # a new column: rewrite with the wider header
                rows = self._rows(path)
                self._write(path, fieldnames, rows)
        else:
            self._write(path, fieldnames, [])
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fieldnames).writerow({k: _fmt(v) for k, v in row.items()})

    @staticmethod
    def _rows(path):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    @staticmethod
    def _write(path, fieldnames, rows):
        with atomic_open(path, "w", newline="") as f:  # unique temporary name, umask permissions
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)

    def resume(self, step):
        """Rewrite both files with the rows up to ``step`` (0: none), as the resumed run continues from there:
        rows logged after the checkpoint, or by a run killed before its first one, would be repeated. Rows
        are kept while their steps increase: a row torn by a kill (its step cut short) ends them."""
        for name in ("steps.csv", "epochs.csv"):
            path = self.directory / name
            if path.exists() and path.stat().st_size:
                with open(path, newline="") as f:
                    reader = csv.DictReader(f)
                    fieldnames, rows = reader.fieldnames, list(reader)
                self._write(path, fieldnames, _rows_up_to(rows, step))

    def log_step(self, step, metrics):
        self._append("steps.csv", {"step": step, **metrics})

    def log_epoch(self, epoch, metrics):
        self._append("epochs.csv", {"epoch": epoch + 1, **metrics})


class TensorBoardLogger(TrainingLogger):
    """Scalars under ``directory`` (``tensorboard --logdir directory``): ``train/<metric>`` and ``epoch/<metric>``."""

    def __init__(self, directory):
        import tensorflow as tf

        from utils.file_utils import UnsafePathError, path_problem

        if os.path.lexists(directory) and not os.path.isdir(directory):  # TensorFlow's own error: not an OSError
            raise UnsafePathError(f"{path_problem(directory) or f'{directory} is not a folder'}: TensorBoard's event "
                                  "files go in a folder of that name (nothing was changed); move it away or choose "
                                  "another --output")
        self._tf = tf
        self.writer = tf.summary.create_file_writer(str(directory))

    def log_step(self, step, metrics):
        with self.writer.as_default():
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self._tf.summary.scalar(f"train/{k}", v, step=step)

    def log_epoch(self, epoch, metrics):
        with self.writer.as_default():
            for k, v in metrics.items():
                if isinstance(v, int | float) and k != "step":
                    self._tf.summary.scalar(f"epoch/{k}", v, step=epoch + 1)
        self.writer.flush()

    def close(self):
        self.writer.flush()


class LoggerList(TrainingLogger):
    """Forward every call to several loggers."""

    def __init__(self, loggers):
        self.loggers = list(loggers)

    def console(self):
        return next((lg for lg in self.loggers if isinstance(lg, ConsoleLogger)), None)

    def begin(self, info):
        for lg in self.loggers:
            lg.begin(info)

    def resume(self, step):
        for lg in self.loggers:
            lg.resume(step)

    def log_step(self, step, metrics):
        for lg in self.loggers:
            lg.log_step(step, metrics)

    def log_epoch(self, epoch, metrics):
        for lg in self.loggers:
            lg.log_epoch(epoch, metrics)

    def close(self):
        for lg in self.loggers:
            lg.close()


def build_loggers(directory, console=True, progress=True, csv=True, tensorboard=True):
    """A `LoggerList`: console, ``<directory>/logs/*.csv`` and ``<directory>/tensorboard/``."""
    loggers = []
    if console:
        loggers.append(ConsoleLogger(progress=progress))
    if csv and directory is not None:
        loggers.append(CSVLogger(Path(directory) / "logs"))
    if tensorboard and directory is not None:
        loggers.append(TensorBoardLogger(Path(directory) / "tensorboard"))
    return LoggerList(loggers)


#: the rows `is_log_file` looks at (it reads no further: a long run's log is not read whole to be recognised)
_LOG_ROWS_CHECKED = 1000
_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: what a number written by `_fmt` may be cut to ("1e" of "1e-05", "na" of "nan", "-" of "-inf")
_NUMBER_PREFIX = re.compile(r"[-+0-9.eEnaifNAIF]*")


def is_log_file(path, first_column="step") -> bool:
    """Whether ``path`` reads as a `CSVLogger` file: a header of metric names starting with ``first_column``,
    then rows of numbers (empty cells allowed, and anything in the file's last row, which a kill may have cut
    in the middle of a number: "1e" of "1e-05"); only the header and the first `_LOG_ROWS_CHECKED` rows are
    read."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or header[0] != first_column or not all(_METRIC_NAME.fullmatch(h) for h in header):
                return False
            rows = itertools.islice(reader, _LOG_ROWS_CHECKED + 1)
            row = next(rows, None)
            while row is not None:
                following = next(rows, None)
                if len(row) > len(header):
                    return False
                whole = row if following is not None else row[:-1]  # the last row's last cell may be torn
                for cell in whole:
                    if cell:
                        float(cell)
                if following is None and row and not _NUMBER_PREFIX.fullmatch(row[-1]):
                    return False
                row = following
    except (OSError, ValueError, csv.Error):  # UnicodeDecodeError is a ValueError
        return False
    return True


def _rows_up_to(rows, limit, column="step"):
    """The leading rows whose ``column`` increases and is at most ``limit``."""
    kept, last = [], 0
    for row in rows:
        try:
            step = int(float(row.get(column) or ""))
        except ValueError:
            break
        if step > limit or step <= last:
            break
        kept.append(row)
        last = step
    return kept


def _fmt(value):
    if isinstance(value, float):
        return float(f"{value:.8g}")
    return value
