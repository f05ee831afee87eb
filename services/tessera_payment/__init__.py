"""The payment service: charging customers for orders through a payment processor, and refunding them."""

DOMAIN = "payment.tessera.dev"
