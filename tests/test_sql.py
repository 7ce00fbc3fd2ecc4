"""processes/runtime/sql.py: the handlers' hand-written statements, on SQLite and Postgres.

Each test checks what the ORM would have given: exact 64-bit ints, converted
columns (JSON, SQLite's 0/1 booleans), pks set on insert, errors surfacing as
Django's.
"""

import pytest
from django.db import DatabaseError, IntegrityError, transaction

from processes.blueprints.state import Operation, TokenAccount, TokenOperation, TokenState
from processes.runtime import sql
from processes.runtime.ids import new_id
from processes.runtime.models import Message, Process

BIG = 2**63 - 1  # the largest value a BIGINT column holds


@pytest.fixture
def process(db):
    return Process.objects.create(id=new_id(), name=f"sql-{new_id()[:8]}", kind="token", owner=new_id())


def account(process, balance: int, locked: int = 0) -> TokenAccount:
    row = TokenAccount(process=process, account=new_id(), balance=balance, locked=locked)
    sql.insert_row(row)
    return row


def test_big_ints_near_2_63_round_trip_exactly(process):
    row = account(process, BIG, locked=BIG - 1)
    found = sql.select_one(TokenAccount, where="process_id = %s AND account = %s", params=[process.id, row.account])
    assert (found.balance, found.locked) == (BIG, BIG - 1)
    assert type(found.balance) is int

    changed = sql.update_rows(TokenAccount, set="balance = balance - %s", where="id = %s", params=[1, row.pk])
    assert changed == 1
    assert TokenAccount.objects.get(pk=row.pk).balance == BIG - 1  # the ORM reads what the statement wrote


def test_sum_is_an_exact_int(process):
    # 2**62 + 1 and 2**61 + 3 lose their low bits as floats: a float anywhere on the way shows.
    account(process, 2**62 + 1)
    account(process, 2**61 + 3)
    total = sql.select_sum(TokenAccount, column="balance", where="process_id = %s", params=[process.id])
    assert total == 2**62 + 2**61 + 4
    assert type(total) is int  # Postgres sums a bigint as numeric (a Decimal)


def test_sum_of_nothing_is_0(process):
    total = sql.select_sum(TokenAccount, column="balance", where="process_id = %s", params=[process.id])
    assert total == 0 and type(total) is int


def test_value_and_exists(process):
    row = account(process, 5)
    assert sql.select_value(TokenAccount, expression="COUNT(*)", where="process_id = %s", params=[process.id]) == 1
    assert sql.select_value(TokenAccount, expression="account", where="id = %s", params=[row.pk]) == row.account
    assert sql.select_value(TokenAccount, expression="account", where="id = %s", params=[row.pk + 1]) is None
    assert sql.exists(TokenAccount, where="process_id = %s AND balance >= %s", params=[process.id, 5])
    assert not sql.exists(TokenAccount, where="process_id = %s AND balance > %s", params=[process.id, 5])


def test_update_value_takes_a_counter_in_one_statement(process):
    row = account(process, BIG - 1)
    take = dict(set="balance = balance + 1", where="id = %s", returning="balance - 1")
    assert sql.update_value(TokenAccount, **take, params=[row.pk]) == BIG - 1  # the value before, exactly
    assert TokenAccount.objects.get(pk=row.pk).balance == BIG
    assert sql.update_value(TokenAccount, **take, params=[row.pk + 1]) is None  # no such row: nothing changed


def test_json_and_boolean_columns_come_back_as_the_orm_gives_them(process):
    tags = [["Action", "Transfer"], ["Quantity", "12"], ["Note", "ünïcode \" and 'quotes'"]]
    msg = Message(msg_id=new_id(), sender=new_id(), target=process.id, action="Transfer", tags=tags,
                  timestamp=1, reference=1, pushed_for=new_id(), handled=True, result={"n": BIG, "ok": [True, None]})
    assert sql.insert_row(msg)
    assert msg.seq is not None  # the auto pk (BigAutoField) is set from the database

    found = sql.select_one(Message, where="msg_id = %s", params=[msg.msg_id])
    orm = Message.objects.get(msg_id=msg.msg_id)
    assert found.tags == orm.tags == tags
    assert found.result == orm.result == {"n": BIG, "ok": [True, None]}
    assert found.handled is True and found.dead is False  # SQLite stores 0/1: converted like the ORM does
    assert found.get("Quantity") == "12"
    assert (found.seq, found.parent_id, found.slot) == (msg.seq, None, None)


def test_datetime_columns_come_back_aware_as_the_orm_gives_them(process):
    # SQLite stores a datetime as naive text: the backend's converter makes it aware (USE_TZ).
    found = sql.select_one(Process, where="id = %s", params=[process.id])
    assert found.created_at == Process.objects.get(pk=process.id).created_at
    assert found.created_at.tzinfo is not None


def test_insert_sets_the_auto_pk_and_the_row_is_then_saved_by_pk(process):
    op = Operation(process=process, op_id=new_id(), kind=Operation.DEPOSIT, user=new_id(), quantity=7,
                   step="checking", flow_id=new_id(), request_id=new_id(), created_at=1, updated_at=1)
    assert sql.insert_row(op)
    assert op.pk is not None and not op._state.adding
    assert Operation.objects.get(pk=op.pk).op_id == op.op_id

    op.step, op.expiring, op.error = "minting", True, "why"
    sql.save_row(op)
    saved = Operation.objects.get(pk=op.pk)
    assert (saved.step, saved.expiring, saved.error, saved.quantity) == ("minting", True, "why", 7)

    op.quantity = 9
    sql.update_columns(op, "quantity")
    assert Operation.objects.get(pk=op.pk).quantity == 9


def test_insert_keeps_a_given_pk(process):
    token = TokenState(process=process, name="T", ticker="T", total_supply=BIG)
    assert sql.insert_row(token)
    assert token.pk == process.id
    assert TokenState.objects.get(pk=process.id).total_supply == BIG
    found = sql.select_rows(TokenState, where="process_id = %s", params=[process.id])
    assert [t.total_supply for t in found] == [BIG]


def test_saving_a_row_that_is_gone_raises(process):
    row = account(process, 1)
    TokenAccount.objects.filter(pk=row.pk).delete()
    with pytest.raises(DatabaseError):
        sql.save_row(row)


def test_unless_exists_inserts_once_and_other_constraints_still_raise(process):
    def operation(quantity: int) -> TokenOperation:
        return TokenOperation(process=process, key="op-1", kind="mint", account=new_id(), quantity=quantity,
                              timestamp=1, message_id=new_id())

    assert sql.insert_row(operation(5), unless_exists=("process_id", "key"))
    again = operation(6)
    assert not sql.insert_row(again, unless_exists=("process_id", "key"))
    assert again.pk is None and again._state.adding
    assert list(TokenOperation.objects.filter(process=process).values_list("quantity", flat=True)) == [5]

    with pytest.raises(IntegrityError), transaction.atomic():  # quantity > 0 is still the database's rule
        sql.insert_row(TokenOperation(process=process, key="op-2", kind="mint", account=new_id(), quantity=0,
                                      timestamp=1, message_id=new_id()), unless_exists=("process_id", "key"))


def test_constraint_violations_surface_as_integrity_errors(process):
    row = account(process, 3)
    with pytest.raises(IntegrityError), transaction.atomic():  # balance >= 0
        sql.update_rows(TokenAccount, set="balance = balance - %s", where="id = %s", params=[4, row.pk])
    assert TokenAccount.objects.get(pk=row.pk).balance == 3


def test_rows_in_order_with_a_limit(process):
    for balance in (3, 1, 2):
        account(process, balance)
    rows = sql.select_rows(TokenAccount, where="process_id = %s", params=[process.id], order_by="balance DESC", limit=2)
    assert [r.balance for r in rows] == [3, 2]
    assert all(not r._state.adding for r in rows)


# --- writes that wait for no answer (sql.writing_later) --------------------------------------

def test_a_queued_write_is_seen_by_the_next_read_of_any_kind(process):
    op = Operation(process=process, op_id=new_id(), kind=Operation.DEPOSIT, user=new_id(), quantity=7,
                   step="checking", flow_id=new_id(), request_id=new_id(), created_at=1, updated_at=1)
    sql.insert_row(op)
    with transaction.atomic(), sql.writing_later():
        op.step = "minting"
        sql.save_row(op)
        sql.update_later(Operation, set="quantity = quantity + %s", where="id = %s", params=[2, op.pk], rows=1)
        # the ORM's read and sql.py's both go out after the queued writes
        assert Operation.objects.get(pk=op.pk).step == "minting"
        assert sql.select_value(Operation, expression="quantity", where="id = %s", params=[op.pk]) == 9
        op.quantity = 10
        sql.update_columns(op, "quantity")
        assert len(sql.take_later()) == 1  # still queued: no statement ran since
    assert Operation.objects.get(pk=op.pk).quantity == 9  # the taken write was the caller's to send; it was not


def test_outside_writing_later_the_same_calls_write_at_once(process):
    row = account(process, 1)
    sql.update_later(TokenAccount, set="balance = balance + %s", where="id = %s", params=[4, row.pk], rows=1)
    assert sql.take_later() == []
    assert TokenAccount.objects.get(pk=row.pk).balance == 5


def test_a_queued_write_to_a_row_that_is_gone_raises_when_it_runs(process):
    row = account(process, 1)
    TokenAccount.objects.filter(pk=row.pk).delete()
    with pytest.raises(DatabaseError, match="no row"), transaction.atomic(), sql.writing_later():
        sql.save_row(row)  # queued: nothing raised yet
        TokenAccount.objects.filter(process=process).count()  # it goes out here, and is checked


def test_a_queued_write_a_constraint_refuses_raises_integrity_error_at_the_next_statement(process):
    row = account(process, 3)
    with pytest.raises(IntegrityError), transaction.atomic(), sql.writing_later():
        sql.update_later(TokenAccount, set="balance = balance - %s", where="id = %s", params=[4, row.pk], rows=1)
        sql.select_one(TokenAccount, where="id = %s", params=[row.pk])
    assert TokenAccount.objects.get(pk=row.pk).balance == 3


def test_insert_or_add_creates_the_row_then_adds_to_it_exactly(process):
    address = new_id()

    def credit(quantity: int) -> None:
        sql.insert_or_add(TokenAccount(process=process, account=address, balance=quantity),
                          unique=("process_id", "account"), add=("balance",))

    credit(2**62)
    credit(2**61 + 3)
    (row,) = TokenAccount.objects.filter(process=process, account=address)
    assert (row.balance, row.locked) == (2**62 + 2**61 + 3, 0)
    with pytest.raises(IntegrityError), transaction.atomic():  # balance >= 0 still holds
        credit(-(2**63 - 1))


def test_what_is_still_queued_when_the_block_ends_is_written_then(process):
    row = account(process, 1)
    with transaction.atomic():
        with sql.writing_later():
            sql.update_later(TokenAccount, set="balance = balance + %s", where="id = %s", params=[6, row.pk], rows=1)
        # the block ended: sent, inside the transaction
        assert sql.select_value(TokenAccount, expression="balance", where="id = %s", params=[row.pk]) == 7
    assert TokenAccount.objects.get(pk=row.pk).balance == 7


def test_values_are_written_in_the_form_the_orm_writes_them(process):
    """sql.py passes plain values (str, int, bool, None) straight through; what it hands the
    driver must equal the ORM's get_db_prep_save, on each backend, for every kind of field."""
    from django.db import connection

    from processes.flows import Flow

    def orm_form(obj, fields) -> list:
        # add=False: an auto_now_add date keeps what sql._prepared's pre_save just set
        values = [f.get_db_prep_save(f.pre_save(obj, False), connection) for f in fields]
        return [plain(v) for v in values]

    def plain(value):  # psycopg's Int2/4/8 only type a literal for server-side binding (off): the int itself
        return int(value) if type(value).__name__ in ("Int2", "Int4", "Int8") else comparable(value)

    def comparable(value):  # a Jsonb (or any adapter) compares by its kind and what it wraps
        return (type(value).__name__, value.obj) if hasattr(value, "obj") else value

    message = Message(msg_id=new_id(), sender=new_id(), target=process.id, action="Transfer",
                      tags=[["Action", "Transfer"], ["Quantity", str(BIG)]], data="", timestamp=BIG, slot=None,
                      reference=3, pushed_for=new_id(), parent_id=None, status=Message.APPLIED, handled=True,
                      result={"messages": [], "changes": [{"change": f"+{BIG}"}]}, attempts=0, applied_at=BIG)
    operation = Operation(process=process, op_id=new_id(), kind=Operation.DEPOSIT, user=new_id(), quantity=BIG,
                          step="minting", reserved=True, expiring=False, flow_id=new_id(), request_id=new_id(),
                          created_at=1, updated_at=2)
    flow = Flow(id=new_id(), kind="deposit", user=new_id(), target=process.id, quantity=None)
    for obj in (message, operation, flow, TokenAccount(process=process, account=new_id(), balance=BIG)):
        fields = [f for f in obj._meta.concrete_fields if not f.primary_key or obj.pk is not None]
        ours = [comparable(v) for v in sql._prepared(obj, fields, add=True)]
        assert ours == orm_form(obj, fields), type(obj).__name__
