"""The chaos suite's hooks in its jobs' processes (drivers, Ray workers, image encoders; tests/chaos.py puts this
folder on their PYTHONPATH). Each is read at the moment it acts, so a run turns it on and off by writing or
removing a file, on a shared cluster too:

- s3fs's pipe_file uploads in parts of the size that $CHAOS_PART_SIZE_FILE holds, so that shards of the suite's
  small job go through multipart uploads (a missing file or 0 leaves s3fs's own: parts of 50 MiB, multipart from
  100 MiB);
- while $CHAOS_MEMORY_FULL_FILE exists, reserving an image encoder's shared-memory block (os.posix_fallocate on
  a memfd named instaflow-encode, pipeline/encoders.py) fails with ENOSPC, as with a full memory;
- while $CHAOS_ENCODER_START_FAILS_FILE exists, starting an image encoder process (subprocess.Popen of
  `pipeline.encoders`) fails with EMFILE, as when the worker is out of file descriptors; in the process whose
  pid the file holds only (in every process if it is empty)."""

import errno
import os

if os.environ.get("CHAOS_PART_SIZE_FILE"):
    import s3fs.core

    _pipe_file = s3fs.core.S3FileSystem._pipe_file

    def _part_size() -> int:
        try:
            with open(os.environ["CHAOS_PART_SIZE_FILE"]) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    async def _pipe_file_in_parts(self, path, data, chunksize=None, **kwargs):
        return await _pipe_file(self, path, data, chunksize=chunksize or _part_size() or 50 * 2**20, **kwargs)

    s3fs.core.S3FileSystem._pipe_file = _pipe_file_in_parts

if os.environ.get("CHAOS_MEMORY_FULL_FILE"):
    _posix_fallocate = os.posix_fallocate

    def _fallocate_unless_memory_full(fd, offset, length):
        if os.path.exists(os.environ["CHAOS_MEMORY_FULL_FILE"]):
            try:
                name = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                name = ""
            if name.startswith("/memfd:instaflow-encode"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (chaos suite: memory_full)")
        return _posix_fallocate(fd, offset, length)

    os.posix_fallocate = _fallocate_unless_memory_full

if os.environ.get("CHAOS_ENCODER_START_FAILS_FILE"):
    import subprocess

    def _cannot_start() -> bool:
        try:
            with open(os.environ["CHAOS_ENCODER_START_FAILS_FILE"]) as f:
                return f.read().strip() in ("", str(os.getpid()))
        except OSError:
            return False

    class _PopenUnlessNoDescriptors(subprocess.Popen):
        def __init__(self, args, *more, **kwargs):
            if "pipeline.encoders" in (args if isinstance(args, (list, tuple)) else [args]) and _cannot_start():
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE) + " (chaos suite: encoder_start_fails)")
            super().__init__(args, *more, **kwargs)

    subprocess.Popen = _PopenUnlessNoDescriptors
