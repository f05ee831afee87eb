"""Load balancers over the healthy instances of one service: round robin and smooth weighted round robin."""

from __future__ import annotations

from collections.abc import Sequence

from tessera_runtime.discovery.model import ServiceInstance


class RoundRobinLoadBalancer:
    """Each healthy instance in turn, whatever its weight."""

    def __init__(self) -> None:
        self._instances: tuple[ServiceInstance, ...] = ()
        self._next = 0

    def update(self, instances: Sequence[ServiceInstance]) -> None:
        """The instances to pick from now (the healthy ones), in a stable order."""
        self._instances = tuple(instances)
        if self._instances:
            self._next %= len(self._instances)
        else:
            self._next = 0

    def pick(self) -> ServiceInstance | None:
        if not self._instances:
            return None
        instance = self._instances[self._next]
        self._next = (self._next + 1) % len(self._instances)
        return instance


class WeightedRoundRobinLoadBalancer:
    """Smooth weighted round robin, as nginx's upstream module does it: on each pick every instance's current
    weight grows by its weight, the one with the largest current weight is picked and loses the sum of the weights.
    Over any run of sum-of-weights picks each instance is picked exactly its weight's number of times, and the
    picks are interleaved (weights 5, 1, 1 give a a b a c a a, never a a a a a b c), so no instance gets a burst.

    When the set of instances changes, the ones that stay keep their current weight and new ones start at 0, so a
    health flap does not reset the rotation of the others."""

    def __init__(self) -> None:
        self._instances: tuple[ServiceInstance, ...] = ()
        self._current: dict[str, int] = {}
        self._total = 0

    def update(self, instances: Sequence[ServiceInstance]) -> None:
        self._instances = tuple(instances)
        self._current = {i.address: self._current.get(i.address, 0) for i in self._instances}
        self._total = sum(i.weight for i in self._instances)

    def pick(self) -> ServiceInstance | None:
        if not self._instances:
            return None
        current = self._current
        best: ServiceInstance | None = None
        best_weight = 0
        for instance in self._instances:
            weight = current[instance.address] + instance.weight
            current[instance.address] = weight
            if best is None or weight > best_weight:
                best, best_weight = instance, weight
        assert best is not None
        current[best.address] -= self._total
        return best


LoadBalancer = RoundRobinLoadBalancer | WeightedRoundRobinLoadBalancer

BALANCERS = {"round_robin": RoundRobinLoadBalancer, "weighted_round_robin": WeightedRoundRobinLoadBalancer}
