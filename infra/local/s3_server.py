"""Local S3 endpoint for development: moto's ThreadedMotoServer on 127.0.0.1.

    python -m infra.local.s3_server --port 9000 --bucket my-bucket \
        --upload jobs/data/prompts.parquet:s3://my-bucket/prompts/prompts.parquet

Starts the server (always bound to 127.0.0.1), creates the buckets, uploads the
given files, prints the endpoint and the environment variables to export, and
serves until Ctrl-C / SIGTERM. All state is in memory and is lost on exit.

--upload takes LOCAL:s3://bucket/key. LOCAL may be a file or a directory; a
directory is uploaded recursively under the key as a prefix, and a key ending
in "/" (or empty) gets the file's basename appended. Buckets named in --upload
are created automatically.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from pathlib import Path

HOST = "127.0.0.1"  # never 0.0.0.0: this server has no auth and accepts any credentials
CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def parse_upload(spec: str) -> tuple[Path, str, str]:
    """'LOCAL:s3://bucket/key' -> (Path(LOCAL), bucket, key)."""
    local, sep, rest = spec.partition(":s3://")
    if not sep or not local or not rest:
        raise argparse.ArgumentTypeError(f"expected LOCAL:s3://bucket/key, got {spec!r}")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise argparse.ArgumentTypeError(f"missing bucket in {spec!r}")
    path = Path(local)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {local}")
    return path, bucket, key


def upload_items(path: Path, key: str) -> list[tuple[Path, str]]:
    if path.is_dir():
        prefix = key if (key == "" or key.endswith("/")) else key + "/"
        return [
            (f, prefix + f.relative_to(path).as_posix())
            for f in sorted(path.rglob("*"))
            if f.is_file()
        ]
    if key == "" or key.endswith("/"):
        key += path.name
    return [(path, key)]


def check_port_free(port: int) -> None:
    # ThreadedMotoServer.start() blocks forever if the bind fails in its thread, so
    # fail fast here instead (a tiny race window remains; good enough for dev use).
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            sys.exit(f"cannot bind {HOST}:{port}: {e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m infra.local.s3_server",
        description="Run a local in-memory S3 server (moto) on 127.0.0.1.",
    )
    ap.add_argument("--port", type=int, default=9000, help="port (0 = pick a free one; default 9000)")
    ap.add_argument("--bucket", action="append", default=[], metavar="NAME",
                    help="bucket to create (repeatable)")
    ap.add_argument("--upload", action="append", default=[], type=parse_upload,
                    metavar="LOCAL:s3://bucket/key", help="file or directory to upload (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="do not log every request")
    args = ap.parse_args(argv)

    from moto.server import ThreadedMotoServer  # moto[server]
    import boto3

    if args.quiet:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)

    check_port_free(args.port)
    server = ThreadedMotoServer(ip_address=HOST, port=args.port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDS["AWS_DEFAULT_REGION"],
        )
        buckets = list(dict.fromkeys(args.bucket + [b for _, b, _ in args.upload]))
        for b in buckets:
            s3.create_bucket(Bucket=b)
            print(f"created bucket s3://{b}")
        for path, bucket, key in args.upload:
            for f, k in upload_items(path, key):
                s3.upload_file(str(f), bucket, k)
                print(f"uploaded {f} -> s3://{bucket}/{k} ({f.stat().st_size} bytes)")
    except Exception as e:
        server.stop()
        sys.exit(f"setup failed: {e}")

    env = {"AWS_ENDPOINT_URL": endpoint, **CREDS}
    print(f"\nS3 endpoint: {endpoint}  (in-memory; contents are lost on exit)")
    print("In another shell:")
    print("  export " + " ".join(f"{k}={v}" for k, v in env.items()))
    print("Serving; Ctrl-C to stop.", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping S3 server", flush=True)
        server.stop()


if __name__ == "__main__":
    main()
