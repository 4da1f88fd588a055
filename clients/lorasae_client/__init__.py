"""Client for the lorasae feature server: httpx + pydantic only, no torch.

``LoraSaeClient`` / ``AsyncLoraSaeClient`` talk to ``lorasae serve``; the wire format lives in
``lorasae_client.schemas`` (the server validates with the same models).
"""

from .client import AsyncLoraSaeClient, LoraSaeClient
from .errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    LoraSaeError,
    LoraSaeWarning,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from .schemas import (
    AdapterInfo,
    CausalEffect,
    DashboardInfo,
    FeatureEntry,
    FeaturesRequest,
    FeaturesResponse,
    HealthResponse,
    Histogram,
    LatentContext,
    LatentRecord,
    LatentSearchResponse,
    LatentSummary,
    LogitEntry,
    ResponseWarning,
    SaeInfo,
    TokenActivation,
    TokenEffects,
    TokenResult,
    TokenValue,
)

__version__ = "0.1.0"

__all__ = [
    "LoraSaeClient",
    "AsyncLoraSaeClient",
    "LoraSaeError",
    "LoraSaeWarning",
    "ResponseWarning",
    "APIConnectionError",
    "APITimeoutError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "NotFoundError",
    "ConflictError",
    "PayloadTooLargeError",
    "UnprocessableEntityError",
    "RateLimitError",
    "ServiceUnavailableError",
    "InternalServerError",
    "AdapterInfo",
    "FeatureEntry",
    "FeaturesRequest",
    "FeaturesResponse",
    "HealthResponse",
    "LogitEntry",
    "SaeInfo",
    "TokenResult",
    "LatentRecord",
    "LatentSearchResponse",
    "LatentSummary",
    "LatentContext",
    "DashboardInfo",
    "Histogram",
    "TokenActivation",
    "TokenEffects",
    "TokenValue",
    "CausalEffect",
]
