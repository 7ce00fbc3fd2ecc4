"""Process state, one typed table per concern, each row owned by a process.

Database constraints back the money rules: balances and locks never negative,
a lock never above its balance, one row per account, one record per operation.
"""

from django.db import models
from django.db.models import F, Q

from processes.runtime.models import Process

__all__ = [
    "TokenState", "TokenAccount", "TokenMinter", "FaucetGrant", "TokenOperation",
    "CoordinatorState", "CoordinatorRole", "Operation", "CoordinatorPosition",
    "LockManagerState", "LockManagerClient", "CollateralLock", "LockRequest",
    "StateManagerState", "StateManagerClient", "Position",
]


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


# --- coordinator ----------------------------------------------------------------------

UNIT = 1_000_000


class CoordinatorState(models.Model):
    """Configuration, limits, pause flags and the coordinator's own books.

    The books: `custody` is USDA this coordinator holds for v2 deposits,
    `collateral` is USDA locked for its v1 mints, `outstanding` is TIM3 it has
    minted and not yet burned. Every mint must keep outstanding <= custody +
    collateral (proof of reserves, SPEC §4). `payouts_committed` is custody
    promised to redemptions in flight.
    """

    process = models.OneToOneField(Process, primary_key=True, on_delete=models.CASCADE, related_name="coordinator")
    usda_process = models.CharField(max_length=43, blank=True)
    tim3_process = models.CharField(max_length=43, blank=True)
    lock_manager_process = models.CharField(max_length=43, blank=True)
    state_manager_process = models.CharField(max_length=43, blank=True)
    scheduler = models.CharField(max_length=43, blank=True)  # the Cron wallet allowed to send CleanupExpired
    # circuit breaker and rate limit (SPEC §5 defaults)
    min_amount = models.BigIntegerField(default=1 * UNIT)
    max_amount = models.BigIntegerField(default=100_000 * UNIT)
    user_daily_limit = models.BigIntegerField(default=50_000 * UNIT)
    system_hourly_limit = models.BigIntegerField(default=10_000 * UNIT)
    large_threshold = models.BigIntegerField(default=1_000 * UNIT)
    cooldown_ms = models.BigIntegerField(default=300_000)
    rate_limit_per_minute = models.PositiveIntegerField(default=60)
    pending_timeout_ms = models.BigIntegerField(default=300_000)
    # emergency pause
    paused_mint = models.BooleanField(default=False)
    paused_redeem = models.BooleanField(default=False)
    risk_halt = models.BooleanField(default=False)  # set by a Risk-Alert: minting halted
    pause_reason = models.CharField(max_length=500, blank=True)
    paused_by = models.CharField(max_length=43, blank=True)
    paused_at = models.BigIntegerField(null=True, blank=True)
    # books
    custody = models.BigIntegerField(default=0)
    collateral = models.BigIntegerField(default=0)
    outstanding = models.BigIntegerField(default=0)
    payouts_committed = models.BigIntegerField(default=0)
    # The system hourly limit's rolling window, kept up to date instead of summed per
    # request (that sum grew with the hour's traffic): `hour_window_minted` is the
    # quantity of reserved mint operations created after `hour_window_since` (ms).
    hour_window_since = models.BigIntegerField(default=0)
    hour_window_minted = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(custody__gte=0), name="coordinator_custody_not_negative"),
            models.CheckConstraint(condition=Q(collateral__gte=0), name="coordinator_collateral_not_negative"),
            models.CheckConstraint(condition=Q(outstanding__gte=0), name="coordinator_outstanding_not_negative"),
            models.CheckConstraint(
                condition=Q(payouts_committed__gte=0) & Q(payouts_committed__lte=F("custody")),
                name="coordinator_payouts_within_custody",
            ),
            models.CheckConstraint(
                condition=Q(outstanding__lte=F("custody") + F("collateral")), name="coordinator_fully_backed"
            ),
            models.CheckConstraint(condition=Q(hour_window_minted__gte=0), name="coordinator_window_not_negative"),
        ]


class CoordinatorRole(models.Model):
    ADMIN, GUARDIAN = "admin", "guardian"

    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="coordinator_roles")
    address = models.CharField(max_length=43)
    role = models.CharField(max_length=8)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["process", "address", "role"], name="coordinator_role_unique"),
            models.CheckConstraint(condition=Q(role__in=["admin", "guardian"]), name="coordinator_role_known"),
        ]


class Operation(models.Model):
    """One user request, carried by its id on every hop of its flow."""

    DEPOSIT, REDEEM, LOCK_MINT, BURN = "deposit", "redeem", "lock_mint", "burn"
    MINT_KINDS = (DEPOSIT, LOCK_MINT)
    PENDING, COMPLETED, REFUNDED, FAILED = "pending", "completed", "refunded", "failed"

    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="operations")
    op_id = models.CharField(max_length=43)
    kind = models.CharField(max_length=10)
    user = models.CharField(max_length=43)
    quantity = models.BigIntegerField()
    status = models.CharField(max_length=10, default=PENDING)
    step = models.CharField(max_length=16)  # what it waits for: minting, burning, paying, locking, ...
    awaiting = models.CharField(max_length=43, blank=True)  # id of the message whose answer it waits for
    expiring = models.BooleanField(default=False)  # timed out; asked the awaited process what became of it
    reserved = models.BooleanField(default=False)  # counts against the mint limits (accepted, not failed)
    flow_id = models.CharField(max_length=43)  # the user's first message (Pushed-For)
    request_id = models.CharField(max_length=43)  # the message that opened the operation
    error = models.TextField(blank=True)
    created_at = models.BigIntegerField()  # message time, ms
    updated_at = models.BigIntegerField()

    class Meta:
        ordering = ["created_at", "op_id"]
        constraints = [
            models.UniqueConstraint(fields=["process", "op_id"], name="operation_unique"),
            models.CheckConstraint(condition=Q(quantity__gt=0), name="operation_quantity_positive"),
            models.CheckConstraint(
                condition=Q(status__in=["pending", "completed", "refunded", "failed"]), name="operation_status_known"
            ),
        ]
        indexes = [
            models.Index(fields=["process", "user", "created_at"], name="operation_user_window"),
            models.Index(fields=["process", "status", "updated_at"], name="operation_pending"),
            models.Index(fields=["process", "created_at"], name="operation_window"),
        ]


class CoordinatorPosition(models.Model):
    """v1 collateral this coordinator locked for a user (what BurnTIM3 may unlock)."""

    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="coordinator_positions")
    user = models.CharField(max_length=43)
    locked = models.BigIntegerField(default=0)
    committed = models.BigIntegerField(default=0)  # part of locked promised to burns in flight

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["process", "user"], name="coordinator_position_unique"),
            models.CheckConstraint(
                condition=Q(committed__gte=0) & Q(committed__lte=F("locked")), name="coordinator_position_committed_ok"
            ),
        ]


# --- lock manager ---------------------------------------------------------------------

class LockManagerState(models.Model):
    process = models.OneToOneField(Process, primary_key=True, on_delete=models.CASCADE, related_name="lock_manager")
    usda_process = models.CharField(max_length=43, blank=True)
    total_locked = models.BigIntegerField(default=0)
    locks_count = models.BigIntegerField(default=0)
    unlocks_count = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(total_locked__gte=0), name="lock_manager_total_not_negative")]


class LockManagerClient(models.Model):
    """A coordinator allowed to lock and unlock collateral."""

    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="lock_manager_clients")
    address = models.CharField(max_length=43)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["process", "address"], name="lock_manager_client_unique")]


class CollateralLock(models.Model):
    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="collateral_locks")
    user = models.CharField(max_length=43)
    locked = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["process", "user"], name="collateral_lock_unique"),
            models.CheckConstraint(condition=Q(locked__gte=0), name="collateral_lock_not_negative"),
        ]


class LockRequest(models.Model):
    """A lock or unlock relayed to USDA, so its answer goes back to the right coordinator."""

    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="lock_requests")
    op_id = models.CharField(max_length=43)
    kind = models.CharField(max_length=8)  # lock | unlock
    user = models.CharField(max_length=43)
    quantity = models.BigIntegerField()
    requester = models.CharField(max_length=43)
    status = models.CharField(max_length=8, default="pending")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["process", "op_id", "kind"], name="lock_request_unique")]


# --- state manager ----------------------------------------------------------------------

class StateManagerState(models.Model):
    process = models.OneToOneField(Process, primary_key=True, on_delete=models.CASCADE, related_name="state_manager")
    target_ratio_bp = models.PositiveIntegerField(default=10_000)  # global collateral ratio target, basis points
    updates_count = models.BigIntegerField(default=0)


class StateManagerClient(models.Model):
    """A coordinator allowed to UpdatePosition (and told of risk)."""

    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="state_manager_clients")
    address = models.CharField(max_length=43)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["process", "address"], name="state_manager_client_unique")]


class Position(models.Model):
    process = models.ForeignKey(Process, on_delete=models.CASCADE, related_name="positions")
    user = models.CharField(max_length=43)
    collateral_type = models.CharField(max_length=16)  # USDA-custody (v2) | USDA-locked (v1)
    tim3 = models.BigIntegerField(default=0)
    collateral = models.BigIntegerField(default=0)
    updated_at = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["user", "collateral_type"]
        constraints = [
            models.UniqueConstraint(fields=["process", "user", "collateral_type"], name="position_unique"),
            models.CheckConstraint(condition=Q(tim3__gte=0), name="position_tim3_not_negative"),
            models.CheckConstraint(condition=Q(collateral__gte=0), name="position_collateral_not_negative"),
        ]
