"""Fewer indexes on the tables every hop writes.

- `message_target_slot` duplicated the index of the (target, slot) unique constraint.
- On Postgres, Django adds a `..._like` index (varchar_pattern_ops) next to every
  indexed or unique CharField, for `LIKE 'prefix%'` queries. The app runs none on
  these tables (ids and addresses are matched whole), and each costs an index
  insertion per written row: processes_message had 14 indexes, 5 of them these.
  Equality lookups use the plain index beside each. Not recreated on reverse: they
  are only ever an optimisation for queries nobody sends; Django drops such indexes
  with IF EXISTS when it alters a field, so their absence is safe.
"""

from django.db import migrations

TABLES = [
    "processes_message", "processes_flow", "processes_operation", "processes_tokenaccount",
    "processes_tokenoperation", "processes_position", "processes_coordinatorposition", "processes_wallet",
    "processes_process", "processes_faucetgrant",
]


def drop_pattern_indexes(apps, schema_editor):
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return  # only Postgres gets them
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = ANY(%s) AND indexname LIKE %s",
            [TABLES, r"%\_like"],
        )
        for (name,) in cursor.fetchall():
            cursor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")


class Migration(migrations.Migration):

    dependencies = [
        ("processes", "0003_mint_window"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="message",
            name="message_target_slot",
        ),
        migrations.RunPython(drop_pattern_indexes, migrations.RunPython.noop),
    ]
