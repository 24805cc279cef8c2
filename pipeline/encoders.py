"""A worker's image encoders: processes of their own, fed through shared memory, so that encoding never takes the
interpreter lock from the thread that drives the device (tests/bench/encoders.py: beside a device thread that holds
the lock for 90% of each batch, as eager kernel launches do, 4 to 8 encoder threads slowed the device to 0.92 of
its rate; as many processes kept it at 0.98 to 0.995).

Each batch's pixels are copied once, as they lie (planar or channels-last), into a shared-memory block, by a
feeder thread that first waits for the device's copy to the host; the processes encode a few images of it at a
time and send back their bytes. Every image has its own future, so a row whose image cannot be encoded fails
alone. A process that dies fails the images it held with EncoderLost, which is no row's fault: their unit's try
fails and is retried. It is replaced; if no replacement can start, the worker encodes in its own process.

Nothing outlives the worker, however it ends (an exception, SIGTERM, `ray.kill`, which SIGKILLs the worker's
children first, or the OOM killer): a block is an anonymous memory file (memfd) that has no name in /dev/shm, so
the kernel frees it with the last process that maps it, and its descriptor goes to the processes over a socket
(SCM_RIGHTS), so no path names it. A process ends when its input closes, which the kernel does when the worker
ends (or `close()`, for a worker outside Ray). A block's pages are reserved when it is made (fallocate), so
writing it later never raises SIGBUS; where the kernel refuses the memory (ENOSPC, ENOMEM), encoding falls back
to the worker's own process. In a memory cgroup that is full, the OOM killer acts first, as it would for any
allocation of the same size.

    python -m pipeline.encoders FD   # one encoder process: tasks in on stdin, blocks on socket FD, results on stdout
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import pickle
import queue
import socket
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future

import numpy as np

from pipeline.writers import encode_image

logger = logging.getLogger(__name__)

IMAGES_PER_TASK = 4  # per message: few messages, and a batch still spread over the processes


class EncoderLost(RuntimeError):
    """An image was not encoded for a reason that is not its own (an encoder process died, the device's copy
    failed): the unit's try fails and is retried, rather than its rows committed as failed."""


class _Block:
    """Shared memory that one batch's pixels occupy until their last image is encoded: an anonymous memory file,
    reserved in full, whose descriptor each process receives once, with the block's id."""

    _ids = itertools.count()

    def __init__(self, size: int):
        self.fd = os.memfd_create("instaflow-encode", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            os.posix_fallocate(self.fd, 0, size)  # ENOSPC/ENOMEM now, rather than SIGBUS on a page written later
            self.buf = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.size = size
        self.id = next(self._ids)  # descriptors are reused; ids are not
        self.images_left = 0

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


_BLOCK_ID = struct.Struct("!Q")


class _Process:
    def __init__(self):
        env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # this worker's imports
        self.blocks_socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.popen = subprocess.Popen([sys.executable, "-m", "pipeline.encoders", str(theirs.fileno())],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                          pass_fds=(theirs.fileno(),))
        except BaseException:
            self.blocks_socket.close()
            raise
        finally:
            theirs.close()
        self.blocks_sent: set[int] = set()
        self.tasks: dict[int, tuple] = {}  # task id -> (block, its futures)
        self.images = 0  # images sent and not yet returned: the next task goes to the least loaded process

    def send(self, block: "_Block", task: tuple) -> None:
        """The block's descriptor first if this process has not had it, then the task; OSError if it is gone."""
        if block.id not in self.blocks_sent:
            socket.send_fds(self.blocks_socket, [_BLOCK_ID.pack(block.id)], [block.fd])
            self.blocks_sent.add(block.id)
        pickle.dump(task, self.popen.stdin)
        self.popen.stdin.flush()

    def end(self) -> None:
        """Closes its input (it exits when it has read the rest) and its socket."""
        for stream in (self.popen.stdin, self.blocks_socket):
            try:
                stream.close()
            except OSError:
                pass


class EncoderProcesses:
    """`count` encoder processes; `submit` returns one future per image (its encoded bytes)."""

    def __init__(self, count: int):
        self.count = count
        self.images_encoded = 0
        self._lock = threading.Lock()
        self._free: list[_Block] = []
        self._blocks: list[_Block] = []  # every block made, closed with the encoders
        self._task_ids = itertools.count()
        self._closed = False
        self._warned_no_room = False
        self._processes = [self._start() for _ in range(count)]
        self._feed: queue.SimpleQueue = queue.SimpleQueue()
        self._feeder = threading.Thread(target=self._feed_loop, name="encode-feeder", daemon=True)
        self._feeder.start()

    def submit(self, pixels, n: int, image_format: str) -> list[Future]:
        """Encodes the first `n` images of `pixels` (a HostCopy or anything with `numpy()` giving (N, H, W, 3)
        uint8); returns at once, without waiting for the device's copy."""
        if self._closed:
            raise RuntimeError("the image encoders are closed")
        futures = [Future() for _ in range(n)]
        if n:
            self._feed.put((pixels, n, image_format, futures))
        return futures

    def pids(self) -> list[int]:
        with self._lock:
            return [process.popen.pid for process in self._processes]

    def close(self) -> None:
        """Ends the processes (their input closes) and frees the shared memory; the worker's end does the same."""
        self._closed = True
        self._feed.put(None)
        self._feeder.join(timeout=10)
        with self._lock:
            processes, self._processes = list(self._processes), []
        for process in processes:
            process.end()
        for process in processes:
            try:
                process.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.popen.kill()
        with self._lock:
            blocks, self._blocks, self._free = self._blocks, [], []
        for block in blocks:
            block.close()

    # ----------------------------------------------------------------------------------------- in the worker

    def _start(self) -> _Process:
        process = _Process()
        threading.Thread(target=self._read_loop, args=(process,), name="encode-results", daemon=True).start()
        return process

    def _feed_loop(self) -> None:
        while (item := self._feed.get()) is not None:
            pixels, n, image_format, futures = item
            try:
                self._send(pixels.numpy()[:n], image_format, futures)
            except Exception as exc:  # the device's copy failed, or no process could take the batch
                lost = EncoderLost(f"the batch's pixels could not be encoded: {type(exc).__name__}: {exc}")
                for future in futures:
                    if not future.done():
                        future.set_exception(lost)

    def _send(self, pixels: np.ndarray, image_format: str, futures: list[Future]) -> None:
        planar = pixels.transpose(0, 3, 1, 2)
        layout = "planar" if planar.flags.c_contiguous else "hwc"  # copied as it lies: no gather here
        source = planar if layout == "planar" else pixels
        with self._lock:
            block = self._block(source.nbytes) if self._processes else None  # none left: encoded here
        if block is None:
            encoded = _settle(futures, _encode_each(pixels, image_format))
            with self._lock:
                self.images_encoded += encoded
            return
        np.copyto(np.ndarray(source.shape, np.uint8, buffer=block.buf), source)
        block.images_left = len(futures)
        with self._lock:
            for first in range(0, len(futures), IMAGES_PER_TASK):
                last = min(first + IMAGES_PER_TASK, len(futures))
                if not self._processes:  # the last one died and none could start: its reader failed what it held
                    error = EncoderLost("no image encoder process is left")
                    for future in futures[first:]:
                        future.set_exception(error)
                    block.images_left -= len(futures) - first
                    if block.images_left == 0:
                        self._free.append(block)
                    return
                process = min(self._processes, key=lambda p: p.images)
                task_id = next(self._task_ids)
                process.tasks[task_id] = (block, futures[first:last])
                process.images += last - first
                try:
                    process.send(block, (task_id, block.id, source.shape, layout, first, last, image_format))
                except OSError:  # it died: its reader fails what it held and starts another
                    pass

    def _block(self, size: int) -> _Block | None:
        """A free block of at least `size` bytes; the smallest that fits, else a new one; None when no memory can
        be reserved for one: the batch is then encoded in the worker's own process. Called holding the lock."""
        fitting = [block for block in self._free if block.size >= size]
        if fitting:
            block = min(fitting, key=lambda b: b.size)
            self._free.remove(block)
            return block
        try:
            self._blocks.append(_Block(size))
            return self._blocks[-1]
        except OSError as exc:
            if not self._warned_no_room:
                self._warned_no_room = True
                logger.warning("no shared memory for a batch's pixels (%d MB): %s; encoding in the worker's own "
                               "process", size >> 20, exc)
            return None

    def _read_loop(self, process: _Process) -> None:
        while True:
            try:
                task_id, results = pickle.load(process.popen.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                break
            with self._lock:
                block, futures = process.tasks.pop(task_id)
                process.images -= len(futures)
            self._done(block, len(futures), _settle(futures, results))
        status = process.popen.wait()
        with self._lock:
            lost, process.tasks = list(process.tasks.values()), {}
            replace = not self._closed and process in self._processes
            if replace:
                try:
                    self._processes[self._processes.index(process)] = self._start()
                except Exception as exc:  # EMFILE, ENOMEM: the worker encodes what comes next itself
                    self._processes.remove(process)
                    logger.warning("an image encoder process exited with status %s and none could be started in "
                                   "its place (%s); %d remain", status, exc, len(self._processes))
        if replace and lost:
            logger.warning("an image encoder process exited with status %s; the images of %d tasks it held "
                           "failed, and their unit's try with them", status, len(lost))
        elif replace:  # idle: no output is touched (Ray kills a worker's children first when it ends the worker)
            logger.debug("an idle image encoder process exited with status %s", status)
        error = EncoderLost(f"the image encoder process exited with status {status}")
        for block, futures in lost:
            for future in futures:
                future.set_exception(error)
            self._done(block, len(futures), 0)

    def _done(self, block: _Block, images: int, encoded: int) -> None:
        with self._lock:
            self.images_encoded += encoded
            block.images_left -= images
            if block.images_left == 0:
                self._free.append(block)


def _encode_each(images, image_format: str) -> list:
    """Each image's bytes, or the exception its encoding raised: a bad image fails alone."""
    results = []
    for image in images:
        try:
            results.append(encode_image(image, image_format))
        except Exception as exc:
            results.append(exc)
    return results


def _settle(futures: list[Future], results: list) -> int:
    """Each future's result or exception; returns how many images were encoded."""
    for future, result in zip(futures, results):
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    return sum(not isinstance(result, BaseException) for result in results)


# ------------------------------------------------------------------------------------------ in the process


def serve(tasks, results, blocks_socket: socket.socket) -> None:
    """Encodes tasks read from `tasks` until it closes (the worker ended or closed it); each result is (task id,
    [bytes or exception]). A task's block came on `blocks_socket` before it, as its id and descriptor."""
    blocks: dict[int, mmap.mmap] = {}
    while True:
        try:
            task_id, block_id, shape, layout, first, last, image_format = pickle.load(tasks)
        except EOFError:
            return
        while block_id not in blocks:
            message, fds, _, _ = socket.recv_fds(blocks_socket, _BLOCK_ID.size, 1)
            if not fds:  # the worker is gone
                return
            blocks[_BLOCK_ID.unpack(message)[0]] = mmap.mmap(fds[0], 0, prot=mmap.PROT_READ)
            os.close(fds[0])
        pixels = np.ndarray(shape, np.uint8, buffer=blocks[block_id])[first:last]
        images = pixels.transpose(0, 2, 3, 1) if layout == "planar" else pixels
        encoded = [result if not isinstance(result, Exception) or _picklable(result)
                   else RuntimeError(f"{type(result).__name__}: {result}")
                   for result in _encode_each(images, image_format)]
        try:
            pickle.dump((task_id, encoded), results)
            results.flush()
        except BrokenPipeError:  # the worker is gone
            return


def _picklable(exc: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(exc))
        return True
    except Exception:
        return False


if __name__ == "__main__":
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else printed goes to the worker's log, not into the results
    serve(sys.stdin.buffer, results, socket.socket(fileno=int(sys.argv[1])))
