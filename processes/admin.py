"""Django admin for the engine: everything read-only.

Process state changes only by messages (that is what keeps every invariant and
the replayable log true), so the admin can look but never edit, add or delete.
Operators act through the Operations page, which sends messages.
"""

from django.contrib import admin

from processes.blueprints import state
from processes.flows import Flow
from processes.runtime.models import Message, Process, Wallet


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Process)
class ProcessAdmin(ReadOnlyAdmin):
    list_display = ("name", "kind", "version", "active", "next_slot", "id", "created_at")
    list_filter = ("kind", "active")
    search_fields = ("name", "id")


@admin.register(Wallet)
class WalletAdmin(ReadOnlyAdmin):
    list_display = ("label", "address", "created_at")
    search_fields = ("label", "address")


@admin.register(Message)
class MessageAdmin(ReadOnlyAdmin):
    list_display = ("seq", "action", "sender", "target", "slot", "status", "dead", "timestamp")
    list_filter = ("status", "dead", "handled")
    search_fields = ("msg_id", "action", "sender", "target", "pushed_for")
    list_select_related = False
    show_full_result_count = False


@admin.register(Flow)
class FlowAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "mode", "status", "quantity", "user", "created_at", "ended_at")
    list_filter = ("kind", "mode", "status")
    search_fields = ("id", "user")
    date_hierarchy = "created_at"


@admin.register(state.TokenState)
class TokenStateAdmin(ReadOnlyAdmin):
    list_display = ("process", "ticker", "total_supply", "minted_total", "burned_total", "mint_policy")


@admin.register(state.TokenAccount)
class TokenAccountAdmin(ReadOnlyAdmin):
    list_display = ("process", "account", "balance", "locked")
    list_filter = ("process",)
    search_fields = ("account",)


@admin.register(state.TokenOperation)
class TokenOperationAdmin(ReadOnlyAdmin):
    list_display = ("process", "kind", "account", "quantity", "key", "timestamp")
    list_filter = ("process", "kind")
    search_fields = ("account", "key", "message_id")


@admin.register(state.CoordinatorState)
class CoordinatorStateAdmin(ReadOnlyAdmin):
    list_display = ("process", "paused_mint", "paused_redeem", "risk_halt", "custody", "collateral", "outstanding")


@admin.register(state.Operation)
class OperationAdmin(ReadOnlyAdmin):
    list_display = ("op_id", "process", "kind", "user", "quantity", "status", "step", "created_at")
    list_filter = ("process", "kind", "status")
    search_fields = ("op_id", "user", "flow_id")


@admin.register(state.CoordinatorPosition)
class CoordinatorPositionAdmin(ReadOnlyAdmin):
    list_display = ("process", "user", "locked", "committed")
    search_fields = ("user",)


@admin.register(state.CoordinatorRole)
class CoordinatorRoleAdmin(ReadOnlyAdmin):
    list_display = ("process", "role", "address")
    list_filter = ("role",)


@admin.register(state.LockManagerState)
class LockManagerStateAdmin(ReadOnlyAdmin):
    list_display = ("process", "total_locked", "locks_count", "unlocks_count")


@admin.register(state.CollateralLock)
class CollateralLockAdmin(ReadOnlyAdmin):
    list_display = ("process", "user", "locked")
    search_fields = ("user",)


@admin.register(state.StateManagerState)
class StateManagerStateAdmin(ReadOnlyAdmin):
    list_display = ("process", "target_ratio_bp", "updates_count")


@admin.register(state.Position)
class PositionAdmin(ReadOnlyAdmin):
    list_display = ("process", "user", "collateral_type", "tim3", "collateral", "updated_at")
    list_filter = ("collateral_type",)
    search_fields = ("user",)


for model in (state.TokenMinter, state.FaucetGrant, state.LockManagerClient, state.LockRequest,
              state.StateManagerClient):
    admin.site.register(model, ReadOnlyAdmin)
