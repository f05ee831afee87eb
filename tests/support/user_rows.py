"""A complete row of the user service's users table, for tests that write below the repository."""

from __future__ import annotations

from tessera_runtime.db import utcnow


def user_row(user_id: str) -> dict:
    now = utcnow()
    return {"id": user_id, "email": f"{user_id}@example.com", "email_key": f"{user_id}@example.com",
            "display_name": "Ada", "status": "ACTIVE", "given_name": "Ada", "family_name": "L", "phone_number": "",
            "locale": "en", "time_zone": "", "marketing_emails": True, "order_update_emails": False,
            "preferred_currency_code": "EUR", "create_time": now, "update_time": now, "version": 3}
