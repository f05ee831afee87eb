"""OrderService servicer: translates protobuf requests into commands and results back into protobuf."""

from __future__ import annotations

from tessera.order.v1 import order_service_pb2 as svc
from tessera.order.v1 import order_service_pb2_grpc

from tessera_order import mapping
from tessera_order.service_layer import commands, handlers
from tessera_order.service_layer.saga import SagaCoordinator


class OrderServicer(order_service_pb2_grpc.OrderServiceServicer):
    def __init__(self, uow_factory: handlers.UowFactory, sagas: SagaCoordinator) -> None:
        self.uow = uow_factory
        self.sagas = sagas

    async def CreateOrder(self, request: svc.CreateOrderRequest, context) -> svc.CreateOrderResponse:
        cmd = commands.CreateOrder(
            customer_id=request.customer_id,
            items=tuple(commands.OrderLine(i.product_id, i.quantity) for i in request.items),
            payment_method=request.payment_method, currency_code=request.currency_code,
            request_id=request.request_id,
        )
        order = await handlers.create_order(cmd, self.uow, self.sagas)
        return svc.CreateOrderResponse(order=mapping.order_to_proto(order))

    async def GetOrder(self, request: svc.GetOrderRequest, context) -> svc.GetOrderResponse:
        order = await handlers.get_order(commands.GetOrder(request.id), self.uow)
        return svc.GetOrderResponse(order=mapping.order_to_proto(order))

    async def ListOrders(self, request: svc.ListOrdersRequest, context) -> svc.ListOrdersResponse:
        status = mapping.status_from_proto(request.status)
        cmd = commands.ListOrders(page_size=request.page_size, page_token=request.page_token,
                                  customer_id=request.customer_id, status=status,
                                  unknown_status=request.status if status is None and request.status != 0 else None)
        orders, token = await handlers.list_orders(cmd, self.uow)
        return svc.ListOrdersResponse(orders=[mapping.order_to_proto(o) for o in orders], next_page_token=token)

    async def CancelOrder(self, request: svc.CancelOrderRequest, context) -> svc.CancelOrderResponse:
        order = await handlers.cancel_order(commands.CancelOrder(request.id, request.reason), self.uow, self.sagas)
        return svc.CancelOrderResponse(order=mapping.order_to_proto(order))
