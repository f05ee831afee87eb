"""The scenarios, by the number the benchmark issue gives them; each returns a ScenarioResult."""

from __future__ import annotations

from collections.abc import Callable

from bench.harness import Run, ScenarioResult
from bench.scenarios import gateway, grpc_paths, relay, saga, scaling

Scenario = Callable[[Run], ScenarioResult]

SCENARIOS: dict[str, Scenario] = {
    "1": grpc_paths.get_user_vs_echo,
    "2": grpc_paths.create_user_vs_echo,
    "3": gateway.rest_vs_grpc,
    "4": grpc_paths.get_user_vs_peer,
    "5": saga.saga_vs_participants,
    "6": relay.relay_vs_pika,
    "7": scaling.two_workers_vs_one,
}
