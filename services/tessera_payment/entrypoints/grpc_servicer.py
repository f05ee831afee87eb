"""PaymentService servicer: translates protobuf requests into commands and results back into protobuf."""

from __future__ import annotations

from collections.abc import Callable

from tessera.payment.v1 import payment_service_pb2 as svc
from tessera.payment.v1 import payment_service_pb2_grpc

from tessera_payment import mapping
from tessera_payment.service_layer import commands, handlers


class PaymentServicer(payment_service_pb2_grpc.PaymentServiceServicer):
    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork], processing: handlers.Processing) -> None:
        self.uow = uow_factory
        self.processing = processing

    async def ProcessPayment(self, request: svc.ProcessPaymentRequest, context) -> svc.ProcessPaymentResponse:
        cmd = commands.ProcessPayment(
            order_id=request.order_id, customer_id=request.customer_id,
            amount=mapping.money_from_proto(request.amount) if request.HasField("amount") else None,
            payment_method=request.payment_method, idempotency_key=request.idempotency_key,
        )
        payment = await handlers.process_payment(cmd, self.uow(), self.processing)
        return svc.ProcessPaymentResponse(payment=mapping.payment_to_proto(payment))

    async def VoidPayment(self, request: svc.VoidPaymentRequest, context) -> svc.VoidPaymentResponse:
        cmd = commands.VoidPayment(
            order_id=request.order_id, customer_id=request.customer_id,
            amount=mapping.money_from_proto(request.amount) if request.HasField("amount") else None,
            payment_method=request.payment_method, idempotency_key=request.idempotency_key,
        )
        payment = await handlers.void_payment(cmd, self.uow(), self.processing)
        return svc.VoidPaymentResponse(payment=mapping.payment_to_proto(payment))

    async def GetPayment(self, request: svc.GetPaymentRequest, context) -> svc.GetPaymentResponse:
        payment = await handlers.get_payment(commands.GetPayment(request.id), self.uow())
        return svc.GetPaymentResponse(payment=mapping.payment_to_proto(payment))

    async def ListPayments(self, request: svc.ListPaymentsRequest, context) -> svc.ListPaymentsResponse:
        status = mapping.status_from_proto(request.status)
        cmd = commands.ListPayments(
            page_size=request.page_size, page_token=request.page_token, order_id=request.order_id,
            customer_id=request.customer_id, status=status,
            unknown_status=request.status if status is None and request.status != 0 else None,
        )
        payments, token = await handlers.list_payments(cmd, self.uow())
        return svc.ListPaymentsResponse(payments=[mapping.payment_to_proto(p) for p in payments],
                                        next_page_token=token)

    async def RefundPayment(self, request: svc.RefundPaymentRequest, context) -> svc.RefundPaymentResponse:
        cmd = commands.RefundPayment(payment_id=request.payment_id, idempotency_key=request.idempotency_key,
                                     reason=request.reason)
        payment = await handlers.refund_payment(cmd, self.uow(), self.processing)
        return svc.RefundPaymentResponse(payment=mapping.payment_to_proto(payment))
