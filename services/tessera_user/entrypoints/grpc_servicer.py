"""UserService servicer: translates protobuf requests into commands and results back into protobuf."""

from __future__ import annotations

from collections.abc import Callable

from tessera.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

from tessera_user import mapping
from tessera_user.domain.model import Preferences
from tessera_user.service_layer import commands, handlers

_OUTPUT_ONLY = ("id", "status", "create_time", "update_time", "version")


class UserServicer(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork]) -> None:
        self.uow = uow_factory

    async def CreateUser(self, request: user_service_pb2.CreateUserRequest, context) -> user_service_pb2.CreateUserResponse:  # noqa: E501
        u = request.user
        set_fields = {fd.name for fd, _ in u.ListFields()}
        cmd = commands.CreateUser(
            email=u.email,
            display_name=u.display_name,
            profile=mapping.profile_from_proto(u.profile),
            preferences=mapping.preferences_from_proto(u.preferences) if u.HasField("preferences") else Preferences(),
            request_id=request.request_id,
            output_only_set=tuple(f for f in _OUTPUT_ONLY if f in set_fields),
        )
        user = await handlers.create_user(cmd, self.uow())
        return user_service_pb2.CreateUserResponse(user=mapping.user_to_proto(user))

    async def GetUser(self, request: user_service_pb2.GetUserRequest, context) -> user_service_pb2.GetUserResponse:
        user = await handlers.get_user(commands.GetUser(request.id), self.uow())
        return user_service_pb2.GetUserResponse(user=mapping.user_to_proto(user))

    async def ListUsers(self, request: user_service_pb2.ListUsersRequest, context) -> user_service_pb2.ListUsersResponse:  # noqa: E501
        status = mapping.status_from_proto(request.status)
        cmd = commands.ListUsers(page_size=request.page_size, page_token=request.page_token, status=status,
                                 unknown_status=request.status if status is None and request.status != 0 else None)
        users, token = await handlers.list_users(cmd, self.uow())
        return user_service_pb2.ListUsersResponse(users=[mapping.user_to_proto(u) for u in users],
                                                  next_page_token=token)

    async def UpdateUser(self, request: user_service_pb2.UpdateUserRequest, context) -> user_service_pb2.UpdateUserResponse:  # noqa: E501
        u = request.user
        cmd = commands.UpdateUser(
            user_id=u.id, paths=tuple(request.update_mask.paths), display_name=u.display_name,
            profile=mapping.profile_from_proto(u.profile),
            preferences=mapping.preferences_from_proto(u.preferences if u.HasField("preferences")
                                                       else user_pb2.Preferences()),
        )
        user = await handlers.update_user(cmd, self.uow())
        return user_service_pb2.UpdateUserResponse(user=mapping.user_to_proto(user))

    async def DeleteUser(self, request: user_service_pb2.DeleteUserRequest, context) -> user_service_pb2.DeleteUserResponse:  # noqa: E501
        await handlers.delete_user(commands.DeleteUser(request.id), self.uow())
        return user_service_pb2.DeleteUserResponse()

    async def DeactivateUser(self, request: user_service_pb2.DeactivateUserRequest, context) -> user_service_pb2.DeactivateUserResponse:  # noqa: E501
        user = await handlers.deactivate_user(commands.DeactivateUser(request.id, request.reason), self.uow())
        return user_service_pb2.DeactivateUserResponse(user=mapping.user_to_proto(user))

    async def ActivateUser(self, request: user_service_pb2.ActivateUserRequest, context) -> user_service_pb2.ActivateUserResponse:  # noqa: E501
        user = await handlers.activate_user(commands.ActivateUser(request.id), self.uow())
        return user_service_pb2.ActivateUserResponse(user=mapping.user_to_proto(user))
