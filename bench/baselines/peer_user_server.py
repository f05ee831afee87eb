"""The peer baseline: GetUser served the way common demo services do it — a sync `grpc.server` on a thread pool,
a sync SQLAlchemy ORM session per call (psycopg2) — reading the same `users` table the user service wrote.

It answers the same response (every field of the User) so that the comparison is of the serving model alone.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Boolean, DateTime, Integer, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from tessera.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

_STATUS = {"ACTIVE": user_pb2.USER_STATUS_ACTIVE, "INACTIVE": user_pb2.USER_STATUS_INACTIVE}


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    email: Mapped[str] = mapped_column(String(254))
    display_name: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    given_name: Mapped[str] = mapped_column(String(100))
    family_name: Mapped[str] = mapped_column(String(100))
    phone_number: Mapped[str] = mapped_column(String(16))
    locale: Mapped[str] = mapped_column(String(35))
    time_zone: Mapped[str] = mapped_column(String(64))
    marketing_emails: Mapped[bool] = mapped_column(Boolean)
    order_update_emails: Mapped[bool] = mapped_column(Boolean)
    preferred_currency_code: Mapped[str] = mapped_column(String(3))
    create_time = mapped_column(DateTime(timezone=True))
    update_time = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer)


def _timestamp(value) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


class PeerUserServicer(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, session_factory: sessionmaker) -> None:
        self.sessions = session_factory

    def GetUser(self, request, context):
        with self.sessions() as session:
            row = session.get(UserRow, request.id)
            if row is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"user {request.id} not found")
            user = user_pb2.User(
                id=row.id, email=row.email, display_name=row.display_name, status=_STATUS[row.status],
                profile=user_pb2.Profile(given_name=row.given_name, family_name=row.family_name,
                                         phone_number=row.phone_number, locale=row.locale,
                                         time_zone=row.time_zone),
                preferences=user_pb2.Preferences(marketing_emails=row.marketing_emails,
                                                 order_update_emails=row.order_update_emails,
                                                 preferred_currency_code=row.preferred_currency_code),
                create_time=_timestamp(row.create_time), update_time=_timestamp(row.update_time),
                version=row.version)
        return user_service_pb2.GetUserResponse(user=user)


def serve(database_url: str, host: str, port: int, threads: int) -> None:
    engine = create_engine(database_url, pool_size=threads, max_overflow=threads, pool_pre_ping=False)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads))
    user_service_pb2_grpc.add_UserServiceServicer_to_server(
        PeerUserServicer(sessionmaker(bind=engine, expire_on_commit=False)), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    print(f"peer-user listening on {host}:{bound}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True, help="postgresql+psycopg2://user@host/db")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=10, help="thread pool size (demo services use 10)")
    args = parser.parse_args()
    serve(args.database_url, args.host, args.port, args.threads)


if __name__ == "__main__":
    main()
