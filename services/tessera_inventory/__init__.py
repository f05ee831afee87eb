"""The inventory service: the product catalogue, stock levels and the reservations that hold stock for orders."""

DOMAIN = "inventory.tessera.dev"
