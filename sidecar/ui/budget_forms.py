"""The dashboard's budget form (new and edit) as sent, checked by the budget API's own rules."""

from __future__ import annotations

import re

import msgspec

from sidecar import money
from sidecar.budgets import model
from sidecar.budgets.model import Budget, BudgetCreate, BudgetPatch
from sidecar.identity.model import rfc3339
from sidecar.ui.forms import first

_WHOLE = re.compile(r"\d{1,16}")


class BudgetForm(msgspec.Struct, kw_only=True):
    """Every field as text, as the form shows and sends it; `errors` by field name."""

    kind: str = "identity"
    target: str = ""
    period: str = "monthly"
    amount_usd: str = ""
    token_limit: str = ""
    requests_per_minute: str = ""
    alerts: str = ""  # comma-separated percents
    is_active: bool = True
    expires_at: str = ""
    errors: dict[str, str] = msgspec.field(default_factory=dict)

    @classmethod
    def from_fields(cls, fields: dict[str, list[str]]) -> BudgetForm:
        return cls(
            kind=first(fields, "kind"),
            target=first(fields, "target"),
            period=first(fields, "period"),
            amount_usd=first(fields, "amount_usd").strip(),
            token_limit=first(fields, "token_limit").strip(),
            requests_per_minute=first(fields, "requests_per_minute").strip(),
            alerts=first(fields, "alerts").strip(),
            is_active=first(fields, "is_active") == "on",
            expires_at=first(fields, "expires_at").strip(),
        )

    @classmethod
    def of(cls, budget: Budget) -> BudgetForm:
        return cls(
            kind=budget.scope.kind,
            target=budget.scope.target,
            period=budget.period,
            amount_usd="" if budget.amount_nanos is None else money.plain(budget.amount_nanos),
            token_limit="" if budget.token_limit is None else str(budget.token_limit),
            requests_per_minute=""
            if budget.requests_per_minute is None
            else str(budget.requests_per_minute),
            alerts=", ".join(str(t) for t in budget.thresholds),
            is_active=budget.is_active,
            expires_at="" if budget.expires_ms is None else rfc3339(budget.expires_ms),
        )

    def _fields(self) -> dict[str, object] | None:
        """The form as the API's JSON, or None with `errors` filled for what is not even a
        number."""
        errors: dict[str, str] = {}
        raw: dict[str, object] = {
            "period": self.period,
            "is_active": self.is_active,
            "expires_at": self.expires_at or None,
        }
        if self.amount_usd:
            if money.from_text(self.amount_usd.removeprefix("$")) is None:
                errors["amount_usd"] = "a number of dollars, such as 50 or 12.5"
            else:
                raw["amount_usd"] = float(self.amount_usd.removeprefix("$"))
        else:
            raw["amount_usd"] = None
        for name in ("token_limit", "requests_per_minute"):
            text = getattr(self, name).replace(",", "").replace("_", "")
            if text and not _WHOLE.fullmatch(text):
                errors[name] = "a whole number"
            raw[name] = int(text) if text and name not in errors else None
        percents = [p.strip().removesuffix("%") for p in self.alerts.split(",") if p.strip()]
        if any(not _WHOLE.fullmatch(p) for p in percents):
            errors["alerts"] = "whole percents, comma-separated, such as 80, 100"
        else:
            raw["alerts"] = [{"threshold_percent": int(p)} for p in percents]
        if self.period not in model.CALENDAR:
            errors["period"] = "one of " + ", ".join(model.CALENDAR)
        if errors:
            self.errors = errors
            return None
        return raw

    def refused(self, param: str | None, message: str) -> None:
        """What the budget API refused, shown beside its field."""
        field = (param or "amount_usd").split(".", 1)[0].split("[", 1)[0]
        self.errors = {"target" if field == "scope" else field: message}

    def to_create(self) -> BudgetCreate | None:
        """The form as a create request, or None with `errors` filled."""
        raw = self._fields()
        if self.kind not in model.KINDS:
            self.errors["kind"] = "identity, tag or api_key_owner"
            return None
        if raw is None:
            return None
        raw["scope"] = {"kind": self.kind, "target": self.target}
        return msgspec.convert(raw, BudgetCreate)

    def to_patch(self, budget: Budget) -> BudgetPatch | None:
        """The form as a patch of `budget` (its scope stays), or None with `errors` filled."""
        raw = self._fields()
        if raw is None:
            return None
        if budget.expires_ms is not None and self.expires_at == rfc3339(budget.expires_ms):
            del raw["expires_at"]  # unchanged, even if it has passed
        return msgspec.convert(raw, BudgetPatch)
