"""redis: one Redis shared by every worker and replica (`redis_integration.py`) over one
connection (`redis_link.py`), for the event bridge (`redis_bridge.py`) and the shared
rate-limit counters (`redis_rates.py`)."""

from runtime.integrations.redis.redis_integration import (
    DEFAULT_REDISINTEGRATION_CONFIG,
    RedisIntegration,
    RedisSettings,
)

__all__ = ["DEFAULT_REDISINTEGRATION_CONFIG", "RedisIntegration", "RedisSettings"]
