"""The Tessera services a client can call, by the attribute a client gives each, with their descriptors."""

from __future__ import annotations

import dataclasses

from google.protobuf.descriptor import ServiceDescriptor
from tessera.analytics.v1 import analytics_service_pb2
from tessera.inventory.v1 import inventory_service_pb2
from tessera.notification.v1 import notification_service_pb2
from tessera.order.v1 import order_service_pb2
from tessera.payment.v1 import payment_service_pb2
from tessera.user.v1 import user_service_pb2


@dataclasses.dataclass(frozen=True)
class Service:
    """One service of the contracts: the attribute its stub has on a client, and its descriptor."""

    attribute: str
    descriptor: ServiceDescriptor


SERVICES: tuple[Service, ...] = (
    Service("users", user_service_pb2.DESCRIPTOR.services_by_name["UserService"]),
    Service("inventory", inventory_service_pb2.DESCRIPTOR.services_by_name["InventoryService"]),
    Service("payments", payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"]),
    Service("orders", order_service_pb2.DESCRIPTOR.services_by_name["OrderService"]),
    Service("notifications", notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"]),
    Service("analytics", analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"]),
)


def attribute_of(service_full_name: str) -> str:
    """The client attribute of a service, from its full name (`tessera.order.v1.OrderService` -> `orders`)."""
    for service in SERVICES:
        if service.descriptor.full_name == service_full_name:
            return service.attribute
    raise KeyError(f"{service_full_name} is not a Tessera service")
