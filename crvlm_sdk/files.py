"""Writing a directory or a file all at once: a crash leaves the old version or the new one,
never half, and ``overwrite`` replaces only a directory or file of the kind crvlm is writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from crvlm_sdk.errors import BundleError, CrvlmError


def _exists(target: Path, *, overwrite: bool, what: str, error: type[CrvlmError]) -> bool:
    """Whether ``target`` is there to be replaced; without ``overwrite`` that is an error."""
    if not (target.exists() or target.is_symlink()):
        return False
    if not overwrite:
        raise error(f"{target} already exists", hint=f"pass --overwrite (overwrite=True) to replace the {what}, "
                                                     "or choose another path")
    return True


@dataclass(frozen=True)
class Artifact:
    """A kind of directory crvlm writes, recognised before ``overwrite`` replaces one: it holds
    ``marker`` and nothing but names crvlm writes there, so a folder given by mistake is refused
    instead of deleted."""

    what: str
    marker: str
    names: frozenset[str]
    suffixes: tuple[str, ...] = ()
    #: what a refusal raises (its exit code in the CLI)
    error: type[CrvlmError] = CrvlmError

    def owns(self, name: str) -> bool:
        return name in self.names or name.endswith(self.suffixes)

    def check_replaceable(self, target: Path, *, overwrite: bool) -> None:
        """Raise unless writing ``target`` is allowed: it does not exist, or ``overwrite`` is set
        and it is a directory of this kind."""
        if not _exists(target, overwrite=overwrite, what=self.what, error=self.error):
            return
        refuse = f"; --overwrite replaces only a {self.what} crvlm wrote"
        if target.is_symlink() or not target.is_dir():
            raise self.error(f"{target} is not a {self.what} directory{refuse}", hint="choose another path")
        names = {entry.name for entry in target.iterdir()}
        if self.marker not in names:
            raise self.error(f"{target} is not a {self.what} (it has no {self.marker}){refuse}",
                             hint="choose another path")
        foreign = sorted(name for name in names if not self.owns(name))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise self.error(f"{target} holds files a {self.what} does not ({shown}){refuse}",
                             hint="move them elsewhere or choose another path")


BUNDLE = Artifact("bundle", "manifest.json", frozenset({"manifest.json", "tensors.safetensors", "README.md"}),
                  error=BundleError)
REPORT = Artifact("report", "report.json", frozenset({"report.json", "report.md", "bundle-manifest.json"}),
                  (".png",))
CHECKPOINT = Artifact("model checkpoint", "config.json", frozenset(),
                      (".json", ".jinja", ".safetensors", ".txt", ".model"))
DEMO_MODEL = Artifact("demo model", "crvlm_demo_vlm.json", frozenset(), (".json", ".jinja", ".safetensors", ".txt"))


@dataclass(frozen=True)
class FileArtifact:
    """A kind of single file crvlm writes; ``recognise`` tells one crvlm wrote from any other
    file, so ``overwrite`` never replaces a file given by mistake (a model, say)."""

    what: str
    recognise: Callable[[Path], bool]
    error: type[CrvlmError] = CrvlmError

    def check_replaceable(self, target: Path, *, overwrite: bool) -> None:
        if not _exists(target, overwrite=overwrite, what=self.what, error=self.error):
            return
        if target.is_symlink() or not target.is_file() or not self.recognise(target):
            raise self.error(f"{target} is not a {self.what} crvlm wrote; --overwrite replaces only those",
                             hint="choose another path")


def _temporary_names(target: Path) -> re.Pattern[str]:
    """Siblings :func:`atomic_directory` leaves only when its process dies: ``.NAME.PID.*.tmp``
    (being written) and ``.NAME.old-PID`` (the previous version, between two renames)."""
    return re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)\..*\.tmp|old-(\d+))$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(target: Path) -> None:
    """Undo what a killed writer of ``target`` left behind: put a moved-aside previous version
    back if ``target`` is gone, and remove temporaries whose writing process no longer runs."""
    if not target.parent.is_dir():
        return
    pattern = _temporary_names(target)
    for entry in target.parent.iterdir():
        found = pattern.match(entry.name)
        if found is None or _alive(int(found.group(1) or found.group(2))):
            continue
        if found.group(2) and not (target.exists() or target.is_symlink()):
            with contextlib.suppress(OSError):  # left in place if it cannot come back
                os.replace(entry, target)  # the previous version was complete: it comes back
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


@contextmanager
def atomic_directory(target: Path, kind: Artifact, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty sibling of ``target`` to fill; on success it takes ``target``'s place.

    An existing ``target`` is replaced only with ``overwrite`` and only if it is a ``kind``
    directory; it is moved aside, replaced with one rename and only then removed. Without
    ``overwrite`` the final rename refuses a ``target`` another process created meanwhile. On any
    error the half-written sibling is removed and ``target`` is left as it was; a writer killed
    outright is cleaned up after by the next one (:func:`recover_interrupted`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    kind.check_replaceable(target, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if overwrite and (target.exists() or target.is_symlink()):
            kind.check_replaceable(target, overwrite=True)  # it may have changed while we wrote
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)  # fails on a non-empty directory written meanwhile
            except OSError:
                raise kind.error(f"{target} was created by someone else while this {kind.what} was written",
                                 hint="pass --overwrite (overwrite=True) to replace it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: Path, kind: FileArtifact, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path of ``target`` to write; on success it becomes ``target``.

    The same promises as :func:`atomic_directory`: an existing ``target`` is replaced (in one
    rename) only with ``overwrite`` and only if ``kind`` recognises it; without ``overwrite`` a
    file created meanwhile is not replaced (the temporary is hard-linked into place, which
    fails if the name exists); on any error the temporary is removed and ``target`` is as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    kind.check_replaceable(target, overwrite=overwrite)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        if overwrite and (target.exists() or target.is_symlink()):
            kind.check_replaceable(target, overwrite=True)  # it may have changed while we wrote
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise kind.error(f"{target} was created by someone else while this {kind.what} was written",
                                 hint="pass --overwrite (overwrite=True) to replace it") from None
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
