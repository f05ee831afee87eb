"""The notification service: e-mails users in reaction to events and records what it sent."""

DOMAIN = "notification.tessera.dev"
