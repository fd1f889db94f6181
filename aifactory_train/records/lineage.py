"""Data lineage: which data trained a model, whose it is, and what consent covers it.

Each split gets a SHA-256 digest over the full content of every file it uses (path relative to the data root,
label and the SHA-256 of the file's bytes), so two runs share a digest only if they saw exactly the same data.
MLflow's own Hugging Face digest reads only the first 10,000 rows, which is why we pass ours.

Hashing every byte of a terabyte split takes minutes, on every run, while the other ranks of a multi-node job
wait for rank 0 (and give up past the process group's timeout). So each file's SHA-256 is kept in a cache, keyed by what
``stat`` says of it (size, mtime, ctime, inode: git's and DVC's test for "unchanged"), and only new or changed
files are read, by several threads. The cache lives under ``$AIFT_CACHE_DIR`` (default
``~/.cache/aifactory_train``), one JSON file per data root, and holds hashes of the file names, never the names
themselves. ``AIFT_DIGEST_CACHE=0`` reads every byte every time; ``AIFT_DIGEST_CACHE=refresh`` (what `aift data
digest --recompute` sets) reads every byte once and rewrites the cache.

A digest is only as good as the cache it came from: a cache another user can write would let them plant a digest
for data they changed. So the cache is per user: its folder is created 0700, and a folder or file that is not the
user's own, or that others may write, is not read (every file is hashed, with a warning). An entry is bound to the
file's device and inode as well as its size, mtime and ctime; ctime cannot be set back by a user, so a changed file
is always re-read.

A data root may carry a ``datacard.yaml`` (owner, license, consent, source, contact); its fields are
logged with the run and copied into summary.json. `aift data synth` writes one. Its ``usage`` section holds
the owner's terms (recipes, users, Slurm accounts, hosts, an end date), checked before a run uses the data, with
those of every card above it (aifactory_train/records/usage_terms.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

# The owner's terms live in aifactory_train/records/usage_terms.py; these names stay importable from here.
from aifactory_train.records.usage_terms import (DATACARD_FILE, USAGE_KEYS, UsageTerms, check_usage,  # noqa: E402,F401
                                         datacards_for, describe_cards, load_datacard, read_usage_terms)

DATACARD_FIELDS = ("name", "owner", "license", "consent", "source", "contact", "description", "deidentified",
                   "deidentification")


def _digest_names(root: Path, resolved_root: Path, path: str) -> tuple[str, Path]:
    """(the name a file is hashed and cached under, its path) for ``path`` relative to ``root``."""
    rel = posixpath.normpath(str(path))
    full = root / rel
    if os.path.isabs(rel) or rel.startswith("../"):
        # resolving costs a syscall per path component: only for paths that may lie outside the root
        try:
            rel = full.resolve().relative_to(resolved_root).as_posix()
        except ValueError:
            rel = full.resolve().as_posix()
    return rel, full


def file_digests(root: str | Path, paths: Iterable[str]) -> dict[str, str]:
    """``{path: SHA-256 of its bytes}`` for files relative to ``root``, through the digest cache: the same hashes
    the split digests are made of, so checks on content (a validation file identical to a training file) read no
    file twice. Pass the result to ``digest_files(digests=...)``."""
    root = Path(root)
    resolved_root = root.resolve()
    names = {str(p): _digest_names(root, resolved_root, str(p)) for p in paths}
    by_rel = DigestCache.for_root(resolved_root).file_digests(dict(names.values()))
    return {p: by_rel[rel] for p, (rel, _) in names.items()}


def digest_files(root: str | Path, paths: Iterable[str], labels: Iterable[Any],
                 digests: dict[str, str] | None = None) -> str:
    """SHA-256 over (relative path, label, SHA-256 of the file's bytes) of every record, in the given order.
    ``digests``: the files' SHA-256s from ``file_digests`` (taken when the data were checked), used as they are."""
    root = Path(root)
    resolved_root = root.resolve()
    records = []
    known = {}
    for path, label in zip(paths, labels):
        rel, full = _digest_names(root, resolved_root, str(path))
        records.append((rel, label, full))
        if digests is not None and str(path) in digests:
            known[rel] = digests[str(path)]
    missing = {rel: full for rel, _, full in records if rel not in known}
    file_digests = {**known, **(DigestCache.for_root(resolved_root).file_digests(missing) if missing else {})}
    sha = hashlib.sha256()
    for rel, label, _ in records:
        sha.update(f"{rel}\0{label}\0{file_digests[rel]}\n".encode())
    return sha.hexdigest()


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)  # hashlib lets go of the GIL on large updates, so threads hash in parallel
    return sha.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _private_to_this_user(path: Path) -> str | None:
    """Why ``path`` (the cache folder or file) may not be trusted, or None: it must be this user's own, and no one
    else may write it."""
    st = path.stat()
    if st.st_uid != os.getuid():
        return f"it belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"others may write it (mode {oct(st.st_mode & 0o777)})"
    return None


class DigestCache:
    """Per-file SHA-256s of one data root, reused while ``stat`` says a file is unchanged.

    Written by hand (not DVC's state database or a package): the whole of it is a JSON file of ``stat`` keys, read
    once and replaced atomically, which is safe on the shared (Lustre/NFS) filesystems where sqlite locking is
    not. Two jobs writing at once cost at most a re-read of some files, never a wrong digest."""

    VERSION = 2  # 2: entries carry the device too
    # A file changed within this long of being hashed may be changed again within the same mtime tick; such a
    # file is hashed but not cached (git's "racily clean" entries)
    RACY_NS = 2_000_000_000
    # threads that read and hash the files not in the cache (parallel reads also hide network-filesystem latency)
    MAX_THREADS = 8
    # Opt-in, for this process only: a dict here collects every hash computed or looked up, keyed by the file's
    # stat key, so a later caller (`aift data check`: duplicates and leakage across splits) gets the digest's
    # hashes without reading any file again, also for files too new for the cache or with the cache turned off.
    remembered: dict[tuple[int, ...], str] | None = None

    def __init__(self, path: Path | None, refresh: bool = False) -> None:
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None:
            self.path = path = self._trusted(path)
        # refresh: every file this process asks for is read again, and the entries of the others are kept (a
        # dataset's splits are asked for one by one, each through a cache of its own)
        self.refresh = refresh
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("version") == self.VERSION and isinstance(data.get("files"), dict):
                    self.entries = data["files"]
                else:
                    log.warning("digest cache '%s' has another format; hashing every file again", path)
            except (OSError, ValueError, AttributeError) as err:
                log.warning("digest cache '%s' is unreadable (%s); hashing every file again", path, err)

    @staticmethod
    def _trusted(path: Path) -> Path | None:
        """``path`` if its folder is (or could be made) this user's private one and the file, if there, is theirs;
        else None: no cache, every file is hashed."""
        folder = path.parent
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            why = _private_to_this_user(folder)
            if why is None and path.exists():
                why = _private_to_this_user(path)
                folder = path
        except OSError as err:
            log.warning("digest cache '%s' could not be written (%s); every file is hashed", folder, err)
            return None
        if why is not None:
            log.warning("digest cache '%s' is not used: %s; every file is hashed (set AIFT_CACHE_DIR to a folder of "
                        "your own)", folder, why)
            return None
        return path

    @classmethod
    def for_root(cls, resolved_root: Path) -> "DigestCache":
        mode = os.environ.get("AIFT_DIGEST_CACHE", "1").strip().lower()
        if mode in ("0", "false", "no", "off"):
            return cls(None)
        base = Path(os.environ.get("AIFT_CACHE_DIR") or
                    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aifactory_train")
        name = hashlib.sha256(str(resolved_root).encode()).hexdigest()[:32]
        return cls(base / "digests" / f"{name}.json", refresh=mode == "refresh")

    @staticmethod
    def _key(rel: str) -> str:
        # a hash of the name: file names of sensitive data (a patient id in an image name) stay out of the cache
        return hashlib.sha256(rel.encode()).hexdigest()

    def file_digests(self, files: dict[str, Path]) -> dict[str, str]:
        """``{relative path: sha256}`` for ``files``, reading only those not in the cache as they are now."""
        from concurrent.futures import ThreadPoolExecutor

        digests: dict[str, str] = {}
        stale: dict[str, tuple[Path, list[int]]] = {}
        memo, stats = DigestCache.remembered, {}
        for rel, full in files.items():
            stat = _stat_key(full)  # a missing file fails here, before any hashing, with its path
            entry = None if self.refresh else self.entries.get(self._key(rel))
            if memo is not None:
                stats[rel] = tuple(stat)
            if memo is not None and tuple(stat) in memo:
                digests[rel] = memo[tuple(stat)]
            elif isinstance(entry, list) and len(entry) == len(stat) + 1 and entry[:-1] == stat:
                digests[rel] = entry[-1]
            else:
                stale[rel] = (full, stat)
        if stale:
            started = time.time()
            workers = min(self.MAX_THREADS, os.cpu_count() or 1, len(stale))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                hashed = dict(zip(stale, pool.map(file_sha256, [full for full, _ in stale.values()])))
            now_ns = time.time_ns()
            for rel, (full, stat) in stale.items():
                digests[rel] = hashed[rel]
                if _stat_key(full) == stat and now_ns - stat[1] > self.RACY_NS and now_ns - stat[2] > self.RACY_NS:
                    # (the stat key is taken before and after the read: a file changed while it was read is not cached)
                    self.entries[self._key(rel)] = [*stat, hashed[rel]]
            nbytes = sum(stat[0] for _, stat in stale.values())
            log.info("SHA-256: hashed %d file(s), %.1f MB in %.1f s; %d unchanged file(s) from the cache",
                     len(stale), nbytes / 1e6, time.time() - started, len(files) - len(stale))
            self._save()
        if memo is not None:
            memo.update((key, digests[rel]) for rel, key in stats.items())
        return digests

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            import tempfile

            self.path.parent.mkdir(parents=True, exist_ok=True)
            # a name of its own (jobs on several nodes may share a pid) in the same folder, then an atomic rename
            handle, partial = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            # (mkstemp creates the file 0600: the cache stays this user's)
            try:
                with os.fdopen(handle, "w") as out:
                    json.dump({"version": self.VERSION, "files": self.entries}, out)
                os.replace(partial, self.path)
            except OSError:
                Path(partial).unlink(missing_ok=True)
                raise
        except OSError as err:
            log.warning("digest cache '%s' could not be written (%s); the next run hashes these files again",
                        self.path, err)


def read_datacard(root: str | Path) -> dict[str, str]:
    """What the data card of the data at ``root`` says (known fields, as text), for the run's record: the fields of
    the nearest card at or above the resolved ``root`` and, as ``usage``, the terms of every card that covers it
    (what ``check_usage`` enforces); ``terms`` says so when no card states consent or terms. {} without a card."""
    cards = datacards_for(root)
    if not cards:
        return {}
    card = load_datacard(cards[0])
    fields = {k: str(v) for k, v in card.items() if k in DATACARD_FIELDS}
    derived = card.get("derived_from")
    if isinstance(derived, dict):
        fields["derived_from"] = f"{derived.get('source')} (digest {derived.get('digest')})"
    described = describe_cards(cards)
    terms = [t for c in described["cards"] for t in c["terms"]]
    if terms:
        fields["usage"] = "; ".join(terms) if len(terms) > 1 else terms[0]
    elif not described["consent_stated"]:
        fields["terms"] = "none stated: no card states consent or usage terms"
    from aifactory_train.records.withdrawal import describe as withdrawals

    left_out = withdrawals(Path(root))  # each withdrawal list's SHA-256 and the records the readers left out
    if left_out:
        fields["withdrawn"] = left_out
    return fields


@dataclass
class SplitLineage:
    name: str
    num_rows: int
    digest: str
    dataset: Any = None  # the datasets.Dataset, for MLflow's dataset input (not serialised)


@dataclass
class DatasetLineage:
    name: str
    root: str
    splits: dict[str, SplitLineage] = field(default_factory=dict)
    datacard: dict[str, str] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)  # every record data.on_invalid=skip left out
    invalid_records: dict[str, dict[str, Any]] = field(default_factory=dict)  # InvalidRecords.by_reason

    @property
    def digest(self) -> str:
        sha = hashlib.sha256()
        for name in sorted(self.splits):
            sha.update(f"{name}:{self.splits[name].digest}\n".encode())
        return sha.hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": str(Path(self.root).resolve()),  # where the data was, whatever folder the run started in
            "digest": self.digest,
            "splits": {n: {"num_rows": s.num_rows, "digest": s.digest} for n, s in self.splits.items()},
            "datacard": self.datacard,
            "skipped_files": len(self.skipped_files),
            "invalid_records": self.invalid_records,
        }


# -- records that fail a check --------------------------------------------------------------------------------
ON_INVALID = ("error", "skip")
FIRST_PATHS = 5  # paths kept (and logged) per reason: enough to find the pattern, not a copy of the file list
SKIP_HINT = "data.on_invalid=skip leaves such records out and counts them"


class InvalidRecords:
    """What ``data.on_invalid`` does with a record that fails a check when it is first read.

    ``error`` (the default) raises the check's DataError: one line naming the file, the record, the field, the bad
    value and what is expected. ``skip`` leaves the record out and counts it per reason, keeping the first paths.
    ``by_reason`` (``{reason: {"count": n, "first_paths": [...]}}``) is plain data: the DataModules expose it as
    ``invalid_records``; the lineage carries it into summary.json and, with ``skipped_files``, into MLflow."""

    def __init__(self, policy: str = "error", hint: str | None = SKIP_HINT) -> None:
        from aifactory_train.errors import ConfigError

        if policy not in ON_INVALID:
            raise ConfigError(f"config key 'data.on_invalid': '{policy}' is not valid; valid values: "
                              f"{', '.join(ON_INVALID)}")
        self.policy = policy
        self.hint = hint
        self.by_reason: dict[str, dict[str, Any]] = {}
        self.paths: list[str] = []

    def __call__(self, reason: str, path: str, message: str) -> None:
        """Record ``path`` (a file, or ``file:line``) as invalid for ``reason``; raises under policy ``error``."""
        from aifactory_train.errors import DataError

        if self.policy == "error":
            raise DataError(f"{message} ({self.hint})" if self.hint else message)
        entry = self.by_reason.setdefault(reason, {"count": 0, "first_paths": [], "first_message": message})
        entry["count"] += 1
        if len(entry["first_paths"]) < FIRST_PATHS:
            entry["first_paths"].append(str(path))
        self.paths.append(str(path))

    def __len__(self) -> int:
        return len(self.paths)

    def log(self, logger: logging.Logger, root: str | Path) -> None:
        for reason, entry in sorted(self.by_reason.items()):
            logger.warning("data.on_invalid=skip: left out %d record(s) of data.root '%s' (%s), e.g. %s; first: %s",
                           entry["count"], root, reason.replace("_", " "), ", ".join(entry["first_paths"]),
                           entry["first_message"])

    def lineage_fields(self) -> dict[str, str]:
        """Counts per reason for the lineage's tags (MLflow ``aift.data.skipped_<reason>``)."""
        return {f"skipped_{reason}": str(entry["count"]) for reason, entry in sorted(self.by_reason.items())}


def inside_root(root: str | Path, path: str | Path, where: str, base: str | Path | None = None) -> Path:
    """``path`` (relative to ``root`` or absolute) resolved, symlinks and ``..`` included, if it lies inside the
    data root; else a DataError naming ``where`` (file and row) and the path. A dataset is what lies under its
    root: a manifest row ``../other_owner/img.png``, an absolute path or a symlink out of it would read data that
    its data card, usage terms and digest do not cover. ``base``: the folder ``path`` is relative to (default
    ``root``), e.g. a COCO image folder."""
    from aifactory_train.errors import DataError

    resolved_root = Path(root).resolve()
    resolved = (Path(base if base is not None else root) / path).resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise DataError(f"{where}: path '{path}' resolves to '{resolved}', outside data.root '{resolved_root}'; "
                        f"every file of a dataset must lie inside its root (no '..', absolute paths or symlinks "
                        f"out of it)")
    return resolved


class SameBytes:
    """Whether two files under ``root`` hold the same bytes, read now. A match found through the digest cache is
    confirmed by reading both files (rare in valid data, so cheap): a wrong cache entry must not make valid data
    fail a check."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.read: dict[str, str] = {}

    def _sha(self, path: str) -> str:
        if path not in self.read:
            self.read[path] = file_sha256(self.root / path)
        return self.read[path]

    def __call__(self, a: str, b: str) -> bool:
        return self._sha(a) == self._sha(b)


def shared_across_splits(digests: dict[str, dict[str, str]], same=None) -> list[tuple[str, str, str, str]]:
    """(split, path, earlier split, its path) for each file whose bytes (SHA-256) are also in an earlier split
    (``digests``: ``{split: {path: sha256}}`` in order, train first): validation or test data that the model
    trained on measures memory, not generalisation. ``same(path, other)``: confirms a match (``SameBytes``)."""
    seen: dict[str, tuple[str, str]] = {}
    shared = []
    for split, files in digests.items():
        here = {}
        for path, sha in files.items():
            if sha in seen and seen[sha][0] != split and (same is None or same(path, seen[sha][1])):
                shared.append((split, path, *seen[sha]))
            here.setdefault(sha, (split, path))
        for sha, where in here.items():
            seen.setdefault(sha, where)
    return shared
