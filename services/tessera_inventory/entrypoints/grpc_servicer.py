"""InventoryService servicer: translates protobuf requests into commands and results back into protobuf."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from tessera.inventory.v1 import inventory_service_pb2 as svc
from tessera.inventory.v1 import inventory_service_pb2_grpc

from tessera_inventory import mapping
from tessera_inventory.domain.model import DEFAULT_TTL
from tessera_inventory.service_layer import commands, handlers

_OUTPUT_ONLY = ("id", "stock_reserved", "stock_available", "create_time", "update_time", "version")


class InventoryServicer(inventory_service_pb2_grpc.InventoryServiceServicer):
    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork],
                 default_ttl: dt.timedelta = DEFAULT_TTL) -> None:
        self.uow = uow_factory
        self.default_ttl = default_ttl

    async def CreateProduct(self, request: svc.CreateProductRequest, context) -> svc.CreateProductResponse:
        p = request.product
        set_fields = {fd.name for fd, _ in p.ListFields()}
        cmd = commands.CreateProduct(
            sku=p.sku, name=p.name, description=p.description,
            price=mapping.money_from_proto(p.price) if p.HasField("price") else None,
            stock_on_hand=p.stock_on_hand, request_id=request.request_id,
            output_only_set=tuple(f for f in _OUTPUT_ONLY if f in set_fields),
        )
        product = await handlers.create_product(cmd, self.uow())
        return svc.CreateProductResponse(product=mapping.product_to_proto(product))

    async def GetProduct(self, request: svc.GetProductRequest, context) -> svc.GetProductResponse:
        product = await handlers.get_product(commands.GetProduct(_id(request.id)), self.uow())
        return svc.GetProductResponse(product=mapping.product_to_proto(product))

    async def BatchGetProducts(self, request: svc.BatchGetProductsRequest, context) -> svc.BatchGetProductsResponse:
        cmd = commands.BatchGetProducts(tuple(_id(i) for i in request.ids))
        products = await handlers.batch_get_products(cmd, self.uow())
        return svc.BatchGetProductsResponse(products=[mapping.product_to_proto(p) for p in products])

    async def ListProducts(self, request: svc.ListProductsRequest, context) -> svc.ListProductsResponse:
        cmd = commands.ListProducts(page_size=request.page_size, page_token=request.page_token, sku=request.sku,
                                    in_stock_only=request.in_stock_only)
        products, token = await handlers.list_products(cmd, self.uow())
        return svc.ListProductsResponse(products=[mapping.product_to_proto(p) for p in products],
                                        next_page_token=token)

    async def UpdateProduct(self, request: svc.UpdateProductRequest, context) -> svc.UpdateProductResponse:
        p = request.product
        cmd = commands.UpdateProduct(
            product_id=_id(p.id), paths=tuple(request.update_mask.paths), name=p.name, description=p.description,
            price=mapping.money_from_proto(p.price) if p.HasField("price") else None,
        )
        product = await handlers.update_product(cmd, self.uow())
        return svc.UpdateProductResponse(product=mapping.product_to_proto(product))

    async def DeleteProduct(self, request: svc.DeleteProductRequest, context) -> svc.DeleteProductResponse:
        await handlers.delete_product(commands.DeleteProduct(_id(request.id)), self.uow())
        return svc.DeleteProductResponse()

    async def AdjustStock(self, request: svc.AdjustStockRequest, context) -> svc.AdjustStockResponse:
        cmd = commands.AdjustStock(product_id=_id(request.product_id), delta=request.delta, reason=request.reason,
                                   request_id=request.request_id)
        product = await handlers.adjust_stock(cmd, self.uow())
        return svc.AdjustStockResponse(product=mapping.product_to_proto(product))

    async def ReserveStock(self, request: svc.ReserveStockRequest, context) -> svc.ReserveStockResponse:
        cmd = commands.ReserveStock(order_id=_id(request.order_id), items=mapping.items_from_proto(request.items),
                                    ttl=_ttl(request.ttl) if request.HasField("ttl") else None)
        reservation = await handlers.reserve_stock(cmd, self.uow(), self.default_ttl)
        return svc.ReserveStockResponse(reservation=mapping.reservation_to_proto(reservation))

    async def GetReservation(self, request: svc.GetReservationRequest, context) -> svc.GetReservationResponse:
        reservation = await handlers.get_reservation(commands.GetReservation(_id(request.id)), self.uow())
        return svc.GetReservationResponse(reservation=mapping.reservation_to_proto(reservation))

    async def ReleaseReservation(self, request: svc.ReleaseReservationRequest, context) -> svc.ReleaseReservationResponse:  # noqa: E501
        cmd = commands.ReleaseReservation(reservation_id=_id(request.id), reason=request.reason)
        reservation = await handlers.release_reservation(cmd, self.uow())
        return svc.ReleaseReservationResponse(reservation=mapping.reservation_to_proto(reservation))

    async def CommitReservation(self, request: svc.CommitReservationRequest, context) -> svc.CommitReservationResponse:
        reservation = await handlers.commit_reservation(commands.CommitReservation(_id(request.id)), self.uow())
        return svc.CommitReservationResponse(reservation=mapping.reservation_to_proto(reservation))


def _id(value: str) -> str:
    """Ids are UUIDs, whose letters may come in either case: stored and compared in lower case (as payment, order
    and notification do in their handlers), so that an order's reservation (order_id is its idempotency key) or a
    product is the same whichever case a caller writes it in. A reservation's items are lower-cased with them
    (mapping.items_from_proto)."""
    return value.lower()


def _ttl(duration) -> dt.timedelta | None:
    """The requested time to live, or None for zero (the default). One too long for a timedelta (about 2.7 million
    years), or a Duration the protobuf rules make invalid (nanos outside +-999,999,999 or against the sign of
    seconds), reads as the longest, which the handler refuses as out of range, naming `ttl`, like any other too
    long. One shorter than a microsecond reads as zero length, which the handler refuses as too short."""
    if duration.seconds == 0 and duration.nanos == 0:
        return None
    try:
        duration.ToJsonString()  # checks the Duration's own rules
        return duration.ToTimedelta()
    except (OverflowError, ValueError):
        return dt.timedelta.max
