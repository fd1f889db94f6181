"""The audit log: one JSON line per action on the data (train, eval, predict, export, launch), allowed or refused,
hash-chained so that a changed, inserted or removed line is found (`aift audit verify`).

Each line holds ``prev``: the SHA-256 of the previous line's bytes (64 zeros for the first), and ``seq``, its
number. A ``<log>.head`` file beside it holds the number of lines and the SHA-256 of the last one, so that lines cut
off the end are found too. Appends take an exclusive ``fcntl.flock`` on the log, so two processes (two runs, a
sweep) writing at once neither interleave their bytes nor chain to the same line.

Where it goes: ``audit.path`` when set (a file, or a folder to hold ``aift-audit.jsonl``); else the folder of the
data owner's card (the nearest ``datacard.yaml`` of the data) when this user may write there; else the run folder
(`aift launch`, which has none yet: aift's cache folder).

What it does not do: a user who can write the file can rewrite the whole chain (and its head) consistently; the
chain shows tampering against a copy or a head kept elsewhere (the last line's hash is printed and recorded in the
run's summary), it does not prevent it. Making the file append-only for its writers (``chattr +a``, a log server)
is the administrator's part. A command refused before it looked at the data (a mistyped key) writes no line: no
data was used.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

AUDIT_FILE = "aift-audit.jsonl"
HEAD_SUFFIX = ".head"
GENESIS = "0" * 64
SCHEMA = 1


@dataclass
class AuditConfig:
    """``audit``: where the audit log is appended (null: beside the data owner's card, else the run folder)."""

    path: Optional[str] = None


# -- what the data check saw, for the command's line -------------------------------------------------------------
_NOTED: dict[str, Any] | None = None


def note_check(config: Any, record: dict[str, Any] | None = None, refusal: BaseException | None = None,
               paths: Any = None) -> None:
    """Called by ``usage_terms.check_usage``: what it checked (or why it refused), for the line the command writes
    when it ends."""
    global _NOTED
    cards: list[str] = []
    if record is not None:
        cards = [c["path"] for c in record.get("cards", [])]
    elif paths is not None:
        try:
            from aifactory_train.records.usage_terms import datacards_for

            cards = [str(c) for c in datacards_for(paths)]
        except Exception:  # noqa: BLE001 - a card that cannot be found is what the refusal says
            cards = []
    _NOTED = {"audit_path": _audit_path_of(config), "record": record, "refusal": refusal, "cards": cards,
              "purpose": _purpose(config), "paths": [str(Path(p).resolve()) for p in
                                                     ([paths] if isinstance(paths, (str, Path)) else paths or [])][:20]}


def begin_command() -> None:
    """A command starts: no data check noted yet (an earlier command's, in the same process, is not this one's)."""
    global _NOTED
    _NOTED = None


def noted() -> dict[str, Any] | None:
    return _NOTED


def _purpose(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    from aifactory_train.records.consent import purpose_of

    return purpose_of(config)


def _audit_path_of(config: Any) -> str | None:
    if config is None:
        return None
    section = config.get("audit") if isinstance(config, dict) else getattr(config, "audit", None)
    value = section.get("path") if isinstance(section, dict) else getattr(section, "path", None)
    return None if value in (None, "") else str(value)


# -- where -------------------------------------------------------------------------------------------------------
def location(audit_path: str | None, cards: list[str], run_dir: Path | None) -> Path:
    """The log file: ``audit.path`` (a folder gets ``aift-audit.jsonl``), else beside the nearest card when this user
    may write there, else in the run folder (aift's cache folder when there is none, or the command did not finish)."""
    if audit_path:
        path = Path(audit_path).expanduser()
        return path / AUDIT_FILE if path.is_dir() else path
    for card in cards[:1]:
        folder = Path(card).parent
        target = folder / AUDIT_FILE
        if os.access(folder, os.W_OK | os.X_OK) and (not target.exists() or os.access(target, os.W_OK)):
            return target
    if run_dir is None:
        from aifactory_train.locations import cache_dir

        return cache_dir() / AUDIT_FILE
    return Path(run_dir) / AUDIT_FILE


# -- writing -----------------------------------------------------------------------------------------------------
def _last_line(handle) -> bytes | None:
    """The last line of an open binary file (without its newline), read backwards in blocks."""
    handle.seek(0, os.SEEK_END)
    end = handle.tell()
    if end == 0:
        return None
    block, data, position = 8192, b"", end
    while position > 0:
        step = min(block, position)
        position -= step
        handle.seek(position)
        data = handle.read(step) + data
        stripped = data.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    return data.rstrip(b"\n")


def append(path: Path, entry: dict[str, Any]) -> tuple[int, str]:
    """Append ``entry`` to the log at ``path`` under an exclusive lock, chained to the last line; returns (its line
    number, its SHA-256)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # held until the file is closed
        last = _last_line(handle)
        seq = 1
        if last is not None:
            try:
                seq = int(json.loads(last).get("seq", 0)) + 1
            except (ValueError, AttributeError):
                seq = 0  # a broken last line: the new line still chains to its bytes; verify reports it
        line = json.dumps({"seq": seq, "prev": hashlib.sha256(last).hexdigest() if last is not None else GENESIS,
                           **entry}, sort_keys=True, default=str, separators=(",", ":")).encode()
        handle.seek(0, os.SEEK_END)
        handle.write(line + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
        digest = hashlib.sha256(line).hexdigest()
        head = path.with_name(path.name + HEAD_SUFFIX)
        partial = head.with_name(head.name + f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"lines": seq, "sha256": digest}) + "\n")
        os.replace(partial, head)  # under the log's lock: the head always names the last line written
    return seq, digest


def log_action(action: str, outcome: str, run_dir: Path | None = None, error: BaseException | None = None,
               result: dict[str, Any] | None = None, config: Any = None) -> tuple[Path, int, str] | None:
    """Write the line of a command that ended: ``outcome`` ok | refused | failed | stopped. Returns (log, line,
    sha256), or None when nothing is written (the command never reached the data check, or the log cannot be
    written: said in the log, never a failure of the command)."""
    noted_check = _NOTED or {}
    if not noted_check and action != "export":
        return None  # refused before any data was looked at: no use of data to record
    from aifactory_train.records.masking import one_line
    from aifactory_train.records.usage_terms import kernel_host, os_user

    record = noted_check.get("record") or {}
    datasets = _datasets(result)
    cards = noted_check.get("cards") or [c for d in datasets for c in d.get("cards", [])]
    entry = {
        "v": SCHEMA, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "action": action, "outcome": outcome, "reason": one_line(error) if error is not None else None,
        "user": record.get("user") or os_user(), "host": record.get("host") or kernel_host(),
        "slurm_job": record.get("slurm_job"), "account": record.get("account"), "recipe": record.get("recipe"),
        "run_dir": str(Path(run_dir).resolve()) if run_dir is not None else None,
        "data": noted_check.get("paths") or [d["root"] for d in datasets if d.get("root")],
        "datasets": [{k: d.get(k) for k in ("root", "digest")} for d in datasets],
        "cards": cards, "duo": record.get("consent_codes"),
        "purpose": record.get("purpose") or noted_check.get("purpose") or _purpose(config),
        "obligations": record.get("obligations"), "withdrawals": record.get("withdrawals"), "rank": _rank(),
    }
    # a refused or failed command may have been refused that very folder (one inside the input, a user's folder it
    # would have written into): without a card's folder, its line goes to aift's cache folder, not the run folder
    finished = outcome in ("ok", "stopped")
    path = location(noted_check.get("audit_path") or _audit_path_of(config), cards, run_dir if finished else None)
    try:
        seq, digest = append(path, entry)
    except OSError as err:
        log.warning("audit log '%s' could not be written (%s): this %s (%s) is not in it", path, err.strerror, action,
                    outcome)
        return None
    log.info("audit: %s %s, line %d (sha256 %s) of %s", action, outcome, seq, digest, path)
    return path, seq, digest


def _rank() -> int | None:
    """The process's global rank as Lightning counts it (None before Lightning was imported): information only."""
    import sys

    utilities = sys.modules.get("lightning.pytorch.utilities")
    return getattr(utilities.rank_zero_only, "rank", None) if utilities is not None else None


def _datasets(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The datasets a command's result names: the data read (train, eval), the data a model was trained on (export's
    provenance)."""
    if not result:
        return []
    found = []
    if isinstance(result.get("dataset"), dict):
        found.append(result["dataset"])
    for entry in result.get("datasets") or []:
        if isinstance(entry, dict):
            found.append(entry)
    return found


# -- checking ----------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    ok: bool
    lines: int
    message: str


def verify(path: str | Path) -> Verdict:
    """Check the chain of the log at ``path``: every line JSON, numbered in order, holding the SHA-256 of the line
    before; the head file names the last line. The first line that breaks it is named."""
    path = Path(path)
    if path.is_dir():
        path = path / AUDIT_FILE
    data = path.read_bytes()  # OSError: the caller's
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        return Verdict(False, len(lines), f"line {len(lines)}: not ended by a newline (cut off, or written by "
                                          f"something other than aift)")
    previous = None
    for n, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            return Verdict(False, n, f"line {n}: not a JSON object (changed, or not an aift audit line)")
        if not isinstance(entry, dict):
            return Verdict(False, n, f"line {n}: not a JSON object")
        expected = hashlib.sha256(previous).hexdigest() if previous is not None else GENESIS
        if entry.get("prev") != expected:
            what = ("is not the first line of a log (its prev is not 64 zeros): lines before it were removed"
                    if previous is None else
                    f"its prev is not the SHA-256 of line {n - 1}: line {n - 1} was changed, or lines were "
                    f"inserted or removed between them")
            return Verdict(False, n, f"line {n}: {what}")
        if entry.get("seq") != n:
            return Verdict(False, n, f"line {n}: numbered {entry.get('seq')!r}, expected {n}: lines were inserted "
                                     f"or removed before it")
        previous = line
    head = path.with_name(path.name + HEAD_SUFFIX)
    last = hashlib.sha256(previous).hexdigest() if previous is not None else GENESIS
    if head.is_file():
        try:
            stated = json.loads(head.read_text())
        except ValueError:
            return Verdict(False, len(lines), f"head file '{head}' is not JSON")
        if stated.get("lines") != len(lines) or stated.get("sha256") != last:
            return Verdict(False, len(lines), (
                f"line {len(lines) + (1 if stated.get('lines', 0) > len(lines) else 0)}: the head file '{head}' names "
                f"{stated.get('lines')} lines ending in sha256 {stated.get('sha256')}, the log has {len(lines)} "
                f"ending in {last}: the last line was changed, or lines were removed from or added to the end"))
        return Verdict(True, len(lines), f"{len(lines)} lines, chain intact, last sha256 {last} (matches {head.name})")
    return Verdict(True, len(lines), f"{len(lines)} lines, chain intact, last sha256 {last}; no head file "
                                     f"{head.name}: lines cut off the end would not be found")


def command_ended(command: str, run_dir: Path | None, result: Any = None, error: BaseException | None = None,
                  config: Any = None) -> None:
    """The hook of the commands (cli.py): the line of ``command`` once it ended, with ``result`` (its summary) or
    ``error``. Every process of a run writes its own line (with its rank): which rank a process is comes from
    variables a user can set, so no process may leave its line out on that ground."""
    global _NOTED
    if error is None:
        outcome = "stopped" if isinstance(result, dict) and result.get("status") == "stopped" else "ok"
    elif _NOTED is not None and _NOTED.get("refusal") is error:
        outcome = "refused"
    elif isinstance(error, KeyboardInterrupt):
        outcome = "interrupted"
    else:
        outcome = "failed"
    if command == "export" and run_dir is not None and error is None:
        provenance = Path(run_dir) / "provenance.json"
        try:
            result = {**(result or {}), "datasets": json.loads(provenance.read_text()).get("datasets") or []}
        except (OSError, ValueError):
            pass
    if command == "export" and error is not None:
        _NOTED = None
        return  # nothing left the run folder; which checkpoint was tried is in its log
    try:
        log_action(command, outcome, run_dir, error, result if isinstance(result, dict) else None, config)
    except Exception as err:  # noqa: BLE001 - the audit line must never turn a finished run into a failure
        log.warning("audit log: the line of this %s could not be written (%s: %s)", command, type(err).__name__, err)
    finally:
        _NOTED = None  # this command's check: never the next command's (several commands in one process)
