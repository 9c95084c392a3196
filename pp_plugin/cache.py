"""Location of the pp-plugin cache and helpers that write into it atomically.

Downloads and conversions go to a temporary file or folder next to their
target and are renamed into place only once complete, so an interrupted run
never leaves a half-written file or folder under the target's name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pp_plugin.errors import CacheError

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "PP_PLUGIN_CACHE"
"""Environment variable that overrides the cache folder."""


def cache_dir() -> Path:
    """Return the pp-plugin cache folder, creating it when missing.

    The folder is ``$PP_PLUGIN_CACHE`` when that variable is set and not empty,
    else ``$XDG_CACHE_HOME/pp-plugin`` when ``XDG_CACHE_HOME`` is an absolute
    path (the XDG base directory spec says to ignore a relative one), else
    ``~/.cache/pp-plugin``.

    Raises:
        CacheError: the folder cannot be created, or the path is a file.
    """
    override = os.environ.get(CACHE_ENV_VAR, "")
    xdg_cache_home = os.environ.get("XDG_CACHE_HOME", "")
    if override:
        folder = Path(override).expanduser()
    elif xdg_cache_home and Path(xdg_cache_home).is_absolute():
        folder = Path(xdg_cache_home) / "pp-plugin"
    else:
        folder = Path.home() / ".cache" / "pp-plugin"

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise CacheError(
            f"Cache folder {str(folder)!r} cannot be created because a file is in the way: {exc}. "
            f"Remove that file or set {CACHE_ENV_VAR} to another folder."
        ) from exc
    except OSError as exc:
        raise CacheError(
            f"Cache folder {str(folder)!r} cannot be created: {exc}. "
            f"Set {CACHE_ENV_VAR} to a writable folder."
        ) from exc
    return folder


@contextlib.contextmanager
def atomic_write_path(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``target`` when the block exits cleanly.

    The temporary file is created in ``target``'s folder (so ``os.replace`` is a
    rename on one file system) under a unique hidden name, so it never clobbers
    another file. If the block raises, the temporary file is deleted and
    ``target`` is left untouched.

    Args:
        target: final path of the file. Its parent folder is created when missing.
        overwrite: when False, raise CacheError instead of replacing an
            existing ``target``. The check runs both before the block and before
            the rename.

    Raises:
        CacheError: ``overwrite`` is False and ``target`` exists.
    """
    target_path = Path(target)
    _reject_existing(target_path, overwrite)
    target_path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target_path.name}.", suffix=".tmp", dir=target_path.parent)
    os.close(fd)
    temp_path = Path(temp_name)
    # mkstemp creates the file with mode 0600; give it the mode open() would.
    temp_path.chmod(0o666 & ~_current_umask())
    try:
        yield temp_path
        _reject_existing(target_path, overwrite)
        os.replace(temp_path, target_path)
    finally:
        # After a successful os.replace the temporary name no longer exists.
        temp_path.unlink(missing_ok=True)


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``target`` through a temporary file and a rename; return ``target``."""
    with atomic_write_path(target, overwrite=overwrite) as temp_path:
        temp_path.write_bytes(data)
    return Path(target)


def atomic_write_text(
    target: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", overwrite: bool = True
) -> Path:
    """Write ``text`` to ``target`` through a temporary file and a rename; return ``target``."""
    return atomic_write_bytes(target, text.encode(encoding), overwrite=overwrite)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder that is renamed to ``target`` when the block exits cleanly.

    The temporary folder sits next to ``target`` under a unique hidden name. If
    the block raises, it is deleted. An existing ``target`` is never replaced:
    when another process created it while the block ran, the new folder is
    discarded and the existing one kept, because both hold the same result.

    Raises:
        CacheError: ``target`` exists before the block starts.
    """
    target_path = Path(target)
    if target_path.exists():
        raise CacheError(
            f"Folder {str(target_path)!r} already exists and would be replaced. "
            "Delete it to rebuild it, or use it as it is."
        )
    target_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = Path(tempfile.mkdtemp(prefix=f".{target_path.name}.", suffix=".tmp", dir=target_path.parent))
    # mkdtemp creates the folder with mode 0700; give it the mode mkdir() would.
    temp_path.chmod(0o777 & ~_current_umask())
    try:
        yield temp_path
        try:
            os.rename(temp_path, target_path)
        except OSError:
            if not target_path.is_dir():
                raise
            logger.info("Folder %s was created by another process; discarding this copy", target_path)
    finally:
        if temp_path.exists():
            shutil.rmtree(temp_path, ignore_errors=True)


def _reject_existing(target_path: Path, overwrite: bool) -> None:
    if not overwrite and target_path.exists():
        raise CacheError(
            f"File {str(target_path)!r} already exists and overwrite=False. "
            "Delete it or write to another path."
        )


def _current_umask() -> int:
    # NOTE: os.umask can only be read by setting it, so another thread that
    # creates a file during these two calls gets mode 0o022 masking.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
