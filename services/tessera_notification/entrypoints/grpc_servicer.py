"""NotificationService servicer: translates protobuf requests into commands and results back into protobuf."""

from __future__ import annotations

from collections.abc import Callable

from tessera.notification.v1 import notification_service_pb2 as pb
from tessera.notification.v1 import notification_service_pb2_grpc as pb_grpc

from tessera_notification import mapping
from tessera_notification.service_layer import commands, handlers


class NotificationServicer(pb_grpc.NotificationServiceServicer):
    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork]) -> None:
        self.uow = uow_factory

    async def GetNotification(self, request: pb.GetNotificationRequest, context) -> pb.GetNotificationResponse:
        notification = await handlers.get_notification(commands.GetNotification(request.id), self.uow())
        return pb.GetNotificationResponse(notification=mapping.notification_to_proto(notification))

    async def ListNotifications(self, request: pb.ListNotificationsRequest, context) -> pb.ListNotificationsResponse:
        kind, unknown_kind = mapping.kind_from_proto(request.kind)
        status, unknown_status = mapping.status_from_proto(request.status)
        cmd = commands.ListNotifications(
            page_size=request.page_size, page_token=request.page_token, user_id=request.user_id,
            order_id=request.order_id, kind=kind, status=status, unknown_kind=unknown_kind,
            unknown_status=unknown_status)
        rows, token = await handlers.list_notifications(cmd, self.uow())
        return pb.ListNotificationsResponse(notifications=[mapping.notification_to_proto(n) for n in rows],
                                            next_page_token=token)
