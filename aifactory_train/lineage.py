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
those of every card above it (aifactory_train/usage_terms.py).
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

# The owner's terms live in aifactory_train/usage_terms.py; these names stay importable from here.
from aifactory_train.usage_terms import (DATACARD_FILE, USAGE_KEYS, UsageTerms, check_usage,  # noqa: E402,F401
                                         datacards_for, describe_cards, load_datacard, read_usage_terms)

DATACARD_FIELDS = ("name", "owner", "license", "consent", "source", "contact", "description", "deidentified",
                   "deidentification")


def digest_files(root: str | Path, paths: Iterable[str], labels: Iterable[Any]) -> str:
    """SHA-256 over (relative path, label, SHA-256 of the file's bytes) of every record, in the given order."""
    root = Path(root)
    resolved_root = root.resolve()
    records = []
    for path, label in zip(paths, labels):
        rel = posixpath.normpath(str(path))
        full = root / rel
        if os.path.isabs(rel) or rel.startswith("../"):
            # resolving costs a syscall per path component: only for paths that may lie outside the root
            try:
                rel = full.resolve().relative_to(resolved_root).as_posix()
            except ValueError:
                rel = full.resolve().as_posix()
        records.append((rel, label, full))
    file_digests = DigestCache.for_root(resolved_root).file_digests({rel: full for rel, _, full in records})
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

    def __init__(self, path: Path | None, refresh: bool = False) -> None:
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None:
            self.path = path = self._trusted(path)
        if path is not None and path.is_file() and not refresh:
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
        for rel, full in files.items():
            stat = _stat_key(full)  # a missing file fails here, before any hashing, with its path
            entry = self.entries.get(self._key(rel))
            if isinstance(entry, list) and len(entry) == len(stat) + 1 and entry[:-1] == stat:
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
    skipped_files: list[str] = field(default_factory=list)

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
        }
