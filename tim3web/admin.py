"""Django admin for the web layer. Accounts can be looked at (and users managed in
Auth); wallet addresses, token hashes, idempotency records and the audit log are
read-only: changing them would break who-owns-what or the audit trail."""

from django.contrib import admin

from tim3web.models import Account, ApiToken, AuditEntry, IdempotencyRecord


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ("user", "address", "created_at")
    search_fields = ("user__username", "address")
    list_select_related = ("user",)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Tokens can be revoked (deleted); never read or edited (only a hash is stored)."""

    list_display = ("user", "created_at", "expires_at", "last_used_at")
    readonly_fields = ("user", "token_hash", "created_at", "expires_at", "last_used_at")
    list_select_related = ("user",)

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(IdempotencyRecord)
class IdempotencyRecordAdmin(ReadOnlyAdmin):
    list_display = ("user", "key", "method", "path", "status_code", "created_at")
    search_fields = ("key", "user__username")


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ("created_at", "actor", "action")
    list_filter = ("action",)
    search_fields = ("action", "actor__username")
    date_hierarchy = "created_at"


admin.site.site_header = "TIM3 administration"
admin.site.site_title = "TIM3 admin"
admin.site.index_title = "Records (read-only where editing would break invariants)"
