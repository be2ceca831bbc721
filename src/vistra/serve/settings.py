"""The limits and batching of one service, shared by the command line and `create_app`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """Limits and batching of one service; the command line fills it from its options."""

    max_batch: int = 16  # images per forward pass
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    max_upload_mb: float = 20.0  # request body limit (a batch request included)
    # Predictions in the service at once (more get 503): with max_upload_mb, it bounds the
    # memory uploads can hold (32 x 20 MB).
    queue_size: int = 32
    timeout_s: float = 30.0  # per request, from arrival to answer; later gets 504
    # Silence allowed while a body arrives; longer gets 408, so a client that stops sending
    # frees its place instead of holding it until timeout_s.
    read_timeout_s: float = 5.0
    # Predictions one client address may have in the service (more get 429): one client
    # cannot take every place of queue_size.
    max_in_flight_per_client: int = 8
    preprocess_threads: int = 2  # threads decoding and transforming images
    max_megapixels: float = 40.0  # decoded size limit: a 40 MP RGB image is 120 MB
    max_aspect_ratio: float = 50.0  # long side / short side; beyond it nothing is recognisable
    explain: bool = False  # heat maps on request (?explain=METHOD): costly, so opt-in
    # Heat-map requests in the service at once (more get 503): they run one at a time on a
    # thread and model copy of their own, so however many are asked for, predictions go on.
    explain_max_in_flight: int = 2
    # An explain request's time from arrival to answer, instead of timeout_s (later gets 504):
    # a heat map may take seconds where a prediction takes milliseconds.
    explain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "preprocess_threads",
                     "max_in_flight_per_client", "explain_max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, got {getattr(self, name)}")
        for name in ("max_upload_mb", "timeout_s", "read_timeout_s", "max_megapixels",
                     "max_aspect_ratio", "explain_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {self.max_wait_ms}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
