"""File-system failures as one readable message: what could not be written, why, what to do.

Python's own writes raise OSError with an errno and the file name; orbax writes arrays through
TensorStore, whose failures arrive as ValueError('RESOURCE_EXHAUSTED: ... local file "..." ...
[os_error_code=\'28\']'). `translated` turns both kinds into a StorageError whose message
names the path and the remedy; anything else passes through unchanged.
"""
import contextlib
import errno
import re
from typing import Optional, Tuple

REASONS = {
    errno.ENOSPC: 'the disk is full',
    errno.EDQUOT: 'the disk quota is exceeded',
    errno.EROFS: 'the file system is read-only',
    errno.EACCES: 'permission denied',
    errno.EPERM: 'operation not permitted',
}
# What the user can do about each reason, before the caller's alternative.
FIXES = {errno.ENOSPC: 'free space', errno.EDQUOT: 'free space',
         errno.EROFS: 'make it writable', errno.EACCES: 'make it writable',
         errno.EPERM: 'make it writable'}
# TensorStore's status codes and messages for the same conditions.
_STATUS = {'RESOURCE_EXHAUSTED': errno.ENOSPC, 'PERMISSION_DENIED': errno.EACCES}
_TEXT = {'No space left on device': errno.ENOSPC, 'Disk quota exceeded': errno.EDQUOT,
         'Read-only file system': errno.EROFS, 'Permission denied': errno.EACCES}


class StorageError(OSError):
    """A write that failed because of the file system; the message says what to do."""

    def __init__(self, code: int, message: str, path: Optional[str] = None):
        super().__init__(code, message, path)
        self.message = message

    def __str__(self) -> str:
        return self.message


def failure_of(err: BaseException) -> Optional[Tuple[int, Optional[str]]]:
    """(errno, path) if `err` is a file-system failure listed in REASONS, else None."""
    if isinstance(err, StorageError):
        return None
    if isinstance(err, OSError) and err.errno in REASONS:
        return err.errno, err.filename
    if isinstance(err, ValueError):
        text = str(err)
        code = next((c for s, c in _STATUS.items() if text.startswith(s)), None)
        found = re.search(r"os_error_code='(\d+)'", text)
        if found and int(found.group(1)) in REASONS:
            code = int(found.group(1))
        code = code or next((c for s, c in _TEXT.items() if s in text), None)
        if code is None:
            return None
        path = re.search(r'Failed writing: "([^"]+)"', text) or re.search(
            r'local file "([^"]+)"', text)
        return code, _checkpoint_of(path.group(1)) if path else None
    return None


def _checkpoint_of(path: str) -> str:
    """`.../ckpt/best/7` for a file inside orbax's temporary folder of that checkpoint."""
    return re.sub(r'\.orbax-checkpoint-tmp.*$', '', path)


def message(code: int, path: Optional[str], remedy: str) -> str:
    """'cannot write PATH: the disk is full; free space or <remedy>'."""
    where = f' {path}' if path else ''
    return f'cannot write{where}: {REASONS[code]}; {FIXES[code]} or {remedy}'


@contextlib.contextmanager
def translated(remedy: str):
    """Re-raise file-system failures inside the block as StorageError(message naming the path,
    the reason and `remedy`)."""
    try:
        yield
    except (OSError, ValueError) as err:
        failure = failure_of(err)
        if failure is None:
            raise
        code, path = failure
        raise StorageError(code, message(code, path, remedy), path) from err
