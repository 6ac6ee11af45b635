"""One error family. Each class carries its HTTP status, gRPC code name and a public message.

Adapters translate foreign exceptions into these at the boundary; anything else is answered as
500 / INTERNAL "unexpected error" with details only in logs and spans.
"""

from __future__ import annotations


class GatewayError(Exception):
    status: int = 500
    grpc_code: str = "INTERNAL"
    public_message: str = "unexpected error"

    def __init__(self, detail: str = "", *, public_message: str | None = None) -> None:
        super().__init__(detail or self.public_message)
        self.detail = detail
        if public_message is not None:
            self.public_message = public_message

    @property
    def kind(self) -> str:
        return type(self).__name__


class BadRequest(GatewayError):
    status, grpc_code, public_message = 400, "INVALID_ARGUMENT", "bad request"


class ClientClosedRequest(GatewayError):
    """The client went away before its request was read (nginx's 499): nobody sees the answer, logs do."""

    status, grpc_code, public_message = 499, "CANCELLED", "client closed request"


class Unauthenticated(GatewayError):
    status, grpc_code, public_message = 401, "UNAUTHENTICATED", "client identity required"


class Forbidden(GatewayError):
    status, grpc_code, public_message = 403, "PERMISSION_DENIED", "forbidden"


class NotFound(GatewayError):
    status, grpc_code, public_message = 404, "NOT_FOUND", "no route"


class RequestTimeout(GatewayError):
    status, grpc_code, public_message = 408, "DEADLINE_EXCEEDED", "request timeout"


class PayloadTooLarge(GatewayError):
    status, grpc_code, public_message = 413, "RESOURCE_EXHAUSTED", "request body too large"


class UriTooLong(GatewayError):
    status, grpc_code, public_message = 414, "INVALID_ARGUMENT", "request target too long"


class HeadersTooLarge(GatewayError):
    status, grpc_code, public_message = 431, "RESOURCE_EXHAUSTED", "request headers too large"


class UpstreamUnavailable(GatewayError):
    """Connect refused/reset or the upstream broke the exchange."""

    status, grpc_code, public_message = 502, "UNAVAILABLE", "upstream unavailable"


class UpstreamConnectFailed(UpstreamUnavailable):
    """No connection could be made (refused, unreachable, handshake failed): not a byte of the request was sent,
    so any request may be retried on another endpoint."""


class UpstreamIdentityMismatch(GatewayError):
    status, grpc_code, public_message = 502, "UNAVAILABLE", "upstream identity rejected"


class NoHealthyUpstream(GatewayError):
    status, grpc_code, public_message = 503, "UNAVAILABLE", "no healthy upstream"


class Overloaded(GatewayError):
    status, grpc_code, public_message = 503, "UNAVAILABLE", "upstream overloaded"


class AuthzUnavailable(GatewayError):
    status, grpc_code, public_message = 503, "UNAVAILABLE", "authorization unavailable"


class UpstreamTimeout(GatewayError):
    status, grpc_code, public_message = 504, "DEADLINE_EXCEEDED", "upstream timeout"


class InternalError(GatewayError):
    pass


def as_gateway_error(exc: BaseException) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    return InternalError(f"{type(exc).__name__}: {exc}")
