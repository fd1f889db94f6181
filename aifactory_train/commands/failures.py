"""What `aift` does when a command fails: one line on the console, the traceback in a log file, no empty run folder.

Standard library only: the CLI imports this before it knows which subcommand runs.

Exit codes (README, "When something is wrong"): 0 done; 1 an unexpected failure (a bug, or a library's error);
2 a mistake the user can fix (an :class:`~aifactory_train.errors.AiftError`, a bad key, a bad command line);
130 interrupted (Ctrl-C); 143 stopped by SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from aifactory_train.locations import cache_dir
from aifactory_train.records.masking import one_line

USER_ERROR, UNEXPECTED, INTERRUPTED = 2, 1, 130
FALLBACK_LOG = "last-error.log"
HYDRA_SUBDIR = ".hydra"  # Hydra's record of the composed config, written into every run folder


def fallback_log() -> Path:
    """Where a failure's details go when there is no run folder (or it was removed): one file, the last failure."""
    return cache_dir() / FALLBACK_LOG


def is_user_error(err: BaseException) -> bool:
    """A mistake in the command or the config: our own errors, and Hydra's refusals of a config it cannot compose
    (an unknown group option or key, an override it cannot parse)."""
    from aifactory_train.errors import AiftError

    if isinstance(err, AiftError):
        return True
    hydra_errors = sys.modules.get("hydra.errors")
    return hydra_errors is not None and isinstance(err, (
        hydra_errors.ConfigCompositionException, hydra_errors.OverrideParseException,
        hydra_errors.MissingConfigException))


def describe(err: BaseException) -> str:
    """The console line of a failure: a user error as it is; anything else with its type, which says what broke."""
    if is_user_error(err):
        return one_line(err)
    return f"{type(err).__name__}: {one_line(err)}"


def exit_code(err: BaseException) -> int:
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    return USER_ERROR if is_user_error(err) else UNEXPECTED


def _header(err: BaseException) -> str:
    from aifactory_train.records.masking import redact_text

    return (f"{time.strftime('%Y-%m-%d %H:%M:%S')} aift {redact_text(' '.join(sys.argv[1:]))}\n"
            f"error: {describe(err)}\n")


def _traceback(err: BaseException) -> str:
    from aifactory_train.records.masking import redact_text

    return redact_text("".join(traceback.format_exception(type(err), err, err.__traceback__)))


def write_fallback(err: BaseException, earlier: str = "") -> Path | None:
    """The failure (and what the run's log held, ``earlier``) into the fallback log; None if it cannot be written."""
    path = fallback_log()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_header(err) + (f"\n--- the run's log ---\n{earlier}" if earlier else "") +
                        f"\n{_traceback(err)}")
    except OSError:
        return None
    return path


def _file_handlers(run_dir: Path) -> list[logging.FileHandler]:
    """The root logger's file handlers, those writing into ``run_dir`` (Hydra's job log) where there are any."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    in_run = [h for h in handlers if Path(h.baseFilename).parent == run_dir]
    return in_run or handlers


def job_log(run_dir: Path) -> Path | None:
    """The log file Hydra opened for this run (``<run folder>/<job>.log``), if any."""
    handlers = _file_handlers(run_dir)
    return Path(handlers[0].baseFilename) if handlers else None


def _log_to_file_only(err: BaseException, run_dir: Path, with_traceback: bool) -> None:
    """The error (and its traceback) into the run's log file, not the console: the console gets one line."""
    record = logging.getLogger("aift").makeRecord(
        "aift", logging.ERROR, __file__, 0, "error: %s", (describe(err),), None)
    if with_traceback:
        record.exc_text = _traceback(err).rstrip()
    for handler in _file_handlers(run_dir):
        handler.handle(record)
        handler.flush()


def holds_only_its_log(run_dir: Path, log: Path | None) -> bool:
    """Nothing in ``run_dir`` but Hydra's config record and this run's log: a folder the command made and that
    would be left empty of results."""
    try:
        entries = list(run_dir.iterdir())
    except OSError:
        return False
    allowed = {HYDRA_SUBDIR} | ({log.name} if log is not None and log.parent == run_dir else set())
    return all(entry.name in allowed for entry in entries)


def fresh_run_dir(run_dir: Path, given_before: dict[str, bool]) -> bool:
    """At the start of a job: was ``run_dir`` made by this command? Not when the user named it and it was there
    before (``hydra.run.dir=existing``: a resumed run, another rank's folder), nor when it already holds a log
    with lines or anything else (two runs started in the same second share a timestamped folder)."""
    resolved = str(run_dir.resolve())
    if given_before.get(resolved):
        return False
    log = job_log(run_dir)
    if log is not None and log.parent == run_dir and log.is_file() and log.stat().st_size > 0:
        return False
    return holds_only_its_log(run_dir, log)


def remove_empty_run_dir(run_dir: Path) -> bool:
    """Remove a failed run's folder that holds only its log, then the folders above it it leaves empty (up to the
    working folder): a mistake leaves no trace in outputs/."""
    log = job_log(run_dir)
    if not holds_only_its_log(run_dir, log):
        return False
    for handler in _file_handlers(run_dir):  # the log is about to go: nothing may write to it any more
        if Path(handler.baseFilename).parent == run_dir:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd, parent = Path.cwd().resolve(), run_dir.resolve().parent
    while parent != cwd and cwd in parent.parents:
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent
    return not run_dir.exists()


def report_job_failure(err: BaseException, run_dir: Path, fresh: bool, verbose: bool) -> int:
    """A Hydra job (train, eval, predict, export) failed: print one line (and where the details are), keep the
    traceback in the run's log (or the fallback log when the run folder is removed), remove the run folder if this
    command made it and it holds nothing but its log. Returns the exit code."""
    user_error = is_user_error(err)
    _log_to_file_only(err, run_dir, with_traceback=not user_error)
    where = job_log(run_dir)
    if fresh and run_dir.is_dir():
        earlier = ""
        if where is not None and where.is_file():
            try:
                earlier = where.read_text(errors="replace")
            except OSError:
                pass
        if remove_empty_run_dir(run_dir):
            where = None if user_error else write_fallback(err, earlier)
    print(f"error: {describe(err)}", file=sys.stderr)
    if verbose and not user_error:
        print(_traceback(err), file=sys.stderr, end="")
    if not user_error and where is not None:
        print(f"details: {where}{'' if verbose else ' (the traceback; or run again with --verbose)'}",
              file=sys.stderr)
    return exit_code(err)


def report_failure(err: BaseException, verbose: bool) -> int:
    """A failure outside a run (the command line, Hydra's composition, a non-Hydra subcommand): one line; for an
    unexpected one also the fallback log with its traceback. Returns the exit code."""
    print(f"error: {describe(err)}", file=sys.stderr)
    if is_user_error(err) or isinstance(err, KeyboardInterrupt):
        return exit_code(err)
    if verbose:
        print(_traceback(err), file=sys.stderr, end="")
    path = write_fallback(err)
    if path is not None:
        print(f"details: {path}{'' if verbose else ' (the traceback; or run again with --verbose)'}",
              file=sys.stderr)
    return exit_code(err)
