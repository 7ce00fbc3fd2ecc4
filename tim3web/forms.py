"""The pages' forms: every rule the user can break is said in a sentence, next to its field."""

from django import forms

from processes.actions import SCOPES
from processes.blueprints.coordinator import LIMIT_FIELDS
from processes.runtime.quantities import QuantityError, format_units, parse_token_amount

MODE_CHOICES = {
    "deposit": [("deposit", "Custody (v2)"), ("lock", "Lock collateral (v1)")],
    "redeem": [("deposit", "From custody (v2)"), ("lock", "Unlock collateral (v1)")],
}
SCOPE_CHOICES = [("mint", "Minting only (deposits)"), ("redeem", "Redemptions only"), ("all", "Everything")]


class SignupForm(forms.Form):
    username = forms.CharField(
        label="Username", max_length=150,
        help_text="Letters, digits and @ . + - _ only.",
        widget=forms.TextInput(attrs={"autocomplete": "username", "autocapitalize": "none", "spellcheck": "false"}),
    )
    password1 = forms.CharField(
        label="Password", strip=False, help_text="At least 8 characters, not a common password.",
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )
    password2 = forms.CharField(
        label="Confirm password", strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )

    def clean(self):
        data = super().clean()
        if data.get("password1") and data.get("password2") and data["password1"] != data["password2"]:
            self.add_error("password2", "The two passwords do not match.")
        return data


def amount_error(direction: str, quantity: int, mode: str, wallet: dict, limits: dict, paused: dict) -> str | None:
    """Why this amount cannot be deposited or redeemed now, or None.

    The same rules, with the same sentences, run in the browser (static/js/swap.js)."""
    if direction == "deposit":
        if paused.get("mint"):
            return f"Minting is paused{': ' + paused['reason'] if paused.get('reason') else ''}. Deposits are disabled."
        if quantity > wallet["usda_available"]:
            return f"That is more than your available balance of {format_units(wallet['usda_available'])} USDA."
        if limits:
            if quantity < limits["min_amount"]:
                return f"The minimum per operation is {format_units(limits['min_amount'])} TIM3."
            if quantity > limits["max_amount"]:
                return f"The maximum per operation is {format_units(limits['max_amount'])} TIM3."
            if quantity > limits["daily_left"]:
                return (f"Over your daily limit: {format_units(limits['daily_left'])} TIM3 left of "
                        f"{format_units(limits['user_daily_limit'])} in the last 24 hours.")
            if quantity > limits["hourly_left"]:
                return (f"Over the system's hourly limit: {format_units(limits['hourly_left'])} TIM3 can be minted "
                        "in the next hour.")
        return None
    if paused.get("redeem"):
        return f"Redemptions are paused{': ' + paused['reason'] if paused.get('reason') else ''}."
    if quantity > wallet["tim3"]:
        return f"That is more than your balance of {format_units(wallet['tim3'])} TIM3."
    if mode == "lock" and quantity > wallet["v1_position"]:
        return f"Your v1 collateral position backs only {format_units(wallet['v1_position'])} TIM3."
    if mode == "deposit" and limits and quantity > limits["payout_available"]:
        return f"The coordinator can pay out at most {format_units(limits['payout_available'])} USDA right now."
    return None


class AmountForm(forms.Form):
    """A deposit (USDA -> TIM3) or a redemption (TIM3 -> USDA), amount in whole tokens."""

    amount = forms.CharField(
        label="Amount", max_length=40,
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off", "placeholder": "0.00",
                                      "spellcheck": "false", "pattern": r"[0-9]*[.,]?[0-9]*"}),
    )
    mode = forms.ChoiceField(label="Mode", widget=forms.RadioSelect)

    def __init__(self, *args, direction: str, wallet: dict, limits: dict, paused: dict, **kwargs):
        kwargs.setdefault("prefix", direction)
        super().__init__(*args, **kwargs)
        self.direction, self.wallet, self.limits, self.paused = direction, wallet, limits, paused
        self.fields["mode"].choices = MODE_CHOICES[direction]
        self.fields["mode"].initial = "deposit"
        self.fields["amount"].label = "You pay" if direction == "deposit" else "You redeem"

    def clean_amount(self) -> int:
        try:
            return parse_token_amount(self.cleaned_data["amount"])
        except QuantityError as exc:
            raise forms.ValidationError(str(exc))

    def clean(self):
        data = super().clean()
        if "amount" in data and "mode" in data:
            reason = amount_error(self.direction, data["amount"], data["mode"], self.wallet, self.limits, self.paused)
            if reason:
                self.add_error("amount", reason)
        return data


class FaucetForm(forms.Form):
    amount = forms.CharField(label="USDA from the faucet", max_length=40, initial="1000",
                             widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
                             help_text="Test environment only: at most 1,000 USDA per request, 10,000 per day.")

    def clean_amount(self) -> int:
        try:
            return parse_token_amount(self.cleaned_data["amount"])
        except QuantityError as exc:
            raise forms.ValidationError(str(exc))


class PauseForm(forms.Form):
    scope = forms.ChoiceField(label="What to pause", choices=SCOPE_CHOICES, initial="mint", widget=forms.RadioSelect)
    reason = forms.CharField(label="Reason (shown to every user)", max_length=500,
                             widget=forms.Textarea(attrs={"rows": 2, "placeholder": "e.g. Investigating a custody discrepancy"}))

    def clean_scope(self):
        if self.cleaned_data["scope"] not in SCOPES:
            raise forms.ValidationError("Choose mint, redeem or all.")
        return self.cleaned_data["scope"]

    def clean_reason(self):
        reason = self.cleaned_data["reason"].strip()
        if not reason:
            raise forms.ValidationError("A pause needs a reason.")
        return reason


class ResumeForm(forms.Form):
    scope = forms.ChoiceField(label="What to resume", choices=SCOPE_CHOICES, initial="all", widget=forms.RadioSelect)


# Limits: how each coordinator limit is entered on the page.
LIMIT_INPUTS = {
    "MinAmount": ("Minimum per operation", "TIM3"),
    "MaxAmount": ("Maximum per operation", "TIM3"),
    "UserDailyLimit": ("Per user, rolling 24 h", "TIM3"),
    "SystemHourlyLimit": ("System, rolling hour", "TIM3"),
    "LargeOperationThreshold": ("Large operation from", "TIM3"),
    "CooldownSeconds": ("Cooldown after a large operation", "seconds"),
    "RateLimitPerMinute": ("Requests per wallet per minute", "per minute"),
    "PendingTimeout": ("Pending operation timeout", "seconds"),
}
assert set(LIMIT_INPUTS) == set(LIMIT_FIELDS), "every coordinator limit has an input"


class LimitsForm(forms.Form):
    """One field per ConfigType; only changed values are sent."""

    def __init__(self, *args, current: dict[str, int], **kwargs):
        super().__init__(*args, **kwargs)
        self.current = current
        for name, (label, unit) in LIMIT_INPUTS.items():
            if unit == "TIM3":
                initial = format_units(current[name]).replace(",", "")
            else:
                initial = str(current[name])
            self.fields[name] = forms.CharField(
                label=label, initial=initial, max_length=30, help_text=unit,
                widget=forms.TextInput(attrs={"inputmode": "decimal" if unit == "TIM3" else "numeric",
                                              "autocomplete": "off"}))

    def clean(self):
        data = super().clean()
        values = {}
        for name, (_label, unit) in LIMIT_INPUTS.items():
            text = (data.get(name) or "").strip()
            if not text:
                continue
            if unit == "TIM3":
                try:
                    values[name] = parse_token_amount(text)
                except QuantityError as exc:
                    self.add_error(name, str(exc))
            elif text.isascii() and text.isdigit() and int(text) > 0:  # str.isdigit() alone takes "²", which int() refuses
                values[name] = int(text)
            else:
                self.add_error(name, "Enter a whole number above zero.")
        if "MinAmount" in values and "MaxAmount" in values and values["MinAmount"] > values["MaxAmount"]:
            self.add_error("MinAmount", "The minimum cannot be above the maximum.")
        data["values"] = values
        return data

    def changes(self) -> dict[str, str]:
        """ConfigType -> Value (what `configure_coordinator` sends), only for changed limits."""
        return {name: str(value) for name, value in self.cleaned_data["values"].items() if value != self.current[name]}
