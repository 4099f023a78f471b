"""Unsigned reads of an S3 "folder" (a zarr container): objects through tensorstore, listings through s3fs.

Public buckets are read anonymously: no credentials are looked up, sent or needed, and no
instance-metadata endpoint is probed (tensorstore's ``anonymous`` credentials, s3fs ``anon=True``).
Objects go through tensorstore's ``s3`` key-value store (C++, concurrent, bounded retries with
backoff for SlowDown/5xx and dropped connections, from the fetch context's retry policy); a
missing object is ``None``, not an error. Listings go through s3fs/botocore (ListObjectsV2, paged),
because tensorstore lists keys without sizes and ETags. Every failure is a one-line FetchError
naming the dataset and the ``s3://bucket/key``. Requests are counted in ``ctx.other_requests``.

``ctx`` is whatever fetch the folder serves (:class:`S3Context`: the fetch context is one); this
layer knows nothing of sources.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

from emdata.errors import FetchError
from emdata.transport.retry import RetryPolicy

T = TypeVar("T")
R = TypeVar("R")


class S3Context(Protocol):
    """What an S3 folder needs from the fetch it serves."""

    dataset: str
    policy: RetryPolicy | None  # None: RetryPolicy.from_env()
    other_requests: int  # the folder adds each request it sends

    def tensorstore_context(self) -> dict[str, Any]:
        """A tensorstore ``context`` spec with the fetch's retry and concurrency bounds."""
        ...

    def map(self, fn: Callable[[T], R], items: Iterable[T], *, cancel: threading.Event | None = None) -> list[R]:
        """``fn`` over ``items`` on the fetch's bounded worker pool (a source lists a folder's rows on it)."""
        ...


def anonymous_filesystem(dataset: str, policy: RetryPolicy, *, endpoint_url: str | None = None,
                         region: str | None = None) -> Any:
    """An anonymous (unsigned) s3fs filesystem with bounded retries and timeouts."""
    try:
        import s3fs
    except ImportError as exc:  # pragma: no cover - s3fs comes with dvc-s3
        raise FetchError(dataset, endpoint_url or "s3", "s3fs is not installed",
                         "pip install s3fs (it comes with dvc-s3)") from exc
    client_kwargs: dict[str, Any] = {}
    if region:
        client_kwargs["region_name"] = region
    if endpoint_url:
        client_kwargs["endpoint_url"] = endpoint_url
    # botocore's max_attempts counts retries; total_max_attempts counts tries. s3fs has its own
    # retry loop on top (5 by default), which would multiply the two: keep only botocore's.
    config = {"retries": {"total_max_attempts": policy.attempts, "mode": "standard"},
              "connect_timeout": policy.connect_timeout, "read_timeout": policy.read_timeout}
    fs = s3fs.S3FileSystem(anon=True, client_kwargs=client_kwargs, config_kwargs=config,
                           skip_instance_cache=True)
    fs.retries = 1
    return fs


class S3Folder:
    """The objects under ``s3://<bucket>/<prefix>/``, addressed by keys relative to it."""

    def __init__(self, ctx: S3Context, *, bucket: str, prefix: str, region: str,
                 endpoint: str | None = None, requests_in_flight: int | None = None) -> None:
        self.ctx, self.bucket, self.prefix = ctx, bucket, prefix.strip("/")
        self.region, self.endpoint = region, endpoint
        # Small objects are latency-bound: a few requests per worker keep the link busy while the
        # workers write and hash (default: the context's bound, one per worker).
        self.requests_in_flight = requests_in_flight
        self.policy = policy = ctx.policy or RetryPolicy.from_env()
        # tensorstore has no request timeout of its own: bound each operation (tries x (connect + read + backoff)).
        self.timeout = policy.attempts * (policy.connect_timeout + policy.read_timeout + policy.max_delay)
        self._kv: Any = None
        self._fs: Any = None
        self._lock = threading.Lock()  # builds the tensorstore key-value store once
        self._fs_lock = threading.Lock()  # builds the s3fs filesystem once
        self._count_lock = threading.Lock()

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self.prefix}/{key}"

    def _count(self, n: int = 1) -> None:
        with self._count_lock:
            self.ctx.other_requests += n

    @property
    def kv(self) -> Any:
        with self._lock:
            if self._kv is None:
                import tensorstore as ts

                spec: dict[str, Any] = {"driver": "s3", "bucket": self.bucket, "path": self.prefix + "/",
                                        "aws_region": self.region}
                if self.endpoint:
                    spec["endpoint"] = self.endpoint
                try:
                    context = self.ctx.tensorstore_context()
                    if self.requests_in_flight:
                        context["s3_request_concurrency"] = {"limit": self.requests_in_flight}
                    self._kv = ts.KvStore.open(spec, context=ts.Context(context)).result(
                        timeout=self.timeout)
                except Exception as exc:
                    raise self._error(self.url(), exc) from exc
            return self._kv

    def _error(self, url: str, exc: BaseException) -> FetchError:
        """tensorstore's status text, shortened to one line: what failed, the HTTP status, what to do."""
        text = str(exc)
        code = re.search(r"http_response_code='(\d+)'", text)
        detail = re.sub(r"^[A-Z_]+: ", "", text.split(" [", 1)[0].strip())
        if "retry attempts failed" in detail:
            detail = detail.replace("All ", "failed after ").replace(" retry attempts failed:", " tries:", 1)
        if isinstance(exc, TimeoutError):
            detail = f"no answer within {self.timeout:.0f} s"
        status = f" (HTTP {code.group(1)})" if code and code.group(1) not in detail else ""
        hint = ("the bucket must allow anonymous reads (emdata never sends credentials)" if code and code.group(1) == "403"
                else "check the endpoint and the network, then fetch again (finished objects are kept)")
        return FetchError(self.ctx.dataset, url, f"{detail[:240]}{status}", hint)

    def get(self, key: str) -> bytes | None:
        """The object at ``key``, or None when the service has no such object."""
        return self.get_many([key])[key]

    def read_async(self, key: str) -> Any:
        """Start reading ``key``; :meth:`result` waits for it (reads run concurrently, bounded by the context)."""
        self._count()
        try:
            return self.kv.read(key)
        except FetchError:
            raise
        except Exception as exc:
            raise self._error(self.url(key), exc) from exc

    def result(self, key: str, future: Any) -> bytes | None:
        """The bytes of a read started with :meth:`read_async`, or None when there is no such object."""
        return self.result_and_etag(key, future)[0]

    def result_and_etag(self, key: str, future: Any) -> tuple[bytes | None, str]:
        """Like :meth:`result`, with the ETag the GET answered ('' when tensorstore reports none)."""
        try:
            result = future.result(timeout=self.timeout)
        except Exception as exc:
            raise self._error(self.url(key), exc) from exc
        if result.state == "missing":
            return None, ""
        # tensorstore's storage generation for S3 holds the response's ETag, quotes included.
        etag = re.search(rb'"([^"]*)"', bytes(result.stamp.generation))
        return bytes(result.value), etag.group(1).decode("ascii", "replace") if etag else ""

    def get_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Several objects at once (concurrently); None for each one the service does not have."""
        futures = {key: self.read_async(key) for key in keys}
        return {key: self.result(key, future) for key, future in futures.items()}

    def prepare_listing(self) -> None:
        """Build the s3fs client now, in the background (it costs a few tenths of a second; no request)."""
        def build() -> None:
            try:
                self._filesystem()
            except Exception:  # noqa: BLE001 - listing() builds it again and reports the error
                pass

        threading.Thread(target=build, name="emdata-s3-client", daemon=True).start()

    def _filesystem(self) -> Any:
        with self._fs_lock:
            if self._fs is None:
                fs = anonymous_filesystem(self.ctx.dataset, self.policy, endpoint_url=self.endpoint,
                                          region=self.region)
                fs.connect()  # the botocore client, without a request
                self._fs = fs
            return self._fs

    def keys(self, prefix: str) -> dict[str, tuple[int, str]]:
        """Every key that starts with ``prefix``, listed by tensorstore (no sizes: ``(-1, "")`` each)."""
        import tensorstore as ts

        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # the first key after every key with the prefix
        self._count()
        try:
            found = self.kv.list(ts.KvStore.KeyRange(inclusive_min=prefix, exclusive_max=end)).result(
                timeout=self.timeout)
        except FetchError:
            raise
        except Exception as exc:
            raise self._error(self.url(prefix), exc) from exc
        return {k.decode("utf-8", "surrogateescape"): (-1, "") for k in found}

    def listing(self, prefix: str) -> dict[str, tuple[int, str]]:
        """Key -> (size, ETag) of every object whose key starts with ``prefix`` (ListObjectsV2, paged)."""
        found: dict[str, tuple[int, str]] = {}
        for page in self._pages(prefix):
            for item in page.get("Contents", []):
                found[item["Key"][len(self.prefix) + 1:]] = (int(item["Size"]), str(item.get("ETag", "")))
        return found

    def folders(self, prefix: str) -> list[str]:
        """The keys' "folders" one level below ``prefix`` (which ends in ``/``): relative, each ending in ``/``."""
        return sorted(p["Prefix"][len(self.prefix) + 1:] for page in self._pages(prefix, "/")
                      for p in page.get("CommonPrefixes", []))

    def _pages(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        """The pages of a ListObjectsV2 of ``prefix`` (grouped at ``delimiter`` when given)."""
        fs = self._filesystem()
        full = f"{self.prefix}/{prefix}"
        token = None
        while True:
            args = {"Bucket": self.bucket, "Prefix": full, **({"ContinuationToken": token} if token else {}),
                    **({"Delimiter": delimiter} if delimiter else {})}
            self._count()
            try:
                page = fs.call_s3("list_objects_v2", **args)
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
                raise FetchError(self.ctx.dataset, f"s3://{self.bucket}/{full}", f"listing failed ({first})",
                                 "check the endpoint, region and bucket in params.yaml and the network") from exc
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
