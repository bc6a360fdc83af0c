"""The one settings object: every knob of gateway, job runner and workers (prefix `ACTPROMPT_`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from service.storage.s3 import S3Location


class Settings(BaseSettings):
    """Built once per process (`get_settings()`) and injected; nothing else reads the environment."""

    model_config = SettingsConfigDict(env_prefix="ACTPROMPT_", extra="ignore", frozen=True)

    # --- storage and modes -------------------------------------------------------------------------
    database_url: str = Field(
        default="sqlite:///./var/actprompt.db",
        description="SQLAlchemy URL of the source-of-truth database (SQLite file or postgresql+psycopg://...).",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker (redis://...). Unset = embedded: jobs run in a thread of the gateway.",
    )
    admin_key: str | None = Field(
        default=None,
        description="Key that manages tenants and backbones. Unset in embedded mode = generated and stored "
        "under var_dir.",
    )
    var_dir: Path = Field(default=Path("./var"), description="Folder for the generated admin key and caches.")
    auto_migrate: bool | None = Field(
        default=None,
        description="Run Alembic migrations at start. Unset = only in embedded mode; otherwise the server "
        "refuses to start on an unmigrated database.",
    )
    embedded_worker: bool = Field(
        default=True,
        description="In embedded mode, run queued jobs in a thread of the gateway (off = jobs wait queued).",
    )

    # --- datasets ----------------------------------------------------------------------------------
    data_roots: str = Field(
        default="./data", description="Colon-separated folders that file:// dataset URIs may read from."
    )
    allow_http_datasets: bool = Field(
        default=True, description="Allow http(s):// dataset URIs (public addresses only)."
    )
    max_dataset_bytes: int = Field(ge=1, default=2 << 30, description="Largest dataset download, in bytes.")
    files_dir: Path | None = Field(
        default=None,
        description="Where uploaded files (POST /v1/files) are stored. Unset = var_dir/files; in production "
        "a path shared by the API and the workers (a volume).",
    )
    storage_url: str | None = Field(
        default=None,
        description="Where uploaded files live: s3://bucket/prefix (credentials from boto3's chain: AWS_* "
        "environment variables, a profile or an instance role; never from here). Unset = files_dir.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for a non-AWS store (MinIO, Ceph, moto: http://host:9000); unset = AWS.",
    )
    s3_region: str | None = Field(default=None, description="S3 region; unset = boto3's own (AWS_REGION).")
    s3_timeout_seconds: float = Field(
        gt=0,
        default=10.0,
        description="Connect and read timeout of one S3 request; an upload fails with 503 after "
        "s3_max_attempts of them.",
    )
    s3_max_attempts: int = Field(
        ge=1, default=3, description="Tries of one S3 request (boto3's standard retry mode, with backoff)."
    )
    storage_part_bytes: int = Field(
        ge=5 << 20,
        default=8 << 20,
        description="Part size of multipart uploads to S3 (S3's minimum is 5 MiB); one part is buffered "
        "in memory per upload in flight.",
    )
    storage_cache_bytes: int = Field(
        ge=1,
        default=20 << 30,
        description="Bound of this node's on-disk cache of S3 objects (var_dir/cache/objects), keyed by "
        "sha256; least recently used go. Make it larger than the largest dataset.",
    )
    storage_wait_seconds: float = Field(
        ge=0,
        default=300.0,
        description="How long a job waits for an unreachable object store before the attempt counts as "
        "failed (the job is queued again while attempts remain).",
    )
    dataset_s3_prefixes: str = Field(
        default="",
        description="Comma-separated s3://bucket/prefix locations that s3:// dataset URIs may name, read "
        "with the server's credentials; any other bucket is refused (403). Empty = no s3:// datasets.",
    )
    max_file_bytes: int = Field(
        ge=1, default=2 << 30, description="Largest file accepted by POST /v1/files, in bytes; 413 above."
    )
    max_evaluation_images: int = Field(
        ge=1, default=100_000, description="Most images one evaluation scores; larger datasets are refused."
    )
    min_images_per_class: int = Field(
        ge=1, default=2, description="Classes with fewer images fail dataset validation."
    )

    # --- compute -----------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where training and prediction run; auto = cuda when available."
    )
    job_queue: str | None = Field(
        default=None,
        description="Celery queue for training tasks. Unset = actprompt.gpu when the device is cuda, "
        "else actprompt.cpu.",
    )

    # --- request limits ----------------------------------------------------------------------------
    max_upload_bytes: int = Field(
        ge=1, default=32 << 20, description="Largest request body (uploads, base64 images); 413 above."
    )
    max_images_per_request: int = Field(ge=1, default=64, description="Most images in one predict request.")
    max_top_k: int = Field(ge=1, default=20, description="Largest top_k a predict request may ask for.")
    max_active_jobs_per_tenant: int = Field(
        ge=1, default=32, description="Jobs a tenant may have queued or running at once; 429 above."
    )
    page_size_max: int = Field(ge=1, default=100, description="Largest page of a paginated listing.")

    # --- serving (service/serving, docs/SERVING.md) ---------------------------------------------------
    serving_max_wait_ms: float = Field(
        ge=0,
        default=5.0,
        description="How long the micro-batcher waits for more rows (short against a forward pass).",
    )
    serving_max_batch_rows: int = Field(
        ge=1, default=64, description="Most image rows in one batched forward pass."
    )
    serving_queue_budget_ms: float = Field(
        gt=0,
        default=500.0,
        description="Admission control: a predict expected to wait longer than this before its first row "
        "runs is refused at once (503 overloaded, Retry-After).",
    )
    serving_front_max_in_flight: int = Field(
        ge=0,
        default=0,
        description="Predicts one HTTP process takes at once (a tenant past its share of them gets 503 "
        "overloaded before its body is read). 0: adaptive, the answers/s this process has been giving x "
        "a quarter of the queue budget (at least 16), so that what it holds drains in about that time on "
        "any hardware; a number fixes the limit.",
    )
    serving_model_lanes: int = Field(
        ge=0,
        default=0,
        description="Forward passes the engine runs at once, each on its own thread (one copy of the "
        "weights). 0: one per core on a CPU (torch then uses one thread in each), one on a GPU.",
    )
    serving_model_nice: int = Field(
        ge=0,
        le=19,
        default=0,
        description="Added to the nice value of the engine's model threads (Linux): above 0 the forward "
        "passes yield the CPU to latency-bound work on the same cores (the fronts' HTTP and refusals, the "
        "engine's event loop). Measured on 2 cores at 2x/3x overload, 5: faster refusals but less goodput "
        "(docs/SERVING.md), so 0 by default.",
    )
    serving_traced_segments: bool = Field(
        default=True,
        description="Run the backbone's layers as TorchScript traces in passes that only add prompts between "
        "layers (used only where they reproduce the eager layers: bit for bit, or within 1e-4 when "
        "optimised; 1.2x the rows per second of a small CNN on a 2-core CPU); off = eager PyTorch "
        "everywhere.",
    )
    serving_optimised_segments: bool = Field(
        default=True,
        description="Optimise the traced segments: norms folded into the convolutions and, on a CPU, "
        "channels-last convolutions (~25 % fewer cycles per row on ResNet-20; outputs within 1e-4 of eager "
        "PyTorch, relative to the largest, checked at start-up, instead of bit for bit); off = the same "
        "ATen ops as eager PyTorch, bit for bit.",
    )
    serving_fair_quantum_rows: int = Field(
        ge=1, default=8, description="Rows each tenant's queue sends per fair-share (round-robin) turn."
    )
    serving_engine_endpoint: str | None = Field(
        default=None,
        description="ZeroMQ endpoint of the engine process (ipc://...); `actprompt serve` sets it for its "
        "fronts. Unset = the engine runs inside the API process.",
    )
    serving_engine_timeout_ms: float = Field(
        gt=0,
        default=5000.0,
        description="A front that hears nothing from the engine (heartbeat) this long fails requests "
        "fast with 503 until it answers again.",
    )
    serving_engine_reply_timeout_ms: float = Field(
        gt=0,
        default=60_000.0,
        description="Ceiling on the engine's answer to one request, heartbeats or not: past it the front "
        "answers 503 engine_timeout and logs an error (a fault, such as a pass that never returns; far "
        "above the queue budget plus the longest pass).",
    )
    serving_max_classes: int = Field(
        ge=1,
        default=100,
        description="Head padding of the slot table; prompts with more classes get a pass of their own.",
    )
    max_prompts_per_request: int = Field(
        ge=1, default=16, description="Most prompts one predict request may name."
    )
    training_backbones_bytes: int = Field(
        ge=1,
        default=4 << 30,
        description="Bound on the backbones a worker keeps loaded for training (least recently used go).",
    )
    prompt_cache_host_bytes: int = Field(
        ge=1, default=256 << 20, description="Host-memory tier of the prompt cache."
    )
    prompt_cache_device_bytes: int = Field(
        ge=1, default=256 << 20, description="Device tier (the slot table), in bytes."
    )
    prompt_cache_max_slots: int = Field(
        ge=1, default=1024, description="Upper bound on device slots whatever the bytes."
    )
    prompt_cache_pin_fraction: float = Field(
        ge=0, le=1, default=0.5, description="Share of either cache tier that pinned prompts may hold."
    )
    rate_limit_per_second: float = Field(
        ge=0, default=50.0, description="Predict requests per second per tenant; 0 = off."
    )
    rate_limit_burst: int = Field(
        ge=1, default=100, description="Token-bucket burst of the per-tenant rate limit."
    )
    rate_limit_redis_url: str | None = Field(
        default=None,
        description="Redis for shared rate limits; unset = the broker if it is Redis, else in memory.",
    )
    rate_limit_redis_timeout_ms: float = Field(
        gt=0,
        default=100.0,
        description="Longest wait for one reply of the rate limiter's Redis; past it the breaker opens.",
    )
    rate_limit_breaker_seconds: float = Field(
        gt=0,
        default=2.0,
        description="After a Redis failure, how long the limiter limits per process before probing again.",
    )
    rate_limit_local_share_s: float = Field(
        ge=0,
        default=0.05,
        description="Seconds of a tenant's rate a process may take from Redis ahead of use (fewer round "
        "trips; a tenant may be refused up to processes x share tokens early, never admitted over).",
    )
    auth_cache_seconds: float = Field(
        ge=0,
        default=5.0,
        description="How long an authenticated API key is remembered; a key revoked through another process "
        "stops working at most this long after (at once through this one). 0 = ask the database each time.",
    )
    prompt_resolve_cache_seconds: float = Field(
        ge=0,
        default=5.0,
        description="How long a resolved prompt reference is remembered for predict; a deletion or new "
        "version made by another process is seen at most this long after. 0 = no cache.",
    )
    predict_url_timeout_s: float = Field(
        gt=0, default=5.0, description="Connect and read timeout for an image given by URL to predict."
    )
    predict_url_max_bytes: int = Field(
        ge=1, default=16 << 20, description="Largest image fetched by URL for predict, in bytes."
    )
    allow_private_urls: bool = Field(
        default=False,
        description="Also fetch predict image URLs from private, loopback and link-local addresses "
        "(tests, on-prem); off = public addresses only, as for dataset downloads.",
    )
    torch_threads: int = Field(
        ge=0,
        default=0,
        description="Intra-op threads of torch in this process (serving and embedded training alike); "
        "0 = torch's default (every core); `serve` gives its engine process every core unless set.",
    )
    metrics_per_tenant: bool = Field(
        default=False,
        description="Label serving metrics with the tenant id (a series per tenant: small deployments only).",
    )

    # --- job leases and retries --------------------------------------------------------------------
    # Recovery budget after a worker dies (SIGKILL, OOM, lost node): its lease runs out at most
    # `lease_seconds` after the kill, the next reaper pass (every `reaper_interval_seconds`) re-queues the
    # job, and an idle worker claims it at once: 30 + 10 = at most 40 s, plus the model load, within the
    # 60 s goal. A live job renews every 5 s, so a false takeover needs 6 heartbeats in a row to fail
    # (30 s without one database write from the heartbeat thread, which a loaded CPU does not cause).
    lease_seconds: float = Field(
        gt=0,
        default=30.0,
        description="How long a worker's claim on a job lasts without a heartbeat before it can be re-run.",
    )
    heartbeat_seconds: float = Field(
        gt=0, default=5.0, description="How often a running job renews its lease (a sixth of the lease)."
    )
    cancel_poll_seconds: float = Field(
        gt=0, default=1.0, description="How often a running job reads its status to notice a cancel request."
    )
    max_attempts: int = Field(
        ge=1, default=3, description="Runs of a job (crashes included) before it ends failed."
    )
    max_requeues: int = Field(
        ge=0,
        default=10,
        description="Times the reaper re-sends a queued job nobody claimed before it ends failed.",
    )
    # A message lost by the broker (a flush, a restart without persistence) is noticed once its job has
    # waited `queued_stale_seconds` and the reaper finds no message for it in Redis: at most 45 + 10 s after
    # the loss. A job whose send failed (broker down at submission) is marked unsent and goes out at the
    # next reaper pass after the broker is back. A job whose message is still waiting is never re-sent.
    queued_stale_seconds: float = Field(
        gt=0,
        default=45.0,
        description="A job queued this long without a claim is checked against the broker and re-sent if "
        "its message is missing.",
    )
    reaper_interval_seconds: float = Field(
        gt=0, default=10.0, description="How often the reaper looks for lost jobs."
    )
    checkpoints_keep: int = Field(
        ge=1, default=2, description="Latest checkpoints kept per job; older ones are deleted."
    )
    progress_event_seconds: float = Field(
        ge=0,
        default=2.0,
        description="Least interval between progress events written for one job (throttle).",
    )

    # --- logging -----------------------------------------------------------------------------------
    log_level: str = Field(default="INFO", description="Root log level.")
    log_json: bool = Field(default=True, description="Emit one JSON object per log line.")

    @model_validator(mode="after")
    def _heartbeat_renews_the_lease(self) -> Settings:
        """A heartbeat slower than the lease would let a live job's lease expire and the job run twice."""
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be below "
                f"lease_seconds ({self.lease_seconds})"
            )
        return self

    @model_validator(mode="after")
    def _s3_locations_parse(self) -> Settings:
        """Bad S3 URLs fail at start, and tenants can never name the bucket prefix that holds uploads."""
        from service.storage.s3 import S3Location

        allowed = self.dataset_s3_locations
        if self.storage_url:
            store = S3Location.parse(self.storage_url)
            clash = [str(loc) for loc in allowed if loc.overlaps(store)]
            if clash:
                raise ValueError(
                    f"dataset_s3_prefixes {clash} overlap storage_url {self.storage_url}: tenants could "
                    "read each other's uploads"
                )
        return self

    # --- derived -----------------------------------------------------------------------------------
    @property
    def is_embedded(self) -> bool:
        """No broker: the gateway runs jobs itself."""
        return not self.broker_url

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_embedded if self.auto_migrate is None else self.auto_migrate

    @property
    def data_root_paths(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.data_roots.split(":") if p.strip()]

    @property
    def cache_dir(self) -> Path:
        return self.var_dir / "cache"

    @property
    def files_root(self) -> Path:
        return self.files_dir if self.files_dir is not None else self.var_dir / "files"

    @property
    def object_cache_dir(self) -> Path:
        return self.var_dir / "cache" / "objects"

    @property
    def dataset_s3_locations(self) -> list[S3Location]:
        from service.storage.s3 import S3Location

        return [S3Location.parse(p.strip()) for p in self.dataset_s3_prefixes.split(",") if p.strip()]

    def resolved_device(self) -> str:
        """`cpu` or `cuda` (imports torch only for `auto`)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
