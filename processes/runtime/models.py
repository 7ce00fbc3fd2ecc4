"""The engine's tables: processes, wallets and the message log (the mailbox).

A message row is inserted `pending` in the same transaction as the sender's
state change (transactional outbox) and becomes `applied` or `failed`, with
its slot, in the same transaction as the target's state change. That shared
transaction is what makes every message apply exactly once.
"""

from django.db import models
from django.db.models import Q

ID_LENGTH = 43  # base64url of 32 bytes, no padding: the AO id length


class Process(models.Model):
    id = models.CharField(primary_key=True, max_length=ID_LENGTH)
    name = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=32)  # which blueprint handles its messages
    version = models.PositiveIntegerField(default=1)
    active = models.BooleanField(default=True)
    owner = models.CharField(max_length=ID_LENGTH)  # wallet allowed to configure it
    next_slot = models.BigIntegerField(default=1)
    next_reference = models.BigIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "name"]
        permissions = [("pause_system", "Can pause the TIM3 system (guardian)")]
        constraints = [
            models.CheckConstraint(condition=Q(next_slot__gte=1), name="process_next_slot_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id[:8]}…)"


class Wallet(models.Model):
    """A user or operator address: sends messages, never handles them."""

    address = models.CharField(primary_key=True, max_length=ID_LENGTH)
    label = models.CharField(max_length=150, blank=True)
    next_reference = models.BigIntegerField(default=1)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.label or self.address


class Message(models.Model):
    PENDING, APPLIED, FAILED = "pending", "applied", "failed"
    STATUSES = [(PENDING, "pending"), (APPLIED, "applied"), (FAILED, "failed")]

    # `seq` is arrival order: the order a mailbox is drained in.
    seq = models.BigAutoField(primary_key=True)
    msg_id = models.CharField(max_length=ID_LENGTH, unique=True)
    sender = models.CharField(max_length=ID_LENGTH, db_index=True)  # AO "From"
    target = models.CharField(max_length=ID_LENGTH)
    action = models.CharField(max_length=64, blank=True, db_index=True)
    tags = models.JSONField(default=list)  # ordered [[name, value], ...]
    data = models.TextField(blank=True, default="")
    timestamp = models.BigIntegerField()  # ms, set when scheduled
    slot = models.BigIntegerField(null=True, blank=True)  # gap-free per target, from 1
    reference = models.BigIntegerField()  # the sender's own counter
    x_reference = models.CharField(max_length=32, blank=True, default="")
    pushed_for = models.CharField(max_length=ID_LENGTH, db_index=True)  # root of the cascade
    parent = models.ForeignKey(
        "self", to_field="msg_id", null=True, blank=True, on_delete=models.PROTECT, related_name="children"
    )
    status = models.CharField(max_length=8, choices=STATUSES, default=PENDING)
    handled = models.BooleanField(default=False)  # False after apply: no handler matched (inbox)
    error = models.TextField(blank=True, default="")
    result = models.JSONField(default=dict, blank=True)  # what applying it produced
    attempts = models.PositiveIntegerField(default=0)
    dead = models.BooleanField(default=False)  # gave up after repeated infrastructure failures
    applied_at = models.BigIntegerField(null=True, blank=True)  # wall clock ms, for lag figures

    class Meta:
        ordering = ["seq"]
        constraints = [
            models.UniqueConstraint(fields=["target", "slot"], name="message_unique_slot_per_target"),
            models.CheckConstraint(condition=Q(slot__isnull=True) | Q(slot__gte=1), name="message_slot_positive"),
            models.CheckConstraint(
                condition=Q(status="pending", slot__isnull=True) | ~Q(status="pending"),
                name="message_pending_has_no_slot",
            ),
        ]
        # (target, slot) lookups use message_unique_slot_per_target's index. Every index here is
        # written twice per message (inserted pending, then applied with its slot: not a HOT update).
        indexes = [
            models.Index(fields=["target", "seq"], condition=Q(status="pending"), name="message_pending_by_target"),
        ]

    def __str__(self) -> str:
        return f"{self.action or '?'} {self.msg_id[:8]}… → {self.target[:8]}…"

    # --- AO-style accessors used by handlers ---------------------------------
    @property
    def tag_dict(self) -> dict[str, str]:
        return {name: value for name, value in self.tags}

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value of tag `name` (AO `msg.Tags[name]`)."""
        for tag_name, value in self.tags:
            if tag_name == name:
                return value
        return default

    @property
    def is_root(self) -> bool:
        return self.pushed_for == self.msg_id
