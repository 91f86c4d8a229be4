"""Typed settings: one object per service, read once from `MEDIMG_<SERVICE>_*` at start-up."""

from __future__ import annotations

import sys
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from medimg_core.identity import SpiffeId, spiffe_id


class ServiceSettings(BaseSettings):
    """What every service needs. Subclasses set `env_prefix` and add their own fields.

    Fields without a default are required: a missing one stops the process at start-up.
    """

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    #: The port the service listens on, plaintext, on 127.0.0.1 only (its sidecar calls it).
    port: int
    #: The port of the Prometheus `/metrics` endpoint on 127.0.0.1; 0 turns it off.
    metrics_port: int = 0
    #: The largest gRPC message in either direction, in bytes.
    max_message_bytes: int = 64 * 1024 * 1024
    #: Seconds health reports NOT_SERVING after SIGTERM while calls are still taken, so
    #: load balancers and sidecars stop routing here before the server stops listening.
    drain_delay_seconds: float = 1.0
    #: Seconds in-flight calls get to finish once the server stops taking new ones.
    grace_seconds: float = 10.0
    #: Seconds a call to another service may take when the caller set no deadline.
    default_deadline_seconds: float = 10.0
    trust_domain: str = "medimg.local"
    namespace: str = "medimg"
    log_level: str = "INFO"
    #: Print finished spans as JSON to stderr (there is no collector in the local run).
    trace_to_console: bool = False
    #: An OpenTelemetry collector's OTLP/gRPC endpoint for the spans (http: plaintext,
    #: https: TLS); unset: none. In Kubernetes, the sidecar's OTLP listener
    #: `http://127.0.0.1:4317`, which forwards to the collector over mTLS.
    otlp_endpoint: str | None = Field(default=None, pattern=r"^https?://[^/\s]+/?$")

    def spiffe(self, name: str) -> SpiffeId:
        return spiffe_id(self.trust_domain, self.namespace, name)

    @property
    def gateway(self) -> SpiffeId:
        return self.spiffe("gateway")


class AuditedServiceSettings(ServiceSettings):
    """Settings of a service that reports PHI access to audit through its sidecar."""

    #: host:port of the sidecar's outbound listener for the audit service.
    audit_target: str
    #: Seconds a direct AppendEvents may take before the events go to the durable spool
    #: (short: patient calls wait at most this long on an audit outage).
    audit_direct_deadline_seconds: float = 1.0
    #: Spooled events forwarded per AppendEvents once audit is back (audit takes <= 1000).
    audit_drain_batch_size: int = Field(default=500, ge=1, le=1000)
    #: The most events the spool holds; beyond it reports fail closed (Redis memory bound).
    audit_spool_max_events: int = Field(default=200_000, ge=1)
    #: Seconds a spooled event may stay with a silent replica before another resends it.
    audit_claim_idle_seconds: float = 60.0


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S]) -> S:
    """Reads the settings or exits naming every missing or invalid variable."""
    try:
        return cls()
    except ValidationError as error:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = [
            f"  {prefix}{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors()
        ]
        sys.exit(f"{cls.__name__}: bad or missing settings:\n" + "\n".join(problems))
