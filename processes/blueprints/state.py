"""Process state, one typed table per concern, each row owned by a process.

Database constraints back the money rules: balances and locks never negative,
a lock never above its balance, one row per account, one record per operation.
"""

from django.db import models
from django.db.models import F, Q

from processes.runtime.models import Process

__all__ = ["TokenState", "TokenAccount", "TokenMinter", "FaucetGrant", "TokenOperation"]


class TokenState(models.Model):
    MINT_FAUCET, MINT_OWNER, MINT_MINTERS = "faucet", "owner", "minters"

    process = models.OneToOneField(Process, primary_key=True, on_delete=models.CASCADE, related_name="token")
    name = models.CharField(max_length=64)
    ticker = models.CharField(max_length=16)
    logo = models.CharField(max_length=64, blank=True)
    denomination = models.PositiveSmallIntegerField(default=6)
    total_supply = models.BigIntegerField(default=0)
    minted_total = models.BigIntegerField(default=0)
    burned_total = models.BigIntegerField(default=0)
    mint_policy = models.CharField(max_length=8, default=MINT_OWNER)
    locker = models.CharField(max_length=43, blank=True)  # the one process allowed to Lock/Unlock
    faucet_per_request = models.BigIntegerField(default=0)
    faucet_per_window = models.BigIntegerField(default=0)
    faucet_window_ms = models.BigIntegerField(default=86_400_000)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(total_supply__gte=0), name="token_supply_not_negative"),
            models.CheckConstraint(
                condition=Q(mint_policy__in=["faucet", "owner", "minters"]), name="token_mint_policy_known"
            ),
        ]


class TokenAccount(models.Model):
    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="token_accounts")
    account = models.CharField(max_length=43)
    balance = models.BigIntegerField(default=0)
    locked = models.BigIntegerField(default=0)  # part of balance held as v1 collateral

    class Meta:
        ordering = ["account"]
        constraints = [
            models.UniqueConstraint(fields=["process", "account"], name="token_account_unique"),
            models.CheckConstraint(condition=Q(balance__gte=0), name="token_balance_not_negative"),
            models.CheckConstraint(condition=Q(locked__gte=0), name="token_locked_not_negative"),
            models.CheckConstraint(condition=Q(locked__lte=F("balance")), name="token_locked_within_balance"),
        ]


class TokenMinter(models.Model):
    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="token_minters")
    address = models.CharField(max_length=43)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["process", "address"], name="token_minter_unique")]


class FaucetGrant(models.Model):
    """Faucet mints, for the rolling per-wallet cap."""

    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="faucet_grants")
    account = models.CharField(max_length=43)
    quantity = models.BigIntegerField()
    timestamp = models.BigIntegerField()

    class Meta:
        indexes = [models.Index(fields=["process", "account", "timestamp"], name="faucet_grant_window")]
        constraints = [models.CheckConstraint(condition=Q(quantity__gt=0), name="faucet_grant_positive")]


class TokenOperation(models.Model):
    """A mint or burn, keyed so the same operation can never happen twice."""

    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="token_operations")
    key = models.CharField(max_length=120)
    kind = models.CharField(max_length=8)  # mint | burn
    account = models.CharField(max_length=43)
    quantity = models.BigIntegerField()
    timestamp = models.BigIntegerField()
    message_id = models.CharField(max_length=43)

    class Meta:
        ordering = ["timestamp", "key"]
        constraints = [
            models.UniqueConstraint(fields=["process", "key"], name="token_operation_unique"),
            models.CheckConstraint(condition=Q(quantity__gt=0), name="token_operation_positive"),
        ]
