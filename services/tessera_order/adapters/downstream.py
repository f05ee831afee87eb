"""gRPC clients of the user, inventory and payment services, behind the saga's ports.

Channels come from tessera_runtime.clients.open_channel: a default deadline, the caller's remaining deadline and
identity propagated, and gRPC retries only for the methods the contracts mark NO_SIDE_EFFECTS or IDEMPOTENT.
Failed calls become DownstreamError with the other service's status, ErrorInfo reason and metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.duration_pb2 import Duration
from tessera.common.v1 import money_pb2
from tessera.inventory.v1 import inventory_service_pb2 as inventory_pb2
from tessera.inventory.v1 import inventory_service_pb2_grpc, product_pb2
from tessera.payment.v1 import payment_pb2, payment_service_pb2, payment_service_pb2_grpc
from tessera.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

from tessera_order.service_layer.ports import Customer, DownstreamError, Payment, Product, Reservation
from tessera_order.settings import OrderSettings
from tessera_runtime.clients import NOT_SENT_REASONS, error_details, open_channel
from tessera_runtime.config import CircuitSettings
from tessera_runtime.discovery.model import DiscoverySettings
from tessera_runtime.errors import DATABASE_UNAVAILABLE

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
INVENTORY_SERVICE = inventory_pb2.DESCRIPTOR.services_by_name["InventoryService"]
PAYMENT_SERVICE = payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"]
# What a step's error says when the call got no answer from the service itself: gRPC's own text names addresses
# and resolver details of the cluster, and the step's error is shown to the customer (GetOrder), so it is logged
# here instead.
_NO_ANSWER = {
    grpc.StatusCode.UNAVAILABLE: "the {} service could not be reached",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the {} service did not answer in time",
    grpc.StatusCode.CANCELLED: "the call to the {} service was cancelled",
}

log = logging.getLogger("tessera.order.downstream")


def translate(service: str, err: grpc.aio.AioRpcError) -> DownstreamError:
    info, _ = error_details(err)
    if info is not None and info.reason in NOT_SENT_REASONS:
        # Refused by this process's own circuit breaker, or no healthy instance of the service was discovered: the
        # service gave no answer, it is simply unavailable.
        info = None
    if info is None:
        message = _NO_ANSWER.get(err.code(), "the call to the {} service failed").format(service)
        log.warning("%s: %s", message, err.code().name, extra={"service": service, "detail": err.details() or ""})
    else:
        message = err.details() or ""
    return DownstreamError(
        service, err.code(), info.reason if info is not None else err.code().name, message,
        dict(info.metadata) if info is not None else {},
        # A service whose database failed under the call answers, but cannot say whether its write was applied.
        answered=info is not None and info.reason != DATABASE_UNAVAILABLE,
    )


async def _call(service: str, method: Callable[..., Awaitable[Any]], request: Any,
                timeout: float | None = None) -> Any:
    try:
        return await method(request, timeout=timeout)
    except grpc.aio.AioRpcError as err:
        raise translate(service, err) from None


def _reservation(r: product_pb2.Reservation) -> Reservation:
    return Reservation(id=r.id, status=product_pb2.ReservationStatus.Name(r.status).removeprefix(
        "RESERVATION_STATUS_"))


def _payment(p: payment_pb2.Payment) -> Payment:
    return Payment(id=p.id, status=payment_pb2.PaymentStatus.Name(p.status).removeprefix("PAYMENT_STATUS_"),
                   idempotency_key=p.idempotency_key)


class GrpcCustomerDirectory:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = user_service_pb2_grpc.UserServiceStub(channel)

    async def get_customer(self, customer_id: str) -> Customer:
        reply = await _call("user", self.stub.GetUser, user_service_pb2.GetUserRequest(id=customer_id))
        return Customer(id=reply.user.id, active=reply.user.status == user_pb2.USER_STATUS_ACTIVE)


class GrpcInventory:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = inventory_service_pb2_grpc.InventoryServiceStub(channel)

    async def batch_get_products(self, product_ids: Sequence[str]) -> list[Product]:
        reply = await _call("inventory", self.stub.BatchGetProducts,
                            inventory_pb2.BatchGetProductsRequest(ids=list(product_ids)))
        return [Product(id=p.id, name=p.name, sku=p.sku, price_minor=p.price.amount_minor,
                        currency_code=p.price.currency_code) for p in reply.products]

    async def reserve_stock(self, order_id: str, items: Sequence[tuple[str, int]],
                            ttl_seconds: int) -> Reservation:
        request = inventory_pb2.ReserveStockRequest(
            order_id=order_id, ttl=Duration(seconds=ttl_seconds),
            items=[product_pb2.ReservationItem(product_id=p, quantity=q) for p, q in items])
        return _reservation((await _call("inventory", self.stub.ReserveStock, request)).reservation)

    async def commit_reservation(self, reservation_id: str) -> Reservation:
        reply = await _call("inventory", self.stub.CommitReservation,
                            inventory_pb2.CommitReservationRequest(id=reservation_id))
        return _reservation(reply.reservation)

    async def release_reservation(self, reservation_id: str, reason: str) -> Reservation:
        reply = await _call("inventory", self.stub.ReleaseReservation,
                            inventory_pb2.ReleaseReservationRequest(id=reservation_id, reason=reason))
        return _reservation(reply.reservation)


class GrpcPayments:
    def __init__(self, channel: grpc.aio.Channel, payment_deadline_seconds: float) -> None:
        self.stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        self.payment_deadline = payment_deadline_seconds

    async def process_payment(self, *, order_id: str, customer_id: str, amount_minor: int, currency_code: str,
                              payment_method: str, idempotency_key: str) -> Payment:
        request = payment_service_pb2.ProcessPaymentRequest(
            order_id=order_id, customer_id=customer_id,
            amount=money_pb2.Money(currency_code=currency_code, amount_minor=amount_minor),
            payment_method=payment_method, idempotency_key=idempotency_key)
        # Charging goes through an external processor, so it gets its own, longer deadline.
        reply = await _call("payment", self.stub.ProcessPayment, request, timeout=self.payment_deadline)
        return _payment(reply.payment)

    async def refund_payment(self, payment_id: str, idempotency_key: str, reason: str) -> Payment:
        request = payment_service_pb2.RefundPaymentRequest(payment_id=payment_id, idempotency_key=idempotency_key,
                                                           reason=reason)
        return _payment((await _call("payment", self.stub.RefundPayment, request,
                                     timeout=self.payment_deadline)).payment)

    async def void_payment(self, *, order_id: str, customer_id: str, amount_minor: int, currency_code: str,
                           payment_method: str, idempotency_key: str) -> Payment:
        request = payment_service_pb2.VoidPaymentRequest(
            order_id=order_id, customer_id=customer_id,
            amount=money_pb2.Money(currency_code=currency_code, amount_minor=amount_minor),
            payment_method=payment_method, idempotency_key=idempotency_key)
        # The default deadline (TESSERA_DEFAULT_DEADLINE_SECONDS, 5 s unless set): usually only the payment record
        # changes, but a PENDING payment whose charging call is gone is settled first, and the processor is asked
        # whether it charged it for at most the payment service's lookup timeout (1 s), which that deadline covers.
        return _payment((await _call("payment", self.stub.VoidPayment, request)).payment)


class DownstreamChannels:
    """The three channels of the order service; closed when the service stops."""

    def __init__(self, user_addr: str, inventory_addr: str, payment_addr: str, *, default_deadline: float,
                 circuit: CircuitSettings = CircuitSettings(), discovery: DiscoverySettings | None = None) -> None:
        def channel(address: str, service: ServiceDescriptor) -> grpc.aio.Channel:
            return open_channel(address, [service], default_deadline=default_deadline, circuit=circuit,
                                discovery=discovery)

        self.user = channel(user_addr, USER_SERVICE)
        self.inventory = channel(inventory_addr, INVENTORY_SERVICE)
        self.payment = channel(payment_addr, PAYMENT_SERVICE)

    @classmethod
    def from_settings(cls, settings: OrderSettings) -> DownstreamChannels:
        """The channels as the service's settings configure them: addresses, deadline, circuit breakers."""
        return cls(settings.user_service_addr, settings.inventory_service_addr, settings.payment_service_addr,
                   default_deadline=settings.default_deadline_seconds, circuit=settings.circuit,
                   discovery=settings.discovery)

    async def close(self) -> None:
        for channel in (self.user, self.inventory, self.payment):
            await channel.close()
