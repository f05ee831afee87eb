"""The analytics service: business metrics per UTC day, counted from the domain events."""

DOMAIN = "analytics.tessera.dev"
