"""Files a recipe reads outside training: the inputs of ``aift predict``, read in batches by a pool of workers,
and the data card that covers them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator


def input_files(path: str, extensions: tuple[str, ...]) -> list[Path]:
    """The files under ``path`` (a folder, searched recursively, in sorted order) or ``path`` itself."""
    from aifactory_train.errors import DataError

    kinds = ", ".join(extensions)
    root = Path(path)
    if not root.exists():
        raise DataError(f"config key 'input': '{path}' does not exist; give a folder of files ({kinds}) or one file")
    if root.is_file():
        if not root.name.lower().endswith(extensions):
            raise DataError(f"config key 'input': '{path}' is not a kind of file this recipe reads; valid: {kinds}")
        return [root]
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.name.lower().endswith(extensions))
    if not files:
        raise DataError(f"config key 'input': the folder '{path}' holds no files this recipe reads ({kinds})")
    return files


class _FileReads:
    """A map-style dataset of ``read(file)``: what DataLoader workers run. A file the reader refuses comes back as
    its message, so the main process raises the reader's DataError as it is (a worker's exception would arrive
    wrapped in the worker's traceback)."""

    def __init__(self, files: list[Path], read: Callable[[Path], Any]):
        self.files, self.read = files, read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, str | None]:
        from aifactory_train.errors import DataError

        try:
            return self.read(self.files[index]), None
        except DataError as err:
            return None, str(err)


def read_in_batches(files: list[Path], read: Callable[[Path], Any], batch_size: int,
                    num_workers: int) -> Iterator[tuple[list[Path], list[Any]]]:
    """(files, what ``read`` made of each) per batch, in file order, read by ``num_workers`` DataLoader worker
    processes while the model works on the batch before (0: in this process). For recipes whose files take real
    work to decode (images); ``read`` must be picklable where workers are spawned (a module-level function, or a
    functools.partial of one)."""
    from torch.utils.data import DataLoader

    from aifactory_train.errors import DataError

    loader = DataLoader(_FileReads(files, read), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    for start, items in zip(range(0, len(files), batch_size), loader):
        for _, error in items:
            if error is not None:
                raise DataError(error)
        yield files[start:start + batch_size], [item for item, _ in items]


def datacard_root(path: Path) -> Path | None:
    """The folder of the nearest data card at or above ``path`` (resolved), whose fields describe these files; the
    owner's terms of it and of every card above it apply (usage_terms.datacards_for)."""
    from aifactory_train.records.usage_terms import datacards_for

    cards = datacards_for(path)
    return cards[0].parent if cards else None
