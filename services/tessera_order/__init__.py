"""The order service: customers' orders and the persisted CreateOrder saga across user, inventory and payment."""

DOMAIN = "order.tessera.dev"
