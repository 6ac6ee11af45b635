from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SignRequest(_message.Message):
    __slots__ = ("csr_pem", "ttl_s")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    csr_pem: str
    ttl_s: int
    def __init__(self, csr_pem: _Optional[str] = ..., ttl_s: _Optional[int] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("cert_chain_pem", "bundle_pem")
    CERT_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    cert_chain_pem: _containers.RepeatedScalarFieldContainer[str]
    bundle_pem: str
    def __init__(self, cert_chain_pem: _Optional[_Iterable[str]] = ..., bundle_pem: _Optional[str] = ...) -> None: ...

class BundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BundleResponse(_message.Message):
    __slots__ = ("bundle_pem",)
    BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    bundle_pem: str
    def __init__(self, bundle_pem: _Optional[str] = ...) -> None: ...
