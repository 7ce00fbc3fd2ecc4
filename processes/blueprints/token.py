"""The token blueprint (AO `blueprints/token.lua`), used by USDA and TIM3.

Info, Balance, Balances, Total-Supply, Transfer, Mint and Burn as in aos, plus
Lock/Unlock for v1 collateral, TokenStats and GetOperation. Quantities are
exact ints; a handler that raises changes nothing and its sender gets
`<Action>-Error` from the runtime.
"""

from django.db.models import Q, Sum

from processes.blueprints.state import FaucetGrant, TokenAccount, TokenMinter, TokenOperation, TokenState
from processes.runtime import sql
from processes.runtime.builtins import message_status
from processes.runtime.handlers import HandlerError, Handlers, own_state
from processes.runtime.ids import is_id
from processes.runtime.models import Message
from processes.runtime.quantities import MAX_SUPPLY, format_units, parse_quantity
from processes.runtime.registry import Blueprint, register_blueprint

handlers = Handlers()

# Requests a coordinator may burn a user's TIM3 for (SPEC §3: only inside that user's redemption).
REDEMPTION_ACTIONS = ("RedeemTIM3", "BurnTIM3")


# --- helpers --------------------------------------------------------------------

def state(ctx) -> TokenState:
    # change_supply updates this object as it updates the row
    return own_state(ctx, TokenState, missing="This token has not been spawned.")


def balance_of(ctx, address: str) -> TokenAccount | None:
    return sql.select_one(TokenAccount, where="process_id = %s AND account = %s", params=[ctx.process.id, address])


def is_minter(ctx, address: str) -> bool:
    return sql.exists(TokenMinter, where="process_id = %s AND address = %s", params=[ctx.process.id, address])


def require_address(value: str | None, name: str) -> str:
    if not value:
        raise HandlerError(f"{name} is required.")
    if not is_id(value):
        raise HandlerError(f"{name} must be a 43-character address.")
    return value


def require_owner(msg, ctx) -> None:
    if msg.sender != ctx.process.owner:
        raise HandlerError(f"Only the owner may {msg.action}.")


def credit(ctx, address: str, quantity: int) -> None:
    # One statement, whether the account exists or not, that needs no answer: inside a
    # drain it goes out with the next one (sql.writing_later).
    sql.insert_or_add(TokenAccount(process=ctx.process, account=address, balance=quantity),
                      unique=("process_id", "account"), add=("balance",))
    ctx.note(account=address, change=f"+{quantity}", ticker=state(ctx).ticker)


def debit(ctx, address: str, quantity: int) -> None:
    # Take it only if the unlocked balance covers it, in one statement; read the row
    # only to explain a refusal.
    taken = sql.update_rows(TokenAccount, set="balance = balance - %s",
                            where="process_id = %s AND account = %s AND balance >= locked + %s",
                            params=[quantity, ctx.process.id, address, quantity])
    if not taken:
        row = balance_of(ctx, address)
        available = (row.balance - row.locked) if row else 0
        raise HandlerError(
            f"Insufficient balance: {format_units(available)} available, {format_units(quantity)} needed."
        )
    ctx.note(account=address, change=f"-{quantity}", ticker=state(ctx).ticker)


def record_operation(ctx, *, key: str, kind: str, address: str, quantity: int) -> None:
    limit = TokenOperation._meta.get_field("key").max_length
    if len(key) > limit:  # Postgres would fail the insert, SQLite would store it: refuse alike
        raise HandlerError(f"Operation id {key[:40]!r}... is longer than {limit} characters.")
    operation = TokenOperation(process=ctx.process, key=key, kind=kind, account=address, quantity=quantity,
                               timestamp=ctx.now, message_id=ctx.msg.msg_id)
    if not sql.insert_row(operation, unless_exists=("process_id", "key")):
        raise HandlerError(f"Operation {key} was already applied; it is never applied twice.")


def change_supply(ctx, token: TokenState, delta: int) -> None:
    if token.total_supply + delta > MAX_SUPPLY:
        raise HandlerError("Mint would take the total supply above its maximum.")
    if delta > 0 and token.minted_total + delta > MAX_SUPPLY:  # burned_total <= minted_total: one check
        raise HandlerError("Mint would take the lifetime minted total above its maximum.")
    if delta > 0:
        sql.update_later(TokenState, set="total_supply = total_supply + %s, minted_total = minted_total + %s",
                         where="process_id = %s", params=[delta, delta, token.pk], rows=1)
    else:
        sql.update_later(TokenState, set="total_supply = total_supply + %s, burned_total = burned_total - %s",
                         where="process_id = %s", params=[delta, delta, token.pk], rows=1)
    token.total_supply += delta  # the memo stays what the database now holds
    if delta > 0:
        token.minted_total += delta
    else:
        token.burned_total -= delta


# --- spawn and configuration ------------------------------------------------------

@handlers.add("Spawn")
def spawn(msg, ctx):
    if TokenState.objects.filter(process=ctx.process).exists():
        raise HandlerError("This token is already spawned.")
    require_owner(msg, ctx)
    policy = msg.get("Mint-Policy", TokenState.MINT_OWNER)
    if policy not in ("faucet", "owner", "minters"):
        raise HandlerError("Mint-Policy must be faucet, owner or minters.")
    TokenState.objects.create(
        process=ctx.process,
        name=msg.get("Token-Name") or msg.get("Name") or ctx.process.name,
        ticker=msg.get("Ticker", "TKN"),
        logo=msg.get("Logo", ""),
        denomination=int(msg.get("Denomination", "6")),
        mint_policy=policy,
        faucet_per_request=int(msg.get("Faucet-Per-Request", "0")),
        faucet_per_window=int(msg.get("Faucet-Per-Window", "0")),
        faucet_window_ms=int(msg.get("Faucet-Window-Ms", "86400000")),
    )
    ctx.reply({"Action": "Spawned", "Process": ctx.process.id})


@handlers.add("SetLocker")
def set_locker(msg, ctx):
    require_owner(msg, ctx)
    locker = require_address(msg.get("Locker"), "Locker")
    token = state(ctx)  # written through the shared object (Context.memo)
    token.locker = locker
    token.save(update_fields=["locker"])
    ctx.reply({"Action": "SetLocker-Response", "Locker": locker})


@handlers.add("SetMintPolicy")
def set_mint_policy(msg, ctx):
    require_owner(msg, ctx)
    policy = msg.get("Mint-Policy")
    if policy not in ("faucet", "owner", "minters"):
        raise HandlerError("Mint-Policy must be faucet, owner or minters.")
    token = state(ctx)
    token.mint_policy = policy
    token.save(update_fields=["mint_policy"])
    ctx.reply({"Action": "SetMintPolicy-Response", "Mint-Policy": policy})


@handlers.add("AddMinter")
def add_minter(msg, ctx):
    require_owner(msg, ctx)
    minter = require_address(msg.get("Minter"), "Minter")
    TokenMinter.objects.get_or_create(process=ctx.process, address=minter)
    ctx.reply({"Action": "AddMinter-Response", "Minter": minter})


@handlers.add("RemoveMinter")
def remove_minter(msg, ctx):
    require_owner(msg, ctx)
    minter = require_address(msg.get("Minter"), "Minter")
    TokenMinter.objects.filter(process=ctx.process, address=minter).delete()
    ctx.reply({"Action": "RemoveMinter-Response", "Minter": minter})


# --- reads ------------------------------------------------------------------------

@handlers.add("Info")
def info(msg, ctx):
    token = state(ctx)
    ctx.reply({
        "Action": "Info-Response", "Name": token.name, "Ticker": token.ticker, "Logo": token.logo,
        "Denomination": token.denomination, "Mint-Policy": token.mint_policy,
    })


@handlers.add("Balance")
def balance(msg, ctx):
    token = state(ctx)
    address = msg.get("Recipient") or msg.get("Target") or msg.sender
    row = balance_of(ctx, address)
    amount = row.balance if row else 0
    ctx.reply({
        "Action": "Balance-Response", "Balance": amount, "Ticker": token.ticker, "Account": address,
        "Locked": row.locked if row else 0,
    }, data=str(amount))


@handlers.add("Balances")
def balances(msg, ctx):
    rows = TokenAccount.objects.filter(process=ctx.process, balance__gt=0).order_by("account")
    ctx.reply({"Action": "Balances-Response"}, data={r.account: str(r.balance) for r in rows})


@handlers.add("Total-Supply")
def total_supply(msg, ctx):
    token = state(ctx)
    ctx.reply({"Action": "Total-Supply", "Ticker": token.ticker}, data=str(token.total_supply))


@handlers.add("TokenStats")
def token_stats(msg, ctx):
    token = state(ctx)
    holders = TokenAccount.objects.filter(process=ctx.process, balance__gt=0).count()
    locked = TokenAccount.objects.filter(process=ctx.process).aggregate(s=Sum("locked"))["s"] or 0
    ctx.reply({"Action": "TokenStats-Response", "Ticker": token.ticker}, data={
        "total_supply": str(token.total_supply), "minted_total": str(token.minted_total),
        "burned_total": str(token.burned_total), "holders": holders, "locked": str(locked),
        "minters": sorted(TokenMinter.objects.filter(process=ctx.process).values_list("address", flat=True)),
    })


@handlers.add("GetOperation")
def get_operation(msg, ctx):
    key = msg.get("Operation-Id")
    if not key:
        raise HandlerError("Operation-Id is required.")
    # The operation and its compensations (`<id>:<X-Mint-Kind>`), not every key that merely starts alike.
    ops = TokenOperation.objects.filter(Q(key=key) | Q(key__startswith=f"{key}:"), process=ctx.process).order_by(
        "timestamp", "key")
    ctx.reply({"Action": "GetOperation-Response", "Operation-Id": key, "Found": "true" if ops else "false"}, data=[
        {"key": o.key, "kind": o.kind, "account": o.account, "quantity": str(o.quantity), "timestamp": o.timestamp}
        for o in ops
    ])


# --- moving tokens ------------------------------------------------------------------

@handlers.add("Transfer")
def transfer(msg, ctx):
    state(ctx)
    recipient = require_address(msg.get("Recipient"), "Recipient")
    quantity = parse_quantity(msg.get("Quantity"))
    debit(ctx, msg.sender, quantity)
    credit(ctx, recipient, quantity)
    x_tags = ctx.forwarded_x_tags()
    if not msg.get("Cast"):
        ctx.send(target=msg.sender, tags={
            "Action": "Debit-Notice", "Recipient": recipient, "Quantity": quantity, **x_tags,
        }, data=f"You transferred {format_units(quantity)} to {recipient}")
    # The Credit-Notice is always sent: a process that is paid must hear of it,
    # or the deposit it starts would be stranded.
    ctx.send(target=recipient, tags={
        "Action": "Credit-Notice", "Sender": msg.sender, "Quantity": quantity, **x_tags,
    }, data=f"You received {format_units(quantity)} from {msg.sender}")


def check_mint_allowed(msg, ctx, token: TokenState, quantity: int) -> str:
    """Who receives the mint, if the sender may mint at all (the authorization hook)."""
    if msg.sender == ctx.process.owner and token.mint_policy != TokenState.MINT_MINTERS:
        return require_address(msg.get("Recipient") or msg.sender, "Recipient")
    if token.mint_policy == TokenState.MINT_FAUCET:
        if msg.get("Recipient") not in (None, msg.sender):
            raise HandlerError("The faucet mints only to the wallet that asks.")
        if quantity > token.faucet_per_request:
            raise HandlerError(f"The faucet gives at most {format_units(token.faucet_per_request)} per request.")
        since = ctx.now - token.faucet_window_ms
        used = FaucetGrant.objects.filter(
            process=ctx.process, account=msg.sender, timestamp__gt=since
        ).aggregate(s=Sum("quantity"))["s"] or 0
        if used + quantity > token.faucet_per_window:
            raise HandlerError(
                f"Faucet limit reached: {format_units(used)} of {format_units(token.faucet_per_window)} "
                "used in the last 24 hours."
            )
        FaucetGrant.objects.create(process=ctx.process, account=msg.sender, quantity=quantity, timestamp=ctx.now)
        return msg.sender
    if token.mint_policy == TokenState.MINT_MINTERS:
        if not is_minter(ctx, msg.sender):
            raise HandlerError("Only an authorized minter may Mint.")
        return require_address(msg.get("Recipient"), "Recipient")
    raise HandlerError("Only the owner may Mint.")


@handlers.add("Mint")
def mint(msg, ctx):
    token = state(ctx)
    quantity = parse_quantity(msg.get("Quantity"))
    recipient = check_mint_allowed(msg, ctx, token, quantity)
    key = msg.get("X-Operation-Id") or msg.msg_id
    if msg.get("X-Mint-Kind"):  # compensation re-mints are separate operations
        key = f"{key}:{msg.get('X-Mint-Kind')}"
    record_operation(ctx, key=key, kind="mint", address=recipient, quantity=quantity)
    change_supply(ctx, token, quantity)
    credit(ctx, recipient, quantity)
    ctx.reply({"Action": "Mint-Response", "Recipient": recipient, "Quantity": quantity},
              data=f"Minted {format_units(quantity)} {token.ticker} to {recipient}")


def check_redemption(msg, ctx, user: str, quantity: int) -> str:
    """The user's own request that authorizes a minter to burn for them."""
    request_id = msg.get("Redemption-Request")
    if not request_id:
        raise HandlerError("Burning for another account needs the Redemption-Request it belongs to.")
    request = sql.select_one(Message, where="msg_id = %s", params=[request_id])
    if (
        request is None or request.sender != user or request.target != msg.sender
        or request.action not in REDEMPTION_ACTIONS or request.status != Message.APPLIED
    ):
        raise HandlerError("Redemption-Request is not this user's redemption sent to this minter.")
    if request.get("Quantity") != str(quantity):
        raise HandlerError("Burn quantity does not match the redemption request.")
    return request_id


@handlers.add("Burn")
def burn(msg, ctx):
    token = state(ctx)
    quantity = parse_quantity(msg.get("Quantity"))
    user = msg.get("User")
    if user and user != msg.sender:
        if not is_minter(ctx, msg.sender):
            raise HandlerError("Only an authorized minter may burn for a user, inside that user's redemption.")
        key = "burn:" + check_redemption(msg, ctx, user, quantity)
    else:
        user = msg.sender
        key = "burn:" + msg.msg_id
    record_operation(ctx, key=key, kind="burn", address=user, quantity=quantity)
    debit(ctx, user, quantity)
    change_supply(ctx, token, -quantity)
    ctx.reply({"Action": "Burn-Response", "User": user, "Quantity": quantity},
              data=f"Burned {format_units(quantity)} {token.ticker} of {user}")


# --- v1 collateral ----------------------------------------------------------------------

def require_locker(msg, ctx, token: TokenState) -> tuple[str, int]:
    if not token.locker or msg.sender != token.locker:
        raise HandlerError(f"Only the Lock Manager may {msg.action}.")
    return require_address(msg.get("User"), "User"), parse_quantity(msg.get("Quantity"))


@handlers.add("Lock")
def lock(msg, ctx):
    token = state(ctx)
    user, quantity = require_locker(msg, ctx, token)
    row = balance_of(ctx, user)
    available = (row.balance - row.locked) if row else 0
    if quantity > available:
        raise HandlerError(f"Insufficient unlocked balance: {format_units(available)} available to lock.")
    sql.update_rows(TokenAccount, set="locked = locked + %s", where="id = %s", params=[quantity, row.pk])
    ctx.note(account=user, locked=f"+{quantity}", ticker=token.ticker)
    ctx.reply({"Action": "Lock-Response", "User": user, "Quantity": quantity, "Locked": row.locked + quantity})


@handlers.add("Unlock")
def unlock(msg, ctx):
    token = state(ctx)
    user, quantity = require_locker(msg, ctx, token)
    row = balance_of(ctx, user)
    if row is None or row.locked < quantity:
        raise HandlerError("Cannot unlock more than is locked.")
    sql.update_rows(TokenAccount, set="locked = locked - %s", where="id = %s", params=[quantity, row.pk])
    ctx.note(account=user, locked=f"-{quantity}", ticker=token.ticker)
    ctx.reply({"Action": "Unlock-Response", "User": user, "Quantity": quantity, "Locked": row.locked - quantity})


handlers.add("Message-Status", handle=message_status)

blueprint = register_blueprint(Blueprint(
    kind="token", handlers=handlers,
    state_models=[TokenState, TokenAccount, TokenMinter, FaucetGrant, TokenOperation], own_state=TokenState,
))
