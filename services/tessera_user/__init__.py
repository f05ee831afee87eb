"""The user service: customer accounts, profile and preferences."""

DOMAIN = "user.tessera.dev"
