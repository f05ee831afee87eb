"""AnalyticsService servicer: translates protobuf requests into commands and results back into protobuf."""

from __future__ import annotations

from collections.abc import Callable

from tessera.analytics.v1 import analytics_service_pb2 as pb
from tessera.analytics.v1 import analytics_service_pb2_grpc as pb_grpc

from tessera_analytics import mapping
from tessera_analytics.service_layer import commands, handlers


class AnalyticsServicer(pb_grpc.AnalyticsServiceServicer):
    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork]) -> None:
        self.uow = uow_factory

    async def GetDailyMetrics(self, request: pb.GetDailyMetricsRequest, context) -> pb.GetDailyMetricsResponse:
        metrics = await handlers.get_daily_metrics(commands.GetDailyMetrics(request.date), self.uow())
        return pb.GetDailyMetricsResponse(metrics=mapping.daily_metrics_to_proto(metrics))

    async def ListDailyMetrics(self, request: pb.ListDailyMetricsRequest, context) -> pb.ListDailyMetricsResponse:
        cmd = commands.ListDailyMetrics(start_date=request.start_date, end_date=request.end_date,
                                        page_size=request.page_size, page_token=request.page_token)
        page, token = await handlers.list_daily_metrics(cmd, self.uow())
        return pb.ListDailyMetricsResponse(daily_metrics=[mapping.daily_metrics_to_proto(m) for m in page],
                                           next_page_token=token)

    async def GetMetricsSummary(self, request: pb.GetMetricsSummaryRequest,
                                context) -> pb.GetMetricsSummaryResponse:
        start, end, totals = await handlers.get_metrics_summary(
            commands.GetMetricsSummary(start_date=request.start_date, end_date=request.end_date), self.uow())
        return pb.GetMetricsSummaryResponse(summary=mapping.summary_to_proto(start, end, totals))
