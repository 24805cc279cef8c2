"""The chaos suite's hook in its jobs' processes (drivers and Ray workers; tests/chaos.py puts this folder on their
PYTHONPATH): s3fs's pipe_file uploads in parts of the size that $CHAOS_PART_SIZE_FILE holds, so that shards of
the suite's small job go through multipart uploads. The file is read at each upload, so each run on a shared
cluster sets its own size; a missing file or 0 leaves s3fs's own (parts of 50 MiB, multipart from 100 MiB)."""

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
